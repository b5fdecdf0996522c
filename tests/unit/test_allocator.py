"""keep_freed_memory: inside the block a freed large block stays in the process (reused by the
next allocation instead of fresh zero-filled pages from the kernel); after it, glibc's default
is back (a freed large block goes back to the kernel at once)."""

import os

import numpy as np
import pytest

from qarm_core import allocator
from qarm_core.allocator import keep_freed_memory

pytestmark = pytest.mark.skipif(not allocator.is_supported(), reason="glibc only")

MB = 1 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _released_on_free(n_bytes: int = 64 * MB) -> float:
    """Fraction of a freshly allocated and touched block that leaves the RSS when it is freed."""
    a = np.ones(n_bytes, dtype=np.uint8)
    held = _rss()
    del a
    return (held - _rss()) / n_bytes


def test_freed_blocks_stay_inside_and_go_back_after():
    assert _released_on_free() > 0.9                 # glibc default: munmap on free
    with keep_freed_memory() as changed:
        assert changed
        assert _released_on_free() < 0.1
    assert _released_on_free() > 0.9


def test_the_heap_kept_in_the_block_is_handed_back_at_exit():
    with keep_freed_memory():
        a = np.ones(128 * MB, dtype=np.uint8)
        del a
        kept = _rss()
    assert kept - _rss() > 100 * MB                  # malloc_trim at exit


def test_nested_blocks_restore_only_at_the_outermost_exit():
    with keep_freed_memory():
        with keep_freed_memory():
            pass
        assert _released_on_free() < 0.1
    assert _released_on_free() > 0.9


def test_works_as_a_decorator_and_restores_on_error():
    @keep_freed_memory()
    def boom():
        assert _released_on_free() < 0.1
        raise RuntimeError("x")

    with pytest.raises(RuntimeError):
        boom()
    assert _released_on_free() > 0.9


def test_environment_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("QARM_KEEP_FREED_MEMORY", "0")
    with keep_freed_memory() as changed:
        assert not changed
        assert _released_on_free() > 0.9
