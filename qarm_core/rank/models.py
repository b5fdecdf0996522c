"""ESU models: DIN-style target attention over a short history and a GSU-retrieved long history.

One module, ``RankModel``, configured by a ``ModelSpec``; the named presets (``MODEL_SPECS``) are the
baselines and our variants, trained in the same harness:

| name          | item representation                     | long-history search (GSU)                   |
|---------------|-----------------------------------------|---------------------------------------------|
| din           | ItemID                                  | none (short history only)                   |
| din_tags      | ItemID + mean of its tag embeddings     | none (content control: the item's tags)     |
| din_text      | ItemID + frozen text embedding, projected | none (content control: the item's text)   |
| sim_hard      | ItemID                                  | same category (the item's first tag, as SIM) |
| sim_hard_c1   | ItemID                                  | same level-1 SID code (a variant)           |
| sim_soft      | ItemID                                  | inner product of the learned ID embeddings  |
| ours_nosid    | ItemID                                  | inner product of (PCA'd) LLM embeddings     |
| ours_sid      | ItemID + c1 + c2 + c3 SID embeddings    | inner product of (PCA'd) LLM embeddings     |
| ours_sid_vq   | ours_sid + mean of the item's top-k nearest items' VQ embeddings (QARM V1) | same |

Every model attends to the short history (last ``short_len`` events); all but DIN also to the k
items its GSU returned. Item representation: the sum of its id / code / neighbour embeddings (width
``dim``), optionally + the frozen embedding projected to ``dim``. Padding (item 0) is masked in every
attention: padded positions get weight exactly 0, and a row with no valid position (an empty history)
yields the zero interest vector. Head: MLP over [target, short interest, long interest] -> logit (BCE).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qarm_core.rank.gsu import soft_topk_by_index


@dataclass(frozen=True)
class ModelSpec:
    name: str
    gsu: str | None          # None | 'hard' | 'soft_id' | 'embedding'
    sids: bool = False
    vq: bool = False
    frozen_embedding: bool = False
    tags: bool = False       # add the mean of the item's tag embeddings
    hard_key: str = "tag"    # SIM-hard's category: the item's first tag, or its c1 code
    baseline: bool = True    # a baseline (the comparison's reference set) rather than one of ours

    @property
    def retrieval(self) -> str | None:
        """The key of the precomputed GSU results this model reads (None: none or searched live)."""
        return f"hard:{self.hard_key}" if self.gsu == "hard" else self.gsu


MODEL_SPECS: dict[str, ModelSpec] = {
    "din": ModelSpec("din", None),
    "din_tags": ModelSpec("din_tags", None, tags=True),
    "din_text": ModelSpec("din_text", None, frozen_embedding=True),
    "sim_hard": ModelSpec("sim_hard", "hard", hard_key="tag"),
    "sim_hard_c1": ModelSpec("sim_hard_c1", "hard", hard_key="c1"),
    "sim_soft": ModelSpec("sim_soft", "soft_id"),
    "ours_nosid": ModelSpec("ours_nosid", "embedding", baseline=False),
    "ours_sid": ModelSpec("ours_sid", "embedding", sids=True, baseline=False),
    "ours_sid_vq": ModelSpec("ours_sid_vq", "embedding", sids=True, vq=True, baseline=False),
}


def resolve_spec(name: str, frozen_embedding: bool = False) -> ModelSpec:
    """The preset ``name``, with the frozen item embedding added to the SID models if configured
    (``rank.model.frozen_embedding``). Unknown names raise KeyError."""
    spec = MODEL_SPECS[name]
    if frozen_embedding and spec.sids:
        from dataclasses import replace
        spec = replace(spec, frozen_embedding=True)
    return spec


@dataclass
class ItemTables:
    """Item-side tensors the models read, rows indexed by dense item index (row 0 = padding).

    codes ``(N + 1, 3)`` (0 = no code), code_vocab ``(3,)``, neighbours ``(N + 1, K)`` (VQ codes),
    frozen ``(N + 1, D)`` (the item embedding), tags ``(N + 1, T)`` (tag indices, 0 = none) with
    ``tag_vocab`` rows, n_items = N.
    """

    n_items: int
    codes: np.ndarray | None = None
    code_vocab: np.ndarray | None = None
    neighbours: np.ndarray | None = None
    frozen: np.ndarray | None = None
    tags: np.ndarray | None = None
    tag_vocab: int = 0


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over valid positions of ``scores`` ``(B, L)``; invalid positions get weight 0 and a
    row with no valid position gets all zeros (not NaN)."""
    s = scores.masked_fill(~mask, float("-inf"))
    any_valid = mask.any(dim=1, keepdim=True)
    s = torch.where(any_valid, s, torch.zeros_like(s))
    w = torch.softmax(s, dim=1)
    return w * mask


