"""DeepSpeed's config and the process group: the numeric type of a run, the DeepSpeed config dict,
rank/world from the launcher's environment, gloo setup, barriers and sums across processes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from qarm_core.embed.config import TrainConfig
from qarm_core.embed.train.record import STAGE
from qarm_core.errors import DataError

if TYPE_CHECKING:
    from qarm_core.devices import DTypeChoice

REPO = Path(__file__).resolve().parents[3]
DEEPSPEED_CONFIG_DIR = REPO / "configs" / "deepspeed"
# Used when the repo's configs/ folder is not there (an installed wheel); same content as zero{N}.json.
BUILTIN_ZERO = {"stage": 2, "contiguous_gradients": True, "overlap_comm": False, "reduce_scatter": True,
                "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}


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
        ds = {"zero_optimization": dict(BUILTIN_ZERO, stage=cfg.zero_stage), "gradient_clipping": 1.0,
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


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) when alone."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(world: int, use_deepspeed: bool) -> None:
    """gloo process group. DeepSpeed needs one even alone: a single-process run gets a group of
    one on a free local port (DeepSpeed would otherwise try MPI discovery)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    # alone: a group of one over a free local port, passed explicitly rather than through
    # os.environ (child processes started later must not inherit a port that is taken)
    kw = {} if world > 1 else {"init_method": f"tcp://127.0.0.1:{free_port()}", "rank": 0, "world_size": 1}
    if world == 1:
        os.environ.setdefault("LOCAL_RANK", "0")     # DeepSpeed's engine asserts it is set
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False, auto_mpi_discovery=world > 1, **kw)
    else:
        dist.init_process_group("gloo", **kw)


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_sum(x: float, world: int) -> float:
    if world == 1:
        return x
    import torch
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())
