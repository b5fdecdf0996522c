"""Train and evaluate one model on one seed: Adam on BCE, a fixed number of epochs, test metrics
(AUC, GAUC, logloss) after every epoch (the curves)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

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
    metrics: dict[str, float]                      # test metrics after the last epoch
    curves: list[dict[str, float]] = field(default_factory=list)   # one entry per epoch
    train_samples_per_s: float = 0.0
    n_params: int = 0
    seconds: float = 0.0
    trained: RankModel | None = field(default=None, repr=False)   # the trained model (eval mode)


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
    out = [model(data.batch(rows[lo:lo + batch_size], model.spec.gsu)).numpy()
           for lo in range(0, len(rows), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def evaluate_rows(model: RankModel, data: RankData, rows: np.ndarray, batch_size: int) -> dict[str, float]:
    logits = predict(model, data, rows, batch_size)
    return evaluate(data.user_id[rows], data.label[rows], logits)


def train_model(name: str, data: RankData, cfg: RankConfig, seed: int,
                on_epoch: Callable[[dict[str, float]], None] | None = None) -> RunResult:
    """Train ``name`` on ``data.train_rows`` for ``cfg.train.epochs`` epochs with ``seed`` (init,
    dropout and shuffling), evaluating on ``data.test_rows`` after each epoch."""
    tc = cfg.train
    if len(data.train_rows) == 0 or len(data.test_rows) == 0:
        raise DataError("rank", "samples", f"{len(data.train_rows)} training and {len(data.test_rows)} test "
                                           "samples: both splits must be non-empty")
    torch.set_num_threads(tc.num_threads)
    # Adam's second moments of rarely touched embedding rows decay into denormals, which the CPU
    # handles ~100x slower; flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    model = build_model(name, data, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    result = RunResult(name, seed, {}, n_params=sum(p.numel() for p in model.parameters()))
    t_start = time.perf_counter()
    train_time, train_seen = 0.0, 0
    n_batches = -(-len(data.train_rows) // tc.batch_size)
    prog = Progress("rank", f"{name} seed {seed}: training batches ({tc.epochs} epochs)", tc.epochs * n_batches,
                    "batches")
    for epoch in range(1, tc.epochs + 1):
        model.train()
        order = data.train_rows[rng.permutation(len(data.train_rows))]
        losses, t0 = [], time.perf_counter()
        for lo in range(0, len(order), tc.batch_size):
            rows = order[lo:lo + tc.batch_size]
            batch = data.batch(rows, model.spec.gsu)
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
        point = {"epoch": float(epoch), "train_loss": float(np.sum(losses) / len(order)),
                 **{f"test_{k}": v for k, v in evaluate_rows(model, data, data.test_rows, tc.eval_batch_size).items()},
                 "epoch_seconds": dt}
        result.curves.append(point)
        prog.fields["test_auc"] = round(point.get("test_auc", float("nan")), 4)
        if on_epoch:
            on_epoch(point)
    prog.finish()
    result.metrics = {k.removeprefix("test_"): v for k, v in result.curves[-1].items() if k.startswith("test_")}
    result.train_samples_per_s = train_seen / max(train_time, 1e-9)
    result.seconds = time.perf_counter() - t_start
    result.trained = model.eval()
    return result
