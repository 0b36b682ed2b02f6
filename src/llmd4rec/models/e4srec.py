"""E4SRec: a Hugging Face causal LM reads projected item-ID embeddings and scores every item from its last hidden state.

The sequence is [instruction tokens] + [one soft token per history item] + [response tokens]; the hidden state at
the last response token goes through W_out to logits over all items (docs/method.md, "The two
models"). Three exact ways to get them:

- plain: one full sequence per sample (the reference),
- prefix sharing: the instruction is the same for every sample, so it runs once and its KV cache is broadcast,
- all-prefix: every prefix of a history in one pass; a 4D mask gives each prefix its own copy of the response
  tokens, which sees the instruction, the items up to that prefix and nothing else (docs/method.md, "The two models").
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..config import E4SRecConfig
from ..data.dataset import padding_start
from ..errors import InputError
from .backbone import LLM_EXTRA, load_backbone
from .chunked import chunked_cross_entropy
from .sasrec import Dropout


class E4SRec(nn.Module):
    """Frozen item table -> W_in -> LoRA'd decoder -> item head. Trainable: LoRA, W_in, the head (W_out, or with
    llm.item_head=tied a bias over items), and W_txt with item text.

    With a bfloat16/float16 backbone the frozen weights are stored and multiplied in that dtype, while the trainable
    weights stay float32 masters that autocast rounds once per call for the decoder's matmuls; W_in, W_out, the
    logits and the cross-entropy stay float32 (full-ranking scores in bfloat16 would tie).
    """

    pack_tokens = 512  # all-prefix row length that users are packed into; attention cost grows with its square
    inline_prompt = False  # the trainer sets it under FSDP and ZeRO-3: no separate prompt pass in training
    trims_padding = True  # encode drops all-padding columns: evaluation batches users of similar length together

    def __init__(self, cfg: E4SRecConfig, item_embeddings: torch.Tensor, backbone=None, tokenizer=None,
                 text_embeddings: torch.Tensor | None = None):
        super().__init__()
        try:
            from peft import LoraConfig, inject_adapter_in_model
            from peft.tuners.tuners_utils import BaseTunerLayer
        except ImportError:
            raise InputError(LLM_EXTRA) from None
        if cfg.item_text and text_embeddings is None:
            raise InputError("llm.item_text is true but no item text embeddings were given")
        if text_embeddings is not None and not cfg.item_text:
            raise ValueError("item text embeddings given while llm.item_text is false")
        if text_embeddings is not None and text_embeddings.shape[0] != item_embeddings.shape[0]:
            raise InputError(f"the item text table has {text_embeddings.shape[0]} rows, the item table "
                             f"{item_embeddings.shape[0]} (row 0 is padding in both)")
        if backbone is None:
            backbone, tokenizer = load_backbone(cfg.backbone, cfg.keep_layers, cfg.dtype, cfg.attention)
        if tokenizer is None:
            raise ValueError("a backbone passed in needs its tokenizer")
        self.cfg = cfg
        self.n_items = item_embeddings.shape[0] - 1
        self.max_len = cfg.max_len

        self.decoder = backbone.get_decoder()  # the base model: hidden states, no LM head
        self.decoder.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                           target_modules=list(cfg.lora_targets)), self.decoder)
        for p in self.decoder.parameters():  # float32 adapters on a bf16/fp16 backbone: small steps are not rounded
            if p.requires_grad:              # away; autocast (`_decode`) runs them in the backbone's dtype
                p.data = p.data.float()
        for m in self.decoder.modules():
            if isinstance(m, BaseTunerLayer):
                m.cast_input_dtype_enabled = False  # else bf16 activations go up to the float32 adapters and back
                for name, drop in m.lora_dropout.items():  # the masks drawn without CPU bernoulli_
                    if isinstance(drop, nn.Dropout):
                        m.lora_dropout[name] = Dropout(drop.p)
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        hidden = self.decoder.config.hidden_size

        self.register_buffer("item_table", item_embeddings.detach().float().clone())
        self.w_in = nn.Linear(item_embeddings.shape[1], hidden)
        if cfg.item_head == "linear":
            self.w_out = nn.Linear(hidden, self.n_items + 1)
        else:
            self.item_bias = nn.Parameter(torch.zeros(self.n_items + 1))
        if text_embeddings is not None:  # no bias: an item without text (a zero row) gets its ID-only token
            self.register_buffer("text_table", text_embeddings.detach().float().clone())
            self.w_txt = nn.Linear(text_embeddings.shape[1], hidden, bias=False)
            # zero: the model starts as the ID-only E4SRec and text enters as far as the loss asks (a random W_txt
            # gave 576-dim text tokens many times the ID tokens' size: Beauty's tied-head loss started at 12.9 > ln N)
            nn.init.zeros_(self.w_txt.weight)
        prompt = tokenizer(cfg.instruction, add_special_tokens=True)["input_ids"]  # BOS where the model wants one
        response = tokenizer(cfg.response, add_special_tokens=False)["input_ids"]
        if not prompt or not response:
            raise InputError("llm.instruction and llm.response must both be non-empty")
        self.register_buffer("prompt_ids", torch.tensor(prompt, dtype=torch.long), persistent=False)
        self.register_buffer("response_ids", torch.tensor(response, dtype=torch.long), persistent=False)

    # ---- pieces ----

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.get_input_embeddings().weight.dtype

    def _tokens(self, ids: torch.Tensor, batch: int) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(ids)[None].expand(batch, -1, -1)

    def _item_vectors(self, items: torch.Tensor | slice) -> torch.Tensor:
        """W_in(id) [+ W_txt(text)] in the heads' dtype: float32 unless DeepSpeed's bf16/fp16 mode cast them."""
        tokens = self.w_in(self.item_table[items].to(self.w_in.weight.dtype))
        if self.cfg.item_text:
            tokens = tokens + self.w_txt(self.text_table[items].to(self.w_txt.weight.dtype))
        return tokens

    def _items(self, histories: torch.Tensor) -> torch.Tensor:
        return self._item_vectors(histories).to(self.dtype)

    def head(self, lo: int = 0, hi: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [hi - lo, D], bias) of the item head for items lo..hi-1: W_out's rows, or the items' own tokens
        (tied), computed through module calls so that ZeRO-3 gathers the weights they come from."""
        if self.cfg.item_head == "linear":
            return self.w_out.weight[lo:hi], self.w_out.bias[lo:hi]
        if torch.is_grad_enabled():
            return self._item_vectors(slice(lo, hi)), self.item_bias[lo:hi]
        return self._frozen_item_vectors()[lo:hi], self.item_bias[lo:hi]

    def _frozen_item_vectors(self) -> torch.Tensor:
        """Every item's vector, kept while the weights it comes from are unchanged: scoring without gradients asks
        for it once per batch and item chunk, and it costs about nine times the scores of a batch of 64 users (Beauty,
        with text). Any in-place update (an optimizer step, set_item_embeddings, a load) or new storage bumps the key."""
        sources = [self.item_table, self.w_in.weight, self.w_in.bias]
        if self.cfg.item_text:
            sources += [self.text_table, self.w_txt.weight]
        if any(t.numel() == 0 for t in sources):  # ZeRO-3 partitions: the storage says nothing of the weights
            return self._item_vectors(slice(None))
        key = tuple((t.data_ptr(), t._version) for t in sources)
        if getattr(self, "_vectors_key", None) != key:
            self._vectors, self._vectors_key = self._item_vectors(slice(None)), key
        return self._vectors

    def _decode(self, embeds, mask, positions, cache=None) -> torch.Tensor:
        kw = {self._cache_kw: cache} if cache is not None else {}
        low = self.dtype != torch.float32
        with torch.autocast(embeds.device.type, dtype=self.dtype) if low else nullcontext():
            return self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                use_cache=cache is not None, **kw).last_hidden_state

    def _prompt_cache(self, batch: int):
        """Run the instruction once with batch 1; its keys/values are the same for every sample, so repeat them."""
        from transformers import DynamicCache

        cache = DynamicCache()
        self._decode(self._tokens(self.prompt_ids, 1), None, None, cache)
        cache.batch_repeat_interleave(batch)
        return cache

    # ---- the scorer protocol ----

    def encode(self, histories: torch.Tensor, share_prefix: bool | None = None) -> torch.Tensor:
        """Last hidden state [B, D] for left-padded histories [B, L] (the latest max_len items are used)."""
        histories = histories[:, -self.max_len:]
        histories = histories[:, padding_start(histories):]  # exact: padding is masked anyway
        share = self.cfg.share_prefix if share_prefix is None else share_prefix
        return (self._encode_shared if share else self._encode_plain)(histories)

    def score_items(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        w, b = self.head(lo, hi)
        return F.linear(state.to(w.dtype), w, b).float()

    def score_all(self, histories: torch.Tensor) -> torch.Tensor:
        return self.score_items(self.encode(histories), 0, self.n_items + 1)

    def _encode_plain(self, histories: torch.Tensor) -> torch.Tensor:
        """Reference path: each row is [pad.., prompt, items, response]; transformers builds the mask from 2D."""
        b = histories.shape[0]
        p, r = len(self.prompt_ids), len(self.response_ids)
        real = torch.cat([histories.new_ones(b, p), (histories != 0).long(), histories.new_ones(b, r)], 1)
        embeds = torch.cat([self._tokens(self.prompt_ids, b), self._items(histories),
                            self._tokens(self.response_ids, b)], 1)
        order = torch.sort(real, dim=1, stable=True).indices  # padding to the front, everything else in order
        embeds = embeds.gather(1, order[..., None].expand_as(embeds))
        real = real.gather(1, order)
        positions = (real.cumsum(1) - 1).clamp(min=0)
        return self._decode(embeds, real, positions)[:, -1]

    def _encode_shared(self, histories: torch.Tensor) -> torch.Tensor:
        """Prompt from the shared cache; [items, response] with positions contiguous after the prompt."""
        b = histories.shape[0]
        p, r = len(self.prompt_ids), len(self.response_ids)
        real = (histories != 0).long()
        n = real.sum(1, keepdim=True)
        positions = torch.cat([p + (real.cumsum(1) - 1).clamp(min=0),
                               p + n + torch.arange(r, device=histories.device)], 1)
        embeds = torch.cat([self._items(histories), self._tokens(self.response_ids, b)], 1)
        mask = torch.cat([real.new_ones(b, p), real, real.new_ones(b, r)], 1)  # over [cache, items, response]
        return self._decode(embeds, mask, positions, self._prompt_cache(b))[:, -1]

    # ---- all prefixes in one pass (training) ----

    def _check_prefixes(self, histories: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """A prefix longer than max_len would be cut by encode but not here: refuse it rather than differ."""
        if histories.shape[1] > self.max_len:
            raise ValueError(f"prefix histories must have at most max_len={self.max_len} columns")
        if not bool((histories[rows, cols] != 0).all()):
            raise ValueError("every prefix must end at a real (non-padding) item")

    def prefix_states(self, histories: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Hidden state [N, D] of each prefix histories[rows[i], :cols[i] + 1], every prefix of a user in one pass.

        Each user's real items and one copy of the response tokens per requested prefix are packed, user after user,
        into rows of about `pack_tokens` tokens behind the shared prompt (no padding tokens inside a user). The 4D
        mask lets the copy for the prefix ending at column t see the prompt, its user's items up to t and its own
        earlier response tokens; its positions continue right after item t: exactly the plain path for that prefix.
        """
        self._check_prefixes(histories, rows, cols)
        dev, n = histories.device, len(rows)
        if n == 0:
            return torch.zeros(0, self.decoder.config.hidden_size, dtype=self.dtype, device=dev)
        p, r = len(self.prompt_ids), len(self.response_ids)
        real = histories != 0
        count = real.long().cumsum(1)  # real items up to and including each column

        # one entry per token: items of every user, then r response tokens per prefix
        item_rows, item_cols = real.nonzero(as_tuple=True)
        user = torch.cat([item_rows, rows.repeat_interleave(r)])
        col = torch.cat([item_cols, cols.repeat_interleave(r)])
        copy = torch.cat([torch.full_like(item_rows, -1), torch.arange(n, device=dev).repeat_interleave(r)])
        idx = torch.cat([torch.zeros_like(item_rows), torch.arange(r, device=dev).repeat(n)])
        pos = p + count[user, col] - 1 + torch.where(copy >= 0, idx + 1, 0)
        embeds = torch.cat([self._items(histories[item_rows, item_cols]),
                            self._tokens(self.response_ids, n).flatten(0, 1)])

        # next-fit packing of whole users into rows (bins); `slot` = place of each token in its bin
        cost = (real.sum(1) + r * torch.bincount(rows, minlength=len(histories))).tolist()
        user_bin, bin_id, fill = [], 0, 0
        for need in cost:
            if need and fill and fill + need > self.pack_tokens:
                bin_id, fill = bin_id + 1, 0
            user_bin.append(bin_id)
            fill += need
        tok_bin = torch.tensor(user_bin, device=dev)[user]
        order = torch.argsort(tok_bin, stable=True)
        sizes = torch.bincount(tok_bin)
        slot = torch.empty_like(order)
        slot[order] = torch.arange(len(order), device=dev) - (sizes.cumsum(0) - sizes)[tok_bin[order]]

        def packed(x: torch.Tensor, pad: int) -> torch.Tensor:
            out = x.new_full((len(sizes), int(sizes.max()), *x.shape[1:]), pad)
            out[tok_bin, slot] = x
            return out

        u, t, c, i = packed(user, -1), packed(col, 0), packed(copy, -2), packed(idx, 0)
        same_user = (u[:, :, None] == u[:, None, :]) & (u[:, None, :] >= 0)
        sees_item = (c[:, None, :] == -1) & (t[:, None, :] <= t[:, :, None])
        sees_own = (c[:, None, :] >= 0) & (c[:, None, :] == c[:, :, None]) & (i[:, None, :] <= i[:, :, None])
        allowed = same_user & (sees_item | sees_own) | torch.eye(u.shape[1], dtype=torch.bool, device=dev)  # eye: pads
        allowed = torch.cat([allowed.new_ones(*u.shape, p), allowed], 2)  # everyone sees the prompt
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=dev)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)

        if self.inline_prompt:
            hidden = self._decode_with_inline_prompt(packed(embeds, 0), mask, packed(pos, 0))
        else:
            hidden = self._decode(packed(embeds, 0), mask[:, None], packed(pos, 0), self._prompt_cache(len(sizes)))
        last = len(item_rows) + torch.arange(n, device=dev) * r + r - 1  # each copy's last response token
        return hidden[tok_bin[last], slot[last]]

    def _decode_with_inline_prompt(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
                                   ) -> torch.Tensor:
        """The prompt at the head of every packed row instead of a KV cache from a separate pass: each decoder
        layer then runs once per step, which FSDP needs (its parameters are freed after a layer's backward)."""
        b, length, p = embeds.shape[0], embeds.shape[1], len(self.prompt_ids)
        head = torch.full((b, p, p + length), torch.finfo(self.dtype).min, dtype=mask.dtype, device=mask.device)
        head[:, :, :p] = head[:, :, :p].triu(1)  # the prompt sees itself causally and nothing else
        full_mask = torch.cat([head, mask], 1)[:, None]
        full_pos = torch.cat([torch.arange(p, device=positions.device).expand(b, p), positions], 1)
        return self._decode(torch.cat([self._tokens(self.prompt_ids, b), embeds], 1), full_mask, full_pos)[:, p:]

    def prefix_hidden(self, histories: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden state [B, L, D] of every prefix histories[b, :t+1] (zeros where padded or not in `select`)."""
        select = histories != 0 if select is None else select & (histories != 0)
        rows, cols = select.nonzero(as_tuple=True)
        out = torch.zeros(*histories.shape, self.decoder.config.hidden_size, dtype=self.dtype, device=histories.device)
        out[rows, cols] = self.prefix_states(histories, rows, cols)
        return out

    def prefix_logits(self, histories: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Logits [N, n_items + 1] for the prefixes histories[rows[i], :cols[i] + 1] (training samples)."""
        state = self.sample_states(histories, rows, cols)
        if self.cfg.item_head == "linear":
            return self.w_out(state.to(self.w_out.weight.dtype)).float()  # a module call: ZeRO-3 gathers W_out
        return self.score_items(state, 0, self.n_items + 1)

    def sample_states(self, histories: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Last hidden state [N, D] of each training prefix: all of a user's prefixes in one pass with
        cfg.all_prefix, else each prefix as its own sample."""
        self._check_prefixes(histories, rows, cols)
        if self.cfg.all_prefix:
            return self.prefix_states(histories, rows, cols)
        width = histories.shape[1]
        src = torch.arange(width, device=histories.device) - (width - 1 - cols)[:, None]
        return self.encode(histories[rows].gather(1, src.clamp(min=0)).masked_fill(src < 0, 0))

    def forward(self, histories: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                targets: torch.Tensor | None = None, item_chunk: int = 0) -> torch.Tensor:
        """`prefix_logits` as the module call, so wrappers that hook calls (DDP, FSDP, DeepSpeed) see training.

        With targets: each prefix's cross-entropy over items 1..N instead, streamed over `item_chunk` items of
        W_out at a time (llm_train.loss=ce_chunked), so no prefixes x items matrix is built."""
        if targets is None:
            return self.prefix_logits(histories, rows, cols)
        state = self.sample_states(histories, rows, cols)
        w, b = self.head()
        return chunked_cross_entropy(state.to(w.dtype), w, b, targets, item_chunk).float()

    # ---- weights ----

    def set_item_embeddings(self, item_embeddings: torch.Tensor) -> None:
        """Embedding update: refresh the frozen ID table from the current CRM (the text table stays)."""
        if item_embeddings.shape != self.item_table.shape:
            raise ValueError(f"item table must be {tuple(self.item_table.shape)}, got {tuple(item_embeddings.shape)}")
        self.item_table.copy_(item_embeddings.detach())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA + W_in + the head (+ W_txt): all a checkpoint needs besides the backbone and the frozen item (and text)
        tables, which a run stores once beside its checkpoints."""
        return {k: v.detach() for k, v in self.named_parameters() if v.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        expected = {k for k, v in own.items() if v.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise InputError(f"checkpoint does not match this E4SRec: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for k, v in state.items():
                if v.shape != own[k].shape:
                    raise InputError(f"checkpoint tensor {k} has shape {tuple(v.shape)}, "
                                     f"this E4SRec needs {tuple(own[k].shape)}")
                own[k].copy_(v.to(own[k].device))
