"""Two-tower user-to-item model and the 'u2i' item pairs it mines.

Positives: an event is positive when its ``rating`` is present and ``>= min_rating``;
an event without a rating is positive when ``label == 1``; an event with neither is not positive
(it still counts as history).

Time-ordered split. Each user's events are ordered by ``(ts, item_id)``. The holdout is each user's
last positive event (users with at least two positives); the training samples are the user's
earlier positive events, each with the up to ``history_len`` events right before it as the
history. Events at or after a user's holdout never reach training, so no history holds the
holdout. (Other users' events are not cut at a global time: this is the usual leave-last-out.)

Model. The item tower embeds an item id and a hashed bag of words of its title and tags
(``zlib.crc32`` into ``text_buckets`` buckets, mean-pooled) and maps them through an MLP to an
L2-normalised ``(dim,)`` vector. The user tower pools the item tower's (unnormalised) vectors of
the history with a recency-weighted mean (weights halve every ``recency_half_life`` events back;
padding weighs 0) and maps the result through a residual MLP, again L2-normalised. Training uses
the in-batch sampled softmax with a temperature and the logQ correction: an item appears as a
negative in proportion to its popularity among the targets, so its logits are lowered by
``log q(item)`` to keep popular items from being pushed down merely for being sampled often.
Evaluation: recall@k of the holdout item, retrieved with faiss ``IndexFlatIP`` from the user
vector of the history before it, against the most popular training targets; both exclude the
items the user has had before.

Reuse. ``save_towers`` writes a trained model (weights, the item id of each id-embedding row, its
settings) and ``reuse_towers`` puts it back on another day's split: the daily refresh mines with the
published towers instead of training (``mine.u2i.reuse_model``, as the embedding LLM is reused daily and
retrained weekly). Items the towers never saw get the mean of their id rows, so their vector comes
from their title and tags. Towers trained under other settings or another positive-event rule are not
reused (the model trains).

U2I pairs. For each positive (user, target) in the latest window, which is each user's last
``window_events`` positive events (those with at least one earlier event), the user's history
before the target (the same up to ``history_len`` events the user tower sees) is scored against
the target by the inner product of item-tower vectors, and the ``top_m`` history items become
pairs ``target -> history item`` (source ``'u2i'``).

torch and faiss are imported inside the functions that need them, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qarm_core.arrays import count_distinct, sorted_unique
from qarm_core.devices import cpu_threads
from qarm_core.errors import DataError
from qarm_core.events import POSITIVE_MIN_RATING, positive_mask
from qarm_core.pairs.config import TwoTowerConfig
from qarm_core.pairs.swing import pairs_table
from qarm_core.progress import Progress

if TYPE_CHECKING:
    import torch

STAGE = "mine"
PAIRS_SOURCE = "u2i"
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- data: ids, text, time-ordered split
@dataclass(frozen=True)
class TwoTowerSplit:
    """The event stream in dense indices, the training samples and the holdout.

    ``seq_*`` hold all events ordered by (user, ts, item_id); a sample or holdout is a position
    ``p`` in that stream, and its history is ``seq_item[max(user_start[u], p - history_len):p]``.
    """

    item_ids: np.ndarray      # (n_items,) int64 original ids, sorted; dense item index = position
    item_tokens: np.ndarray   # (n_items, max_tokens) int64 hash buckets, padded with text_buckets
    user_ids: np.ndarray      # (n_users,) int64 original ids, sorted
    user_start: np.ndarray    # (n_users + 1,) int64 first position of each user in the stream
    seq_user: np.ndarray      # (n_events,) int64 dense user index
    seq_item: np.ndarray      # (n_events,) int64 dense item index
    train_pos: np.ndarray     # (n_train,) int64 positions of training targets
    holdout_pos: np.ndarray   # (n_holdout,) int64 positions of holdout events, one per user
    window_pos: np.ndarray    # (n_window,) int64 positions of the latest-window positives
    item_count: np.ndarray    # (n_items,) int64 training-target count of each item
    params: TwoTowerConfig    # the params the split was built with (text hashing, positives, window)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


def _as_table(data: Any, dataset: str) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    try:
        return pa.table(data)
    except (TypeError, ValueError, pa.ArrowException) as exc:
        raise DataError(STAGE, dataset, f"cannot read {type(data).__name__} as a table: {exc}") from None


def _int_column(table: pa.Table, name: str, dataset: str) -> np.ndarray:
    if name not in table.column_names:
        raise DataError(STAGE, dataset, f"missing column {name!r}; found {table.column_names}")
    col = table.column(name)
    if col.null_count:
        raise DataError(STAGE, dataset, f"column {name!r} has {col.null_count} null value(s)")
    try:
        return col.to_numpy().astype(np.int64, casting="same_kind")
    except TypeError:
        raise DataError(STAGE, dataset, f"column {name!r} must be integer, got {col.type}") from None


def _hash_token(token: str, buckets: int) -> int:
    # crc32, not hash(): Python's str hash is salted per process, and buckets must be stable.
    return zlib.crc32(token.encode("utf-8")) % buckets


def item_text_tokens(items: pa.Table, buckets: int, max_tokens: int) -> np.ndarray:
    """``(items.num_rows, max_tokens)`` int64 hashed tokens of each item's title words and tags.

    Tokens are lower-cased title words, then ``tag:<tag>`` per tag, the first ``max_tokens`` kept;
    the padding value is ``buckets`` (the EmbeddingBag's padding index).
    """
    words = pc.split_pattern_regex(pc.utf8_lower(pc.fill_null(items.column("title").combine_chunks(), "")),
                                   r"[^\p{L}\p{N}]+")
    token_parts, owner_parts = [pc.list_flatten(words)], [pc.list_parent_indices(words)]
    if "tags" in items.column_names:
        tags = items.column("tags").combine_chunks()
        token_parts.append(pc.binary_join_element_wise("tag:", pc.utf8_lower(pc.list_flatten(tags)), ""))
        owner_parts.append(pc.list_parent_indices(tags))
    tokens = pa.concat_arrays([t.cast(pa.string()) for t in token_parts])
    owner = np.concatenate([o.to_numpy() for o in owner_parts]).astype(np.int64)
    keep = pc.fill_null(pc.greater(pc.utf8_length(tokens), 0), False).to_numpy(zero_copy_only=False)
    tokens, owner = tokens.filter(pa.array(keep)), owner[keep]
    # Hash each distinct token once: a catalogue has far fewer distinct words than word uses.
    vocab = pc.unique(tokens)
    vocab_bucket = np.array([_hash_token(t, buckets) for t in vocab.to_pylist()], np.int64)
    bucket = vocab_bucket[pc.index_in(tokens, vocab).to_numpy().astype(np.int64)]
    order = np.argsort(owner, kind="stable")          # per item: title words first, then tags
    owner, bucket = owner[order], bucket[order]
    slot = np.arange(len(owner)) - np.searchsorted(owner, owner)
    out = np.full((items.num_rows, max_tokens), buckets, np.int64)
    fits = slot < max_tokens
    out[owner[fits], slot[fits]] = bucket[fits]
    return out


def time_split(interactions: Any, items: Any, params: TwoTowerConfig | None = None,
               min_rating: float | None = POSITIVE_MIN_RATING) -> TwoTowerSplit:
    """The time-ordered split of ``interactions`` (see the module doc), in dense indices; positives
    by ``qarm_core.events.positive_mask`` with ``min_rating``.

    ``interactions``: a table (or anything ``pa.table`` reads) with ``user_id, item_id, ts`` and
    ``rating`` and/or ``label``; ``items``: ``item_id, title`` and optional ``tags``. Every item of
    ``interactions`` must be in ``items``; items without events stay in the catalogue.
    """
    params = params or TwoTowerConfig()
    inter = _as_table(interactions, "interactions")
    items_t = _as_table(items, "items")
    if inter.num_rows == 0:
        raise DataError(STAGE, "interactions", "no interactions: the two-tower model needs events "
                                               "to train on")
    if items_t.num_rows == 0:
        raise DataError(STAGE, "items", "no items")
    if "title" not in items_t.column_names:
        raise DataError(STAGE, "items", f"missing column 'title'; found {items_t.column_names}")
    user = _int_column(inter, "user_id", "interactions")
    item = _int_column(inter, "item_id", "interactions")
    ts = _int_column(inter, "ts", "interactions")
    positive = positive_mask(inter, min_rating, STAGE)

    raw_item_ids = _int_column(items_t, "item_id", "items")
    item_order = np.argsort(raw_item_ids, kind="stable")
    item_ids = raw_item_ids[item_order]
    dup = item_ids[1:][item_ids[1:] == item_ids[:-1]]
    if len(dup):
        raise DataError(STAGE, "items", f"{count_distinct(dup)} item_id(s) appear more than once, "
                                        f"e.g. {sorted_unique(dup)[:5].tolist()}")
    item_dense = np.minimum(np.searchsorted(item_ids, item), len(item_ids) - 1)
    unknown = item_ids[item_dense] != item
    if unknown.any():
        missing = sorted_unique(item[unknown])
        raise DataError(STAGE, "items", f"{len(missing)} item_id(s) of the interactions are not in "
                                        f"the items table, e.g. {missing[:5].tolist()}")

    user_ids, user_dense = np.unique(user, return_inverse=True)
    order = np.lexsort((item, ts, user_dense))
    seq_user, seq_item, pos_flag = user_dense[order].astype(np.int64), item_dense[order], positive[order]
    n_users, n = len(user_ids), len(order)
    user_start = np.searchsorted(seq_user, np.arange(n_users + 1))
    pos_in_user = np.arange(n) - user_start[seq_user]

    # Positives, per user in time order: rank from the end decides holdout and latest window.
    ppos = np.flatnonzero(pos_flag)
    pu = seq_user[ppos]
    n_pos = np.bincount(pu, minlength=n_users)
    first_pos = np.concatenate([[0], np.cumsum(n_pos)[:-1]])
    from_end = n_pos[pu] - 1 - (np.arange(len(ppos)) - first_pos[pu])
    is_holdout = (from_end == 0) & (n_pos[pu] >= 2)
    holdout_pos = ppos[is_holdout]
    # A target needs at least one earlier event: the user tower has nothing to pool otherwise.
    has_history = pos_in_user[ppos] >= 1
    train_pos = ppos[~is_holdout & has_history]
    if params.max_train_samples is not None and len(train_pos) > params.max_train_samples:
        # the most recent samples (ties: the later position), kept in stream order
        recent = np.lexsort((train_pos, ts[order][train_pos]))[-params.max_train_samples:]
        train_pos = np.sort(train_pos[recent])
    # Only training targets are counted: the holdout must not leak into popularity or logQ.
    item_count = np.bincount(seq_item[train_pos], minlength=len(item_ids)).astype(np.int64)
    window_pos = ppos[(from_end < params.window_events) & has_history]

    tokens = item_text_tokens(items_t.take(pa.array(item_order)), params.text_buckets, params.max_tokens)
    return TwoTowerSplit(item_ids=item_ids, item_tokens=tokens, user_ids=user_ids,
                         user_start=user_start.astype(np.int64), seq_user=seq_user, seq_item=seq_item,
                         train_pos=train_pos, holdout_pos=holdout_pos,
                         window_pos=window_pos, item_count=item_count, params=params)


def histories(split: TwoTowerSplit, pos: np.ndarray, history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The events right before each position: items ``(n, history_len)`` and mask ``(n, history_len)``.

    Right-aligned (the most recent event last); padded slots hold ``n_items`` and mask ``False``.
    """
    pos = np.asarray(pos, np.int64)
    n_hist = np.minimum(pos - split.user_start[split.seq_user[pos]], history_len)
    idx = pos[:, None] - history_len + np.arange(history_len)[None, :]
    mask = np.arange(history_len)[None, :] >= (history_len - n_hist)[:, None]
    hist = np.where(mask, split.seq_item[np.maximum(idx, 0)], split.n_items)
    return hist, mask


def pool_weights(mask: np.ndarray, half_life: float) -> np.ndarray:
    """``(n, L)`` float32 history weights, rows summing to 1 (0 on padding, and on empty rows).

    Weights decay by half every ``half_life`` slots back from the most recent (right-most) one;
    0 gives the plain mean.
    """
    n, length = mask.shape
    decay = np.ones(length) if half_life == 0 else 0.5 ** ((length - 1 - np.arange(length)) / half_life)
    w = np.where(mask, decay[None, :], 0.0)
    return (w / np.maximum(w.sum(1, keepdims=True), 1e-30)).astype(np.float32)


# ---------------------------------------------------------------- model
def _build_towers(n_items: int, params: TwoTowerConfig):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Towers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h, d = params.hidden, params.dim
            # sparse gradients: a batch touches ~25k of the rows; a dense (n_items, h) gradient and
            # AdamW step over every row cost 0.4 s per step at 1M items (see train_two_tower)
            self.item_id = nn.Embedding(n_items, h, sparse=True)
            # Bucket text_buckets pads the (n_items, max_tokens) token matrix; the mean skips it.
            self.text = nn.EmbeddingBag(params.text_buckets + 1, h, mode="mean",
                                        padding_idx=params.text_buckets)
            self.item_mlp = nn.Sequential(nn.Linear(2 * h, h), nn.GELU(), nn.Linear(h, d))
            self.user_mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
            nn.init.normal_(self.item_id.weight, std=0.05)
            nn.init.normal_(self.text.weight, std=0.05)
            with torch.no_grad():
                self.text.weight[params.text_buckets].zero_()

        def item_raw(self, idx: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            """(n,) item indices and their (n, max_tokens) tokens -> (n, dim), not normalised."""
            return self.item_mlp(torch.cat([self.item_id(idx), self.text(tokens)], dim=1))

        def user(self, pooled: torch.Tensor) -> torch.Tensor:
            """Weighted mean of the history's item vectors (b, dim) -> (b, dim) L2-normalised."""
            return F.normalize(pooled + self.user_mlp(pooled), dim=-1)

    return Towers()


@contextlib.contextmanager
def _torch_env(params: TwoTowerConfig) -> Iterator[None]:
    """Seeded, fixed-thread torch; the caller's global RNG state and thread counts are restored."""
    import torch

    with cpu_threads(params.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        yield


class TwoTowerModel:
    """Trained towers plus the id map and item text they were trained with (inference only)."""

    def __init__(self, towers, split: TwoTowerSplit, params: TwoTowerConfig, train_seconds: float = 0.0):
        self.towers = towers
        self.item_ids = split.item_ids            # (n_items,) original id of each embedding row
        self.item_tokens = split.item_tokens
        self.params = params
        self.train_seconds = train_seconds
        # the positive-event rule of its training samples (``events.positive_min_rating``), as
        # ``mine_u2i_pairs`` trained or reused it; saved with the towers
        self.min_rating: float | None = POSITIVE_MIN_RATING
        self._raw: np.ndarray | None = None

    def _item_raw(self, chunk: int = 65536) -> np.ndarray:
        """``(n_items, dim)`` float32 item-tower outputs before normalisation (what users pool)."""
        import torch

        if self._raw is None:
            out = [np.zeros((0, self.params.dim), np.float32)]
            with torch.no_grad(), _torch_env(self.params):
                for s in range(0, len(self.item_ids), chunk):
                    idx = torch.arange(s, min(s + chunk, len(self.item_ids)))
                    tokens = torch.from_numpy(self.item_tokens[s:s + chunk])
                    out.append(self.towers.item_raw(idx, tokens).numpy())
            self._raw = np.concatenate(out).astype(np.float32)
        return self._raw

    def item_embeddings(self) -> np.ndarray:
        """``(n_items, dim)`` float32 L2-normalised item-tower vectors, rows in ``item_ids`` order."""
        raw = self._item_raw()
        return raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)

    def user_embeddings(self, hist: np.ndarray, mask: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """``(n, dim)`` float32 L2-normalised user vectors from dense item indices ``(n, L)`` of
        the history, most recent last, and its mask ``(n, L)`` (``False``: padding, any index)."""
        import torch

        hist = np.asarray(hist, np.int64)
        mask = np.asarray(mask, bool)
        if hist.shape != mask.shape or hist.ndim != 2:
            raise ValueError(f"two_tower: hist {hist.shape} and mask {mask.shape} must both be (n, L)")
        raw = self._item_raw()
        out = [np.zeros((0, self.params.dim), np.float32)]
        with torch.no_grad(), _torch_env(self.params):
            for s in range(0, len(hist), chunk):
                h, m = hist[s:s + chunk], mask[s:s + chunk]
                # Padded slots may hold any index: read a valid row, then weight it 0.
                pooled = np.einsum("nl,nld->nd", pool_weights(m, self.params.recency_half_life),
                                   raw[np.where(m, h, 0)])
                out.append(self.towers.user(torch.from_numpy(pooled.astype(np.float32))).numpy())
        return np.concatenate(out)


def train_two_tower(split: TwoTowerSplit, params: TwoTowerConfig | None = None,
                    log: list | None = None) -> TwoTowerModel:
    """Train both towers on ``split.train_pos`` with the in-batch sampled softmax (logQ-corrected).

    ``params`` defaults to the split's; the fields that shaped the split must match it.
    ``log``, if given, receives one ``{"epoch", "loss", "seconds"}`` dict per epoch.
    """
    import torch
    from torch.nn import functional as F

    params = params or split.params
    for name in ("text_buckets", "max_tokens", "window_events"):
        if getattr(params, name) != getattr(split.params, name):
            raise ValueError(f"two_tower: params.{name}={getattr(params, name)!r} differs from the "
                             f"split's {getattr(split.params, name)!r}; rebuild the split with "
                             f"these params")
    if len(split.train_pos) < 2:
        raise DataError(STAGE, "interactions", f"{len(split.train_pos)} training sample(s): need "
                                               "positive events that follow an earlier event of "
                                               "the same user")
    n_items = split.n_items
    t0 = time.perf_counter()
    with _torch_env(params):
        towers = _build_towers(n_items, params)
        # fused: one vectorised kernel; the default loop over the 4M-float text table is 10x slower.
        dense = [p for name, p in towers.named_parameters() if name != "item_id.weight"]
        opt = torch.optim.AdamW(dense, lr=params.lr, weight_decay=params.weight_decay, fused=True)
        # The id table (n_items, hidden) is updated lazily: Adam on the rows a batch touched, their
        # weight decay applied then too. Dense AdamW read and wrote every row's weight, gradient and
        # two moments each step: at 1M items 0.19 s of backward (zero-filling the dense gradient) and
        # 0.19 s of optimiser step per batch (750 of 830 s of a profiled training), growing with the catalog.
        opt_ids = torch.optim.SparseAdam([towers.item_id.weight], lr=params.lr)
        tokens_all = torch.from_numpy(split.item_tokens)
        # logQ: the chance an item shows up as an in-batch negative is its share of the targets.
        log_q = torch.from_numpy(np.log(np.maximum(split.item_count, 1) / len(split.train_pos))).float()
        rng = np.random.default_rng(params.seed)
        n_steps = params.epochs * -(-len(split.train_pos) // params.batch_size)
        scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=params.lr, total_steps=n_steps, pct_start=0.1)
                  for o in (opt, opt_ids)]
        towers.train()
        prog = Progress(STAGE, f"two-tower training steps ({params.epochs} epochs of "
                               f"{len(split.train_pos):,} samples)", n_steps, "steps")
        for epoch in range(params.epochs):
            perm = rng.permutation(split.train_pos)
            total, t_ep = 0.0, time.perf_counter()
            for s in range(0, len(perm), params.batch_size):
                pos = perm[s:s + params.batch_size]
                if len(pos) < 2:
                    continue
                hist, mask = histories(split, pos, params.history_len)
                target = split.seq_item[pos]
                # Run the item tower once per distinct item of the batch (targets and histories),
                # and pool histories as a (batch, distinct items) averaging matrix: a matmul
                # forward and backward, where gathering (batch, L, dim) rows would be far slower.
                uniq, inv = np.unique(np.concatenate([target, hist[mask]]), return_inverse=True)
                rows = np.nonzero(mask)[0]
                weight = pool_weights(mask, params.recency_half_life)[mask]
                avg = torch.sparse_coo_tensor(np.stack([rows, inv[len(target):]]),
                                              weight.astype(np.float32), (len(pos), len(uniq)),
                                              check_invariants=False)
                uniq_t = torch.from_numpy(uniq)
                raw = towers.item_raw(uniq_t, tokens_all[uniq_t])
                u = towers.user(torch.sparse.mm(avg, raw))
                v = F.normalize(raw[torch.from_numpy(inv[:len(target)])], dim=-1)
                logits = u @ v.T / params.temperature
                tgt = torch.from_numpy(target)
                if params.logq_correction:
                    logits = logits - log_q[tgt][None, :]
                # The same item twice in a batch is not a negative of itself.
                same = (tgt[:, None] == tgt[None, :]) & ~torch.eye(len(pos), dtype=torch.bool)
                logits = logits.masked_fill(same, float("-inf"))
                loss = F.cross_entropy(logits, torch.arange(len(pos)))
                opt.zero_grad(set_to_none=True)
                opt_ids.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                _lazy_adamw_step(opt_ids, towers.item_id.weight, uniq_t, params.weight_decay)
                for sch in scheds:
                    sch.step()
                total += float(loss.detach()) * len(pos)
                prog.advance(1, epoch=epoch + 1)
            if log is not None:
                log.append({"epoch": epoch, "loss": total / len(perm),
                            "seconds": time.perf_counter() - t_ep})
        towers.eval()
        prog.finish()
    return TwoTowerModel(towers, split, params, train_seconds=time.perf_counter() - t0)


def _lazy_adamw_step(opt, weight, rows, weight_decay: float) -> None:
    """``opt`` (``SparseAdam`` over ``weight`` ``(n_rows, h)``) steps on the rows its sparse gradient
    holds, ``rows`` ``(m,)`` (the batch's distinct items, known to the caller); those rows then decay
    by ``lr * weight_decay``, as AdamW decays every row each step (rows a batch does not touch keep
    their values: lazy Adam)."""
    import torch

    opt.step()
    if weight_decay:
        with torch.no_grad():
            weight[rows] *= 1.0 - opt.param_groups[0]["lr"] * weight_decay


# ---------------------------------------------------------------- evaluation
def _excluded(split: TwoTowerSplit, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) of every event before each position in its user's stream: the seen items."""
    start = split.user_start[split.seq_user[pos]]
    n_seen = pos - start
    row = np.repeat(np.arange(len(pos)), n_seen)
    # Flat positions start[r], start[r] + 1, ..., pos[r] - 1 for every row r.
    at = np.arange(n_seen.sum()) - np.repeat(np.cumsum(n_seen) - n_seen - start, n_seen)
    return row, split.seq_item[at]


def evaluate_recall(model: TwoTowerModel, split: TwoTowerSplit, k: int = 50,
                    chunk: int = 4096, max_users: int | None = None) -> dict[str, float | int]:
    """Recall@k on the holdout of the two-tower model (faiss exact inner-product search) and of
    the most-popular-training-items baseline; items a user has seen before are excluded for both.

    With one holdout item per user, recall@k is the share of users whose item is in their top k.
    ``max_users``: measure on a seeded sample of at most this many held-out users (the model's
    seed); ``n_users`` says how many were measured and ``recall_*_ci95`` the half-width of each
    recall's 95% normal-approximation interval.
    """
    import faiss

    if k < 1:
        raise ValueError(f"two_tower: k must be >= 1, got {k}")
    pos = split.holdout_pos
    if len(pos) == 0:
        raise DataError(STAGE, "interactions", "no holdout: no user has two positive events")
    if max_users is not None and len(pos) > max_users:
        rng = np.random.default_rng([model.params.seed, 7])
        pos = np.sort(rng.choice(pos, max_users, replace=False))
    n_items = split.n_items
    target = split.seq_item[pos]
    row, seen = _excluded(split, pos)

    # Popularity: the rank of the target among the items the user has not seen. An item seen twice
    # is one item ahead of the target, not two (hence the unique (row, item) keys).
    order = np.lexsort((np.arange(n_items), -split.item_count))
    rank = np.empty(n_items, np.int64)
    rank[order] = np.arange(n_items)
    key = sorted_unique(row * n_items + seen)
    row, seen = key // n_items, key % n_items
    ahead = np.bincount(row, weights=(rank[seen] < rank[target[row]]), minlength=len(pos))
    target_seen = np.zeros(len(pos), bool)
    target_seen[row[seen == target[row]]] = True
    pop_hit = (rank[target] - ahead < k) & ~target_seen

    # Two-tower: search k + (most seen items in the chunk) deep, so that k unseen items remain
    # after exclusion; users go in order of their seen counts, so each chunk's depth fits all.
    index = faiss.IndexFlatIP(model.params.dim)
    index.add(model.item_embeddings())
    # the block's thread limit covers faiss and the torch user tower inside it, and both counts
    # come back after it (devices.cpu_threads: restoring OpenMP alone left MKL on one thread)
    with cpu_threads(model.params.num_threads, faiss_too=True):
        by_seen = np.argsort(pos - split.user_start[split.seq_user[pos]], kind="stable")
        tt_hit = np.zeros(len(pos), bool)
        for s in range(0, len(pos), chunk):
            idx = by_seen[s:s + chunk]
            hist, mask = histories(split, pos[idx], model.params.history_len)
            c_row, c_seen = _excluded(split, pos[idx])
            depth = int(min(n_items, k + np.bincount(c_row, minlength=len(idx)).max()))
            _, got = index.search(model.user_embeddings(hist, mask), depth)        # (chunk, depth)
            seen_key = sorted_unique(c_row * n_items + c_seen)
            unseen = ~np.isin(np.arange(len(idx))[:, None] * n_items + got, seen_key) & (got >= 0)
            top = unseen & (np.cumsum(unseen, axis=1) <= k)
            tt_hit[idx] = (top & (got == target[idx, None])).any(axis=1)
    n = len(pos)

    def half(hits: np.ndarray) -> float:
        return float(1.96 * np.sqrt(hits.mean() * (1 - hits.mean()) / n))

    return {"recall_two_tower": float(tt_hit.mean()), "recall_popularity": float(pop_hit.mean()),
            "recall_two_tower_ci95": half(tt_hit), "recall_popularity_ci95": half(pop_hit),
            "n_users": int(n), "n_users_held_out": int(len(split.holdout_pos)), "k": int(k)}


# ---------------------------------------------------------------- u2i pairs
def u2i_pairs(model: TwoTowerModel, split: TwoTowerSplit, chunk: int = 4096) -> pa.Table:
    """Pairs ``target -> history item`` for every latest-window positive (``split.window_pos``).

    Each target keeps the ``top_m`` of its distinct history items (the same up to ``history_len``
    events the user tower sees; the target itself excluded) by the inner product of item-tower
    vectors; a (src, dst) found for several users keeps its highest score.
    Sorted by (src_item, score desc, dst_item).
    """
    emb = model.item_embeddings()
    length, m = model.params.history_len, min(model.params.top_m, model.params.history_len)
    parts = [(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64))]
    for s in range(0, len(split.window_pos), chunk):
        pos = split.window_pos[s:s + chunk]
        hist, mask = histories(split, pos, length)
        target = split.seq_item[pos]
        # A history item seen twice counts once (at its latest slot); the target is not its own pair.
        o = np.argsort(np.where(mask, hist, -1), axis=1, kind="stable")
        h_sorted = np.take_along_axis(hist, o, axis=1)
        earlier_dup = np.zeros_like(mask)
        np.put_along_axis(earlier_dup, o[:, :-1], h_sorted[:, :-1] == h_sorted[:, 1:], axis=1)
        valid = mask & ~earlier_dup & (hist != target[:, None])
        score = np.einsum("bld,bd->bl", emb[np.where(mask, hist, 0)], emb[target]).astype(np.float64)
        score = np.where(valid, score, -np.inf)
        top = np.argsort(-score, axis=1, kind="stable")[:, :m]
        top_score = np.take_along_axis(score, top, axis=1)
        keep = np.isfinite(top_score)
        parts.append((np.broadcast_to(target[:, None], top.shape)[keep],
                      np.take_along_axis(hist, top, axis=1)[keep], top_score[keep]))
    src, dst, sc = (np.concatenate(x) for x in zip(*parts))
    order = np.lexsort((dst, -sc, src))
    src, dst, sc = src[order], dst[order], sc[order]
    # First occurrence of each (src, dst) in this order is its highest score.
    _, first = np.unique(src * split.n_items + dst, return_index=True)
    keep = np.zeros(len(src), bool)
    keep[first] = True
    return pairs_table(split.item_ids[src[keep]], split.item_ids[dst[keep]], sc[keep], PAIRS_SOURCE)


# ---------------------------------------------------------------- saving and reusing the towers
TOWERS_FORMAT = 1
TOWERS_WEIGHTS, TOWERS_IDS, TOWERS_META = "towers.safetensors", "item_ids.npy", "towers.json"
# The settings a model was trained under (its weights' shapes, the inputs it reads, how it learned):
# published towers are reused only under the same values. The others (window_events, top_m, recall_*,
# num_threads, reuse_model) only decide what is mined or measured with them.
MODEL_FIELDS = ("dim", "hidden", "history_len", "recency_half_life", "text_buckets", "max_tokens", "temperature",
                "logq_correction", "epochs", "batch_size", "lr", "weight_decay", "max_train_samples", "seed")
# ... and which events were its positives (``events.positive_min_rating``), saved beside them.
POSITIVE_RULE_FIELD = "positive_min_rating"


@dataclass(frozen=True)
class SavedTowers:
    """Towers as ``save_towers`` wrote them into ``folder``: ``item_ids`` ``(n_items,)`` int64 sorted
    (the original id of each id-embedding row) and the settings (JSON); the weights are read by
    ``weights()`` only when the towers are reused, so a run that trains instead never loads them."""

    folder: Path
    item_ids: np.ndarray
    settings: dict

    def weights(self) -> dict:
        """The weights by name (torch tensors); an unreadable file, or an id table that does not
        match ``item_ids``, is a ``DataError`` of dataset ``two_tower``."""
        from safetensors.torch import load_file

        try:
            state = load_file(str(self.folder / TOWERS_WEIGHTS))
        except Exception as exc:    # safetensors' own error is no OSError/ValueError
            raise DataError(STAGE, "two_tower", f"unreadable two-tower weights at {self.folder}: {exc}") from None
        rows = state.get("item_id.weight")
        if rows is None or rows.shape[0] != len(self.item_ids):
            raise DataError(STAGE, "two_tower", f"two-tower model at {self.folder}: {len(self.item_ids)} item ids do "
                                                f"not match its id table {None if rows is None else tuple(rows.shape)}")
        return state


def save_towers(model: TwoTowerModel, folder: str | Path) -> None:
    """Write ``model`` into ``folder``: the weights (safetensors), the id of each id-embedding row
    (``.npy``, no pickle) and the settings it was trained under (``MODEL_FIELDS``, JSON). The same
    model gives the same bytes, whatever the mining settings it was used with."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({k: v.detach().contiguous() for k, v in model.towers.state_dict().items()}, str(folder / TOWERS_WEIGHTS))
    np.save(folder / TOWERS_IDS, np.asarray(model.item_ids, np.int64), allow_pickle=False)
    settings = model.params.model_dump(mode="json")
    (folder / TOWERS_META).write_text(json.dumps({"format": TOWERS_FORMAT, "n_items": int(len(model.item_ids)),
                                                  "params": {f: settings[f] for f in MODEL_FIELDS}
                                                  | {POSITIVE_RULE_FIELD: model.min_rating}},
                                                 sort_keys=True, indent=1))


def load_towers(folder: str | Path) -> SavedTowers:
    """The towers ``save_towers`` wrote into ``folder`` (settings and item ids; the weights on
    demand); a missing or inconsistent file is a ``DataError`` of dataset ``two_tower``."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / TOWERS_META).read_text())
        item_ids = np.load(folder / TOWERS_IDS, allow_pickle=False)
        if not isinstance(meta, dict) or not isinstance(meta.get("params", {}), dict):
            raise ValueError(f"{TOWERS_META} is not an object with a params object")
        if not (folder / TOWERS_WEIGHTS).is_file():
            raise OSError(f"no {TOWERS_WEIGHTS}")
    except (OSError, ValueError) as exc:
        raise DataError(STAGE, "two_tower", f"unreadable two-tower model at {folder}: {exc}") from None
    if meta.get("format") != TOWERS_FORMAT:
        raise DataError(STAGE, "two_tower", f"two-tower format {meta.get('format')} at {folder} is not {TOWERS_FORMAT}")
    if item_ids.ndim != 1 or not np.issubdtype(item_ids.dtype, np.integer) \
            or (len(item_ids) > 1 and not (np.diff(item_ids) > 0).all()):
        raise DataError(STAGE, "two_tower", f"two-tower model at {folder}: its item ids are not sorted, distinct integers")
    return SavedTowers(folder=folder, item_ids=item_ids.astype(np.int64), settings=meta.get("params", {}))


def reuse_blocker(saved: SavedTowers, params: TwoTowerConfig,
                  min_rating: float | None = POSITIVE_MIN_RATING) -> str | None:
    """Why ``saved`` cannot stand in for training under ``params`` and the positive-event rule
    ``min_rating`` (None: it can): the settings of ``MODEL_FIELDS`` and the rule that differ, with
    both values."""
    now = params.model_dump(mode="json") | {POSITIVE_RULE_FIELD: min_rating}
    diff = [f"{f} {saved.settings.get(f)!r} -> {now[f]!r}" for f in (*MODEL_FIELDS, POSITIVE_RULE_FIELD)
            if saved.settings.get(f) != now[f]]
    return f"the published towers were trained with other settings ({', '.join(diff)})" if diff else None


def reuse_towers(saved: SavedTowers, split: TwoTowerSplit, params: TwoTowerConfig,
                 min_rating: float | None = POSITIVE_MIN_RATING) -> tuple[TwoTowerModel, int]:
    """``saved`` on ``split``'s catalog, untrained: each item's id row is carried over by item id,
    and an item the towers never saw gets the mean of their id rows (its vector then comes from its
    text). Returns the model and the number of such items. ``ValueError`` if ``reuse_blocker`` says
    the settings or the positive-event rule differ; ``DataError`` if the weights do not fit them."""
    import torch

    why = reuse_blocker(saved, params, min_rating)
    if why is not None:
        raise ValueError(why)
    with _torch_env(params):
        towers = _build_towers(split.n_items, params)
    state = saved.weights()
    old = state.pop("item_id.weight")
    at = np.minimum(np.searchsorted(saved.item_ids, split.item_ids), max(len(saved.item_ids) - 1, 0))
    known = (saved.item_ids[at] == split.item_ids) if len(saved.item_ids) else np.zeros(split.n_items, bool)
    rows = old.mean(0, keepdim=True).expand(split.n_items, -1).clone()
    known_t = torch.from_numpy(known)
    rows[known_t] = old[torch.from_numpy(at[known])]
    state["item_id.weight"] = rows
    try:
        towers.load_state_dict(state)
    except RuntimeError as exc:     # weights of other shapes than the settings say
        raise DataError(STAGE, "two_tower", f"the published two-tower weights do not fit its settings: {exc}") from None
    towers.eval()
    model = TwoTowerModel(towers, split, params)
    model.min_rating = saved.settings.get(POSITIVE_RULE_FIELD)
    return model, int((~known).sum())


def mine_u2i_pairs(interactions: Any, items: Any, params: TwoTowerConfig | None = None,
                   k: int = 50, min_rating: float | None = POSITIVE_MIN_RATING, published: SavedTowers | None = None
                   ) -> tuple[pa.Table, dict[str, Any], TwoTowerModel]:
    """Split, train (or reuse ``published``), evaluate and mine: the 'u2i' pairs table, a report and
    the model (for ``save_towers``).

    ``published``: towers of an earlier run, used as they are when ``reuse_blocker`` finds nothing
    against it (report ``reused`` 1 and ``items_unseen``, the items they never saw); else the model
    trains (``reused`` 0). The report holds recall@k of the model and of popularity on the holdout
    (``None`` when no user has two positives), the training time and the sample/pair counts.
    """
    params = params or TwoTowerConfig()
    split = time_split(interactions, items, params, min_rating)
    blocker = "none published" if published is None else reuse_blocker(published, params, min_rating)
    report: dict[str, Any] = {"n_items": split.n_items, "n_users_total": len(split.user_ids),
                              "n_train_samples": int(len(split.train_pos))}
    if blocker is None:
        model, unseen = reuse_towers(published, split, params, min_rating)
        report |= {"reused": 1, "items_unseen": unseen, "train_seconds": 0.0}
    else:
        if published is not None:
            log.info("mine: training the two-tower model: %s", blocker)
        model = train_two_tower(split, params)
        model.min_rating = min_rating
        report |= {"reused": 0, "train_seconds": round(model.train_seconds, 2)}
    if len(split.holdout_pos):
        report.update(evaluate_recall(model, split, k=k, max_users=params.recall_max_users))
    else:
        report.update({"recall_two_tower": None, "recall_popularity": None, "n_users": 0, "k": k})
    pairs = u2i_pairs(model, split)
    report["n_pairs"] = pairs.num_rows
    return pairs, report, model
