"""Typed configs of the LLM judge and the QA generator (frozen pydantic models, unknown keys refused)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qarm_core.base import Strict
from qarm_core.lm.config import EmbedderConfig, HttpConfig, LocalModelConfig


class KeepRule(Strict):
    """Which judged pairs of one source survive.

    ``fraction``: the top ``keep_fraction`` of that source's pairs by judge score (ties broken by
    item ids, so the verdict is deterministic). ``threshold``: pairs with ``score >= threshold``.
    ``calibrated``: a threshold chosen on the validation period's labels (``judge.calibrate``), so the
    rejection rate is measured; ``keep_fraction`` when the labels are too few (reported as imposed).
    """

    mode: Literal["fraction", "threshold", "calibrated"] = "fraction"
    keep_fraction: float = Field(0.9, ge=0.0, le=1.0)
    threshold: float | None = None

    @model_validator(mode="after")
    def _threshold_given(self) -> "KeepRule":
        if self.mode == "threshold" and self.threshold is None:
            raise ValueError("keep rule mode 'threshold' needs a threshold")
        return self


class KeepRules(Strict):
    """Per-source keep rules. Default: thresholds calibrated on validation labels; the fallback
    fractions follow QARM V2 (~90% of I2I (Swing) and ~30% of U2I pairs kept)."""

    swing: KeepRule = KeepRule(mode="calibrated", keep_fraction=0.9)
    u2i: KeepRule = KeepRule(mode="calibrated", keep_fraction=0.3)
    # 'calibrated': fewer labels than this in either class fall back to keep_fraction.
    min_labels_per_class: int = Field(10, ge=1)


class JudgeEvalConfig(Strict):
    """The judge's AUC on evaluation sets drawn from the run's own interactions (see ``evaluate``):
    held-out strong co-occurrence pairs vs random pairs, and same-genre vs unrelated pairs."""

    enabled: bool = True
    n_per_class: int = Field(150, ge=5)
    seed: int = 0
    min_item_ratings: int = Field(20, ge=1)
    # The sets are drawn from at most this many users (a seeded sample), so that drawing them stays
    # seconds on a log of any size.
    max_users: int = Field(20_000, ge=10)
    # The judge gate fails a run whose judge scores worse than this on any evaluation set
    # (e.g. a swapped model or prompt that lost the signal). None: report only.
    min_auc: float | None = Field(None, ge=0.0, le=1.0)


class JudgeConfig(Strict):
    """The pair judge (stage 2)."""

    backend: Literal["local", "http"] = "local"
    local: LocalModelConfig = LocalModelConfig()
    http: HttpConfig = HttpConfig()
    # Names a prompt family in ``prompts.PROMPTS``; part of the judgment cache key.
    prompt_version: str = "pmi-generic-fs-v1"
    # Judge score = PMI(LLM) + embed_weight * cos(MiniLM(item texts)) + tag_weight * cos(MiniLM(tags)).
    # The weights roughly equalise the three terms' spreads, measured without labels on the 1,800
    # ML-100K eval pairs of seeds 0-2: std(PMI)/std(cos) = 35, std(PMI)/std(tag cos) = 19 (with
    # pmi-fs-v1; the default prompt's PMI spreads ~15% less on session 23's training-period eval sets,
    # std 3.19 vs 3.74; the weights were kept, and that prompt was chosen with them).
    # Both 0: LLM only.
    embed_weight: float = Field(40.0, ge=0.0)
    tag_weight: float = Field(20.0, ge=0.0)
    embedder: EmbedderConfig = EmbedderConfig()
    keep: KeepRules = KeepRules()
    # Reasoning text is generated (slow on CPU) only for: nothing, a sample, or the rejected pairs.
    reasoning: Literal["none", "sample", "rejected"] = "sample"
    reasoning_sample: int = Field(32, ge=0)       # 'sample': how many pairs; 'rejected': at most this many
    reasoning_max_tokens: int = Field(48, ge=1)
    # The default sample in one batch: 32 prompts decoded together took 8.9 s against 16.2 s in
    # batches of 8 (float32, 2 cores capped to AVX2), the same texts.
    reasoning_batch_size: int = Field(32, ge=1)
    seed: int = 0
    eval: JudgeEvalConfig = JudgeEvalConfig()


class QAConfig(Strict):
    """Per-item question/answer pairs (greedy, so a rerun reproduces them)."""

    backend: Literal["local", "http"] = "local"
    local: LocalModelConfig = LocalModelConfig()
    http: HttpConfig = HttpConfig()
    # qa-v2: the instruction in the shared system turn; 73% of SmolLM2's answers passed validation
    # on 256 ML-100K items vs 60% with qa-v1 (float32).
    prompt_version: str = "qa-v2"
    # Which items get QA: those of kept judged pairs (what the embedding model trains on), or all.
    items: Literal["kept_pairs", "all"] = "kept_pairs"
    # A run that reuses the published embedding model (embed.reuse_model: the daily schedule) trains
    # nothing, and only training reads QA. "defer": such a run asks no new questions; it publishes
    # the QA rows still valid (same model, prompt and item fields) and counts the items it deferred,
    # and the next run that trains (the weekly retrain) answers every item still lacking QA.
    # "generate": answer them on the day, as a run that trains does.
    when_model_reused: Literal["defer", "generate"] = "defer"
    k: int = Field(4, ge=1, le=16)                # QA pairs per item
    max_new_tokens: int = Field(24, ge=1)
    max_answer_chars: int = Field(200, ge=1)
    # 64 prompts decode together: on 2 CPU cores 1.2-1.45x the items/s of 32 (float32), and 128 gave no more.
    batch_size: int = Field(64, ge=1)

    @property
    def needs_judgments(self) -> bool:
        """Whether QA waits for the judge: its items are those of kept pairs, which only the
        judge's verdicts name (``items: all`` asks about every item and may run beside the judge)."""
        return self.items == "kept_pairs"
