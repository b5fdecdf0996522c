"""Inputs of the embedding LLM: item text, QA segments, judged pairs, and batches of token ids.

Pairs come from the judge (``schemas.JUDGMENTS``: rows with ``keep == True`` are positives) or,
as a stand-in, straight from a miner (``schemas.PAIRS``: no ``keep`` column, every row is a
positive). Pairs are symmetric for the loss, so (a, b) and (b, a) are one pair; the holdout split
hashes the unordered pair for the same reason (Swing emits both directions, and a split by
directed pair would leak every held-out pair into training through its mirror).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qarm_core.arrays import difference, sorted_unique
from qarm_core.embed.config import EmbedModelConfig
from qarm_core.errors import DataError
from qarm_core.lm.text import ItemTextFormat, render_item, sanitize

if TYPE_CHECKING:
    import torch

IGNORE = -100


# ---------------------------------------------------------------- item text and QA
def check_items(items: pa.Table, stage: str, dataset: str = "items") -> None:
    if "item_id" not in items.column_names or "title" not in items.column_names:
        raise DataError(stage, dataset, f"items table needs columns item_id and title, has {items.column_names}")
    if items.num_rows == 0:
        raise DataError(stage, dataset, "items table is empty")
    if items["item_id"].null_count:
        raise DataError(stage, dataset, f"{items['item_id'].null_count} item(s) have a null item_id")
    n_distinct = pc.count_distinct(items["item_id"]).as_py()
    if n_distinct != items.num_rows:
        raise DataError(stage, dataset, f"item_id is not unique: {items.num_rows} rows, {n_distinct} distinct ids")


def item_texts(items: pa.Table, cfg: EmbedModelConfig, item_ids: Iterable[int] | None = None) -> dict[int, str]:
    """``{item_id: text}`` rendered like the judge does, e.g. ``Heat (1995), genres: Action, Crime``."""
    fmt = ItemTextFormat(include_tags=cfg.include_tags)
    cols = [c for c in ("item_id", "title", "year", "tags", "description") if c in items.column_names]
    wanted = None if item_ids is None else {int(i) for i in item_ids}
    out: dict[int, str] = {}
    for row in items.select(cols).to_pylist():
        if wanted is None or row["item_id"] in wanted:
            out[row["item_id"]] = render_item(row, fmt)
    return out


def qa_by_item(qa: pa.Table | None, max_pairs: int, stage: str) -> dict[int, list[tuple[str, str]]]:
    """``{item_id: [(question, answer), ...]}``, at most ``max_pairs`` per item, by ``qa_index``."""
    if qa is None or qa.num_rows == 0 or max_pairs == 0:
        return {}
    missing = [c for c in ("item_id", "question", "answer") if c not in qa.column_names]
    if missing:
        raise DataError(stage, "qa", f"QA table lacks columns {missing}; has {qa.column_names}")
    cols = ["item_id", "question", "answer"] + (["qa_index"] if "qa_index" in qa.column_names else [])
    rows = qa.select(cols).to_pylist()
    rows.sort(key=lambda r: (r["item_id"], r.get("qa_index") or 0))
    out: dict[int, list[tuple[str, str]]] = {}
    seen: set[tuple[int, str]] = set()
    for r in rows:
        if r["item_id"] is None or not r["question"] or not r["answer"]:
            continue
        lst = out.setdefault(r["item_id"], [])
        # QA text is model output: sanitise it like item text (no markup, no angle brackets, so an
        # answer can never spell an <EMB_i> token)
        q, a = sanitize(r["question"], 300), sanitize(r["answer"], 300)
        if len(lst) < max_pairs and (r["item_id"], q) not in seen:
            seen.add((r["item_id"], q))
            lst.append((q, a))
    return out


@dataclass(frozen=True)
class EncodedItem:
    """Token ids of one item: its item segment and its QA segment (with the answer-token flags)."""

    item: tuple[int, ...]
    qa: tuple[int, ...] = ()
    qa_is_answer: tuple[bool, ...] = ()


def encode_items(tokenizer: Any, texts: dict[int, str], qa: dict[int, list[tuple[str, str]]],
                 cfg: EmbedModelConfig) -> dict[int, EncodedItem]:
    """Tokenise item text (truncated to ``max_item_tokens``) and QA segments
    (``" Question: q Answer: a"`` per pair, as many whole pairs as fit in ``max_qa_tokens``;
    answer tokens flagged)."""
    ids = sorted(texts)
    enc = tokenizer([texts[i] for i in ids], add_special_tokens=False).input_ids
    out: dict[int, EncodedItem] = {}
    for iid, toks in zip(ids, enc):
        toks = toks[: cfg.max_item_tokens] or [tokenizer.eos_token_id]
        qa_ids: list[int] = []
        flags: list[bool] = []
        room = cfg.max_qa_tokens
        for q, a in qa.get(iid, []):
            q_ids = tokenizer(f" Question: {q} Answer:", add_special_tokens=False).input_ids
            a_ids = tokenizer(f" {a}", add_special_tokens=False).input_ids
            if len(q_ids) + len(a_ids) > room:
                if qa_ids:          # whole pairs only, so no answer is cut mid-way ...
                    break
                # ... except a first pair longer than the budget: its question keeps the front
                # half, so that some answer tokens (the loss's only targets) remain
                q_ids = q_ids[: room // 2]
                a_ids = a_ids[: room - len(q_ids)]
            qa_ids += q_ids + a_ids
            flags += [False] * len(q_ids) + [True] * len(a_ids)
            room -= len(q_ids) + len(a_ids)
        out[iid] = EncodedItem(tuple(toks), tuple(qa_ids), tuple(flags))
    return out


def collate(items: list[EncodedItem], emb_ids: tuple[int, ...], pad_id: int, with_qa: bool) -> dict[str, "torch.Tensor"]:
    """Right-padded batch tensors for ``ThreeSegmentLM.forward``.

    ``input_ids``, ``segment``, ``labels``: (batch, seq) int64; ``emb_pos``: (batch, m) int64.
    ``labels`` carries the token id at answer positions, -100 elsewhere (and everywhere without QA).
    """
    import torch

    from qarm_core.embed.model import SEG_EMB, SEG_ITEM, SEG_QA

    m = len(emb_ids)
    lens = [len(e.item) + m + (len(e.qa) if with_qa else 0) for e in items]
    t = max(lens)
    ids = torch.full((len(items), t), pad_id, dtype=torch.long)
    seg = torch.zeros((len(items), t), dtype=torch.long)
    lab = torch.full((len(items), t), IGNORE, dtype=torch.long)
    pos = torch.empty((len(items), m), dtype=torch.long)
    for r, e in enumerate(items):
        n_item = len(e.item)
        ids[r, :n_item] = torch.tensor(e.item)
        seg[r, :n_item] = SEG_ITEM
        ids[r, n_item:n_item + m] = torch.tensor(emb_ids)
        seg[r, n_item:n_item + m] = SEG_EMB
        pos[r] = torch.arange(n_item, n_item + m)
        if with_qa and e.qa:
            s = n_item + m
            qa = torch.tensor(e.qa)
            ids[r, s:s + len(qa)] = qa
            seg[r, s:s + len(qa)] = SEG_QA
            flags = torch.tensor(e.qa_is_answer)
            lab[r, s:s + len(qa)] = torch.where(flags, qa, torch.full_like(qa, IGNORE))
    return {"input_ids": ids, "segment": seg, "emb_pos": pos, "labels": lab}


def count_tokens(batch: dict[str, "torch.Tensor"]) -> int:
    """Real (non-pad) tokens in a collated batch."""
    return int((batch["segment"] != 0).sum())


# ---------------------------------------------------------------- pairs
def _unordered_key(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.minimum(a, b), np.maximum(a, b)


def positive_pairs(judgments: pa.Table, catalog_ids: Iterable[int] | np.ndarray, stage: str,
                   dataset: str = "judgments") -> tuple[np.ndarray, np.ndarray]:
    """(anchor, positive) int64 arrays of shape (n,) : kept, non-self, unordered-distinct pairs,
    in a deterministic order (sorted by the unordered pair). Unknown item ids and an empty result
    are DataErrors."""
    missing = [c for c in ("src_item", "dst_item") if c not in judgments.column_names]
    if missing:
        raise DataError(stage, dataset, f"pairs table lacks columns {missing}; has {judgments.column_names}")
    t = judgments
    if "keep" in t.column_names:
        t = t.filter(pc.fill_null(t["keep"], False))
    if t.num_rows == 0:
        raise DataError(stage, dataset, f"no positive pairs ({judgments.num_rows} rows, none kept)")
    if t["src_item"].null_count or t["dst_item"].null_count:
        raise DataError(stage, dataset, "null item ids in pairs")
    src = t["src_item"].to_numpy().astype(np.int64)
    dst = t["dst_item"].to_numpy().astype(np.int64)
    cat = sorted_unique(np.asarray(list(catalog_ids) if not isinstance(catalog_ids, np.ndarray) else catalog_ids,
                               dtype=np.int64))
    unknown = difference(np.concatenate([src, dst]), cat)
    if len(unknown):
        raise DataError(stage, dataset, f"{len(unknown)} item id(s) in pairs are not in the items table, "
                                        f"e.g. {unknown[:5].tolist()}")
    keep = src != dst
    lo, hi = _unordered_key(src[keep], dst[keep])
    if len(lo) == 0:
        raise DataError(stage, dataset, "no positive pairs left after dropping self pairs")
    uniq = np.unique(np.stack([lo, hi], 1), axis=0)
    return uniq[:, 0], uniq[:, 1]


def _pair_hash(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    from qarm_core.hashing import splitmix64

    lo, hi = _unordered_key(a, b)
    with np.errstate(over="ignore"):
        return splitmix64(splitmix64(lo.astype(np.uint64) ^ np.uint64(seed)) ^ hi.astype(np.uint64))


def split_pairs(judgments: pa.Table, holdout_fraction: float, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """(train, held-out) row subsets of a pairs/judgments table; an unordered pair and its mirror
    always land on the same side. Deterministic in (pair, seed), independent of row order."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError("holdout_fraction must be in [0, 1)")
    a = judgments["src_item"].to_numpy().astype(np.int64)
    b = judgments["dst_item"].to_numpy().astype(np.int64)
    u = (_pair_hash(a, b, seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    held = u < holdout_fraction
    return judgments.filter(pa.array(~held)), judgments.filter(pa.array(held))


def batch_pair_indices(n_pairs: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Global batch ``step`` as indices into the pairs (batch_size,): a seeded permutation per
    epoch, so the batch of a step depends only on (seed, step) -- a resumed run sees the very
    batches the interrupted one would have."""
    per_epoch = max(1, n_pairs // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_pairs)
    if n_pairs < batch_size:       # tiny pair sets: repeat the permutation to fill a batch
        perm = np.resize(perm, batch_size)
    return perm[k * batch_size:(k + 1) * batch_size]


def template_qa(items: pa.Table, k: int = 2) -> pa.Table:
    """A QA table (``schemas.QA``) from the judge's question templates and their field-derived
    answers, without any LLM: a stand-in QA segment when stage-2 QA generation was skipped.
    ``model_id`` is ``"template"``."""
    from qarm_core.judge.qa import questions_for
    from qarm_core.schemas import QA

    cols = [c for c in ("item_id", "title", "year", "tags") if c in items.column_names]
    rows = []
    for r in items.select(cols).to_pylist():
        for idx, t, q in questions_for(r, k):
            rows.append({"item_id": r["item_id"], "qa_index": idx, "question": q, "answer": t.fallback(r),
                         "model_id": "template", "prompt_version": "template-v1"})
    return pa.Table.from_pylist(rows, schema=QA.schema)