class TargetAttention(nn.Module):
    """DIN's local activation unit: weight_j = MLP([h_j, t, h_j - t, h_j * t]), softmax over the
    valid positions, interest = sum_j weight_j h_j.

    The first layer is applied in its factored form W [h, t, h - t, h*t] = (W_h + W_d) h +
    (W_t - W_d) t + W_p (h*t): the same function, with a quarter of the per-position multiply-adds.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.first = nn.Linear(4 * dim, hidden)
        self.out = nn.Linear(hidden, 1)
        self.dim = dim

    def forward(self, target: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """target ``(B, d)``, keys ``(B, L, d)``, mask ``(B, L)`` bool -> interest ``(B, d)``."""
        d = self.dim
        w = self.first.weight                                              # (hidden, 4d)
        w_h, w_t, w_d, w_p = w[:, :d], w[:, d:2 * d], w[:, 2 * d:3 * d], w[:, 3 * d:]
        pre = (keys @ (w_h + w_d).T + (keys * target.unsqueeze(1)) @ w_p.T
               + (target @ (w_t - w_d).T + self.first.bias).unsqueeze(1))  # (B, L, hidden)
        scores = self.out(torch.relu(pre)).squeeze(-1)                     # (B, L)
        wts = masked_softmax(scores, mask)
        return torch.bmm(wts.unsqueeze(1), keys).squeeze(1)


def _table(rows: int, dim: int) -> nn.Embedding:
    """An embedding table whose row 0 (padding / no code) is zero and stays zero."""
    e = nn.Embedding(rows, dim, padding_idx=0)
    nn.init.normal_(e.weight, std=0.05)
    with torch.no_grad():
        e.weight[0].zero_()
    return e


class ItemEncoder(nn.Module):
    """Dense item indices ``(...)`` -> representations ``(..., dim)``."""

    def __init__(self, spec: ModelSpec, tables: ItemTables, dim: int):
        super().__init__()
        self.id = _table(tables.n_items + 1, dim)
        self.sids = spec.sids
        if spec.sids:
            if tables.codes is None:
                raise ValueError(f"model {spec.name} needs Semantic-ID codes")
            self.register_buffer("codes", torch.as_tensor(tables.codes, dtype=torch.int64), persistent=False)
            self.code_emb = nn.ModuleList(_table(int(v), dim) for v in tables.code_vocab)
        self.vq = spec.vq
        if spec.vq:
            if tables.neighbours is None:
                raise ValueError(f"model {spec.name} needs VQ neighbour codes")
            self.register_buffer("neighbours", torch.as_tensor(tables.neighbours, dtype=torch.int64),
                                 persistent=False)
            self.vq_emb = _table(tables.n_items + 1, dim)
        self.frozen = spec.frozen_embedding
        if spec.frozen_embedding:
            if tables.frozen is None:
                raise ValueError(f"model {spec.name} needs the item embeddings")
            self.register_buffer("frozen_vecs", torch.as_tensor(tables.frozen, dtype=torch.float32),
                                 persistent=False)
            self.proj = nn.Linear(tables.frozen.shape[1], dim, bias=False)

        self.tags = spec.tags
        if spec.tags:
            if tables.tags is None:
                raise ValueError(f"model {spec.name} needs the items' tags")
            self.register_buffer("tag_idx", torch.as_tensor(tables.tags, dtype=torch.int64), persistent=False)
            self.tag_emb = _table(tables.tag_vocab, dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        e = self.id(idx)
        if self.tags:
            t = self.tag_idx[idx]                                        # (..., T)
            m = (t > 0).unsqueeze(-1).float()
            e = e + (self.tag_emb(t) * m).sum(-2) / m.sum(-2).clamp(min=1.0)
        if self.sids:
            c = self.codes[idx]                                          # (..., 3)
            for j, emb in enumerate(self.code_emb):
                e = e + emb(c[..., j])
        if self.vq:
            nb = self.neighbours[idx]                                    # (..., K)
            m = (nb > 0).unsqueeze(-1).float()
            e = e + (self.vq_emb(nb) * m).sum(-2) / m.sum(-2).clamp(min=1.0)
        if self.frozen:
            e = e + self.proj(self.frozen_vecs[idx])
        # Padding stays exactly zero whatever the tables hold.
        return e * (idx > 0).unsqueeze(-1).to(e.dtype)


class RankModel(nn.Module):
    """CTR model: ``forward(batch) -> logits (B,)``.

    batch: ``target`` ``(B,)``, ``short`` ``(B, S)``, and for a model with a GSU either ``retrieved``
    ``(B, k)`` (precomputed search) or ``long`` ``(B, L)`` (sim_soft searches it itself); all dense
    item indices with 0 = padding.
    """

    def __init__(self, spec: ModelSpec, tables: ItemTables, dim: int = 32, att_hidden: int = 64,
                 mlp_hidden: tuple[int, ...] | list[int] = (128, 64), dropout: float = 0.1, top_k: int = 50):
        super().__init__()
        self.spec = spec
        self.top_k = top_k
        self.items = ItemEncoder(spec, tables, dim)
        self.att_short = TargetAttention(dim, att_hidden)
        self.att_long = TargetAttention(dim, att_hidden) if spec.gsu else None
        layers: list[nn.Module] = []
        width = dim * (3 if spec.gsu else 2)
        for h in mlp_hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.head = nn.Sequential(*layers)

    def retrieve(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The long-history items the ESU attends to, ``(B, k)``."""
        if self.spec.gsu == "soft_id":
            # SIM-soft: search by the current learned ID embeddings (no gradient through the search).
            with torch.no_grad():
                items, _ = soft_topk_by_index(batch["target"], batch["long"], self.items.id.weight, self.top_k)
            return items
        return batch["retrieved"]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        target, short = batch["target"], batch["short"]
        seqs = [short]
        ret = None
        if self.att_long is not None:
            ret = self.retrieve(batch)
            seqs.append(ret)
        # Encode each distinct item of the batch once, then gather: a batch of B x (1 + S + k)
        # positions touches far fewer distinct items.
        flat = torch.cat([target] + [x.reshape(-1) for x in seqs])
        n_rows = self.items.id.num_embeddings
        if n_rows <= flat.numel():
            # Small catalog: encoding every item is cheaper than finding the distinct ones (a sort).
            reps = self.items(torch.arange(n_rows, device=flat.device))[flat]
        else:
            uniq, inv = torch.unique(flat, return_inverse=True)
            reps = self.items(uniq)[inv]                                 # (B + B*S + B*k, d)
        B, S = short.shape
        t = reps[:B]
        h_short = reps[B:B + B * S].view(B, S, -1)
        parts = [t, self.att_short(t, h_short, short > 0)]
        if ret is not None:
            h_long = reps[B + B * S:].view(B, ret.shape[1], -1)
            parts.append(self.att_long(t, h_long, ret > 0))
        return self.head(torch.cat(parts, dim=-1)).squeeze(-1)

    def embedding_rows(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Embedding rows a batch touched, for the mini-batch-aware L2 penalty."""
        idx = torch.unique(torch.cat([batch["target"].reshape(-1), batch["short"].reshape(-1)]))
        rows = [self.items.id(idx)]
        if self.items.sids:
            c = self.items.codes[idx]
            rows += [emb(c[:, j]) for j, emb in enumerate(self.items.code_emb)]
        return rows
