"""Fine-tuning of the three-segment model, with DeepSpeed (ZeRO) or plain torch, resumable.

Entry points:

* ``train_embedding_model(items, judgments, qa, out_dir, model_cfg, train_cfg)``: trains in this
  process (``launcher == "none"``) or starts ``nproc`` processes on this node with torchrun / the
  deepspeed launcher and waits for them (node ``node_rank`` of ``nnodes``: every node calls it with
  the same ``out_dir`` on a shared filesystem); returns a ``TrainRecord``.
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
      train_log.jsonl     one line per step (loss, nce, qa, nce_spread, grad_norm, scale, tokens/s)
      train_record.json   the ``TrainRecord`` of the finished run
      job/                (multi-process runs) job.json + the input tables as Parquet (+ the
                          DeepSpeed launcher's hostfile of a multi-node run)

GPU hosts: ``launcher="deepspeed"`` (or torchrun) with ``nproc`` = GPUs per node, ``dtype=auto`` (bf16),
``zero_stage=2`` (3 for models that do not fit one GPU), ``attn_implementation="sdpa"``, a larger
``batch_size`` (e.g. 256+; ``grad_cache_chunk`` only when a GPU's share of the batch does not fit:
it recomputes every forward), ``freeze_layers=0``; the module goes to each rank's GPU (DeepSpeed
moves it; the plain-torch path, ``use_deepspeed=False``, too) and batches follow it; the process
group is NCCL there, gloo on CPUs (``distributed.process_group_backend``, recorded in
``TrainRecord.backend``).
Several nodes: ``nnodes``, ``node_rank`` and ``master_addr`` (default ``$MASTER_ADDR``), one launch
per node (``launch.build_launch_command``); the world is ``nnodes * nproc`` processes. In a
refresh, node 0 posts the job on a board and the other nodes join it (``nodes``).

Every step's batch is a function of (seed, step) (``data.batch_pair_indices``) and nothing in the
model is random (no dropout), so a run killed after checkpoint k and resumed reaches the same
weights as an uninterrupted run. With several processes each takes a contiguous slice of the
global batch (rank order); the contrastive loss is over the whole global batch: every rank gathers
all ranks' embeddings, keeps the gradient of its own rows and scales its loss by the world size, so
that the averaged update equals the single-process one (``losses.global_info_nce``; tested).

Modules: ``distributed`` (device, numeric type, DeepSpeed config, process group, gathers), ``checkpoint`` (run
fingerprint, checkpoint IO), ``loop`` (session, step, loop, export), ``launch`` (jobs, launcher
command, relayed progress), ``nodes`` (node 0 posts a multi-node job, the other nodes'
``qarm train-node`` joins it), ``record`` (``TrainRecord``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pyarrow as pa

from qarm_core.embed.config import EmbedModelConfig, TrainConfig
from qarm_core.embed.train.checkpoint import run_fingerprint
from qarm_core.embed.train.distributed import DEEPSPEED_CONFIG_DIR, deepspeed_config, training_dtype
from qarm_core.embed.train.launch import build_launch_command, launch_env, run_job, run_launched, write_job
from qarm_core.embed.train.loop import train_in_process
from qarm_core.embed.train.nodes import announced
from qarm_core.embed.train.record import STAGE, ProgressFn, TrainRecord
from qarm_core.progress import Progress

__all__ = ["DEEPSPEED_CONFIG_DIR", "STAGE", "TrainRecord", "build_launch_command", "deepspeed_config",
           "launch_env", "run_fingerprint", "run_job", "run_launched", "train_embedding_model",
           "train_in_process", "training_dtype", "write_job"]


def train_embedding_model(items: pa.Table, judgments: pa.Table, qa: pa.Table | None, out_dir: str | Path,
                          model_cfg: EmbedModelConfig | None = None, train_cfg: TrainConfig | None = None,
                          progress: ProgressFn | None = None, reference: pa.Table | None = None,
                          board: str | Path | None = None) -> TrainRecord:
    """Fine-tune the three-segment model on judged pairs (+ QA) and write it to ``out_dir/model``.

    ``items``: the items table (item_id, title, year?, tags?); ``judgments``: pairs with
    src_item/dst_item (and ``keep``: only kept rows train; without it every row is a positive);
    ``qa``: the QA table or None. Resumes from ``out_dir/checkpoints`` when a run with the same
    fingerprint was interrupted; returns the stored record without training when the run is
    already complete. ``progress`` gets one dict per step (rank 0 only). ``reference``: (item_id,
    vector) rows, e.g. the published embeddings, that ``train_cfg.stability_weight`` keeps the
    trained items' embeddings near (continued fine-tuning that keeps the SIDs). ``board``: where
    node 0 of a multi-node run posts the job for the other nodes' ``qarm train-node``
    (``nodes.announced``); without it every node must call this function itself.
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
        job = write_job(items, judgments, qa, out_dir, model_cfg, cfg, reference)
        posted = board is not None and cfg.nnodes > 1 and cfg.node_rank == 0
        with announced(board, job, cfg) if posted else contextlib.nullcontext():
            rec = run_launched(job, cfg, relay)
    else:
        rec = train_in_process(items, judgments, qa, Path(out_dir), model_cfg, cfg, relay, reference)
    prog.finish()
    return dataclasses.replace(rec, dtype_reason=choice.reason)
