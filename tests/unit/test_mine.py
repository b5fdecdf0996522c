import numpy as np
import pyarrow as pa
import pytest

from qarm_core.config import parse_config
from qarm_core.duck import connect
from qarm_core.errors import ConfigError, DataError
from qarm_core.pairs.config import MineConfig, SwingConfig, TwoTowerConfig
from qarm_core.events import positive_mask
from qarm_core.pairs.mine import load_interactions, mine_pairs
from qarm_core.pairs.swing import mine_swing_pairs
from qarm_core.schemas import INTERACTIONS, PAIRS
from qarm_core.storage import write_parquet_dataset
from qarm_core.synth import SynthSpec, iter_synthetic_interactions, iter_synthetic_items
from tests.support.data import DUCK



def _interactions():
    return pa.table({"user_id": [1, 1, 2, 2, 3, 3, 4], "item_id": [10, 11, 10, 11, 10, 11, 12],
                     "ts": [1, 2, 3, 4, 5, 6, 7], "rating": [5.0, 4.0, 5.0, 1.0, 4.0, 4.0, None],
                     "label": [None, None, None, None, None, None, 1]}, schema=INTERACTIONS.schema)


def test_load_and_positive_mask(tmp_path):
    rec = write_parquet_dataset(tmp_path / "interactions", iter(_interactions().to_batches()), INTERACTIONS)
    t = load_interactions(connect(DUCK, tmp_path / "t"), rec)
    assert t.num_rows == 7 and t["ts"].to_pylist() == sorted(t["ts"].to_pylist())
    assert positive_mask(t, None, "mine").all()
    # (2, 11) rated 1 is dropped; (4, 12) has no rating but label 1 and is kept
    assert positive_mask(t, 4.0, "mine").tolist() == [True, True, True, False, True, True, True]


def test_swing_source_equals_direct_call():
    t = _interactions()
    cfg = parse_config({"mine": {"swing": {"min_user_items": 1}}}).mine
    table, report = mine_pairs(t, None, cfg, 4.0)
    keep = positive_mask(t, 4.0, "mine")
    ref = mine_swing_pairs(t["user_id"].to_numpy()[keep], t["item_id"].to_numpy()[keep], cfg.swing)
    assert table.schema.equals(PAIRS.schema) and table.equals(ref) and report["swing.events"] == 6


def test_both_sources_on_a_synthetic_log():
    spec = SynthSpec(users=80, items=40, interactions=2000, seed=2)
    inter = pa.Table.from_batches(list(iter_synthetic_interactions(spec)))
    items = pa.Table.from_batches(list(iter_synthetic_items(spec)))
    cfg = parse_config({"mine": {"sources": ["swing", "u2i"], "u2i": {"epochs": 1, "dim": 8, "hidden": 16}}}).mine
    table, report = mine_pairs(inter, items, cfg)
    assert set(table["source"].to_pylist()) == {"swing", "u2i"}
    assert report["u2i.pairs"] == (np.asarray(table["source"].to_pylist()) == "u2i").sum() > 0
    assert {"u2i.recall_two_tower", "u2i.recall_popularity"} <= report.keys()   # values: test_two_tower.py


def test_mine_pairs_refuses_bad_input():
    empty = _interactions().slice(0, 0)
    with pytest.raises(DataError, match=r"\[stage=mine, dataset=interactions\] no interactions"):
        mine_pairs(empty, None, MineConfig())
    with pytest.raises(DataError, match="no events pass min_rating=9.0"):
        mine_pairs(_interactions().slice(0, 6), None, MineConfig(), 9.0)
    with pytest.raises(DataError, match="needs the items dataset"):
        mine_pairs(_interactions(), None, parse_config({"mine": {"sources": ["u2i"]}}).mine)
    with pytest.raises(Exception, match="sources"):
        parse_config({"mine": {"sources": ["swing", "swing"]}})


def test_miner_settings_are_checked_when_the_config_loads():
    cfg = parse_config({"mine": {"swing": {"alpha1": 3.0, "top_k": 7, "seed": 4},
                                 "u2i": {"epochs": 2, "top_m": 3}}}).mine
    assert (cfg.swing.alpha1, cfg.swing.top_k, cfg.swing.beta) == (3.0, 7, SwingConfig().beta)
    assert (cfg.u2i.epochs, cfg.u2i.top_m, cfg.u2i.dim) == (2, 3, TwoTowerConfig().dim)
    with pytest.raises(ConfigError, match="min_user_items"):
        parse_config({"mine": {"swing": {"min_user_items": 5, "max_user_items": 2}}})
    with pytest.raises(ConfigError, match="batch_size"):
        parse_config({"mine": {"u2i": {"batch_size": 1}}})
