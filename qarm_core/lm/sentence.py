"""Sentence embeddings (all-MiniLM-L6-v2 by default) of texts and of a catalog's item texts."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from qarm_core.allocator import keep_freed_memory
from qarm_core.lm.assets import minilm_path
from qarm_core.progress import Progress, advance


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2 by default), on CPU."""

    def __init__(self, model_path: str | Path | None = None, batch_size: int = 64, model_id: str | None = None,
                 device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_path) if model_path else minilm_path()
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().to(device)
        self.batch_size = batch_size
        self.model_id = model_id or sentence_model_id(model_path)

    @keep_freed_memory()
    def embed(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        """n texts -> float32 array of shape (n, dim), rows of unit norm; ``progress`` advances
        by each batch's rows."""
        import torch

        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[s:s + self.batch_size]), padding=True, truncation=True,
                                     max_length=128, return_tensors="pt").to(self.device)
                h = self.model(**enc).last_hidden_state
                m = enc["attention_mask"][..., None].to(h.dtype)
                v = (h * m).sum(1) / m.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(v, dim=-1).float().cpu().numpy())
                advance(progress, len(out[-1]))
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)


def sentence_model_id(model_path: str | Path | None = None) -> str:
    """The id ``SentenceEmbedder`` gives the model of ``model_path`` (None: the default MiniLM)."""
    return "minilm-l6-v2" if model_path is None else Path(model_path).name


def minilm_signature(model_path: str | Path | None = None) -> dict:
    """The default sentence embedder's identity without loading it: its folder's name and its
    output width (``hidden_size`` of its config.json)."""
    import json

    path = Path(model_path) if model_path else minilm_path()
    return {"model": path.name, "dim": int(json.loads((path / "config.json").read_text())["hidden_size"])}


def embed_item_texts(items: pa.Table, embedder: "SentenceEmbedder | None" = None, fmt=None,
                     progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(sorted item ids ``(n,)``, unit-norm embeddings ``(n, dim)`` float32, model id) of every
    item's rendered text (``text.item_text``), with ``embedder`` (default: MiniLM on the CPU)."""
    from qarm_core.lm.text import item_text

    ids, texts = item_text(items, fmt)
    embedder = embedder or SentenceEmbedder()
    return ids, embedder.embed(texts, progress).astype(np.float32, copy=False), embedder.model_id
