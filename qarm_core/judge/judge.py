"""Stage 2, the LLM judge: every candidate pair gets a score, a per-source keep verdict and, where
configured, a short reasoning text. Output rows follow ``schemas.JUDGMENTS``.

Score of a pair (src A, dst B), higher = more related (see ``prompts``):

    score = PMI_LLM(A -> B) + embed_weight * cos(emb(text A), emb(text B))
                            + tag_weight * cos(emb(tags A), emb(tags B))

PMI_LLM needs one forward pass per pair plus one neutral pass per distinct B; the sentence
embeddings (all-MiniLM-L6-v2) are one pass per item. Judgments are cached by (pair, model id, prompt
version, the hash of both items' texts as the judge reads them): a daily refresh scores only the pairs
``pairs_to_score`` returns and takes the rest from the previous table, so an item whose title or tags
changed under the same id is judged again. The
keep verdict is recomputed over the whole current pair set of each source at every run (it is a
rank rule), so cached and new pairs are ruled alike.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qarm_core.arrays import sorted_unique
from qarm_core.errors import DataError
from qarm_core.judge.config import JudgeConfig, KeepRule, KeepRules
from qarm_core.judge.prompts import JudgePrompt, judge_prompt
from qarm_core.lm.text import quote, render_items, render_texts_and_tags
from qarm_core.schemas import JUDGMENTS

if TYPE_CHECKING:
    from qarm_core.executor import ShardRunner
    from qarm_core.lm.backend import LMBackend
    from qarm_core.lm.sentence import SentenceEmbedder

STAGE = "judge"
SOURCES = ("swing", "u2i")
PAIR_KEY = ["src_item", "dst_item", "source"]
CACHE_KEY = PAIR_KEY + ["text_hash"]          # what a cached judgment must match (with model and prompt)
# What a score depends on (with model and prompt): the ordered pair's texts, not the miner that found
# it; a pair mined by Swing yesterday and by the two-tower today is not scored again.
SCORE_KEY = ["src_item", "dst_item", "text_hash"]
KEEP_TAG, REJECT_TAG = "[keep] ", "[reject] "
MAX_REASONING_CHARS = 400


# ---------------------------------------------------------------- input checks
def validate_pairs(pairs: pa.Table, dataset: str = "pairs") -> pa.Table:
    """Pairs with columns src_item, dst_item, source (others dropped), unique by key, int64/string.

    Raises DataError for missing columns, nulls, unknown sources or src == dst.
    """
    missing = [c for c in PAIR_KEY if c not in pairs.column_names]
    if missing:
        raise DataError(STAGE, dataset, f"pairs table lacks columns {missing}; has {pairs.column_names}")
    try:
        t = pa.table({"src_item": pc.cast(pairs["src_item"], pa.int64()),
                      "dst_item": pc.cast(pairs["dst_item"], pa.int64()),
                      "source": pc.cast(pairs["source"], pa.string())})
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(STAGE, dataset, f"pair columns have wrong types: {exc}") from None
    for c in PAIR_KEY:
        nulls = t[c].null_count
        if nulls:
            raise DataError(STAGE, dataset, f"{nulls} pair(s) have a null {c}")
    bad = set(pc.unique(t["source"]).to_pylist()) - set(SOURCES)
    if bad:
        raise DataError(STAGE, dataset, f"unknown pair source(s) {sorted(bad)}; expected one of {SOURCES}")
    self_pairs = pc.sum(pc.equal(t["src_item"], t["dst_item"])).as_py() or 0
    if self_pairs:
        raise DataError(STAGE, dataset, f"{self_pairs} pair(s) have src_item == dst_item")
    if t.num_rows:
        t = t.group_by(PAIR_KEY, use_threads=False).aggregate([])
    return t.select(PAIR_KEY)


def pair_text_hashes(pairs: pa.Table, items: pa.Table, item_format: str) -> list[str]:
    """Per row of (src_item, dst_item): a hash of exactly what the scorer reads (both items'
    rendered texts and tag lines), so a cached score is reused only for unchanged text."""
    import hashlib
    import json

    src, dst = pairs["src_item"].to_pylist(), pairs["dst_item"].to_pylist()
    texts, tags = render_texts_and_tags(items, set(src) | set(dst), item_format)
    # qarm_core.hashing.stable_hash([text a, text b, tags a, tags b]) with each item's strings
    # JSON-encoded once, not once per pair (tests/unit/test_judge.py checks the two agree): the
    # hash is the key of every published judgment, so it must not change.
    text_js = {i: json.dumps(t) for i, t in texts.items()}
    tag_js = {i: json.dumps(t) for i, t in tags.items()}
    blake = hashlib.blake2b
    return [blake(f"[{text_js[a]},{text_js[b]},{tag_js[a]},{tag_js[b]}]".encode(), digest_size=10).hexdigest()
            for a, b in zip(src, dst)]


def keyed_pairs(pairs: pa.Table, items: pa.Table, item_format: str, dataset: str = "pairs") -> pa.Table:
    """``validate_pairs(pairs)`` plus ``text_hash`` (``pair_text_hashes``): the cache key of a judgment."""
    t = validate_pairs(pairs, dataset)
    return t.append_column("text_hash", pa.array(pair_text_hashes(t, items, item_format), pa.string()))


def _empty_judgments() -> pa.Table:
    return JUDGMENTS.schema.empty_table()


def _conform_previous(previous: pa.Table | None) -> pa.Table:
    if previous is None:
        return _empty_judgments()
    missing = [c for c in JUDGMENTS.columns if c not in previous.column_names]
    if missing:
        raise DataError(STAGE, "judgments", f"previous judgments lack columns {missing}")
    try:
        return previous.select(JUDGMENTS.columns).cast(JUDGMENTS.schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(STAGE, "judgments", f"previous judgments do not match the schema: {exc}") from None


# ---------------------------------------------------------------- incremental refresh
def pairs_to_score(previous: pa.Table | None, pairs: pa.Table, model_id: str, prompt_version: str,
                   key: Sequence[str] = tuple(SCORE_KEY)) -> pa.Table:
    """The pairs (src_item, dst_item, source, text_hash), as ``keyed_pairs`` returns them, with no
    judgment in ``previous`` made by this ``model_id`` and ``prompt_version`` from the same item
    texts, under any source (``key``: ``SCORE_KEY``; ``CACHE_KEY`` asks for the same source too).
    Pure: neither input is modified.

    Shapes: ``pairs`` n rows (distinct by ``PAIR_KEY``); result m <= n rows, in ``pairs`` order.
    """
    missing = [c for c in CACHE_KEY if c not in pairs.column_names]
    if missing:
        raise ValueError(f"pairs_to_score needs keyed pairs (judge.keyed_pairs); missing {missing}")
    key = list(key)
    todo = pairs.select(CACHE_KEY)
    prev = _conform_previous(previous)
    done = prev.filter(pc.and_(pc.equal(prev["model_id"], model_id),
                               pc.equal(prev["prompt_version"], prompt_version))).select(key)
    if done.num_rows == 0 or todo.num_rows == 0:
        return todo
    idx = pa.table({**{c: todo[c] for c in key}, "_i": pa.array(np.arange(todo.num_rows))})
    left = idx.join(done.group_by(key, use_threads=False).aggregate([]), keys=key,
                    join_type="left anti", use_threads=False)
    return todo.take(pa.array(np.sort(left["_i"].to_numpy()))) if left.num_rows else todo.slice(0, 0)


# ---------------------------------------------------------------- keep rules
def _keep_mask(scores: np.ndarray, src: np.ndarray, dst: np.ndarray, rule: KeepRule) -> np.ndarray:
    n = len(scores)
    if rule.mode == "threshold":
        return scores >= rule.threshold
    # 'fraction', and 'calibrated' before it is calibrated (judge.calibrate resolves it to a threshold)
    k = int(np.ceil(rule.keep_fraction * n - 1e-9))
    order = np.lexsort((dst, src, -scores))          # best first; ties by item ids
    keep = np.zeros(n, dtype=bool)
    keep[order[:k]] = True
    return keep


def apply_keep_rules(judgments: pa.Table, rules: KeepRules | None = None) -> pa.Table:
    """``judgments`` with its ``keep`` column recomputed per source by ``rules``.

    A 'fraction' rule keeps the ceil(fraction * n) best-scored pairs of that source (ties broken by
    src_item, dst_item); a 'threshold' rule keeps score >= threshold. Rows of other sources are
    a DataError. Shape preserved (n rows in, n rows out, same order).
    """
    rules = rules or KeepRules()
    if judgments.num_rows == 0:
        return judgments
    scores = judgments["score"].to_numpy(zero_copy_only=False).astype(float)
    if np.isnan(scores).any():
        raise DataError(STAGE, "judgments", f"{int(np.isnan(scores).sum())} judgment score(s) are NaN")
    src = judgments["src_item"].to_numpy()
    dst = judgments["dst_item"].to_numpy()
    source = np.asarray(judgments["source"].to_pylist(), dtype=object)
    keep = np.zeros(judgments.num_rows, dtype=bool)
    for s in sorted_unique(source):
        if s not in SOURCES:
            raise DataError(STAGE, "judgments", f"no keep rule for source {s!r}")
        m = source == s
        keep[m] = _keep_mask(scores[m], src[m], dst[m], getattr(rules, s))
    i = judgments.column_names.index("keep")
    return judgments.set_column(i, judgments.schema.field("keep"), pa.array(keep, pa.bool_()))


# ---------------------------------------------------------------- scoring
class PairScorer:
    """Scores (src, dst) item pairs: the LLM's PMI, plus ``embed_weight`` x the cosine of the item
    texts' sentence embeddings, plus ``tag_weight`` x the cosine of the embeddings of their tag lines
    (where either item has no tags, the text cosine stands in for the tag cosine).

    Everything this object computes is kept for its lifetime: neutral log-likelihoods and
    embeddings once per distinct text, and each pair's score terms once per distinct (texts,
    tags). A stage that scores the judged pairs and the evaluation pairs therefore runs the LLM once
    per pair even when the two sets overlap, and can score both in one batched pass (``components``
    on their union first; later calls on either are answered from memory).
    """

    def __init__(self, backend: "LMBackend", prompt: JudgePrompt, embedder: "SentenceEmbedder | None" = None,
                 embed_weight: float = 0.0, tag_weight: float = 0.0):
        if (embed_weight > 0 or tag_weight > 0) and embedder is None:
            raise ValueError("embed_weight or tag_weight > 0 needs an embedder")
        self.backend, self.prompt = backend, prompt
        self.embedder = embedder if (embed_weight > 0 or tag_weight > 0) else None
        self.embed_weight, self.tag_weight = embed_weight, tag_weight
        self._neutral: dict[str, float] = {}
        self.neutral_passes = 0     # neutral passes the LLM ran (one per distinct text B not known)
        self._emb: dict[str, np.ndarray] = {}
        self._pmi: dict[tuple[str, str], float] = {}

    @property
    def model_id(self) -> str:
        """The judge's identity, weights included (the judgment cache key)."""
        mid = self.backend.model_id
        if self.embedder is not None:
            mid += f"+{self.embedder.model_id}*{self.embed_weight:g}"
            if self.tag_weight > 0:
                mid += f"+tags*{self.tag_weight:g}"
        return mid

    def continuation(self, text: str) -> str:
        """Item B's text as the LLM scores it (after the context, or after the neutral context)."""
        return " " + quote(text)

    def preload_neutral(self, values: dict[str, float]) -> None:
        """Neutral log-likelihoods known from an earlier run, by continuation text (``continuation``)."""
        self._neutral.update(values)

    def neutral_of(self, text: str) -> float | None:
        """The neutral log-likelihood of item B's text ``text`` (in the prompt's ``scored_format``)
        if this scorer has it."""
        return self._neutral.get(self.continuation(text))

    @property
    def components_id(self) -> str:
        """The identity of the score *terms* (models, not weights): cached terms stay valid when
        only the weights change."""
        return self.backend.model_id + (f"+{self.embedder.model_id}" if self.embedder is not None else "")

    def llm_pmi(self, src_texts: Sequence[str], dst_texts: Sequence[str], what: str = "pairs") -> np.ndarray:
        """(n,) PMI scores: sum log P(B | context(A)) - sum log P(B | neutral); ``dst_texts`` are
        the B texts as scored (the prompt's ``scored_format``; ``pair_components`` renders them). Pairs already
        scored by this object are not run again; progress is logged as ``judge: scoring <what>``."""
        from qarm_core.progress import Progress

        todo = sorted({(a, b) for a, b in zip(src_texts, dst_texts) if (a, b) not in self._pmi})
        pre = self.prompt.prefix
        if todo:
            conts = [self.continuation(b) for _, b in todo]
            ctxs = [self.prompt.context.format(A=quote(a)) for a, _ in todo]
            with Progress(STAGE, f"scoring {what}", len(todo), "pairs") as prog:
                cond = self.backend.continuation_logprobs(ctxs, conts, prefix=pre, progress=prog)
            new = sorted({c for c in conts if c not in self._neutral})
            if new:
                neutral = [self.prompt.neutral] * len(new)
                with Progress(STAGE, "neutral passes (once per distinct item B)", len(new), "items") as prog:
                    lps = self.backend.continuation_logprobs(neutral, new, prefix=pre, progress=prog)
                for c, lp in zip(new, lps):
                    self._neutral[c] = float(np.sum(lp))
                self.neutral_passes += len(new)
            for (a, b), c, lp in zip(todo, conts, cond):
                self._pmi[(a, b)] = float(np.sum(lp)) - self._neutral[c]
        return np.array([self._pmi[(a, b)] for a, b in zip(src_texts, dst_texts)], dtype=np.float64)

    def cosine(self, src_texts: Sequence[str], dst_texts: Sequence[str]) -> np.ndarray:
        """(n,) cosine similarities of the texts' sentence embeddings."""
        if self.embedder is None:
            raise ValueError("this scorer has no embedder")
        new = sorted({t for t in (*src_texts, *dst_texts) if t not in self._emb})
        if new:
            for t, v in zip(new, self.embedder.embed(new)):
                self._emb[t] = v
        return np.array([float(self._emb[a] @ self._emb[b]) for a, b in zip(src_texts, dst_texts)])

    def components(self, src_texts: Sequence[str], dst_texts: Sequence[str],
                   src_tags: Sequence[str] | None = None, dst_tags: Sequence[str] | None = None,
                   what: str = "pairs", dst_scored: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The score's terms, each of shape (n,): ``pmi`` and, with an embedder, ``cos`` and
        ``tag_cos`` (the text cosine where either item has no tags or no tags are given).
        ``dst_scored``: B's texts in the prompt's ``scored_format``, which the LLM scores (None:
        ``dst_texts``, for prompts that score B as rendered)."""
        if len(src_texts) != len(dst_texts) or (dst_scored is not None and len(dst_scored) != len(dst_texts)):
            raise ValueError("src_texts, dst_texts and dst_scored differ in length")
        if not len(src_texts):
            return {"pmi": np.zeros(0), "cos": np.zeros(0), "tag_cos": np.zeros(0)}
        out = {"pmi": self.llm_pmi(src_texts, dst_texts if dst_scored is None else dst_scored, what)}
        if self.embedder is not None:
            cos = self.cosine(src_texts, dst_texts)
            tcos = cos.copy()
            if src_tags is not None and dst_tags is not None:
                idx = np.flatnonzero([bool(a) and bool(b) for a, b in zip(src_tags, dst_tags)])
                if len(idx):
                    tcos[idx] = self.cosine([src_tags[i] for i in idx], [dst_tags[i] for i in idx])
            out.update(cos=cos, tag_cos=tcos)
        return out

    def combine(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """(n,) judge score from ``components``."""
        s = parts["pmi"].copy()
        if self.embedder is not None:
            s += self.embed_weight * parts["cos"] + self.tag_weight * parts["tag_cos"]
        return s

    def score(self, src_texts: Sequence[str], dst_texts: Sequence[str],
              src_tags: Sequence[str] | None = None, dst_tags: Sequence[str] | None = None) -> np.ndarray:
        """(n,) judge scores, higher = more related. ``*_tags``: the items' tag lines ('' if none)."""
        return self.combine(self.components(src_texts, dst_texts, src_tags, dst_tags))


def make_scorer(cfg: JudgeConfig, backend: "LMBackend | None" = None,
                embedder: "SentenceEmbedder | None" = None, shards: "ShardRunner | None" = None) -> PairScorer:
    """The configured scorer; builds the backend / embedder when not given (loads models). ``shards``:
    where the backend's shards run (``qarm_core.executor``; None: here)."""
    from qarm_core.lm.sentence import SentenceEmbedder
    from qarm_core.lm.backend import make_backend

    backend = backend or make_backend(cfg.backend, cfg.local, cfg.http, shards, name="judge")
    if (cfg.embed_weight > 0 or cfg.tag_weight > 0) and embedder is None:
        from qarm_core.devices import resolve_device

        embedder = SentenceEmbedder(cfg.embedder.model_path, cfg.embedder.batch_size,
                                    device=resolve_device(cfg.local.device, "judge", "local.device"))
    return PairScorer(backend, judge_prompt(cfg.prompt_version), embedder, cfg.embed_weight, cfg.tag_weight)


def pair_components(pairs: pa.Table, items: pa.Table, scorer: PairScorer, what: str = "pairs") -> dict[str, np.ndarray]:
    """``scorer.components`` of the n rows (src_item, dst_item) of ``pairs``, texts from ``items``."""
    src = pairs["src_item"].to_pylist()
    dst = pairs["dst_item"].to_pylist()
    texts, tags = render_texts_and_tags(items, set(src) | set(dst), scorer.prompt.item_format)
    scored = None
    if scorer.prompt.scored_format != scorer.prompt.item_format:
        b_texts = render_items(items, set(dst), scorer.prompt.scored_format)
        scored = [b_texts[i] for i in dst]
    return scorer.components([texts[i] for i in src], [texts[i] for i in dst],
                             [tags[i] for i in src], [tags[i] for i in dst], what, scored)


def score_pairs(pairs: pa.Table, items: pa.Table, scorer: PairScorer) -> np.ndarray:
    """(n,) scores of the n rows (src_item, dst_item) of ``pairs``, texts rendered from ``items``."""
    if not isinstance(scorer, PairScorer):   # e.g. evaluate.YesNoScorer: texts only
        src, dst = pairs["src_item"].to_pylist(), pairs["dst_item"].to_pylist()
        texts = render_items(items, set(src) | set(dst), scorer.prompt.item_format)
        return scorer.score([texts[i] for i in src], [texts[i] for i in dst])
    return scorer.combine(pair_components(pairs, items, scorer))


# ---------------------------------------------------------------- reasoning
def _stable_rank(src: np.ndarray, dst: np.ndarray, source: Sequence[str], seed: int) -> np.ndarray:
    """A per-pair pseudo-random number that does not depend on which other pairs are present."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{a}:{b}:{s}".encode(), digest_size=8).digest(), "big")
                     for a, b, s in zip(src.tolist(), dst.tolist(), source)], dtype=np.uint64)


def reasoning_targets(judgments: pa.Table, cfg: JudgeConfig) -> np.ndarray:
    """Indices of the rows that should carry reasoning under ``cfg.reasoning`` (at most
    ``reasoning_sample``): 'sample' a stable pseudo-random sample, 'rejected' the lowest-scored
    rejected pairs. Shape (m,), m <= reasoning_sample."""
    n = judgments.num_rows
    if cfg.reasoning == "none" or n == 0 or cfg.reasoning_sample == 0:
        return np.zeros(0, dtype=np.int64)
    src = judgments["src_item"].to_numpy()
    dst = judgments["dst_item"].to_numpy()
    if cfg.reasoning == "sample":
        r = _stable_rank(src, dst, judgments["source"].to_pylist(), cfg.seed)
        return np.sort(np.argsort(r, kind="stable")[: cfg.reasoning_sample])
    keep = judgments["keep"].to_numpy(zero_copy_only=False)
    rej = np.flatnonzero(~keep)
    scores = judgments["score"].to_numpy()[rej]
    return np.sort(rej[np.lexsort((dst[rej], src[rej], scores))][: cfg.reasoning_sample])


def _clean_reasoning(text: str, tag: str) -> str | None:
    t = " ".join(text.split())
    if not t:
        return None
    if len(t) > MAX_REASONING_CHARS:
        t = t[:MAX_REASONING_CHARS].rstrip() + "..."
    return tag + t


def add_reasoning(judgments: pa.Table, items: pa.Table, backend: "LMBackend", cfg: JudgeConfig) -> pa.Table:
    """Fill ``reasoning`` for the rows ``reasoning_targets`` picks that lack a reasoning matching
    their current verdict; a kept reasoning whose verdict tag no longer matches is dropped.
    Reasoning texts start with ``[keep] `` or ``[reject] ``. Shape preserved."""
    prompt = judge_prompt(cfg.prompt_version)
    reasoning = judgments["reasoning"].to_pylist()
    keep = judgments["keep"].to_pylist()
    for i, (r, k) in enumerate(zip(reasoning, keep)):
        if r is not None and not r.startswith(KEEP_TAG if k else REJECT_TAG):
            reasoning[i] = None
    todo = [int(i) for i in reasoning_targets(judgments, cfg) if reasoning[int(i)] is None]
    if todo:
        src = judgments["src_item"].to_pylist()
        dst = judgments["dst_item"].to_pylist()
        texts = render_items(items, {src[i] for i in todo} | {dst[i] for i in todo}, prompt.item_format)
        prompts = [prompt.reasoning.format(A=quote(texts[src[i]]), B=quote(texts[dst[i]]),
                                           verdict=prompt.verdict_keep if keep[i] else prompt.verdict_reject)
                   for i in todo]
        from qarm_core.progress import Progress

        with Progress(STAGE, "writing reasoning", len(prompts), "pairs") as prog:
            outs = backend.generate(prompts, cfg.reasoning_max_tokens, batch_size=cfg.reasoning_batch_size,
                                    system=prompt.reasoning_system, progress=prog)
        for i, o in zip(todo, outs):
            reasoning[i] = _clean_reasoning(o, KEEP_TAG if keep[i] else REJECT_TAG)
    col = judgments.column_names.index("reasoning")
    return judgments.set_column(col, judgments.schema.field("reasoning"), pa.array(reasoning, pa.string()))


# ---------------------------------------------------------------- the stage
def judge_pairs(pairs: pa.Table, items: pa.Table, cfg: JudgeConfig | None = None,
                previous: pa.Table | None = None, scorer: PairScorer | None = None) -> pa.Table:
    """The JUDGMENTS table of ``pairs`` (one row per distinct (src_item, dst_item, source)).

    Pairs already judged in ``previous`` by the same model id and prompt version from the same item
    texts keep their score (and reasoning); a pair judged there under another source only takes its
    score (not its reasoning); the others are scored now. Keep verdicts are recomputed
    over all current pairs. ``scorer`` defaults to ``make_scorer(cfg)`` (which loads the models).
    ``pairs`` may come keyed (``keyed_pairs`` of these ``items``): their text hashes are then used as given.
    """
    cfg = cfg or JudgeConfig()
    validate_pairs(pairs)              # bad input fails before a model loads
    scorer = scorer or make_scorer(cfg)
    if scorer.prompt.version != cfg.prompt_version:
        raise ValueError(f"scorer prompt {scorer.prompt.version!r} != cfg.prompt_version {cfg.prompt_version!r}")
    if "text_hash" not in pairs.column_names:   # keyed already by the caller (judge_stage): hashed once
        pairs = keyed_pairs(pairs, items, scorer.prompt.item_format)
    else:
        pairs = pairs.select(CACHE_KEY)
    model_id, pv = scorer.model_id, cfg.prompt_version
    prev = _conform_previous(previous)
    prev = prev.filter(pc.and_(pc.equal(prev["model_id"], model_id), pc.equal(prev["prompt_version"], pv)))
    if prev.num_rows:
        # cached judgments of pairs still present with the same texts and source (first row per key)
        same = prev.join(pairs, keys=CACHE_KEY, join_type="left semi", use_threads=False)
        same = same.group_by(PAIR_KEY, use_threads=False).aggregate(
            [(c, "first") for c in JUDGMENTS.columns if c not in PAIR_KEY])
        same = same.rename_columns([c.removesuffix("_first") for c in same.column_names])
        same = same.select(JUDGMENTS.columns).cast(JUDGMENTS.schema)
        # pairs judged before under another source only: their score carries over (it depends on the
        # texts alone), not the reasoning, which add_reasoning writes where this run wants it
        other = pairs.join(same.select(CACHE_KEY), keys=CACHE_KEY, join_type="left anti", use_threads=False)
        donors = prev.group_by(SCORE_KEY, use_threads=False).aggregate([("score", "first")])
        other = other.join(donors, keys=SCORE_KEY, join_type="inner", use_threads=False)
        k = other.num_rows
        other = pa.table({"src_item": other["src_item"], "dst_item": other["dst_item"], "source": other["source"],
                          "model_id": pa.array([model_id] * k, pa.string()),
                          "prompt_version": pa.array([pv] * k, pa.string()),
                          "score": other["score_first"], "keep": pa.array([False] * k, pa.bool_()),
                          "reasoning": pa.nulls(k, pa.string()), "text_hash": other["text_hash"]},
                         schema=JUDGMENTS.schema)
        prev = pa.concat_tables([same, other]) if k else same
    todo = pairs_to_score(prev, pairs, model_id, pv)
    scores = score_pairs(todo, items, scorer) if todo.num_rows else np.zeros(0)
    if not np.all(np.isfinite(scores)):
        raise DataError(STAGE, "pairs", "the judge produced non-finite scores")
    n = todo.num_rows
    new = pa.table({
        "src_item": todo["src_item"], "dst_item": todo["dst_item"], "source": todo["source"],
        "model_id": pa.array([model_id] * n, pa.string()),
        "prompt_version": pa.array([pv] * n, pa.string()),
        "score": pa.array(scores, pa.float64()),
        "keep": pa.array([False] * n, pa.bool_()),
        "reasoning": pa.nulls(n, pa.string()),
        "text_hash": todo["text_hash"],
    }, schema=JUDGMENTS.schema)
    out = pa.concat_tables([prev, new]) if prev.num_rows else new
    out = out.sort_by([("source", "ascending"), ("src_item", "ascending"), ("dst_item", "ascending")])
    out = apply_keep_rules(out, cfg.keep)
    return add_reasoning(out, items, scorer.backend, cfg)
