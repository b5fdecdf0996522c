"""The QARM V2 three-segment embedding LLM.

One sequence per item, laid out left to right and right-padded::

    <item tokens (<= max_item_tokens)> <EMB_1> ... <EMB_m> <QA tokens (<= max_qa_tokens)> <pad ...>

Attention (``build_attention_bias``), on top of the plain causal + padding mask:

* item tokens: causal among themselves (they come first, so causality is all they need);
* EMB tokens: the item segment and the *earlier* EMB tokens. Letting EMB_j see EMB_<j keeps the
  ``item + EMB`` prefix an ordinary causal sequence, so the embedding at inference is exactly a
  causal forward over ``item + EMB`` (no QA needed) and equals the training-time embedding;
* QA tokens: item + EMB + earlier QA, with QA -> item attention multiplied by a scale ``s`` in
  [0, 1] implemented as the additive bias ``log s`` (``s = 0``: the dtype's most negative value, an
  exact zero after softmax). Training anneals ``s`` from 1 to 0, after which the QA loss reaches
  the item only through the EMB tokens' hidden states.

The bias is a float tensor of shape (batch, 1, seq, seq); transformers 5 passes a 4-D mask
unchanged to both the ``eager`` and the ``sdpa`` attention functions, which add it to the scores.

Embedding = mean of the EMB tokens' last hidden states (after the final norm) -> Linear(hidden, d)
-> L2-normalised; shape (batch, d).

torch is imported at module level here (this module is the model); transformers is imported in
the functions that load one.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qarm_core.embed.config import EmbedModelConfig
from qarm_core.errors import DataError

SEG_PAD, SEG_ITEM, SEG_EMB, SEG_QA = 0, 1, 2, 3
META_FILE = "qarm_embed.json"
PROJ_FILE = "projection.safetensors"
FORMAT_VERSION = 1


def emb_token_strings(m: int) -> list[str]:
    return [f"<EMB_{i}>" for i in range(1, m + 1)]


# ---------------------------------------------------------------- mask
def build_attention_bias(segment: torch.Tensor, qa_item_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias of shape (batch, 1, seq, seq) from segment ids (batch, seq).

    0 where attention is allowed, ``log(qa_item_scale)`` for QA -> item, and ``finfo(dtype).min``
    where it is not allowed. Every query may at least attend to itself or an earlier real token
    (pad rows see the real tokens before them), so no softmax row is all-masked (no NaN).
    """
    if not 0.0 <= qa_item_scale <= 1.0:
        raise ValueError(f"qa_item_scale must be in [0, 1], got {qa_item_scale}")
    b, t = segment.shape
    neg = torch.finfo(dtype).min
    causal = torch.ones((t, t), dtype=torch.bool, device=segment.device).tril()
    q, k = segment[:, :, None], segment[:, None, :]
    allowed = causal[None] & (k != SEG_PAD)
    # a pad query with no earlier real token cannot exist (rows start with item tokens), but keep
    # the diagonal open anyway so that a degenerate row yields finite garbage, not NaN
    allowed |= torch.eye(t, dtype=torch.bool, device=segment.device)[None]
    bias = torch.zeros((b, t, t), dtype=dtype, device=segment.device)
    bias.masked_fill_(~allowed, neg)
    if qa_item_scale < 1.0:
        qa_item = (q == SEG_QA) & (k == SEG_ITEM)
        val = neg if qa_item_scale == 0.0 else math.log(qa_item_scale)
        bias.masked_fill_(qa_item, val)
    return bias[:, None]


def anneal_scale(step: int, anneal_steps: int) -> float:
    """QA -> item attention scale at optimizer step ``step``: 1 -> 0 linearly over ``anneal_steps``."""
    if anneal_steps <= 0:
        return 0.0
    return max(0.0, 1.0 - step / anneal_steps)


