"""Device selection: auto follows what torch sees; asking for a GPU that is not there fails clearly."""

import pytest
import torch

from qarm_core.devices import resolve_device
from qarm_core.errors import DataError


def test_auto_and_cpu():
    assert resolve_device("auto", "embed") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu", "embed") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_cuda_without_a_gpu_names_the_stage_and_key():
    with pytest.raises(DataError, match=r"\[stage=embed, dataset=config\] embed.infer.device='cuda' but torch "
                                        r"sees no CUDA device"):
        resolve_device("cuda", "embed", "embed.infer.device")


def test_unknown_name():
    with pytest.raises(DataError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu", "judge")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_catalog_embedding_refuses_a_missing_gpu_before_loading(tmp_path):
    import pyarrow as pa

    from qarm_core.embed.config import EmbedConfig, EmbedModelConfig
    from qarm_core.embed.embed import embed_catalog

    items = pa.table({"item_id": pa.array([1, 2], pa.int64()), "title": ["a", "b"]})
    with pytest.raises(DataError, match="stage=embed.*device='cuda'"):
        embed_catalog(items, tmp_path / "out", EmbedModelConfig(model=str(tmp_path / "no-model")),
                      EmbedConfig(device="cuda"))
