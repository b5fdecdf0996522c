"""Dask worker plugins of the local clusters qarm starts (``tasks.executor.local_cluster``); a
module of its own so that ``distributed`` is imported only by runs that use Dask."""

from __future__ import annotations

import os
from typing import Any, Sequence

from distributed.diagnostics.plugin import WorkerPlugin


class PinGPU(WorkerPlugin):
    """Worker ``i`` of a local cluster sees GPU ``gpus[i % len(gpus)]`` alone (``CUDA_VISIBLE_DEVICES``,
    set when the worker starts, before its first shard initialises CUDA), so its model replica lives
    on that GPU: one replica per GPU when the cluster has one worker per GPU."""

    name = "qarm-pin-gpu"

    def __init__(self, gpus: Sequence[str]):
        if not gpus:
            raise ValueError("PinGPU needs at least one GPU")
        self.gpus = [str(g) for g in gpus]

    def setup(self, worker: Any) -> None:
        index = int(worker.name) if str(worker.name).isdigit() else 0
        os.environ["CUDA_VISIBLE_DEVICES"] = self.gpus[index % len(self.gpus)]