# ---------------------------------------------------------------- module
class ThreeSegmentLM(nn.Module):
    """A causal LM plus the embedding projection.

    ``lm``: a transformers ``*ForCausalLM`` (its ``.model`` gives hidden states, ``.lm_head`` the
    logits); ``proj``: Linear(hidden, dim). ``forward`` returns the embeddings and the summed QA
    next-token loss, so that the caller can form the contrastive loss over any set of rows (whole
    batch, or the gradient cache's chunks).
    """

    def __init__(self, lm: nn.Module, dim: int, n_emb_tokens: int, packing: str | None = None):
        """``packing`` (``EmbedModelConfig.attn_implementation``'s words): "auto" runs a batch's rows
        packed into one sequence when training in float32 on a CPU, "packed" whenever on a CPU, None
        never (``packs``); it needs an eager model whose attention modules ``prefix_attention`` can
        address (else None)."""
        super().__init__()
        self.lm = lm
        self.n_emb_tokens = n_emb_tokens
        self.proj = nn.Linear(lm.config.hidden_size, dim)
        self.packing = packing if packing and self._use_packed_attention() else None
        self.last_rows = ""          # "packed" or "padded": how the last ``hidden`` call ran its rows

    def _use_packed_attention(self) -> bool:
        """Switch the causal LM's attention to ``prefix_attention``'s (eager outside packed calls)
        where it can address the model; whether it did."""
        from qarm_core.lm import prefix_attention

        lm = self._causal_lm()
        if lm.config._attn_implementation not in ("eager", prefix_attention.NAME_EAGER) \
                or not prefix_attention.addressable(lm):
            return False
        prefix_attention.register()
        lm.set_attn_implementation(prefix_attention.NAME_EAGER)
        return True

    def packs(self, input_ids: torch.Tensor) -> bool:
        """Whether ``hidden`` runs these rows packed: they skip the padding in the linear layers
        (ML-100K training batches of 8 items with their QA are ~34% padding, and their rows cannot
        be sorted by length: they are each other's in-batch negatives). Measured on a 2-core Xeon,
        plain torch, SmolLM2, 8 steps of the ML-100K recipe each: float32 capped to AVX2 173 vs
        152-156 tokens/s eager; bf16 215-220 vs 243-252 eager; the catalog's embedding (batches
        sorted by length: no padding to skip) slower packed in both types. So "auto" packs float32
        training only. Never on a GPU (the attention kernel is the CPU's), nor under gradient
        checkpointing (its recomputation in the backward pass runs outside the packing)."""
        if self.packing is None or input_ids.device.type != "cpu":
            return False
        lm = self._causal_lm()
        checkpointing = getattr(lm, "is_activation_checkpointing", None)
        if checkpointing is None:                        # transformers before the rename
            checkpointing = getattr(lm, "is_gradient_checkpointing", False)
        if checkpointing:
            return False
        if self.packing == "packed":
            return True
        return torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") \
            and self.proj.weight.dtype == torch.float32

    @property
    def dim(self) -> int:
        return self.proj.out_features

    def _causal_lm(self) -> nn.Module:
        # under LoRA, ``lm`` is a peft wrapper around the causal LM
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def _bias_dtype(self) -> torch.dtype:
        # the scores' dtype: bf16 under DeepSpeed bf16 (module cast), bf16 under CPU autocast too
        # (sdpa refuses a float mask whose dtype differs from the query's)
        if torch.is_autocast_enabled("cpu"):
            return torch.get_autocast_dtype("cpu")
        return self.proj.weight.dtype

    def hidden(self, input_ids: torch.Tensor, segment: torch.Tensor, qa_item_scale: float) -> torch.Tensor:
        """Last hidden states (after the final norm), shape (batch, seq, hidden)."""
        bias = build_attention_bias(segment, qa_item_scale, self._bias_dtype())
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        lm = self._causal_lm()
        self.last_rows = "packed" if self.packs(input_ids) else "padded"
        if self.last_rows == "packed":
            from qarm_core.lm.prefix_attention import forward_packed

            h, packed = forward_packed(lm.model, input_ids, pos, (segment != SEG_PAD).sum(1), bias)
            return packed.rows_padded(h)
        out = lm.model(input_ids=input_ids, attention_mask=bias, position_ids=pos, use_cache=False)
        return out.last_hidden_state

    def embed_from_hidden(self, h: torch.Tensor, emb_pos: torch.Tensor) -> torch.Tensor:
        """h (batch, seq, hidden), emb_pos (batch, m) -> L2-normalised (batch, dim) float32."""
        idx = emb_pos[..., None].expand(-1, -1, h.shape[-1])
        pooled = h.gather(1, idx).mean(1)                                   # (batch, hidden)
        z = self.proj(pooled.to(self.proj.weight.dtype))
        return nn.functional.normalize(z.float(), dim=-1)

    def forward(self, input_ids: torch.Tensor, segment: torch.Tensor, emb_pos: torch.Tensor,
                labels: torch.Tensor | None = None, qa_item_scale: float = 0.0) -> dict[str, torch.Tensor]:
        """One batch of item sequences.

        input_ids, segment, labels: (batch, seq); emb_pos: (batch, m). ``labels`` holds the token id
        at answer-token positions and -100 elsewhere. Returns ``emb`` (batch, dim) float32,
        ``qa_loss_sum`` (summed token NLL, float32 scalar) and ``qa_tokens`` (count, scalar).
        The LM head runs on the answer-predicting positions only: with a 49k vocabulary it is
        ~20% of the FLOPs when applied to every position.
        """
        h = self.hidden(input_ids, segment, qa_item_scale)
        emb = self.embed_from_hidden(h, emb_pos)
        zero = h.new_zeros((), dtype=torch.float32)
        if labels is None:
            return {"emb": emb, "qa_loss_sum": zero, "qa_tokens": zero}
        target = labels[:, 1:]
        rows, cols = (target != -100).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return {"emb": emb, "qa_loss_sum": zero, "qa_tokens": zero}
        logits = self._causal_lm().lm_head(h[rows, cols]).float()                     # (n_answer_tokens, vocab)
        nll = nn.functional.cross_entropy(logits, target[rows, cols], reduction="sum")
        return {"emb": emb, "qa_loss_sum": nll, "qa_tokens": zero + rows.numel()}


