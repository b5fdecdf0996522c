"""What every language-model backend offers, and the configured one.

Both backends (``local.LocalLM``: a transformers model in this process; ``http.HttpLM``: an
OpenAI-compatible server) offer the same two calls:

* ``continuation_logprobs(contexts, continuations)``: for each pair of strings, the log-probability
  of every token of ``continuation`` given ``context`` (one forward pass, batched); a list of n
  float arrays, array i of shape (tokens in continuation i,).
* ``generate(prompts, max_new_tokens)``: greedy chat completions, one string per prompt.

torch/transformers are imported inside functions only; building a backend object loads a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from qarm_core.errors import QarmError
from qarm_core.lm.config import HttpConfig, LocalModelConfig
from qarm_core.progress import Progress

if TYPE_CHECKING:
    from qarm_core.executor import ShardRunner


class BackendError(QarmError):
    """A language-model backend failed (model not loadable, server unreachable or answering badly)."""


class LMBackend(Protocol):
    model_id: str

    def continuation_logprobs(self, contexts: Sequence[str], continuations: Sequence[str],
                              prefix: str = "", progress: Progress | None = None) -> list[np.ndarray]: ...

    def generate(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int | None = None,
                 system: str | None = None, progress: Progress | None = None) -> list[str]: ...


def make_backend(backend: str, local: LocalModelConfig, http: HttpConfig,
                 shards: "ShardRunner | None" = None, name: str = "llm") -> LMBackend:
    """The configured backend. ``'local'`` loads a model now; its calls are cut into shards of
    ``local.shard_requests`` run by ``shards`` (``qarm_core.lm.sharded``; None: here). ``'http'``
    sends requests to a server (which does its own scaling). ``name``: the stage, in shard names."""
    if backend == "local":
        from qarm_core.lm.sharded import local_backend

        return local_backend(local, shards, name)
    if backend == "http":
        from qarm_core.lm.http import HttpLM

        return HttpLM(http)
    raise ValueError(f"unknown backend {backend!r}")
