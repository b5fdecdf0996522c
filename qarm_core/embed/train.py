"""Fine-tuning of the three-segment model, with DeepSpeed (ZeRO) or plain torch, resumable.

Entry points:

* ``train_embedding_model(items, judgments, qa, out_dir, model_cfg, train_cfg)``: trains in this
  process (``launcher == "none"``) or starts ``nproc`` processes with torchrun / the deepspeed
  launcher and waits for them; returns a ``TrainRecord``.
* ``build_launch_command(job_file, cfg)``: the argv that starts the multi-process run of a job
  written by ``write_job`` (for a scheduler that launches it itself).

Output folder::

    out_dir/
      model/              the fine-tuned model (HF safetensors + tokenizer + projection.safetensors
                          + qarm_embed.json); load with ``model.load_model``
      checkpoints/        resumable training state, every ``checkpoint_every`` steps (the newest
                          ``keep_checkpoints`` kept). DeepSpeed runs use DeepSpeed's own checkpoint
                          format (the only one that holds partitioned ZeRO optimizer state; it is
                          torch.save-based); plain-torch runs use safetensors + JSON.
      train_log.jsonl     one line per step (loss, nce, qa, scale, tokens/s)
      train_record.json   the ``TrainRecord`` of the finished run
      job/                (multi-process runs) job.json + the input tables as Parquet

GPU hosts: ``launcher="deepspeed"`` (or torchrun) with ``nproc`` = GPUs per node, ``dtype=auto`` (bf16),
``zero_stage=2`` (3 for models that do not fit one GPU), ``attn_implementation="sdpa"``, a larger
``batch_size`` (e.g. 256+) with ``grad_cache_chunk`` sized to GPU memory, ``freeze_layers=0``;
DeepSpeed moves the module to each rank's GPU and batches follow it. The plain-torch path
(``use_deepspeed=False``) is the CPU fallback and keeps the model on the CPU.

Every step's batch is a function of (seed, step) (``data.batch_pair_indices``) and nothing in the
model is random (no dropout), so a run killed after checkpoint k and resumed reaches the same
weights as an uninterrupted run. With ``nproc`` processes each takes a contiguous slice of the
global batch; in-batch negatives are the process's own slice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa

from qarm_core.allocator import keep_freed_memory
from qarm_core.embed.config import EmbedModelConfig, TrainConfig
from qarm_core.errors import DataError
from qarm_core.progress import Progress

if TYPE_CHECKING:
    from qarm_core.devices import DTypeChoice

STAGE = "train"
REPO = Path(__file__).resolve().parents[2]
DEEPSPEED_CONFIG_DIR = REPO / "configs" / "deepspeed"
# Used when the repo's configs/ folder is not there (an installed wheel); same content as zero{N}.json.
_BUILTIN_ZERO = {"stage": 2, "contiguous_gradients": True, "overlap_comm": False, "reduce_scatter": True,
                 "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}

ProgressFn = Callable[[dict], None]


@dataclass(frozen=True)
class TrainRecord:
    """What a training run wrote."""

    model_dir: str
    model_version: str
    fingerprint: str
    steps: int                    # optimizer steps done in total (including before a resume)
    resumed_from_step: int        # 0: started from scratch
    train_pairs: int
    world_size: int
    deepspeed: bool
    zero_stage: int
    dtype: str                    # bfloat16 (mixed precision) or float32, as chosen by ``training_dtype``
    seconds: float                # wall time of this process's run (excluding model loading)
    train_tokens: int             # real (non-pad) tokens processed by all processes in this run
    tokens_per_s: float
    final_loss: float
    final_nce: float
    final_qa: float
    loss_first: float             # mean loss of the first up-to-5 steps of this run
    loss_last: float              # mean loss of the last up-to-5 steps of this run
    reused: bool = False          # True: the model was already complete; nothing was trained
    dtype_reason: str = ""        # why that dtype (``devices.DTypeChoice.reason``)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- configs and fingerprints
def training_dtype(cfg: TrainConfig) -> "DTypeChoice":
    """The numeric type of a training run: ``cfg.dtype`` resolved on the device training runs on
    (DeepSpeed takes the GPU when torch sees one; the plain-torch path stays on the CPU)."""
    import torch

    from qarm_core.devices import resolve_dtype

    device = "cuda" if cfg.use_deepspeed and torch.cuda.is_available() else "cpu"
    return resolve_dtype(cfg.dtype, device, STAGE, "embed.train.dtype")


def deepspeed_config(cfg: TrainConfig, world_size: int, unmanaged_accumulation: bool = False) -> dict:
    """The DeepSpeed config dict: ``configs/deepspeed/zero{stage}.json`` (or ``cfg.deepspeed_config``)
    with the batch size, bf16 (``training_dtype``) and accumulation filled in from ``cfg``."""
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else DEEPSPEED_CONFIG_DIR / f"zero{cfg.zero_stage}.json"
    if cfg.deepspeed_config and not path.exists():
        raise DataError(STAGE, "deepspeed_config", f"DeepSpeed config {path} does not exist")
    if path.exists():
        ds = json.loads(path.read_text())
    else:
        ds = {"zero_optimization": dict(_BUILTIN_ZERO, stage=cfg.zero_stage), "gradient_clipping": 1.0,
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    ds.setdefault("zero_optimization", {})["stage"] = cfg.zero_stage
    micro = cfg.batch_size // world_size
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1,
              train_batch_size=micro * world_size, bf16={"enabled": training_dtype(cfg).bf16})
    ds.pop("fp16", None)
    ds.pop("optimizer", None)       # the optimizer is torch AdamW built here (no JIT-compiled op)
    ds.pop("scheduler", None)       # the LR is set per step here, so resumption needs no scheduler state
    if unmanaged_accumulation:      # gradient cache: several backward() calls per optimizer step
        ds["managed_gradient_accumulation"] = False
    return ds


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def run_fingerprint(model_cfg: EmbedModelConfig, cfg: TrainConfig, data_digest: str, world_size: int) -> str:
    """Identity of a training run: everything that changes its result (not checkpoint cadence,
    time budget, thread count)."""
    t = cfg.model_dump(exclude={"checkpoint_every", "keep_checkpoints", "max_seconds", "num_threads",
                                "launcher", "launcher_args", "master_port"})
    return _digest({"model": model_cfg.model_dump(), "train": t, "data": data_digest, "world": world_size})[:20]


# ---------------------------------------------------------------- distributed helpers
def _dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) when alone."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(world: int, use_deepspeed: bool) -> None:
    """gloo process group. DeepSpeed needs one even alone: a single-process run gets a group of
    one on a free local port (DeepSpeed would otherwise try MPI discovery)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    # alone: a group of one over a free local port, passed explicitly rather than through
    # os.environ (child processes started later must not inherit a port that is taken)
    kw = {} if world > 1 else {"init_method": f"tcp://127.0.0.1:{_free_port()}", "rank": 0, "world_size": 1}
    if world == 1:
        os.environ.setdefault("LOCAL_RANK", "0")     # DeepSpeed's engine asserts it is set
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False, auto_mpi_discovery=world > 1, **kw)
    else:
        dist.init_process_group("gloo", **kw)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _all_sum(x: float, world: int) -> float:
    if world == 1:
        return x
    import torch
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