# ---------------------------------------------------------------- loading / saving
@dataclass(frozen=True)
class LoadedModel:
    model: ThreeSegmentLM
    tokenizer: Any
    emb_token_ids: tuple[int, ...]
    model_version: str
    source: str          # the folder it was loaded from
    fine_tuned: bool


def resolve_model_path(cfg: EmbedModelConfig, stage: str) -> Path:
    """The HF folder named by ``cfg.model`` ("smollm2": the GGUF conversion cache)."""
    if cfg.model == "smollm2":
        from qarm_core.lm.assets import ensure_smollm2

        return ensure_smollm2(cfg.cache_dir)
    p = Path(cfg.model)
    if not p.exists():
        raise DataError(stage, "model", f"model path {p} does not exist")
    if not (p / "config.json").exists():
        raise DataError(stage, "model", f"{p} is not a Hugging Face model folder (no config.json)")
    return p


def read_meta(path: str | Path) -> dict | None:
    f = Path(path) / META_FILE
    return json.loads(f.read_text()) if f.exists() else None


def _init_new_rows(emb: torch.Tensor, n_new: int, seed: int) -> None:
    """New token rows = mean of the old rows + seeded noise at half their per-dim std, so the EMB
    tokens start inside the embedding distribution and distinct from one another."""
    old = emb[:-n_new].float()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n_new, emb.shape[1]), generator=g) * old.std(0) * 0.5
    with torch.no_grad():
        emb[-n_new:] = (old.mean(0) + noise).to(emb.dtype)


def base_version(path: Path, cfg: EmbedModelConfig) -> str:
    """A short id of an un-fine-tuned model: its folder name + a digest of its weights' names and
    sizes + the settings that change the embedding."""
    files = sorted((f.name, f.stat().st_size) for f in path.glob("*.safetensors"))
    key = json.dumps([files, cfg.n_emb_tokens, cfg.dim, cfg.seed, cfg.max_item_tokens, cfg.include_tags])
    return f"base:{path.name}:{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def attention_of(cfg: EmbedModelConfig) -> str:
    """The transformers attention a model of ``cfg`` loads with: "auto" and "packed" load eager
    (``ThreeSegmentLM`` then switches to the packing one)."""
    return "eager" if cfg.attn_implementation in ("auto", "packed") else cfg.attn_implementation


