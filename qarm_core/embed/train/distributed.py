"""DeepSpeed's config and the process group: the device and numeric type of a run, the DeepSpeed
config dict, rank/world from the launcher's environment, the process group (NCCL on GPUs, gloo on
CPUs), barriers, sums and gathers across processes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def training_device(cfg: TrainConfig) -> str:
    """"cuda" or "cpu": where a training run computes: the GPU whenever torch sees one, on both
    paths (DeepSpeed moves the module to the rank's GPU itself; the plain-torch path moves it in
    ``loop.start_session``). Measured on an H200 (64 pairs a step): the plain-torch path trained on
    the host's CPU at 1,805 tokens/s before it followed the GPU, and at 20,989 since."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def training_dtype(cfg: TrainConfig) -> "DTypeChoice":
    """The numeric type of a training run: ``cfg.dtype`` resolved on ``training_device``."""
    from qarm_core.devices import resolve_dtype

    return resolve_dtype(cfg.dtype, training_device(cfg), STAGE, "embed.train.dtype")


def uses_deepspeed(cfg: TrainConfig, world: int) -> bool:
    """``cfg.use_deepspeed`` resolved for a run of ``world`` processes: "auto" is DeepSpeed for more
    than one process (any launcher) or on a GPU, and plain torch for one process on a CPU (there
    ZeRO partitions nothing; its flat-buffer copies cost ~25% of a step)."""
    if cfg.use_deepspeed != "auto":
        return bool(cfg.use_deepspeed)
    return world > 1 or training_device(cfg) == "cuda"


def process_group_backend(cfg: TrainConfig) -> str:
    """The process group's backend: "nccl" when the run computes on CUDA (gradients and the
    gathered embeddings are GPU tensors, which gloo reduces through host copies, if at all),
    else "gloo" (CPU tensors; NCCL takes GPU tensors only)."""
    return "nccl" if training_device(cfg) == "cuda" else "gloo"


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
    # The loop scales the contrastive loss by the world size on the assumption that DeepSpeed
    # averages gradients over ranks (its default, "mean"; ZeRO-2 divides each bucket by the world
    # before the reduce-scatter); a summing config would make every update world times too large.
    if ds.get("gradient_allreduce_op", "mean") != "mean":
        raise DataError(STAGE, "deepspeed_config", f"gradient_allreduce_op={ds['gradient_allreduce_op']!r} in "
                                                   f"{path}: training needs gradients averaged over ranks ('mean')")
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


def local_world_size(env: dict | None = None) -> int:
    """How many ranks run on this host as the launchers this project starts say: torchrun's
    ``LOCAL_WORLD_SIZE``, the ``deepspeed`` launcher's ``LOCAL_SIZE``; 1 when neither is set
    (alone, one process per node, or a launcher that sets neither, e.g. mpirun)."""
    env = os.environ if env is None else env
    return int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 1)


def _skip_shared_memory_allreduce() -> None:
    """Tell DeepSpeed not to build its shared-memory allreduce op: it only serves ranks that share
    a host, and on a fresh machine its JIT compile costs about a minute of every first run."""
    import deepspeed.ops

    # DeepSpeed probes the compatible ops once per process and keeps the dict, so the edit holds
    # for the ``init_distributed`` below (deepspeed/ops/__init__.py).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(world: int, use_deepspeed: bool, backend: str, timeout_s: float) -> str:
    """The process group over ``backend`` (``process_group_backend``); returns the backend of the
    group in use (an existing group's own). A collective that waits longer than ``timeout_s`` for
    a peer raises (``TrainConfig.collective_timeout_s``). DeepSpeed needs a group even alone: a
    single-process run gets a group of one on a free local port (DeepSpeed would otherwise try MPI
    discovery)."""
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        return str(dist.get_backend())
    # alone: a group of one over a free local port, passed explicitly rather than through
    # os.environ (child processes started later must not inherit a port that is taken)
    kw: dict[str, Any] = {} if world > 1 else {"init_method": f"tcp://127.0.0.1:{free_port()}", "rank": 0,
                                               "world_size": 1}
    kw["timeout"] = timedelta(seconds=timeout_s)
    if world == 1:
        os.environ.setdefault("LOCAL_RANK", "0")     # DeepSpeed's engine asserts it is set
    if backend == "nccl":
        import torch

        # NCCL collectives run on the current GPU: each rank on its own before the first barrier
        torch.cuda.set_device(dist_env()[2])
        if world > 1 and not use_deepspeed:
            # bound to the rank's GPU, NCCL need not guess it from the global rank (torch warns that a
            # guess can hang where ranks and GPUs are not numbered alike); DeepSpeed binds it itself
            kw["device_id"] = torch.device("cuda", dist_env()[2])
    if use_deepspeed:
        import deepspeed

        if local_world_size() == 1:
            _skip_shared_memory_allreduce()
        deepspeed.init_distributed(dist_backend=backend, verbose=False, auto_mpi_discovery=world > 1, **kw)
        _clone_world_group_with_timeout(kw["timeout"])
    else:
        dist.init_process_group(backend, **kw)
    return str(dist.get_backend())


def _clone_world_group_with_timeout(timeout: Any) -> None:
    """DeepSpeed's engine reduces gradients and gathers parameters on its own clone of the world
    group (``deepspeed.utils.groups._clone_world_group``), which it creates without a timeout, so
    torch's default for the backend would apply there (30 min gloo, 10 min NCCL), not ours: the
    clone is made here first, with ``timeout``. Every rank calls this (creating a group is itself
    a collective)."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    if not hasattr(groups, "_WORLD_GROUP"):
        raise RuntimeError("this DeepSpeed keeps no _WORLD_GROUP: embed.train.collective_timeout_s cannot reach "
                           "its engine's collectives (qarm_core.embed.train.distributed)")
    if groups._WORLD_GROUP is None:
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())), timeout=timeout)


def _collective_device() -> str:
    """Where small host values go for a collective: NCCL reduces GPU tensors only."""
    import torch.distributed as dist

    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_sum(x: float, world: int) -> float:
    if world == 1:
        return x
    import torch
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t.item())


def gather_floats(values: list[float], world: int) -> list[list[float]]:
    """Every rank's ``values`` (same length on every rank), in rank order: (world, len(values))."""
    if world == 1:
        return [list(values)]
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return [p.tolist() for p in parts]


def splice_local(parts: list, local, rank: int):
    """The global batch from every rank's slice, with this rank's own slice carrying its gradient.

    parts: ``world`` tensors of shape (local_batch, ...) in rank order, as ``all_gather`` returns
    them (no autograd history); local: this rank's (local_batch, ...) tensor, the one with a graph.
    Returns (world * local_batch, ...): ``parts`` concatenated, slot ``rank`` replaced by ``local``,
    so backward reaches this rank's rows only (the other ranks' rows are constants here; each
    rank's own backward covers them). Pure: no process group needed (unit-tested alone).
    """
    import torch

    return torch.cat([local if i == rank else p.detach() for i, p in enumerate(parts)])


def gather_with_local_grad(x, world: int, rank: int):
    """all_gather of ``x`` over the run: (local_batch, ...) -> (world * local_batch, ...), rank
    order, gradient through this rank's own rows only (``splice_local``). ``x`` unchanged alone.
    Every rank must call it, in the same order, with the same shape and dtype."""
    if world == 1:
        return x
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return splice_local(parts, x, rank)