# ---------------------------------------------------------------- plain-torch checkpoints (safetensors + JSON)
def _save_plain(root: Path, tag: str, model: Any, opt: Any, client: dict) -> None:
    from safetensors.torch import save_file, save_model

    tmp = root / f".{tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))           # handles tied (shared) weights
    sd = opt.state_dict()
    tensors = {f"{i}/{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    if tensors:
        save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"]}))
    (tmp / "client_state.json").write_text(json.dumps(client))
    shutil.rmtree(root / tag, ignore_errors=True)
    tmp.rename(root / tag)
    (root / "latest.tmp").write_text(tag)
    (root / "latest.tmp").rename(root / "latest")


def _load_plain(root: Path, model: Any, opt: Any) -> dict | None:
    import torch
    from safetensors.torch import load_file, load_model

    latest = root / "latest"
    if not latest.exists():
        return None
    d = root / latest.read_text().strip()
    load_model(model, str(d / "model.safetensors"))
    groups = json.loads((d / "optimizer.json").read_text())["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    if (d / "optimizer.safetensors").exists():
        for key, v in load_file(str(d / "optimizer.safetensors")).items():
            i, k = key.split("/", 1)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})
    return json.loads((d / "client_state.json").read_text())


def _prune_checkpoints(root: Path, keep: int) -> None:
    tags = sorted(p for p in root.glob("step-*") if p.is_dir())
    for p in tags[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- the run
def _lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _freeze(lm: Any, n_layers: int) -> None:
    """Freeze the token embeddings and the lowest ``n_layers`` decoder blocks: backward then stops
    ``n_layers`` blocks early (a CPU speed lever). The EMB token rows stay at their init then."""
    if n_layers <= 0:
        return
    layers = lm.model.layers
    if n_layers > len(layers):
        raise DataError(STAGE, "config", f"freeze_layers={n_layers} but the model has {len(layers)} layers")
    lm.model.embed_tokens.weight.requires_grad_(False)
    for layer in layers[:n_layers]:
        for p in layer.parameters():
            p.requires_grad_(False)


def _apply_lora(model: Any, cfg: TrainConfig) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise DataError(STAGE, "config", "lora_rank > 0 needs the peft package (pip install peft)") from None
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model.lm = get_peft_model(model.lm, lcfg)
    return model


def _encode_inputs(items: pa.Table, judgments: pa.Table, qa: pa.Table | None, model_cfg: EmbedModelConfig,
                   cfg: TrainConfig, tokenizer: Any):
    from qarm_core.embed import data as D

    D.check_items(items, STAGE)
    ids = items["item_id"].to_numpy()
    if judgments.num_rows == 0:
        raise DataError(STAGE, "judgments", "no pairs to train on (empty table)")
    train_j = D.split_pairs(judgments, cfg.holdout_fraction, cfg.seed)[0] if cfg.holdout_fraction else judgments
    anchors, positives = D.positive_pairs(train_j, ids, STAGE)
    if cfg.max_train_pairs and len(anchors) > cfg.max_train_pairs:
        pick = np.sort(np.random.default_rng([cfg.seed, 7]).choice(len(anchors), cfg.max_train_pairs, replace=False))
        anchors, positives = anchors[pick], positives[pick]
    used = np.unique(np.concatenate([anchors, positives]))
    texts = D.item_texts(items, model_cfg, used)
    qa_map = D.qa_by_item(qa, model_cfg.max_qa_pairs if model_cfg.max_qa_tokens else 0, STAGE)
    enc = D.encode_items(tokenizer, texts, qa_map, model_cfg)
    digest = _digest([hashlib.sha256(anchors.tobytes() + positives.tobytes()).hexdigest(),
                      [(k, v.item, v.qa, v.qa_is_answer) for k, v in sorted(enc.items())]])
    return anchors, positives, enc, digest


def train_embedding_model(items: pa.Table, judgments: pa.Table, qa: pa.Table | None, out_dir: str | Path,
                          model_cfg: EmbedModelConfig | None = None, train_cfg: TrainConfig | None = None,
                          progress: ProgressFn | None = None) -> TrainRecord:
    """Fine-tune the three-segment model on judged pairs (+ QA) and write it to ``out_dir/model``.

    ``items``: the items table (item_id, title, year?, tags?); ``judgments``: pairs with
    src_item/dst_item (and ``keep``: only kept rows train; without it every row is a positive);
    ``qa``: the QA table or None. Resumes from ``out_dir/checkpoints`` when a run with the same
    fingerprint was interrupted; returns the stored record without training when the run is
    already complete. ``progress`` gets one dict per step (rank 0 only).
    """
    model_cfg = model_cfg or EmbedModelConfig()
    cfg = train_cfg or TrainConfig()
    # Resolved once, here: every process of a launched run trains in the same type, and the
    # run's fingerprint (so its checkpoints) names the type, not "auto".
    choice = training_dtype(cfg)
    cfg = cfg.model_copy(update={"dtype": choice.name})
    prog = Progress(STAGE, f"training steps ({choice.name})", cfg.max_steps, "steps")

    def relay(info: dict) -> None:
        prog.advance(int(info["step"]) - prog.done, loss=round(float(info["loss"]), 4),
                     tokens_per_s=round(float(info["tokens_per_s"]), 1))
        if progress is not None:
            progress(info)

    if cfg.launcher != "none":
        job = write_job(items, judgments, qa, out_dir, model_cfg, cfg)
        rec = run_launched(job, cfg, relay)
    else:
        rec = _train(items, judgments, qa, Path(out_dir), model_cfg, cfg, relay)
    prog.finish()
    return dataclasses.replace(rec, dtype_reason=choice.reason)


@keep_freed_memory()
def _train(items: pa.Table, judgments: pa.Table, qa: pa.Table | None, out: Path, model_cfg: EmbedModelConfig,
           cfg: TrainConfig, progress: ProgressFn | None) -> TrainRecord:
    import torch

    from qarm_core.embed import data as D
    from qarm_core.embed.losses import info_nce, qa_loss
    from qarm_core.embed.model import anneal_scale, load_model, save_model

    if cfg.dtype == "auto":  # a job written by hand (or by an older version) for a launched worker
        cfg = cfg.model_copy(update={"dtype": training_dtype(cfg).name})
    rank, world, _ = _dist_env()
    if world > 1 and world != cfg.nproc:
        raise DataError(STAGE, "config", f"launched with WORLD_SIZE={world} but train.nproc={cfg.nproc}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if world > 1 or cfg.use_deepspeed:
        _init_process_group(world, cfg.use_deepspeed)

    loaded = load_model(model_cfg, STAGE, torch.float32)
    model, tok = loaded.model, loaded.tokenizer
    anchors, positives, enc, data_digest = _encode_inputs(items, judgments, qa, model_cfg, cfg, tok)
    fp = run_fingerprint(model_cfg, cfg, data_digest, world)

    out.mkdir(parents=True, exist_ok=True)
    model_dir, ckpt_root = out / "model", out / "checkpoints"
    rec_file = out / "train_record.json"
    if rec_file.exists():
        old = json.loads(rec_file.read_text())
        if old.get("fingerprint") == fp and (model_dir / "qarm_embed.json").exists():
            return TrainRecord(**{**old, "reused": True})
    run_file = ckpt_root / "run.json"
    if run_file.exists() and json.loads(run_file.read_text()).get("fingerprint") != fp:
        raise DataError(STAGE, "checkpoints", f"{ckpt_root} holds checkpoints of a different run (config or "
                                              "data changed); remove it or train into another folder")
    _barrier(world)
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"fingerprint": fp}))

    if cfg.lora_rank:
        model = _apply_lora(model, cfg)     # LoRA freezes the base weights itself
    else:
        _freeze(model.lm, cfg.freeze_layers)
    if cfg.gradient_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("proj.")]
    groups = [{"params": body, "lr": cfg.lr, "base_lr": cfg.lr},
              {"params": list(model.proj.parameters()), "lr": cfg.proj_lr, "base_lr": cfg.proj_lr}]
    # fused AdamW: one kernel per tensor instead of ~10 elementwise passes. Measured here on one
    # flat 135M-element fp32 buffer (what ZeRO hands the optimizer): 0.09 vs 0.65 s a step.
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)

    engine = None
    if cfg.use_deepspeed:
        import deepspeed

        ds_cfg = deepspeed_config(cfg, world, unmanaged_accumulation=cfg.grad_cache_chunk > 0)
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
        fwd = engine
    else:
        fwd = model
    trainable = [p for p in model.parameters() if p.requires_grad]
    device = engine.device if engine is not None else next(model.parameters()).device

    start = 0
    if cfg.use_deepspeed:
        if (ckpt_root / "latest").exists():
            _, client = engine.load_checkpoint(str(ckpt_root))
            start = int(client["step"])
    else:
        client = _load_plain(ckpt_root, model, opt)
        start = int(client["step"]) if client else 0

    bf16 = training_dtype(cfg).bf16
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16 and not cfg.use_deepspeed
                else torch.autocast("cpu", enabled=False))
    micro = cfg.batch_size // world
    with_qa_p = cfg.qa_on_positive and model_cfg.max_qa_tokens > 0
    with_qa_a = model_cfg.max_qa_tokens > 0
    pad = tok.pad_token_id
    emb_ids = loaded.emb_token_ids

    def run_step(a_enc: list, p_enc: list, a_ids: torch.Tensor, p_ids: torch.Tensor, scale: float) -> tuple[float, float, float, int]:
        """One optimizer step's forward/backward on this process's slice; (loss, nce, qa, tokens)."""
        chunk = cfg.grad_cache_chunk or len(a_enc)

        def batch(encs: list, with_qa: bool) -> dict:
            # batches are built on the CPU; DeepSpeed has moved the module to its accelerator
            return {k: v.to(device) for k, v in D.collate(encs, emb_ids, pad, with_qa).items()}

        ba = [batch(a_enc[s:s + chunk], with_qa_a) for s in range(0, len(a_enc), chunk)]
        bp = [batch(p_enc[s:s + chunk], with_qa_p) for s in range(0, len(p_enc), chunk)]
        a_ids, p_ids = a_ids.to(device), p_ids.to(device)
        n_tok = sum(D.count_tokens(b) for b in ba + bp)
        n_ans = float(sum(int((b["labels"] != -100).sum()) for b in ba + bp))
        if not cfg.grad_cache_chunk:
            with autocast:
                oa, op = fwd(**ba[0], qa_item_scale=scale), fwd(**bp[0], qa_item_scale=scale)
                nce = info_nce(oa["emb"], op["emb"], cfg.temperature, a_ids, p_ids)
                qa_l = qa_loss(oa["qa_loss_sum"] + op["qa_loss_sum"], n_ans)
                loss = cfg.contrastive_weight * nce + cfg.qa_weight * qa_l
            (engine.backward(loss) if engine is not None else loss.backward())
            return loss.item(), nce.item(), qa_l.item(), n_tok
        # Gradient cache: (1) embeddings of every chunk without activations (EMB never sees QA, so
        # the QA segment can be left out here); (2) the contrastive loss over the whole slice and its
        # gradient w.r.t. the embeddings; (3) per chunk, recompute with activations and backprop
        # emb . grad + the chunk's share of the QA loss.
        with torch.no_grad(), autocast:
            ea = torch.cat([fwd(**{**batch(a_enc[s:s + chunk], False), "labels": None},
                                qa_item_scale=scale)["emb"] for s in range(0, len(a_enc), chunk)])
            ep = torch.cat([fwd(**{**batch(p_enc[s:s + chunk], False), "labels": None},
                                qa_item_scale=scale)["emb"] for s in range(0, len(p_enc), chunk)])
        ea.requires_grad_(True)
        ep.requires_grad_(True)
        nce = info_nce(ea, ep, cfg.temperature, a_ids, p_ids)
        ga, gp = torch.autograd.grad(cfg.contrastive_weight * nce, [ea, ep])
        qa_sum = 0.0
        for batches, grads in ((ba, ga), (bp, gp)):
            at = 0
            for b in batches:
                n = b["input_ids"].shape[0]
                with autocast:
                    o = fwd(**b, qa_item_scale=scale)
                    sur = (o["emb"] * grads[at:at + n]).sum() + cfg.qa_weight * o["qa_loss_sum"] / max(n_ans, 1.0)
                (engine.backward(sur) if engine is not None else sur.backward())
                qa_sum += o["qa_loss_sum"].item()
                at += n
        qa_l = qa_sum / max(n_ans, 1.0)
        return cfg.contrastive_weight * nce.item() + cfg.qa_weight * qa_l, nce.item(), qa_l, n_tok

    def save(step: int) -> None:
        tag = f"step-{step:08d}"
        client = {"step": step, "fingerprint": fp}
        if engine is not None:
            engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client)
        elif rank == 0:
            _save_plain(ckpt_root, tag, model, opt, client)
        _barrier(world)
        if rank == 0:
            _prune_checkpoints(ckpt_root, cfg.keep_checkpoints)

    log_f = open(out / "train_log.jsonl", "a") if rank == 0 else None
    losses: list[tuple[float, float, float]] = []
    tokens = 0
    t0 = time.perf_counter()
    step = start
    last_saved = start
    try:
        while step < cfg.max_steps:
            idx = D.batch_pair_indices(len(anchors), step, cfg.batch_size, cfg.seed)[rank * micro:(rank + 1) * micro]
            a, p = anchors[idx], positives[idx]
            scale = anneal_scale(step, cfg.anneal_steps)
            for g in opt.param_groups:
                g["lr"] = g.get("base_lr", cfg.lr) * _lr_factor(step, cfg.warmup_steps)
            if engine is None:
                opt.zero_grad(set_to_none=True)
            loss, nce, qa_l, n_tok = run_step([enc[int(i)] for i in a], [enc[int(i)] for i in p],
                                              torch.from_numpy(a), torch.from_numpy(p), scale)
            if engine is not None:
                engine.step()
            else:
                if world > 1:
                    import torch.distributed as dist

                    for prm in trainable:
                        if prm.grad is not None:
                            dist.all_reduce(prm.grad)
                            prm.grad /= world
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
            step += 1
            loss, nce, qa_l = (_all_sum(v, world) / world for v in (loss, nce, qa_l))
            tokens += int(_all_sum(n_tok, world))
            losses.append((loss, nce, qa_l))
            dt = time.perf_counter() - t0
            info = {"step": step, "max_steps": cfg.max_steps, "loss": loss, "nce": nce, "qa": qa_l,
                    "qa_item_scale": scale, "tokens": tokens, "seconds": round(dt, 3),
                    "tokens_per_s": tokens / dt if dt > 0 else 0.0}
            if rank == 0:
                log_f.write(json.dumps(info) + "\n")
                log_f.flush()
                if progress:
                    progress(info)
            out_of_time = cfg.max_seconds is not None and _all_sum(float(dt > cfg.max_seconds), world) > 0
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or out_of_time:
                save(step)
                last_saved = step
            if out_of_time:
                break
        if last_saved != step:
            save(step)
    finally:
        if log_f:
            log_f.close()
    seconds = time.perf_counter() - t0

    # Export. DeepSpeed: the fp32 master weights from the last checkpoint (the module itself holds
    # bf16 copies under bf16); plain torch: the module.
    if cfg.lora_rank:
        model.lm = model.lm.merge_and_unload()
    version = f"qarm-emb:{Path(loaded.source).name}:{fp[:12]}:s{step}"
    if rank == 0:
        sd = None
        if engine is not None and not cfg.lora_rank:
            sd = _fp32_state_from_checkpoint(ckpt_root, model)
        if sd is None:
            sd = {k: v.float() for k, v in model.state_dict().items()}
        meta = {"n_emb_tokens": model_cfg.n_emb_tokens, "dim": model_cfg.dim, "model_version": version,
                "base_model": loaded.source, "fingerprint": fp, "steps": step,
                "model_config": model_cfg.model_dump(), "train_config": cfg.model_dump()}
        lm_dtype = next(model.lm.parameters()).dtype
        model.lm.to(torch.float32)      # save_pretrained writes the module's dtype into config.json
        save_model(model, tok, model_dir, meta, state_dict=sd)
        model.lm.to(lm_dtype)
    _barrier(world)
    lf, ll = losses[:5], losses[-5:]
    record = TrainRecord(
        model_dir=str(model_dir), model_version=version, fingerprint=fp, steps=step, resumed_from_step=start,
        train_pairs=int(len(anchors)), world_size=world, deepspeed=cfg.use_deepspeed,
        zero_stage=cfg.zero_stage if cfg.use_deepspeed else 0, dtype="bfloat16" if bf16 else "float32",
        seconds=round(seconds, 3),
        train_tokens=tokens, tokens_per_s=round(tokens / seconds, 2) if seconds > 0 else 0.0,
        final_loss=losses[-1][0] if losses else float("nan"), final_nce=losses[-1][1] if losses else float("nan"),
        final_qa=losses[-1][2] if losses else float("nan"),
        loss_first=float(np.mean([x[0] for x in lf])) if lf else float("nan"),
        loss_last=float(np.mean([x[0] for x in ll])) if ll else float("nan"))
    if rank == 0:
        tmp = out / "train_record.json.tmp"
        tmp.write_text(json.dumps(record.to_dict(), indent=2))
        tmp.rename(rec_file)
    return record


