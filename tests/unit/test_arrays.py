"""The sort-based set operations against numpy's own (which answers with a hash table)."""

import ast
from pathlib import Path

import numpy as np
import pytest

from qarm_core.arrays import count_distinct, difference, has_duplicates, intersect, member_of, sorted_unique, union


@pytest.mark.parametrize("a", [
    np.random.default_rng(0).integers(-50, 50, 1000),
    np.random.default_rng(1).integers(0, 10**12, 5000, dtype=np.int64),
    np.random.default_rng(2).integers(0, 7, 300).astype(np.int32),
    np.random.default_rng(3).integers(0, 30, (20, 15)),                    # flattened, as np.unique does
    np.array([3.5, -0.0, 0.0, 2.0, 3.5, -1e300]),
    np.array([np.nan, 1.0, np.nan, 1.0]),                                  # NaNs: numpy's own (one NaN)
    np.array(["b", "a", "b"]),
    np.array([True, False, True]),
    np.zeros(0, np.int64),
    np.array([7]),
], ids=["small-range", "wide-int64", "int32", "2-d", "floats", "nan", "str", "bool", "empty", "one"])
def test_sorted_unique_equals_numpy(a):
    got = sorted_unique(a)
    want = np.unique(a)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    assert count_distinct(a) == len(want)
    assert has_duplicates(a.ravel()) == (len(want) != a.size)


def test_has_duplicates_on_sorted_unsorted_and_repeated_ids():
    ids = np.arange(0, 3000, 3)
    assert not has_duplicates(ids)                     # strictly increasing: the one-pass answer
    assert not has_duplicates(ids[::-1])               # no order: sorted, still distinct
    assert has_duplicates(np.r_[ids, ids[17]])         # a repeat after the end of the run
    assert has_duplicates(np.r_[ids[:5], ids[4], ids[5:]])
    assert not has_duplicates(np.zeros(0)) and not has_duplicates([4])
    assert has_duplicates([1.0, np.nan, 1.0]) and not has_duplicates([1.0, 2.0])


def test_union_intersect_difference_equal_numpy():
    rng = np.random.default_rng(4)
    a, b, c = rng.integers(0, 400, 700), rng.integers(200, 600, 500), rng.integers(0, 1000, 10)
    np.testing.assert_array_equal(union(a, b, c), np.union1d(np.union1d(a, b), c))
    np.testing.assert_array_equal(intersect(a, b), np.intersect1d(a, b))
    np.testing.assert_array_equal(difference(a, b), np.setdiff1d(a, b))
    np.testing.assert_array_equal(difference(a, a), np.zeros(0, a.dtype))
    assert len(intersect(a, np.zeros(0, np.int64))) == 0
    np.testing.assert_array_equal(member_of(a, b), np.isin(a, b))
    np.testing.assert_array_equal(member_of(c, a), np.isin(c, a))
    assert not member_of(a, np.zeros(0, np.int64)).any() and member_of(np.zeros(0, np.int64), a).shape == (0,)


# ------------------------------------------------------------------ the rule: no hashing set ops
REPO = Path(__file__).resolve().parents[2]
_HASHING = {"unique": ("return_index", "return_inverse", "return_counts", "axis"),
            "union1d": (), "setdiff1d": (), "intersect1d": ("assume_unique",), "unique_values": ()}


def _hashing_calls(path: Path, root: Path = REPO) -> list[str]:
    """``np.unique`` without return_* / axis, ``np.union1d``, ``np.setdiff1d``, ``np.unique_values``
    and ``np.intersect1d`` without ``assume_unique``: the calls numpy answers with a hash table."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id in ("np", "numpy")):
            continue
        fn = node.func.attr
        if fn in _HASHING and not any(k.arg in _HASHING[fn] for k in node.keywords):
            bad.append(f"{path.relative_to(root)}:{node.lineno} np.{fn}")
    return bad


def test_no_module_calls_numpys_hashing_set_operations():
    files = [p for folder in ("qarm_core", "tasks", "flows") for p in sorted((REPO / folder).rglob("*.py"))
             if p.name != "arrays.py" and "__pycache__" not in p.parts]
    assert [b for p in files for b in _hashing_calls(p)] == []


@pytest.mark.parametrize("source,flagged", [
    ("np.unique(a)", True), ("np.union1d(a, b)", True), ("np.intersect1d(a, b)", True),
    ("np.unique(a, return_counts=True)", False), ("np.intersect1d(a, b, assume_unique=True)", False),
    ("np.unique(a,\n          return_inverse=True)", False), ("sorted_unique(a)", False),
])
def test_the_set_operation_check_itself(tmp_path, source, flagged):
    (tmp_path / "m.py").write_text(source + "\n")
    assert bool(_hashing_calls(tmp_path / "m.py", tmp_path)) == flagged
