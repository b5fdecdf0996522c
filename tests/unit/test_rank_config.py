"""RankConfig: part of the pipeline config, strict, validated."""

import pytest

from qarm_core.config import parse_config
from qarm_core.errors import ConfigError
from qarm_core.rank.config import ALL_MODELS, RankConfig


def test_rank_section_defaults_and_overrides():
    cfg = parse_config({})
    assert cfg.rank == RankConfig() and list(cfg.rank.models) == list(ALL_MODELS)
    assert cfg.rank.samples.long_len == 500 and cfg.rank.gsu.top_k == 50 and len(cfg.rank.train.seeds) == 3
    cfg = parse_config({"rank": {"models": ["din", "ours_sid"], "train": {"epochs": 2}}},
                       overrides={"rank.gsu.pca_dim": None, "rank.samples.neg_per_positive": 2})
    assert cfg.rank.models == ["din", "ours_sid"] and cfg.rank.gsu.pca_dim is None
    assert cfg.rank.samples.neg_per_positive == 2 and cfg.rank.train.epochs == 2


@pytest.mark.parametrize("data, msg", [
    ({"rank": {"modelz": ["din"]}}, "rank.modelz: unknown key"),
    ({"rank": {"models": ["gpt"]}}, "rank.models.0"),
    ({"rank": {"models": []}}, "at least one"),
    ({"rank": {"models": ["din", "din"]}}, "at most once"),
    ({"rank": {"train": {"epochs": "3"}}}, "rank.train.epochs"),
    ({"rank": {"samples": {"short_len": 30, "long_len": 20}}}, "short_len must not exceed long_len"),
    ({"rank": {"train": {"seeds": []}}}, "at least one seed"),
])
def test_bad_rank_config_fails_loudly(data, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_config(data)
