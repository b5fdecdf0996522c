"""Train and evaluate one model on one seed: Adam on BCE, a fixed number of epochs, test metrics
(AUC, GAUC, logloss) after every epoch (the curves)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from qarm_core.devices import cpu_threads
from qarm_core.errors import DataError
from qarm_core.progress import Progress
from qarm_core.rank.config import RankConfig
from qarm_core.rank.data import RankData
from qarm_core.rank.metrics import evaluate
from qarm_core.rank.models import MODEL_SPECS, RankModel, resolve_spec


@dataclass
class RunResult:
    model: str
    seed: int
    metrics: dict[str, float]                      # test metrics of the epoch chosen on validation
    curves: list[dict[str, float]] = field(default_factory=list)   # one entry per epoch (train loss, valid metrics)
    train_samples_per_s: float = 0.0
    n_params: int = 0
    seconds: float = 0.0
    trained: RankModel | None = field(default=None, repr=False)   # the chosen epoch's model (eval mode)
    lr: float = 0.0
    best_epoch: int = 0                            # the epoch with the best validation AUC
    valid_metrics: dict[str, float] = field(default_factory=dict)  # validation metrics of that epoch
    test_rows: np.ndarray | None = field(default=None, repr=False)    # rows of data scored on test
    test_logits: np.ndarray | None = field(default=None, repr=False)  # (len(test_rows),) at best_epoch


def build_model(name: str, data: RankData, cfg: RankConfig) -> RankModel:
    if name not in MODEL_SPECS:
        raise DataError("rank", "models", f"unknown model {name!r}; known: {sorted(MODEL_SPECS)}")
    spec = resolve_spec(name, cfg.model.frozen_embedding)
    m = cfg.model
    return RankModel(spec, data.tables, dim=m.dim, att_hidden=m.att_hidden, mlp_hidden=tuple(m.mlp_hidden),
                     dropout=m.dropout, top_k=cfg.gsu.top_k)


@torch.inference_mode()
def predict(model: RankModel, data: RankData, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits ``(len(rows),)``."""
    model.eval()
    out = [model(data.batch(rows[lo:lo + batch_size], model.spec.retrieval)).numpy()
           for lo in range(0, len(rows), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def evaluate_rows(model: RankModel, data: RankData, rows: np.ndarray, batch_size: int) -> dict[str, float]:
    logits = predict(model, data, rows, batch_size)
    return evaluate(data.user_id[rows], data.label[rows], logits)


def train_model(name: str, data: RankData, cfg: RankConfig, seed: int, seed_index: int = 0,
                lr: float | None = None, on_epoch: Callable[[dict[str, float]], None] | None = None,
                evaluate_test: bool = True) -> RunResult:
    """Train ``name`` with ``seed`` (init, dropout, shuffling) on the training samples of negative
    set ``seed_index`` for ``cfg.train.epochs`` epochs at learning rate ``lr`` (default: the first
    of ``cfg.train.lr_grid``), scoring the validation samples after each epoch. The epoch with the
    best validation AUC is kept; only that model is scored on test (``evaluate_test``), so nothing
    about the test period chooses anything."""
    tc = cfg.train
    lr = tc.lr_grid[0] if lr is None else lr
    train_rows, valid_rows = data.rows("train", seed_index), data.rows("valid", seed_index)
    test_rows = data.rows("test", seed_index)
    if len(train_rows) == 0 or len(valid_rows) == 0 or (evaluate_test and len(test_rows) == 0):
        raise DataError("rank", "samples", f"{len(train_rows)} training, {len(valid_rows)} validation and "
                                           f"{len(test_rows)} test samples: each split must be non-empty")
    with _torch_state(tc.num_threads, seed):
        return _train(name, data, cfg, seed, seed_index, lr, on_epoch, evaluate_test, train_rows, valid_rows)


@contextlib.contextmanager
def _torch_state(threads: int, seed: int) -> Iterator[None]:
    """``threads`` torch threads, denormals flushed and the global RNG seeded for the block; the
    caller's thread count, RNG state and denormal mode come back after it (an unrestored
    ``set_num_threads(1)`` made every later torch stage of the process run on one thread)."""
    # Adam's second moments of rarely touched embedding rows decay into denormals, which the CPU
    # handles ~100x slower; flushing them to zero changes nothing measurable.
    with cpu_threads(threads):
        torch.set_flush_denormal(True)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                yield
        finally:
            torch.set_flush_denormal(False)


def _train(name: str, data: RankData, cfg: RankConfig, seed: int, seed_index: int, lr: float,
           on_epoch: Callable[[dict[str, float]], None] | None, evaluate_test: bool,
           train_rows: np.ndarray, valid_rows: np.ndarray) -> RunResult:
    tc = cfg.train
    rng = np.random.default_rng([seed, 1])
    model = build_model(name, data, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=tc.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    result = RunResult(name, seed, {}, n_params=sum(p.numel() for p in model.parameters()), lr=lr)
    t_start = time.perf_counter()
    train_time, train_seen = 0.0, 0
    n_batches = -(-len(train_rows) // tc.batch_size)
    prog = Progress("rank", f"{name} seed {seed} lr {lr:g}: training batches ({tc.epochs} epochs)",
                    tc.epochs * n_batches, "batches")
    best_auc, best_state = -np.inf, None
    for epoch in range(1, tc.epochs + 1):
        model.train()
        order = train_rows[rng.permutation(len(train_rows))]
        losses, t0 = [], time.perf_counter()
        for lo in range(0, len(order), tc.batch_size):
            rows = order[lo:lo + tc.batch_size]
            batch = data.batch(rows, model.spec.retrieval)
            logits = model(batch)
            loss = loss_fn(logits, batch["label"])
            if tc.embedding_l2 > 0:
                loss = loss + tc.embedding_l2 * sum(r.pow(2).sum() for r in model.embedding_rows(batch))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()) * len(rows))
            prog.advance(1, epoch=epoch)
        dt = time.perf_counter() - t0
        train_time += dt
        train_seen += len(order)
        valid = evaluate_rows(model, data, valid_rows, tc.eval_batch_size)
        point = {"epoch": float(epoch), "train_loss": float(np.sum(losses) / len(order)),
                 **{f"valid_{k}": v for k, v in valid.items()}, "epoch_seconds": dt}
        result.curves.append(point)
        prog.fields["valid_auc"] = round(valid["auc"], 4)
        if valid["auc"] > best_auc:
            best_auc, result.best_epoch, result.valid_metrics = valid["auc"], epoch, valid
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if on_epoch:
            on_epoch(point)
    prog.finish()
    model.load_state_dict(best_state)
    model.eval()
    result.trained = model
    if evaluate_test:
        score_on_test(result, data, seed_index, tc.eval_batch_size)
    result.train_samples_per_s = train_seen / max(train_time, 1e-9)
    result.seconds = time.perf_counter() - t_start
    return result


def score_on_test(result: RunResult, data: RankData, seed_index: int, batch_size: int) -> RunResult:
    """Score ``result.trained`` once on the test samples of negative set ``seed_index``: fills
    ``test_rows``, ``test_logits`` and the test ``metrics``."""
    result.test_rows = data.rows("test", seed_index)
    result.test_logits = predict(result.trained, data, result.test_rows, batch_size)
    result.metrics = evaluate(data.user_id[result.test_rows], data.label[result.test_rows], result.test_logits)
    return result
