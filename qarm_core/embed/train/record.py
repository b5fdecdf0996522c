"""What a training run reports, and the stage name its errors carry."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

STAGE = "train"

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
    backend: str = ""             # process-group backend (gloo on CPUs, nccl on GPUs); "" without a group
    rows: str = ""                # how the last training step ran its rows: "packed" or "padded" (``ThreeSegmentLM.packs``)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def rank_done_file(out_dir: str | Path, rank: int) -> Path:
    """The file rank ``rank`` of a run into ``out_dir`` writes once its work is done."""
    return Path(out_dir) / "ranks_done" / f"rank-{rank:05d}"


def mark_rank_done(out_dir: str | Path, rank: int) -> None:
    """Mark rank ``rank``'s work done: its steps and its part of the last checkpoint finished, and on
    rank 0 the model and ``train_record.json`` written. Written before the run's last barrier, so a
    rank that dies after it (the launcher then stops the others) cannot keep another's mark from
    being written; the launcher clears its ranks' marks before it starts them."""
    f = rank_done_file(out_dir, rank)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(f"{os.getpid()} {time.time():.3f}\n")