def packing_of(cfg: EmbedModelConfig) -> str | None:
    """``ThreeSegmentLM``'s ``packing`` for ``cfg``: its ``attn_implementation`` where that packs."""
    return cfg.attn_implementation if cfg.attn_implementation in ("auto", "packed") else None


def load_model(cfg: EmbedModelConfig, stage: str = "embed", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The three-segment model from ``cfg.model``.

    A folder written by ``save_model`` (it has ``qarm_embed.json``) loads as fine-tuned: its EMB
    tokens and projection are reused and must agree with ``cfg`` (n_emb_tokens, dim). Any other
    causal LM gets ``m`` new EMB tokens (rows initialised by ``_init_new_rows``) and a projection
    seeded with ``cfg.seed`` -- the starting point of fine-tuning and the "base" baseline.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(cfg, stage)
    meta = read_meta(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention_of(cfg))
    except (OSError, ValueError) as exc:
        raise DataError(stage, "model", f"cannot load a causal LM from {path}: {exc}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    strings = emb_token_strings(cfg.n_emb_tokens)
    if meta is not None:
        if meta.get("n_emb_tokens") != cfg.n_emb_tokens or meta.get("dim") != cfg.dim:
            raise DataError(stage, "model", f"{path} was trained with n_emb_tokens={meta.get('n_emb_tokens')}, "
                                            f"dim={meta.get('dim')}; config asks {cfg.n_emb_tokens}, {cfg.dim}")
        ids = tuple(tok.convert_tokens_to_ids(strings))
        model = ThreeSegmentLM(lm, cfg.dim, cfg.n_emb_tokens, packing_of(cfg))
        proj = load_file(str(path / PROJ_FILE))
        model.proj.load_state_dict({k: v.to(dtype) for k, v in proj.items()})
        return LoadedModel(model.eval(), tok, ids, meta["model_version"], str(path), True)
    tok.add_tokens(strings, special_tokens=True)
    ids = tuple(tok.convert_tokens_to_ids(strings))
    n_new = len(tok) - lm.get_input_embeddings().weight.shape[0]
    if n_new > 0:
        lm.resize_token_embeddings(len(tok), mean_resizing=False)
        _init_new_rows(lm.get_input_embeddings().weight, n_new, cfg.seed)
        out_emb = lm.get_output_embeddings()
        if out_emb is not None and out_emb.weight.data_ptr() != lm.get_input_embeddings().weight.data_ptr():
            _init_new_rows(out_emb.weight, n_new, cfg.seed + 1)
    torch.manual_seed(cfg.seed)     # the projection's init (nn.Linear draws from the global RNG)
    model = ThreeSegmentLM(lm, cfg.dim, cfg.n_emb_tokens, packing_of(cfg)).to(dtype)
    return LoadedModel(model.eval(), tok, ids, base_version(path, cfg), str(path), False)


def save_model(model: ThreeSegmentLM, tokenizer: Any, out_dir: str | Path, meta: dict,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an HF folder (safetensors weights + tokenizer) plus ``projection.safetensors`` and
    ``qarm_embed.json``; reloads with ``load_model`` in about a second. Never pickles.

    ``state_dict``: full ``ThreeSegmentLM`` weights to write instead of the module's own (e.g. the
    fp32 master weights recovered from a ZeRO checkpoint). Written to a temporary folder and
    renamed, so a crash never leaves half a model behind.
    """
    import shutil

    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    lm_sd = {k[len("lm."):]: v for k, v in sd.items() if k.startswith("lm.")}
    proj_sd = {k[len("proj."):]: v.detach().float().contiguous() for k, v in sd.items() if k.startswith("proj.")}
    model.lm.save_pretrained(tmp, state_dict=lm_sd)
    tokenizer.save_pretrained(tmp)
    save_file(proj_sd, str(tmp / PROJ_FILE))
    (tmp / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
