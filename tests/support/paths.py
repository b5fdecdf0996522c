"""Where the test suite keeps what it builds once: the repository root, the test cache, the tiny
random LM and the tiny pipeline config."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_CACHE = REPO / ".cache" / "tests"
# configs/tiny.yaml with the judge and QA generator on a tiny random LM (written once per session by
# ``_tiny_test_config``), so a flow test runs the real judge code in seconds.
TINY = str(TEST_CACHE / "tiny.yaml")


def build_tiny_lm() -> Path:
    """The folder of a tiny random causal LM + tokenizer (real transformers model, ~1 s to build),
    built once into the test cache and shared by every test session."""
    from qarm_core.lm.tiny import make_tiny_causal_lm

    path = TEST_CACHE / "tiny_lm"
    if not (path / "config.json").exists():
        tmp = TEST_CACHE / f"tiny_lm.tmp{os.getpid()}"
        make_tiny_causal_lm(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another session built it first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return path
