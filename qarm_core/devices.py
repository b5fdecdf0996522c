"""Where a torch model runs: ``auto`` picks the GPU when torch sees one, else the CPU.

The same code path runs on both: inputs are built on the CPU and moved to the model's device,
outputs come back with ``.cpu()``. A config naming ``cuda`` on a host without CUDA is a config
error, not a silent fallback, so that a GPU job that lost its GPU says so instead of running
hundreds of times slower.
"""

from __future__ import annotations

from typing import Literal

from qarm_core.errors import DataError

DeviceName = Literal["auto", "cpu", "cuda"]


def resolve_device(name: str, stage: str, key: str = "device") -> str:
    """``"cpu"`` or ``"cuda"`` for the configured ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DataError(stage, "config", f"{key}={name!r} but torch sees no CUDA device (torch "
                                             f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                                             f"use {key}: auto or cpu")
        n = torch.cuda.device_count()
        if ":" in name and int(name.split(":", 1)[1]) >= n:
            raise DataError(stage, "config", f"{key}={name!r} but only {n} CUDA device(s) are visible")
        return name
    raise DataError(stage, "config", f"{key}={name!r}: expected auto, cpu, cuda or cuda:N")
