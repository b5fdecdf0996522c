"""The training loop: inputs encoded once, a session (model, optimizer or DeepSpeed engine, resumed
state), one optimizer step (full batch, or gradient cache over chunks), the loop over steps with
checkpoints and the time budget, and the export of the fine-tuned model."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from qarm_core.allocator import keep_freed_memory
from qarm_core.arrays import has_duplicates, union
from qarm_core.embed.config import EmbedModelConfig, TrainConfig
from qarm_core.embed.train.checkpoint import (deepspeed_resume_tag, digest, fp32_state_from_checkpoint, load_plain,
                                             no_pickle_code, run_fingerprint, save_checkpoint)
from qarm_core.embed.train.distributed import (all_sum, barrier, deepspeed_config, dist_env, gather_floats,
                                               gather_with_local_grad, init_process_group, process_group_backend,
                                               training_device, training_dtype, uses_deepspeed)
from qarm_core.embed.train.record import STAGE, ProgressFn, TrainRecord, mark_rank_done
from qarm_core.errors import DataError


def lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def freeze_lower_layers(lm: Any, n_layers: int) -> None:
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


def apply_lora(model: Any, cfg: TrainConfig) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise DataError(STAGE, "config", "lora_rank > 0 needs the peft package (pip install peft)") from None
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model.lm = get_peft_model(model.lm, lcfg)
    return model


def encode_inputs(items: pa.Table, judgments: pa.Table, qa: pa.Table | None, model_cfg: EmbedModelConfig,
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
    used = union(anchors, positives)
    texts = D.item_texts(items, model_cfg, used)
    qa_map = D.qa_by_item(qa, model_cfg.max_qa_pairs if model_cfg.max_qa_tokens else 0, STAGE)
    enc = D.encode_items(tokenizer, texts, qa_map, model_cfg)
    data_digest = digest([hashlib.sha256(anchors.tobytes() + positives.tobytes()).hexdigest(),
                          [(k, v.item, v.qa, v.qa_is_answer) for k, v in sorted(enc.items())]])
    return anchors, positives, enc, data_digest


@dataclass
class Session:
    """What every step of a run shares (built by ``start_session``)."""

    cfg: TrainConfig
    model_cfg: EmbedModelConfig
    loaded: Any                   # embed.model.LoadedModel: model, tokenizer, EMB token ids, source
    engine: Any                   # the DeepSpeed engine, or None on the plain-torch path
    opt: Any
    fwd: Any                      # what runs the forward pass: the engine or the module
    device: Any
    trainable: list
    autocast: Any                 # bf16 autocast on the plain-torch path, a no-op otherwise
    bf16: bool
    anchors: np.ndarray           # (n_pairs,) dense indices of the training pairs' anchors
    positives: np.ndarray         # (n_pairs,)
    enc: dict                     # item id -> encoded item (tokens of the item and QA segments)
    reference: Any                # (m, dim) float32 reference vectors of the stability term, or None
    reference_rows: dict          # item id -> its row of ``reference``
    fingerprint: str
    rank: int
    world: int
    backend: str                  # the process group's backend (gloo / nccl); "" without a group
    out: Path
    start: int                    # the step this process starts from (> 0 after a resume)

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"


def _optimizer(model: Any, cfg: TrainConfig, world: int) -> tuple[Any, Any, Any]:
    """(engine or None, optimizer, forward module): AdamW over the trainable body and the
    projection (their own learning rates), wrapped by DeepSpeed when configured."""
    import torch

    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("proj.")]
    groups = [{"params": body, "lr": cfg.lr, "base_lr": cfg.lr},
              {"params": list(model.proj.parameters()), "lr": cfg.proj_lr, "base_lr": cfg.proj_lr}]
    # fused AdamW: one kernel per tensor instead of ~10 elementwise passes. Measured here on one
    # flat 135M-element fp32 buffer (what ZeRO hands the optimizer): 0.09 vs 0.65 s a step.
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if not cfg.use_deepspeed:
        return None, opt, model
    import deepspeed

    ds_cfg = deepspeed_config(cfg, world, unmanaged_accumulation=cfg.grad_cache_chunk > 0)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    return engine, opt, engine


def reference_vectors(reference: pa.Table | None, cfg: TrainConfig, model_cfg: EmbedModelConfig,
                      trained: Any = None) -> tuple[Any, dict, str]:
    """The stability term's reference: ``(vectors (m, dim) float32 tensor, item id -> row, digest)``
    from a table (item_id, vector) such as the published embeddings, restricted to the ``trained``
    item ids when given; ``(None, {}, "")`` when the term is off (``stability_weight`` 0) or there
    is no table."""
    import torch

    if reference is None or cfg.stability_weight == 0:
        return None, {}, ""
    missing = [c for c in ("item_id", "vector") if c not in reference.column_names]
    if missing:
        raise DataError(STAGE, "reference", f"the stability term's reference lacks columns {missing}; "
                                            f"has {reference.column_names}")
    if trained is not None:      # only the items a step can see: not a 10M-row table in memory
        import pyarrow.compute as pc

        reference = reference.filter(pc.is_in(reference["item_id"], pa.array(sorted(trained), pa.int64())))
    ids = reference["item_id"].to_numpy().astype(np.int64)
    flat = reference["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    x = flat.astype(np.float32, copy=False).reshape(len(ids), -1) if len(ids) else np.zeros((0, model_cfg.dim), np.float32)
    if x.shape[1] != model_cfg.dim:
        raise DataError(STAGE, "reference", f"reference vectors are {x.shape[1]}-d; the model embeds in "
                                            f"{model_cfg.dim} (embed.model.dim)")
    if has_duplicates(ids) or not np.isfinite(x).all():
        raise DataError(STAGE, "reference", "reference vectors must be finite, one row per item id")
    return (torch.from_numpy(x), {int(i): r for r, i in enumerate(ids)},
            hashlib.sha256(ids.tobytes() + x.tobytes()).hexdigest())


def start_session(items: pa.Table, judgments: pa.Table, qa: pa.Table | None, out: Path,
                  model_cfg: EmbedModelConfig, cfg: TrainConfig, reference: pa.Table | None = None
                  ) -> Session | TrainRecord:
    """Load the model, encode the inputs, build the optimizer (or engine) and resume from this run's
    newest checkpoint; the stored record instead when this run is already complete. ``reference``:
    (item_id, vector) rows the stability term keeps embeddings near (``stability_weight``)."""
    import torch

    from qarm_core.embed.model import load_model

    rank, world, _ = dist_env()
    cfg = cfg.model_copy(update={"use_deepspeed": uses_deepspeed(cfg, world)})
    if world > 1 and world != cfg.world_size:
        raise DataError(STAGE, "config", f"launched with WORLD_SIZE={world} but embed.train.nnodes * nproc = "
                                         f"{cfg.nnodes} * {cfg.nproc} = {cfg.world_size}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    backend = ""
    if world > 1 or cfg.use_deepspeed:
        backend = init_process_group(world, cfg.use_deepspeed, process_group_backend(cfg),
                                     cfg.collective_timeout_s)
    loaded = load_model(model_cfg, STAGE, torch.float32)
    anchors, positives, enc, data_digest = encode_inputs(items, judgments, qa, model_cfg, cfg, loaded.tokenizer)
    ref, ref_rows, ref_digest = reference_vectors(reference, cfg, model_cfg, enc.keys())
    if ref_digest:
        data_digest = digest([data_digest, ref_digest])
    fp = run_fingerprint(model_cfg, cfg, data_digest, world)

    out.mkdir(parents=True, exist_ok=True)
    rec_file, ckpt_root = out / "train_record.json", out / "checkpoints"
    if rec_file.exists():
        old = json.loads(rec_file.read_text())
        if old.get("fingerprint") == fp and (out / "model" / "qarm_embed.json").exists():
            return TrainRecord(**{**old, "reused": True})
    run_file = ckpt_root / "run.json"
    if run_file.exists() and json.loads(run_file.read_text()).get("fingerprint") != fp:
        raise DataError(STAGE, "checkpoints", f"{ckpt_root} holds checkpoints of a different run (config or "
                                              "data changed); remove it or train into another folder")
    barrier(world)
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"fingerprint": fp}))

    model = loaded.model
    if cfg.lora_rank:
        apply_lora(model, cfg)          # wraps model.lm in place; LoRA freezes the base weights itself
    else:
        freeze_lower_layers(model.lm, cfg.freeze_layers)
    if cfg.gradient_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    device = training_device(cfg)
    if device == "cuda" and not cfg.use_deepspeed:      # DeepSpeed moves the module itself
        model.to(torch.device("cuda", dist_env()[2]))    # before the optimizer: its state follows the params
    engine, opt, fwd = _optimizer(model, cfg, world)
    start = 0
    if engine is not None:
        tag = deepspeed_resume_tag(ckpt_root)
        if tag is not None:
            with no_pickle_code(ckpt_root):
                _, client = engine.load_checkpoint(str(ckpt_root), tag=tag)
            start = int(client["step"])
    else:
        client = load_plain(ckpt_root, model, opt)
        start = int(client["step"]) if client else 0
    bf16 = training_dtype(cfg).bf16
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if bf16 and not cfg.use_deepspeed
                else torch.autocast(device, enabled=False))
    return Session(cfg=cfg, model_cfg=model_cfg, loaded=loaded, engine=engine, opt=opt, fwd=fwd,
                   device=engine.device if engine is not None else next(model.parameters()).device,
                   trainable=[p for p in model.parameters() if p.requires_grad], autocast=autocast, bf16=bf16,
                   anchors=anchors, positives=positives, enc=enc, reference=ref, reference_rows=ref_rows,
                   fingerprint=fp, rank=rank, world=world,
                   backend=backend, out=out, start=start)


def _batch(s: Session, encs: list, with_qa: bool) -> dict:
    """Collated tensors of encoded items on the session's device (built on the CPU; DeepSpeed has
    moved the module to its accelerator)."""
    from qarm_core.embed import data as D

    return {k: v.to(s.device) for k, v in D.collate(encs, s.loaded.emb_token_ids,
                                                     s.loaded.tokenizer.pad_token_id, with_qa).items()}


def _backward(s: Session, loss: Any) -> None:
    (s.engine.backward(loss) if s.engine is not None else loss.backward())


def contrastive(s: Session, ea: Any, ep: Any, a_ids: Any, p_ids: Any) -> tuple[Any, Any]:
    """(objective, nce) of this rank's embeddings ea, ep (local_batch, dim) and item ids
    (local_batch,): InfoNCE over the global batch, every rank's pairs gathered, negatives of every
    pair drawn from all of them (``losses.global_info_nce``: objective = world * nce is what this
    rank backwards, nce is reported). Alone: the plain in-batch loss."""
    from qarm_core.embed.losses import global_info_nce

    def gather(x: Any) -> Any:
        return gather_with_local_grad(x, s.world, s.rank)

    return global_info_nce(gather(ea), gather(ep), s.cfg.temperature, gather(a_ids), gather(p_ids), s.world)


def stability(s: Session, ea: Any, ep: Any, a_ids: Any, p_ids: Any) -> Any:
    """The stability term of this rank's rows: mean over the rows whose item has a reference vector
    of the squared distance between the embedding (unit) and it; None when the term is off. Averaged
    over ranks by the gradient averaging (each rank's rows are an equal share of the batch)."""
    import torch

    if s.reference is None:
        return None
    e = torch.cat([ea, ep]).float()
    rows = torch.tensor([s.reference_rows.get(int(i), -1) for i in torch.cat([a_ids, p_ids]).tolist()])
    have = rows >= 0
    if not bool(have.any()):
        return e.sum() * 0.0
    ref = s.reference[rows[have]].to(e.device)
    return ((e[have.to(e.device)] - ref) ** 2).sum(1).mean()


def gradient_cache_step(s: Session, ba: list[dict], bp: list[dict], a_enc: list, p_enc: list, a_ids: Any,
                        p_ids: Any, scale: float, n_ans: float) -> tuple[float, float, float, float]:
    """One step's backward with a gradient cache over chunks of ``grad_cache_chunk`` rows: (1) the
    embeddings of every chunk without activations (EMB never sees QA, so the QA segment is left out);
    (2) the contrastive loss over the global batch (other ranks' embeddings gathered as constants)
    and its gradient w.r.t. this rank's embeddings; (3) per chunk, the forward again with
    activations and backward of emb . grad + the chunk's share of the QA loss. Equal to the
    full-batch step (tested). Returns (loss, nce, qa, stability), unscaled."""
    import torch

    cfg, chunk = s.cfg, s.cfg.grad_cache_chunk
    with torch.no_grad(), s.autocast:
        ea = torch.cat([s.fwd(**{**_batch(s, a_enc[i:i + chunk], False), "labels": None},
                              qa_item_scale=scale)["emb"] for i in range(0, len(a_enc), chunk)])
        ep = torch.cat([s.fwd(**{**_batch(s, p_enc[i:i + chunk], False), "labels": None},
                              qa_item_scale=scale)["emb"] for i in range(0, len(p_enc), chunk)])
    ea.requires_grad_(True)          # leaves (local_batch, dim): the gradient wanted is w.r.t. these rows
    ep.requires_grad_(True)
    objective, nce = contrastive(s, ea, ep, a_ids, p_ids)
    stab = stability(s, ea, ep, a_ids, p_ids)
    total = cfg.contrastive_weight * objective + (cfg.stability_weight * stab if stab is not None else 0.0)
    ga, gp = torch.autograd.grad(total, [ea, ep])
    qa_sum = 0.0
    for batches, grads in ((ba, ga), (bp, gp)):
        at = 0
        for b in batches:
            n = b["input_ids"].shape[0]
            with s.autocast:
                o = s.fwd(**b, qa_item_scale=scale)
                surrogate = (o["emb"] * grads[at:at + n]).sum() + cfg.qa_weight * o["qa_loss_sum"] / max(n_ans, 1.0)
            _backward(s, surrogate)
            qa_sum += o["qa_loss_sum"].item()
            at += n
    qa_l = qa_sum / max(n_ans, 1.0)
    st = stab.item() if stab is not None else 0.0
    return cfg.contrastive_weight * nce.item() + cfg.qa_weight * qa_l + cfg.stability_weight * st, nce.item(), qa_l, st


def train_step(s: Session, a_enc: list, p_enc: list, a_ids: Any, p_ids: Any,
               scale: float) -> tuple[float, float, float, float, int]:
    """One optimizer step's forward/backward on this process's slice of the batch:
    (loss, nce, qa, stability, real tokens), unscaled. The contrastive loss is over the global batch
    (``contrastive``); the QA loss is this slice's own (gradient averaging over ranks is right
    for it: the objective is the mean of the ranks' QA losses)."""
    from qarm_core.embed import data as D
    from qarm_core.embed.losses import qa_loss

    cfg, mcfg = s.cfg, s.model_cfg
    chunk = cfg.grad_cache_chunk or len(a_enc)
    with_qa_a, with_qa_p = mcfg.max_qa_tokens > 0, cfg.qa_on_positive and mcfg.max_qa_tokens > 0
    ba = [_batch(s, a_enc[i:i + chunk], with_qa_a) for i in range(0, len(a_enc), chunk)]
    bp = [_batch(s, p_enc[i:i + chunk], with_qa_p) for i in range(0, len(p_enc), chunk)]
    a_ids, p_ids = a_ids.to(s.device), p_ids.to(s.device)
    n_tok = sum(D.count_tokens(b) for b in ba + bp)
    n_ans = float(sum(int((b["labels"] != -100).sum()) for b in ba + bp))
    if cfg.grad_cache_chunk:
        return (*gradient_cache_step(s, ba, bp, a_enc, p_enc, a_ids, p_ids, scale, n_ans), n_tok)
    with s.autocast:
        oa, op = s.fwd(**ba[0], qa_item_scale=scale), s.fwd(**bp[0], qa_item_scale=scale)
        objective, nce = contrastive(s, oa["emb"], op["emb"], a_ids, p_ids)
        qa_l = qa_loss(oa["qa_loss_sum"] + op["qa_loss_sum"], n_ans)
        loss = cfg.contrastive_weight * nce + cfg.qa_weight * qa_l               # reported
        objective = cfg.contrastive_weight * objective + cfg.qa_weight * qa_l    # backwarded (= loss alone)
        stab = stability(s, oa["emb"], op["emb"], a_ids, p_ids)
        if stab is not None:
            loss, objective = loss + cfg.stability_weight * stab, objective + cfg.stability_weight * stab
    _backward(s, objective)
    return loss.item(), nce.item(), qa_l.item(), stab.item() if stab is not None else 0.0, n_tok


def _optimizer_step(s: Session) -> float:
    """The optimizer step over the gradients averaged across ranks; returns their global 2-norm
    before clipping (the number that shows a multi-process run computes the single-process
    gradient: the tests compare it)."""
    import torch

    if s.engine is not None:
        s.engine.step()
        norm = s.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
    if s.world > 1:
        import torch.distributed as dist

        for prm in s.trainable:
            if prm.grad is not None:
                dist.all_reduce(prm.grad)
                prm.grad /= s.world
    norm = torch.nn.utils.clip_grad_norm_(s.trainable, 1.0)
    s.opt.step()
    return float(norm)


def run_steps(s: Session, progress: ProgressFn | None) -> tuple[int, list[tuple[float, float, float]], int, float]:
    """Steps from ``s.start`` to ``max_steps`` (or the time budget), checkpointing every
    ``checkpoint_every`` steps and at the end; one line per step to train_log.jsonl and ``progress``
    (rank 0). Every step's batch is a function of (seed, step). Returns (last step, per-step
    (loss, nce, qa), tokens, seconds)."""
    import torch

    from qarm_core.embed import data as D
    from qarm_core.embed.model import anneal_scale

    cfg, world, rank = s.cfg, s.world, s.rank
    micro = cfg.batch_size // world
    save = lambda step: save_checkpoint(s.ckpt_root, step, s.fingerprint, s.model, s.opt, s.engine,  # noqa: E731
                                        rank, world, cfg.keep_checkpoints)
    log_f = open(s.out / "train_log.jsonl", "a") if rank == 0 else None
    losses: list[tuple[float, float, float]] = []
    tokens, step, last_saved, t0 = 0, s.start, s.start, time.perf_counter()
    try:
        while step < cfg.max_steps:
            idx = D.batch_pair_indices(len(s.anchors), step, cfg.batch_size, cfg.seed)[rank * micro:(rank + 1) * micro]
            a, p = s.anchors[idx], s.positives[idx]
            scale = anneal_scale(step, cfg.anneal_steps)
            for g in s.opt.param_groups:
                g["lr"] = g.get("base_lr", cfg.lr) * lr_factor(step, cfg.warmup_steps)
            if s.engine is None:
                s.opt.zero_grad(set_to_none=True)
            loss, nce, qa_l, stab, n_tok = train_step(s, [s.enc[int(i)] for i in a], [s.enc[int(i)] for i in p],
                                                      torch.from_numpy(a), torch.from_numpy(p), scale)
            grad_norm = _optimizer_step(s)
            step += 1
            # one collective for the step's numbers: (world, 5) rows of (loss, nce, qa, stability, tokens)
            per_rank = np.array(gather_floats([loss, nce, qa_l, stab, float(n_tok)], world))
            loss, nce, qa_l, stab = (float(v) for v in per_rank[:, :4].mean(axis=0))
            tokens += int(per_rank[:, 4].sum())
            losses.append((loss, nce, qa_l))
            dt = time.perf_counter() - t0
            # nce_spread: max - min of the ranks' nce; every rank computes the same global loss, so
            # anything but 0 means the gathered batches disagree
            info = {"step": step, "max_steps": cfg.max_steps, "loss": loss, "nce": nce, "qa": qa_l,
                    **({"stability": stab} if s.reference is not None else {}),
                    "nce_spread": float(np.ptp(per_rank[:, 1])), "grad_norm": grad_norm,
                    "qa_item_scale": scale, "tokens": tokens, "seconds": round(dt, 3),
                    "tokens_per_s": tokens / dt if dt > 0 else 0.0}
            if rank == 0:
                log_f.write(json.dumps(info) + "\n")
                log_f.flush()
                if progress:
                    progress(info)
            out_of_time = cfg.max_seconds is not None and all_sum(float(dt > cfg.max_seconds), world) > 0
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
    return step, losses, tokens, time.perf_counter() - t0


def export_model(s: Session, step: int, losses: list[tuple[float, float, float]], tokens: int,
                 seconds: float) -> TrainRecord:
    """Write the fine-tuned model to ``out/model`` (rank 0) and the run's record. DeepSpeed: the fp32
    master weights from the last checkpoint (the module holds bf16 copies under bf16); plain torch:
    the module's own weights."""
    import torch

    from qarm_core.embed.model import read_meta, save_model

    cfg, model = s.cfg, s.model
    if cfg.lora_rank:
        model.lm = model.lm.merge_and_unload()
    # a continued fine-tune (the weekly retrain) is named after the base model it descends from,
    # not after the folder it started in (a snapshot's "model")
    start = read_meta(Path(s.loaded.source)) if s.loaded.fine_tuned else None
    base_model = (start or {}).get("base_model") or s.loaded.source
    version = f"qarm-emb:{Path(base_model).name}:{s.fingerprint[:12]}:s{step}"
    model_dir = s.out / "model"
    if s.rank == 0:
        sd = fp32_state_from_checkpoint(s.ckpt_root, model) if s.engine is not None and not cfg.lora_rank else None
        if sd is None:
            sd = {k: v.float() for k, v in model.state_dict().items()}
        meta = {"n_emb_tokens": s.model_cfg.n_emb_tokens, "dim": s.model_cfg.dim, "model_version": version,
                "base_model": base_model, "started_from": s.loaded.model_version if start else None,
                "fingerprint": s.fingerprint, "steps": step,
                "model_config": s.model_cfg.model_dump(), "train_config": cfg.model_dump()}
        lm_dtype = next(model.lm.parameters()).dtype
        model.lm.to(torch.float32)      # save_pretrained writes the module's dtype into config.json
        save_model(model, s.loaded.tokenizer, model_dir, meta, state_dict=sd)
        model.lm.to(lm_dtype)
    first, last = losses[:5], losses[-5:]
    nan = float("nan")
    record = TrainRecord(
        model_dir=str(model_dir), model_version=version, fingerprint=s.fingerprint, steps=step,
        resumed_from_step=s.start, train_pairs=int(len(s.anchors)), world_size=s.world, deepspeed=cfg.use_deepspeed,
        zero_stage=cfg.zero_stage if cfg.use_deepspeed else 0, dtype="bfloat16" if s.bf16 else "float32",
        seconds=round(seconds, 3), train_tokens=tokens,
        tokens_per_s=round(tokens / seconds, 2) if seconds > 0 else 0.0,
        final_loss=losses[-1][0] if losses else nan, final_nce=losses[-1][1] if losses else nan,
        final_qa=losses[-1][2] if losses else nan,
        loss_first=float(np.mean([x[0] for x in first])) if first else nan,
        loss_last=float(np.mean([x[0] for x in last])) if last else nan, backend=s.backend,
        rows=s.loaded.model.last_rows)
    if s.rank == 0:
        tmp = s.out / "train_record.json.tmp"
        tmp.write_text(json.dumps(record.to_dict(), indent=2))
        tmp.rename(s.out / "train_record.json")
    mark_rank_done(s.out, s.rank)
    # no rank exits before the model and the record are written: on another node, the launch that
    # started a rank reads the record (from the shared run folder) as soon as its ranks are done
    barrier(s.world)
    return record


@keep_freed_memory()
def train_in_process(items: pa.Table, judgments: pa.Table, qa: pa.Table | None, out: Path,
                     model_cfg: EmbedModelConfig, cfg: TrainConfig, progress: ProgressFn | None,
                     reference: pa.Table | None = None) -> TrainRecord:
    """Train in this process (one rank of a launched run, or alone) into ``out``; resumes from the
    run's newest checkpoint, returns the stored record when the run is already complete."""
    if cfg.dtype == "auto":  # a job written by hand (or by an older version) for a launched worker
        cfg = cfg.model_copy(update={"dtype": training_dtype(cfg).name})
    session = start_session(items, judgments, qa, out, model_cfg, cfg, reference)
    if isinstance(session, TrainRecord):     # the run is complete already, so is this rank's work
        mark_rank_done(out, dist_env()[0])
        return session
    step, losses, tokens, seconds = run_steps(session, progress)
    return export_model(session, step, losses, tokens, seconds)
