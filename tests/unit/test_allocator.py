"""keep_freed_memory: inside the block a freed large block stays in the process (reused by the
next allocation instead of fresh zero-filled pages from the kernel); after it, glibc's default
is back (a freed large block goes back to the kernel at once).

glibc's settings are process-wide: a thread that an earlier test left inside a block (or anything
else that changed them) would change what these tests measure, so each case runs in a fresh
interpreter (seen in a clean-clone run of .ci/run on 2026-12-04: every "> 0.9" check read 0.0 in a
worker that had run other files first; which test left the process so is not yet known)."""

import subprocess
import sys

import pytest

from qarm_core import allocator
from tests.support.paths import REPO

pytestmark = pytest.mark.skipif(not allocator.is_supported(), reason="glibc only")

# The cases, run one per interpreter by _run_case.
CASES = r'''
import os
import sys

import numpy as np
import pytest

from qarm_core.allocator import keep_freed_memory

MB = 1 << 20


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _released_on_free(n_bytes=64 * MB):
    """Fraction of a freshly allocated and touched block that leaves the RSS when it is freed."""
    a = np.ones(n_bytes, dtype=np.uint8)
    held = _rss()
    del a
    return (held - _rss()) / n_bytes


def freed_blocks_stay_inside_and_go_back_after():
    assert _released_on_free() > 0.9                 # glibc default: munmap on free
    with keep_freed_memory() as changed:
        assert changed
        assert _released_on_free() < 0.1
    assert _released_on_free() > 0.9


def the_heap_kept_in_the_block_is_handed_back_at_exit():
    with keep_freed_memory():
        a = np.ones(128 * MB, dtype=np.uint8)
        del a
        kept = _rss()
    assert kept - _rss() > 100 * MB                  # malloc_trim at exit


def nested_blocks_restore_only_at_the_outermost_exit():
    with keep_freed_memory():
        with keep_freed_memory():
            pass
        assert _released_on_free() < 0.1
    assert _released_on_free() > 0.9


def works_as_a_decorator_and_restores_on_error():
    @keep_freed_memory()
    def boom():
        assert _released_on_free() < 0.1
        raise RuntimeError("x")

    with pytest.raises(RuntimeError):
        boom()
    assert _released_on_free() > 0.9


def environment_switch_turns_it_off():
    os.environ["QARM_KEEP_FREED_MEMORY"] = "0"
    with keep_freed_memory() as changed:
        assert not changed
        assert _released_on_free() > 0.9


globals()[sys.argv[1]]()
'''


def _run_case(name: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CASES, name], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("case", ["freed_blocks_stay_inside_and_go_back_after",
                                  "the_heap_kept_in_the_block_is_handed_back_at_exit",
                                  "nested_blocks_restore_only_at_the_outermost_exit",
                                  "works_as_a_decorator_and_restores_on_error",
                                  "environment_switch_turns_it_off"])
def test_keep_freed_memory(case):
    _run_case(case)


def test_a_failing_case_fails_the_test():
    """The runner reports a case that fails (it is not a test that cannot fail)."""
    with pytest.raises(AssertionError, match="no_such_case"):
        _run_case("no_such_case")
