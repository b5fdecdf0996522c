"""A refresh whose training runs on two "nodes" of this host: node 0 runs the codebook-refresh flow,
node 1 runs ``qarm train-node`` and joins the job node 0 posts (gloo, DeepSpeed ZeRO-2, one CPU
process per node). The library-level equality of two nodes and one node of two processes is in
tests/unit/test_embed_train.py; this is the flow side: which node does what, and what is published."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flows.codebook_refresh import codebook_refresh
from qarm_core.config import load_config
from qarm_core.embed.train.distributed import free_port
from qarm_core.errors import DataError
from qarm_core.storage import Storage, read_dataset
from tasks import tracking
from tests.support.paths import REPO, TINY

QARM = str(Path(sys.executable).parent / "qarm")
# DeepSpeed ZeRO-2 over gloo, float32 (bit-comparable), one torch thread per process
TRAIN = {"embed.train.use_deepspeed": True, "embed.train.dtype": "float32", "embed.train.num_threads": 1,
         "embed.train.launcher": "torchrun"}


def _embeddings(home: Path) -> np.ndarray:
    t = read_dataset(Storage(home).current().record("embeddings")).sort_by("item_id")
    return np.stack(t["vector"].to_numpy(zero_copy_only=False))


def _train_run(home: Path, parent_run_id: str) -> dict:
    runs = tracking.runs_of(load_config(TINY, {"home": str(home)}).resolved())
    return next(r for r in runs if r["name"] == "train" and r["tags"]["mlflow.parentRunId"] == parent_run_id)


@pytest.mark.slow
def test_node_1_joins_the_training_of_node_0s_refresh_and_only_node_0_publishes(prefect_harness, tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    node1 = subprocess.Popen([QARM, "train-node", "--config", TINY, "--set", f"home={home}", "--node-rank", "1",
                              "--once", "--wait-s", "600"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        two_nodes = codebook_refresh(TINY, {"home": str(home), **TRAIN, "embed.train.nproc": 1,
                                            "embed.train.nnodes": 2, "embed.train.master_addr": "127.0.0.1",
                                            "embed.train.master_port": free_port()})
        out, _ = node1.communicate(timeout=120)
    finally:
        if node1.poll() is None:        # SIGTERM: the CLI stops its launcher's process group too
            node1.terminate()
            try:
                node1.wait(timeout=20)
            except subprocess.TimeoutExpired:
                node1.kill()
    assert node1.returncode == 0, out
    said = " ".join(out.split())                # rich wraps the terminal's lines
    assert "joining" in said and "as node 1 of 2" in said and "training steps done: 4 steps" in said, out
    train = _train_run(home, two_nodes["mlflow_run_id"])
    assert train["metrics"]["world_size"] == 2 and train["metrics"]["steps"] == 4
    assert train["tags"]["qarm.backend"] == "gloo" and train["tags"]["qarm.deepspeed"] == "True"
    assert not (Storage(home).train_nodes_board / "posting.json").exists()     # withdrawn when it ended
    # the same training on one node of two processes publishes the same embeddings
    one_home = tmp_path / "one_node"
    one_node = codebook_refresh(TINY, {"home": str(one_home), **TRAIN, "embed.train.nproc": 2,
                                       "embed.train.master_port": free_port()})
    assert _train_run(one_home, one_node["mlflow_run_id"])["metrics"]["world_size"] == 2
    np.testing.assert_allclose(_embeddings(home), _embeddings(one_home), rtol=1e-5, atol=1e-6)


def test_a_refresh_on_another_node_than_0_stops_before_any_work(prefect_harness, tmp_path):
    with pytest.raises(DataError, match=r"stage=train, dataset=config.*a refresh runs on node 0 only.*qarm train-node"):
        codebook_refresh(TINY, {"home": str(tmp_path / "h"), "embed.train.launcher": "torchrun",
                                "embed.train.nnodes": 2, "embed.train.node_rank": 1})
    assert not (tmp_path / "h").exists()


def test_train_node_without_a_posted_job_gives_up_with_one_error_line(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    home = tmp_path / "home"
    res = CliRunner().invoke(app, ["train-node", "--config", TINY, "--set", f"home={home}", "--node-rank", "1",
                                   "--wait-s", "0.5"])
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "[stage=train, dataset=job] no training job was posted on" in errors[0], res.output
    assert str(Storage(home).train_nodes_board) in " ".join(res.output.split())
