"""SASRec (Kang & McAuley, 2018): causal self-attention over item embeddings, pre-LayerNorm blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SASRecConfig


class Dropout(nn.Dropout):
    """nn.Dropout with its mask drawn as uniforms compared with p: CPU bernoulli_ is several times slower, and dropout
    masks were a quarter of a SASRec training step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * torch.rand_like(x).ge_(self.p).mul_(1 / (1 - self.p))


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.GELU(), Dropout(dropout), nn.Linear(d, d))
        self.drop = Dropout(dropout)
        self.attn_drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(b, l, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if self.training and self.attn_drop.p > 0:  # SDPA would draw its attention dropout with bernoulli_
            att = (q @ k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5).masked_fill_(~mask, float("-inf"))
            a = self.attn_drop(att.softmax(-1)) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, l, d)))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(nn.Module):
    """Scores all items for the next position; positions count back from the latest item, so padding is invisible."""

    def __init__(self, n_items: int, cfg: SASRecConfig):
        super().__init__()
        if cfg.hidden % cfg.n_heads:
            raise ValueError(f"crm.hidden ({cfg.hidden}) must be divisible by crm.n_heads ({cfg.n_heads})")
        self.n_items = n_items
        self.max_len = cfg.max_len
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.hidden, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.out_emb = None if cfg.tie_weights else nn.Embedding(n_items + 1, cfg.hidden)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def output_weight(self) -> torch.Tensor:
        return (self.out_emb or self.item_emb).weight

    def hidden(self, histories: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded ids -> [B, L, d]; position t only sees items at positions <= t."""
        b, l = histories.shape
        if l > self.max_len:
            histories, l = histories[:, -self.max_len:], self.max_len
        pad = histories == 0
        pos = torch.arange(self.max_len - l, self.max_len, device=histories.device)
        x = self.item_emb(histories) * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb(pos)
        x = self.drop(x) * (~pad).unsqueeze(-1)
        causal = torch.ones(l, l, dtype=torch.bool, device=histories.device).tril()
        eye = torch.eye(l, dtype=torch.bool, device=histories.device)
        mask = (causal & ~pad[:, None, :]) | eye  # a padded query attends to itself only, never NaN
        mask = mask[:, None]
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        return self.hidden(histories)[:, -1]

    def score_items(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return state @ self.output_weight[lo:hi].T

    def score_all(self, histories: torch.Tensor) -> torch.Tensor:
        return self.score_items(self.encode(histories), 0, self.n_items + 1)