def _fp32_state_from_checkpoint(ckpt_root: Path, model: Any) -> dict | None:
    """Full-precision weights reassembled from the newest DeepSpeed checkpoint (every ZeRO stage),
    or None when DeepSpeed cannot (then the module's own weights are exported)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root))
    except Exception:  # noqa: BLE001 -- any failure: fall back to the module weights
        return None
    # zero_to_fp32 lists a tied (shared) parameter under one name only: find it by identity
    alias: dict[int, list[str]] = {}
    for name, prm in model.named_parameters(remove_duplicate=False):
        alias.setdefault(id(prm), []).append(name)
    out = {}
    for name, prm in model.named_parameters(remove_duplicate=False):
        hit = next((sd[a] for a in alias[id(prm)] if a in sd), None)
        out[name] = (hit if hit is not None else prm.detach()).float()
    for name, buf in model.named_buffers():
        out[name] = buf
    return out


# ---------------------------------------------------------------- multi-process launch
def write_job(items: pa.Table, judgments: pa.Table, qa: pa.Table | None, out_dir: str | Path,
              model_cfg: EmbedModelConfig, cfg: TrainConfig) -> Path:
    """Write the inputs (Parquet) and configs (JSON) of a run to ``out_dir/job``; returns job.json."""
    import pyarrow.parquet as pq

    job_dir = Path(out_dir) / "job"
    job_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(items, job_dir / "items.parquet")
    pq.write_table(judgments, job_dir / "judgments.parquet")
    if qa is not None:
        pq.write_table(qa, job_dir / "qa.parquet")
    job = {"out_dir": str(Path(out_dir).resolve()), "items": str(job_dir / "items.parquet"),
           "judgments": str(job_dir / "judgments.parquet"),
           "qa": str(job_dir / "qa.parquet") if qa is not None else None,
           "model_config": model_cfg.model_dump(), "train_config": cfg.model_dump()}
    f = job_dir / "job.json"
    f.write_text(json.dumps(job, indent=2))
    return f


def run_job(job_file: str | Path) -> None:
    """Train the run described by ``job_file`` (written by ``write_job``) in this process: the entry
    point of each process a launcher starts (rank and world from its environment)."""
    import pyarrow.parquet as pq

    job = json.loads(Path(job_file).read_text())
    model_cfg = EmbedModelConfig.model_validate(job["model_config"])
    cfg = TrainConfig.model_validate(job["train_config"])
    items = pq.read_table(job["items"])
    judgments = pq.read_table(job["judgments"])
    qa = pq.read_table(job["qa"]) if job.get("qa") else None
    _train(items, judgments, qa, Path(job["out_dir"]), model_cfg, cfg, None)


def build_launch_command(job_file: str | Path, cfg: TrainConfig, python: str | None = None,
                         extra_launcher_args: list[str] | None = None) -> list[str]:
    """argv that runs ``qarm_core.embed.worker job_file`` in ``cfg.nproc`` processes on this node.

    torchrun: ``python -m torch.distributed.run --nproc_per_node N --master_port P -m
    qarm_core.embed.worker JOB``; deepspeed: ``python -m deepspeed.launcher.runner --num_gpus N
    --master_port P --module qarm_core.embed.worker JOB`` (on CPU hosts the DeepSpeed launcher
    treats --num_gpus as the process count; it passes ``--local_rank=i`` to each worker).
    Multi-node: add e.g. ``--nnodes/--node_rank/--master_addr`` (torchrun) or ``--hostfile``
    (deepspeed) through ``extra_launcher_args``.
    """
    py = python or sys.executable
    extra = list(extra_launcher_args or [])
    if cfg.launcher == "torchrun":
        return [py, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(cfg.nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(cfg.master_port), *extra,
                "-m", "qarm_core.embed.worker", str(job_file)]
    if cfg.launcher == "deepspeed":
        return [py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(cfg.nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(cfg.master_port), *extra,
                "--module", "qarm_core.embed.worker", str(job_file)]
    raise ValueError(f"launcher {cfg.launcher!r} starts no processes")


def launch_env(cfg: TrainConfig) -> dict[str, str]:
    """The environment of launched workers: this one, plus one BLAS/OpenMP thread pool per process
    sized so the processes share the cores instead of oversubscribing them, with passive waits."""
    env = dict(os.environ)
    threads = cfg.num_threads or max(1, (os.cpu_count() or 1) // cfg.nproc)
    env["OMP_NUM_THREADS"] = str(threads)
    # passive OpenMP waits: spinning threads of co-located processes slowed training ~10x here
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("PYTHONPATH", str(REPO))
    if str(REPO) not in env["PYTHONPATH"].split(os.pathsep):
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env["PYTHONPATH"]
    return env


def run_launched(job_file: Path, cfg: TrainConfig, progress: ProgressFn | None = None,
                 timeout_s: float | None = None) -> TrainRecord:
    """Start the multi-process run of ``job_file``, relay progress from its train_log.jsonl, wait,
    and return the record rank 0 wrote. A failed launch raises RuntimeError with the output tail."""
    job = json.loads(Path(job_file).read_text())
    out = Path(job["out_dir"])
    log = out / "train_log.jsonl"
    seen = log.stat().st_size if log.exists() else 0
    cmd = build_launch_command(job_file, cfg, extra_launcher_args=cfg.launcher_args)
    out_log = out / "launch.log"
    t0 = time.perf_counter()
    with open(out_log, "wb") as lf:
        proc = subprocess.Popen(cmd, env=launch_env(cfg), stdout=lf, stderr=subprocess.STDOUT, cwd=str(REPO))
        try:
            while True:
                try:
                    rc = proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    rc = None
                if progress and log.exists() and log.stat().st_size > seen:
                    with open(log, "rb") as f:
                        f.seek(seen)
                        chunk = f.read()
                    done = chunk.rfind(b"\n") + 1
                    seen += done
                    for line in chunk[:done].splitlines():
                        progress(json.loads(line))
                if rc is not None:
                    break
                if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                    proc.kill()
                    proc.wait()
                    raise RuntimeError(f"training launch timed out after {timeout_s}s; see {out_log}")
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
    if rc != 0:
        tail = out_log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"training launch {' '.join(cmd)} failed with exit code {rc}:\n{tail}")
    return TrainRecord(**json.loads((out / "train_record.json").read_text()))
