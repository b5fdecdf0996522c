"""The local LLM backend with its work cut into shards (``qarm_core.executor``): the judge's scoring
and neutral passes, its reasoning, and QA generation all go through ``continuation_logprobs`` and
``generate``, so sharding those two calls shards every LLM stage but catalog embedding (which
shards by catalog part, ``qarm_core.embed.embed``).

A call's requests are cut into runs of ``shard_requests`` in the order the caller gives them
(judge: pairs sorted by item text; QA: questions sorted by item id), extended to the end of a run
of equal contexts so that one source item's candidates share a shard (and their context's
key/value cache). The local run cuts the same shards and runs them one after another, so a run on
a cluster computes the same numbers: each shard's batches depend only on that shard's requests.
A shard's result comes back to the driver whole (a lost worker's shard is run again and replaces
nothing but itself); the stage writes its output once every shard is back.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from qarm_core.executor import LocalShards, ShardRunner
from qarm_core.lm.config import LocalModelConfig
from qarm_core.progress import Progress, advance


@dataclass(frozen=True)
class LogprobJob:
    """One shard of a ``continuation_logprobs`` call, as a worker needs it."""

    model: str                    # LocalModelConfig as JSON (hashable: the worker's model cache key)
    model_id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    prefix: str


@dataclass(frozen=True)
class GenerateJob:
    """One shard of a ``generate`` call."""

    model: str
    model_id: str
    prompts: tuple[str, ...]
    max_new_tokens: int
    batch_size: int | None
    system: str | None


@functools.lru_cache(maxsize=2)
def _worker_lm(model_json: str, model_id: str) -> Any:
    """This process's replica of the model: loaded by a worker's first shard, kept for the rest."""
    from qarm_core.lm.local import LocalLM

    return LocalLM(LocalModelConfig.model_validate_json(model_json), model_id=model_id)


def run_logprob_job(job: LogprobJob) -> list[np.ndarray]:
    return _worker_lm(job.model, job.model_id).continuation_logprobs(list(job.contexts), list(job.continuations),
                                                                      prefix=job.prefix)


def run_generate_job(job: GenerateJob) -> list[str]:
    return _worker_lm(job.model, job.model_id).generate(list(job.prompts), job.max_new_tokens,
                                                        batch_size=job.batch_size, system=job.system)


def shard_bounds(contexts: Sequence[str], size: int) -> list[tuple[int, int]]:
    """[lo, hi) bounds cutting ``contexts`` into runs of ``size``, each cut moved forward past equal
    neighbouring contexts (at most another ``size``), so one context's requests stay together."""
    n, out, lo = len(contexts), [], 0
    while lo < n:
        hi = min(lo + size, n)
        while hi < n and hi - lo < 2 * size and contexts[hi] == contexts[hi - 1]:
            hi += 1
        out.append((lo, hi))
        lo = hi
    return out


class ShardedLM:
    """``inner`` (a loaded ``LocalLM``) with ``continuation_logprobs`` and ``generate`` cut into
    shards of ``cfg.shard_requests`` requests run by ``shards``. On the local runner the shards run
    on ``inner`` here; on a remote one (Dask), each on a worker's own replica of the same model
    (built from ``cfg``). Everything else (``model_id``, ``dtype_choice``, ``chat_prompt``...) is
    ``inner``'s. ``name`` (the stage) prefixes the shards' task-run names: ``judge-score-00003``."""

    def __init__(self, inner: Any, cfg: LocalModelConfig, shards: ShardRunner | None = None, name: str = "llm"):
        self.inner, self.cfg, self.name = inner, cfg, name
        self.shards = shards if shards is not None else LocalShards()
        threads = getattr(self.shards, "threads", None)
        worker_cfg = cfg.model_copy(update={"num_threads": threads}) if threads else cfg
        self._model_json = worker_cfg.model_dump_json()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def _remote(self) -> bool:
        return self.shards.remote

    def continuation_logprobs(self, contexts: Sequence[str], continuations: Sequence[str],
                              prefix: str = "", progress: Progress | None = None) -> list[np.ndarray]:
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        bounds = shard_bounds(contexts, self.cfg.shard_requests)
        jobs = [LogprobJob(self._model_json, self.model_id, tuple(contexts[lo:hi]), tuple(continuations[lo:hi]),
                           prefix) for lo, hi in bounds]
        if self._remote():
            parts = self.shards.run(run_logprob_job, jobs, label=f"{self.name}-score")
            advance(progress, len(contexts))
        else:
            parts = [self.inner.continuation_logprobs(list(j.contexts), list(j.continuations), prefix=prefix,
                                                      progress=progress) for j in jobs]
        return [lp for part in parts for lp in part]

    def generate(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int | None = None,
                 system: str | None = None, progress: Progress | None = None) -> list[str]:
        bounds = [(lo, min(lo + self.cfg.shard_requests, len(prompts)))
                  for lo in range(0, len(prompts), self.cfg.shard_requests)]
        jobs = [GenerateJob(self._model_json, self.model_id, tuple(prompts[lo:hi]), max_new_tokens, batch_size,
                            system) for lo, hi in bounds]
        if self._remote():
            parts = self.shards.run(run_generate_job, jobs, label=f"{self.name}-generate")
            advance(progress, len(prompts))
        else:
            parts = [self.inner.generate(list(j.prompts), max_new_tokens, batch_size=batch_size, system=system,
                                         progress=progress) for j in jobs]
        return [text for part in parts for text in part]


def local_backend(cfg: LocalModelConfig, shards: ShardRunner | None = None, name: str = "llm") -> ShardedLM:
    """The configured local model, its calls sharded (``ShardedLM``). Its weights are loaded here
    only when the shards run here: a remote runner's workers hold their own replicas."""
    from qarm_core.lm.local import LocalLM

    return ShardedLM(LocalLM(cfg, weights=not (shards is not None and shards.remote)), cfg, shards, name)
