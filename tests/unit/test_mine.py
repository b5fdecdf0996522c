import pyarrow as pa
import pytest

from qarm_core.config import DuckDBConfig, MineConfig, parse_config
from qarm_core.duck import connect
from qarm_core.errors import DataError
from qarm_core.pairs.mine import load_events, mine_pairs
from qarm_core.pairs.swing import SwingParams, mine_swing_pairs
from qarm_core.schemas import INTERACTIONS, PAIRS
from qarm_core.storage import write_parquet_dataset


def _interactions(tmp_path):
    t = pa.table({"user_id": [1, 1, 2, 2, 3, 3, 4], "item_id": [10, 11, 10, 11, 10, 11, 12],
                  "ts": [1, 2, 3, 4, 5, 6, 7], "rating": [5.0, 4.0, 5.0, 1.0, 4.0, 4.0, None],
                  "label": [None, None, None, None, None, None, 1]}, schema=INTERACTIONS.schema)
    return write_parquet_dataset(tmp_path / "interactions", iter(t.to_batches()), INTERACTIONS)


def test_positive_events_filter(tmp_path):
    rec = _interactions(tmp_path)
    con = connect(DuckDBConfig(memory_limit="256MB", max_temp_directory_size="256MB", threads=1), tmp_path / "t")
    assert load_events(con, rec, None).num_rows == 7
    ev = load_events(con, rec, 4.0)
    # (2, 11) rated 1 is dropped; (4, 12) has no rating but label 1 and is kept
    assert sorted(zip(ev["user_id"].to_pylist(), ev["item_id"].to_pylist())) == [
        (1, 10), (1, 11), (2, 10), (3, 10), (3, 11), (4, 12)]


def test_mine_pairs_runs_configured_miners(tmp_path):
    rec = _interactions(tmp_path)
    con = connect(DuckDBConfig(memory_limit="256MB", max_temp_directory_size="256MB", threads=1), tmp_path / "t")
    ev = load_events(con, rec, None)
    cfg = parse_config({"mine": {"swing": {"min_user_items": 1}}}).mine
    table, report = mine_pairs(ev, cfg)
    assert table.schema.equals(PAIRS.schema)
    ref = mine_swing_pairs(ev["user_id"].to_numpy(), ev["item_id"].to_numpy(), cfg.swing.params())
    assert table.equals(ref) and report["swing.pairs"] == table.num_rows > 0


def test_mine_pairs_refuses_empty_and_unknown():
    empty = pa.table({"user_id": pa.array([], pa.int64()), "item_id": pa.array([], pa.int64())})
    with pytest.raises(DataError, match=r"\[stage=mine, dataset=interactions\] no events"):
        mine_pairs(empty, MineConfig())
    with pytest.raises(Exception, match="sources"):
        parse_config({"mine": {"sources": ["swing", "swing"]}})


def test_swing_config_maps_to_params():
    cfg = parse_config({"mine": {"swing": {"alpha1": 3.0, "top_k": 7, "seed": 4}}}).mine.swing
    assert cfg.params() == SwingParams(alpha1=3.0, top_k=7, seed=4)
