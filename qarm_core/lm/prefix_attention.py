"""Attention over a prefix that every row of a batch shares, without a copy of its keys per row.

The judge puts the same few-shot examples before every pair and the QA generator the same chat
template and system turn before every question. Their keys and values are computed once, but a
batch that attends over them through a standard key/value cache holds one copy per row: the
cache is repeated per row, extended by concatenation at every forward pass and, for grouped-query
attention, repeated again per query head. On a CPU those copies and the masked attention over the
prefix were ~20% of the judge's time in float32 (SmolLM2-135M, 152 prefix tokens of ~200 per row).

Here a row's cache holds only its own tokens (and its group's context), and each layer attends in
two parts that are merged exactly by their log-sum-exps:

* the prefix: every query of every row against the prefix's keys (batch 1), as one attention
  call whose "sequence" is all the batch's queries of a key/value head (nothing repeated);
* the row's own keys, with the batch's padding and causal mask.

softmax over [prefix; own] = (w_p * out_p + w_o * out_o) / (w_p + w_o), w = exp(lse - max lse), so
the result equals attention over the concatenated keys up to float rounding (tested against the
copying path and a plain forward). Only for CPU tensors (the kernel returns its log-sum-exp there)
and Llama-style attention modules (``layer_idx``, grouped key/value heads); ``LocalLM`` checks that.

Rows may also run **packed** (``Packed``): the batch's rows concatenated into one sequence without
padding, so the linear layers (~80% of the judge's time) run no padding tokens (candidates of 12-33
tokens right-padded to their batch's longest were ~12% of those rows). Only the attention of a row's
own part unpacks them into a padded (rows, heads, width, dim) batch, beside its context's keys.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

NAME = "qarm_shared_prefix"
# The same function with eager attention outside packed calls (the embedding model's padded
# batches: eager was the faster one there, see ``EmbedModelConfig.attn_implementation``).
NAME_EAGER = "qarm_packed_rows"


@dataclass
class Packed:
    """R rows of a forward pass packed into one sequence of T tokens (batch 1, no padding).

    ``slots`` (T,) long: the packed token of row r at its position t sits at ``r * width + t`` of
    the padded (R, width) batch its attention unpacks into. ``context``: per layer, the (keys,
    values) (G, kv_heads, Lc, head_dim) of G contexts that row r continues (``group`` (R,) long:
    which one), read before the row's own keys; the forward's 4D attention mask (R, 1, width,
    Lc + width) covers [context; own] keys. ``kept``: a dict that collects each layer's own
    (keys, values) as the padded (R, kv_heads, width, head_dim), for rows that later rows continue.
    """
    slots: Any
    rows: int
    width: int
    context: Sequence[tuple[Any, Any]] | None = None
    group: Any = None
    kept: dict[int, tuple[Any, Any]] | None = None

    def padded(self, x: Any) -> Any:
        """(1, heads, T, d) packed -> (R, heads, width, d), zeros in the padding slots."""
        heads, d = x.shape[1], x.shape[3]
        flat = x.new_zeros(self.rows * self.width, heads, d)
        flat.index_copy_(0, self.slots, x[0].transpose(0, 1))
        return flat.view(self.rows, self.width, heads, d).transpose(1, 2)

    def packed(self, x: Any) -> Any:
        """(R, heads, width, ...) padded -> (1, heads, T, ...) packed."""
        heads = x.shape[1]
        flat = x.transpose(1, 2).reshape(self.rows * self.width, heads, *x.shape[3:])
        return flat.index_select(0, self.slots).transpose(0, 1)[None]

    def rows_padded(self, hidden: Any) -> Any:
        """Hidden states (T, H) of the packed tokens -> (R, width, H), zeros in the padding slots
        (differentiable: training runs its rows packed too)."""
        flat = hidden.new_zeros(self.rows * self.width, hidden.shape[-1])
        return flat.index_copy(0, self.slots, hidden).view(self.rows, self.width, -1)


def forward_packed(body: Any, input_ids: Any, position_ids: Any, lengths: Any, attention_mask: Any,
                   prefix_kv: Sequence[tuple[Any, Any]] | None = None, context: Sequence[tuple[Any, Any]] | None = None,
                   group: Any = None, keep: bool = False) -> tuple[Any, Packed]:
    """``body`` (a transformers base model, e.g. ``LlamaModel``, whose attention is ``NAME``) over R
    right-padded rows ``input_ids`` and ``position_ids`` (R, width) of ``lengths`` (R,) real tokens,
    run packed into one sequence; ``attention_mask``: the padded batch's additive or boolean 4D
    mask (R, 1, width, Lc + width) over [context; own] keys (``Packed``); ``prefix_kv``: a shared
    prefix read first. Returns (hidden (T, H) of the rows' tokens, row after row; the ``Packed``,
    whose ``kept`` holds each layer's keys/values where ``keep``)."""
    import torch

    rows, width = input_ids.shape
    real = torch.arange(width, device=input_ids.device)[None] < lengths.to(input_ids.device)[:, None]
    slots = real.reshape(-1).nonzero()[:, 0]                 # r * width + t, row after row
    packed = Packed(slots, rows, width, context, group, {} if keep else None)
    with reading(prefix_kv, packed):
        out = body(input_ids=input_ids.reshape(-1)[slots][None], attention_mask=attention_mask,
                   position_ids=position_ids.reshape(-1)[slots][None], use_cache=False)
    return out.last_hidden_state[0], packed


# While a forward pass of ``LocalLM`` runs: the prefix's (keys, values) per layer, each
# (1, kv_heads, n_prefix, head_dim), or None; and the rows' packing, or None. No state: plain
# attention (the function falls back to transformers' SDPA, so the model stays usable outside).
_STATE: contextvars.ContextVar[tuple[Sequence[tuple[Any, Any]] | None, Packed | None] | None] = \
    contextvars.ContextVar(NAME, default=None)


@contextlib.contextmanager
def reading(prefix_kv: Sequence[tuple[Any, Any]] | None, packed: Packed | None = None) -> Iterator[None]:
    """Forward passes inside attend over ``prefix_kv`` first (one (keys, values) pair per layer;
    None: no prefix), their rows packed as ``packed`` says (None: a padded batch)."""
    token = _STATE.set((prefix_kv, packed))
    try:
        yield
    finally:
        _STATE.reset(token)


def register() -> None:
    """Make ``NAME`` (SDPA outside this module's calls, with SDPA's masks) and ``NAME_EAGER`` (eager
    outside them, eager's masks) transformers attention implementations (idempotent)."""
    import functools

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(NAME, shared_prefix_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    AttentionInterface.register(NAME_EAGER, functools.partial(shared_prefix_attention, fallback="eager"))
    AttentionMaskInterface.register(NAME_EAGER, eager_mask)


def addressable(model: Any) -> bool:
    """Whether ``model``'s attention modules are ones this function can address: one per layer,
    each with ``layer_idx`` and ``num_key_value_groups`` (Llama, Qwen2, Mistral...)."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")
            and hasattr(m, "q_proj")]
    return len(mods) == getattr(getattr(model, "config", None), "num_hidden_layers", -1)


def supports(model: Any) -> bool:
    """Whether ``model`` runs its attention through SDPA in modules this function can address."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_attn_implementation", None) in ("sdpa", NAME) and addressable(model)


def _additive(mask: Any, dtype: Any) -> Any:
    import torch

    if mask is None:
        return mask
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def shared_prefix_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                            dropout: float = 0.0, scaling: float | None = None, fallback: str = "sdpa",
                            **kwargs: Any) -> tuple[Any, None]:
    """The attention of one layer: ``query`` (B, H, q, d); ``key``/``value`` (B, kv_heads, k, d), the
    rows' own cached and new tokens; ``attention_mask`` over those k keys (bool or additive,
    (B, 1, q, k), or None). Packed rows (``Packed``): B = 1 and q = k = T, and the mask is the padded
    batch's over [context; own] keys. Returns (output (B, q, H, d), None) as transformers' SDPA does.
    Outside ``reading``: transformers' ``fallback`` attention ("sdpa" or "eager")."""
    import torch

    state = _STATE.get()
    if state is None or (state[0] is None and state[1] is None):
        if fallback == "eager":
            from transformers.models.llama.modeling_llama import eager_attention_forward

            return eager_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, **kwargs)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    prefix, packed = state
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if torch.is_autocast_enabled("cpu"):
        # the kernel is not on autocast's list: run it in autocast's type, as SDPA would be run
        low = torch.get_autocast_dtype("cpu")
        query, key, value = query.to(low), key.to(low), value.to(low)
    # the rows' own part (the kernel reads grouped key/value heads itself)
    if packed is not None:
        k_own, v_own = packed.padded(key), packed.padded(value)
        if packed.kept is not None:
            packed.kept[module.layer_idx] = (k_own, v_own)
        if packed.context is not None:
            kc, vc = packed.context[module.layer_idx]
            k_own = torch.cat([kc.index_select(0, packed.group), k_own], 2)
            v_own = torch.cat([vc.index_select(0, packed.group), v_own], 2)
        # dropout as the model's own attention would apply it (0 outside training, and SmolLM2's)
        out_o, lse_o = flash(packed.padded(query), k_own, v_own, dropout, False,
                             attn_mask=_additive(attention_mask, query.dtype), scale=scaling)
        out_o, lse_o = packed.packed(out_o), packed.packed(lse_o) if prefix is not None else None
    else:
        mask = _additive(attention_mask, query.dtype)
        q, k_len = query.shape[2], key.shape[2]
        causal = False
        if mask is None and q > 1:
            if k_len == q:
                causal = True
            else:                                   # queries are the last q of k positions
                allowed = torch.ones(q, k_len, dtype=torch.bool, device=query.device).tril(k_len - q)
                mask = _additive(allowed[None, None], query.dtype)
        out_o, lse_o = flash(query, key, value, 0.0, causal, attn_mask=mask, scale=scaling)
    if prefix is None:
        return out_o.transpose(1, 2).contiguous(), None
    kp, vp = prefix[module.layer_idx]
    b, h, q, d = query.shape
    kvh = kp.shape[1]
    g = h // kvh
    # the prefix part: head h reads key/value head h // g, so the queries of one key/value head
    # (all rows, their g query heads, all positions) form one sequence against the prefix's keys
    q_pre = query.reshape(b, kvh, g, q, d).permute(1, 0, 2, 3, 4).reshape(1, kvh, b * g * q, d)
    out_p, lse_p = flash(q_pre, kp, vp, 0.0, False, scale=scaling)
    out_p = out_p.reshape(kvh, b, g, q, d).permute(1, 0, 2, 3, 4).reshape(b, h, q, d)
    lse_p = lse_p.reshape(kvh, b, g, q).permute(1, 0, 2, 3).reshape(b, h, q)
    lse_p, lse_o = lse_p.float(), lse_o.float()
    top = torch.maximum(lse_p, lse_o)
    w_p, w_o = torch.exp(lse_p - top)[..., None], torch.exp(lse_o - top)[..., None]
    out = (out_p.float() * w_p + out_o.float() * w_o) / (w_p + w_o)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None
