"""Losses of the three-segment model: symmetric in-batch InfoNCE (over one process's batch, or the
global batch of a multi-process run) and the QA next-token loss."""

from __future__ import annotations

import torch
from torch import nn


def same_item_mask(a_ids: torch.Tensor, p_ids: torch.Tensor) -> torch.Tensor:
    """(batch, batch) bool: True where column j of the anchor->positive logits is the *same item* as
    row i's positive or as row i's anchor, but j != i. Those are not negatives (a duplicated item in
    the batch would otherwise be pushed away from itself), so they are masked out."""
    n = a_ids.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=a_ids.device)
    return off & ((p_ids[None, :] == p_ids[:, None]) | (p_ids[None, :] == a_ids[:, None]))


def info_nce(a: torch.Tensor, p: torch.Tensor, temperature: float,
             a_ids: torch.Tensor | None = None, p_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric in-batch InfoNCE.

    a, p: (batch, d) L2-normalised embeddings of anchors and their positives; row i of ``p`` is the
    positive of row i of ``a`` and every other row is a negative. Returns the mean of the
    anchor->positive and positive->anchor cross-entropies (float32 scalar). With item ids given,
    same-item off-diagonal entries are masked (see ``same_item_mask``).
    """
    logits = (a.float() @ p.float().T) / temperature                       # (batch, batch)
    target = torch.arange(a.shape[0], device=a.device)
    neg = torch.finfo(logits.dtype).min
    l_ap, l_pa = logits, logits.T
    if a_ids is not None and p_ids is not None:
        l_ap = l_ap.masked_fill(same_item_mask(a_ids, p_ids), neg)
        l_pa = l_pa.masked_fill(same_item_mask(p_ids, a_ids), neg)
    return 0.5 * (nn.functional.cross_entropy(l_ap, target) + nn.functional.cross_entropy(l_pa, target))


def global_info_nce(a: torch.Tensor, p: torch.Tensor, temperature: float, a_ids: torch.Tensor | None,
                    p_ids: torch.Tensor | None, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE over the global batch of a ``world``-process run, and the term each rank backwards.

    a, p: (world * local_batch, d) every rank's embeddings in rank order, as
    ``train.distributed.gather_with_local_grad`` returns them: only this rank's rows carry a
    gradient; a_ids, p_ids: (world * local_batch,) item ids gathered the same way (or None).
    Returns (objective, nce): ``nce`` is the global loss, the same on every rank (report this);
    ``objective = world * nce`` is what this rank backwards. Why the factor: this rank's backward
    yields d nce/d theta through its own rows only, and the full gradient is the *sum* of those over
    ranks; DeepSpeed (and the plain-torch path) *average* gradients over ranks, i.e. divide the sum
    by ``world``, so each rank multiplies by ``world`` first. The averaged update then equals the
    single-process gradient of ``nce`` over the concatenated batch (tests/unit/test_embed_train.py).
    With ``world == 1`` both are the plain ``info_nce``.
    """
    nce = info_nce(a, p, temperature, a_ids, p_ids)
    return (nce * world if world > 1 else nce), nce


def qa_loss(qa_loss_sum: torch.Tensor, qa_tokens: torch.Tensor | float) -> torch.Tensor:
    """Mean next-token NLL over the answer tokens (0 when there are none)."""
    n = qa_tokens if isinstance(qa_tokens, float) else float(qa_tokens)
    return qa_loss_sum / max(n, 1.0)
