"""Training of the three-segment model: loss falls, DeepSpeed ZeRO-2 on CPU, resume, gradient
cache, multi-process launch. Tiny random llama; the 2-process runs are marked slow."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from qarm_core.embed.config import EmbedModelConfig, TrainConfig
from qarm_core.errors import DataError

REPO = Path(__file__).resolve().parents[2]
# DeepSpeed JIT-compiles a small op on first use (~1 min); keep it in the repo cache between runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_BUILD_OPS", "0")




def _mcfg(path) -> EmbedModelConfig:
    return EmbedModelConfig(model=str(path), dim=16, max_qa_tokens=24)


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    sd = load_file(str(model_dir / "model.safetensors"))
    sd.update({f"proj.{k}": v for k, v in load_file(str(model_dir / "projection.safetensors")).items()})
    return sd


class Killed(Exception):
    pass


def _kill_at(step: int):
    def progress(info: dict) -> None:
        if info["step"] == step:
            raise Killed(step)
    return progress


def test_loss_falls_plain_torch(tiny_lm_path, tiny_catalog, tmp_path):
    from qarm_core.embed.train import train_embedding_model

    items, judgments, qa = tiny_catalog
    cfg = TrainConfig(use_deepspeed=False, dtype="float32", batch_size=8, max_steps=40, lr=3e-3, proj_lr=1e-2,
                      anneal_steps=10, checkpoint_every=100, temperature=0.1, qa_weight=0.5)
    seen: list[dict] = []
    rec = train_embedding_model(items, judgments, qa, tmp_path, _mcfg(tiny_lm_path), cfg, progress=seen.append)
    assert [s["step"] for s in seen] == list(range(1, 41))
    assert seen[0]["qa_item_scale"] == 1.0 and seen[-1]["qa_item_scale"] == 0.0
    assert rec.steps == 40 and not rec.deepspeed and rec.train_pairs == 60
    assert rec.rows == "packed"                     # float32 on a CPU (attn_implementation: auto)
    assert rec.loss_last < 0.8 * rec.loss_first, (rec.loss_first, rec.loss_last)
    first_qa = np.mean([s["qa"] for s in seen[:5]])
    last_qa = np.mean([s["qa"] for s in seen[-5:]])
    assert last_qa < 0.8 * first_qa
    assert (tmp_path / "model" / "qarm_embed.json").exists()
    lines = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 40 and json.loads(lines[-1])["step"] == 40
    # a finished run is reused, not retrained
    again = train_embedding_model(items, judgments, qa, tmp_path, _mcfg(tiny_lm_path), cfg)
    assert again.reused and again.model_version == rec.model_version
    # another config into the same folder: its checkpoints are not mixed up with this run's
    with pytest.raises(DataError, match=r"stage=train, dataset=checkpoints"):
        train_embedding_model(items, judgments, qa, tmp_path, _mcfg(tiny_lm_path), cfg.model_copy(update={"lr": 1e-3}))


@pytest.mark.slow                      # > 10 s: `make test` runs it, `make test-fast` does not
def test_deepspeed_zero2_single_process(tiny_lm_path, tiny_catalog, tmp_path):
    from qarm_core.embed.config import EmbedConfig
    from qarm_core.embed.embed import embed_catalog
    from qarm_core.embed.train import train_embedding_model

    items, judgments, qa = tiny_catalog
    cfg = TrainConfig(use_deepspeed=True, zero_stage=2, dtype="bfloat16", batch_size=8, max_steps=6, lr=3e-3,
                      anneal_steps=3, checkpoint_every=3)
    rec = train_embedding_model(items, judgments, qa, tmp_path, _mcfg(tiny_lm_path), cfg)
    assert rec.deepspeed and rec.zero_stage == 2 and rec.dtype == "bfloat16" and rec.steps == 6 and rec.world_size == 1
    assert rec.rows == "padded"                     # bf16: auto packs float32 training only
    assert np.isfinite(rec.final_loss) and rec.tokens_per_s > 0
    # alone on the host: DeepSpeed's shared-memory allreduce (a JIT-compiled op) was not built
    import deepspeed.ops
    from deepspeed.comm import comm as ds_comm

    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None
    ck = tmp_path / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step-00000006"
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-00000003", "step-00000006"]
    # the export holds fp32 weights (from the ZeRO master copy) and reloads as a fine-tuned model
    w = _weights(tmp_path / "model")
    assert all(v.dtype.is_floating_point and v.dtype.itemsize == 4 for v in w.values())
    r = embed_catalog(items, tmp_path / "emb", EmbedModelConfig(model=rec.model_dir, dim=16, max_qa_tokens=24),
                      EmbedConfig(batch_size=8))
    assert r.rows == 24 and r.dim == 16 and r.model_version == rec.model_version


@pytest.mark.parametrize("deepspeed", [False, True], ids=["plain", "deepspeed"])
def test_killed_run_resumes_to_the_same_state(tiny_lm_path, tiny_catalog, tmp_path, deepspeed):
    import torch

    from qarm_core.embed.train import train_embedding_model

    items, judgments, qa = tiny_catalog
    cfg = TrainConfig(use_deepspeed=deepspeed, dtype="bfloat16" if deepspeed else "float32", batch_size=8, max_steps=6, lr=3e-3,
                      anneal_steps=4, checkpoint_every=3, warmup_steps=2)
    full = train_embedding_model(items, judgments, qa, tmp_path / "full", _mcfg(tiny_lm_path), cfg)
    with pytest.raises(Killed):        # dies after step 5: the last checkpoint is step 3
        train_embedding_model(items, judgments, qa, tmp_path / "cut", _mcfg(tiny_lm_path), cfg, progress=_kill_at(5))
    assert not (tmp_path / "cut" / "model").exists()
    if deepspeed:       # a kill while DeepSpeed wrote `latest` (it writes it in place) leaves it empty
        (tmp_path / "cut" / "checkpoints" / "latest").write_text("")
    resumed = train_embedding_model(items, judgments, qa, tmp_path / "cut", _mcfg(tiny_lm_path), cfg)
    assert resumed.resumed_from_step == 3 and resumed.steps == 6
    assert resumed.fingerprint == full.fingerprint
    a, b = _weights(tmp_path / "full" / "model"), _weights(tmp_path / "cut" / "model")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert resumed.final_loss == pytest.approx(full.final_loss, abs=1e-6)


def test_gradient_cache_equals_full_batch(tiny_lm_path, tiny_catalog, tmp_path):
    """Gradient cache changes memory, not the update: one fp32 step (Adam moves weights by ~lr =
    1e-3) agrees with the one-pass step. Adam's first step is ~lr * sign(grad), so an element whose
    gradient is ~0 can flip on float rounding alone: the check is on the bulk, not the max."""
    import torch
    from safetensors.torch import load_file

    from qarm_core.embed.train import train_embedding_model

    items, judgments, qa = tiny_catalog
    base = dict(use_deepspeed=False, dtype="float32", batch_size=8, max_steps=1, lr=1e-3, anneal_steps=1, warmup_steps=0,
                qa_on_positive=True)
    r0 = train_embedding_model(items, judgments, qa, tmp_path / "one", _mcfg(tiny_lm_path), TrainConfig(**base))
    r1 = train_embedding_model(items, judgments, qa, tmp_path / "gc", _mcfg(tiny_lm_path),
                               TrainConfig(**base, grad_cache_chunk=2))
    assert r1.final_loss == pytest.approx(r0.final_loss, rel=1e-5)
    a, b = _weights(tmp_path / "one" / "model"), _weights(tmp_path / "gc" / "model")
    start = load_file(str(Path(tiny_lm_path) / "model.safetensors"))
    k = "model.layers.1.mlp.down_proj.weight"
    assert (a[k] - start[k]).abs().max() > 5e-4                     # the step did move the weights
    for k in a:
        if k not in start:          # the projection and new rows: compared against each other only
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)
            continue
        n = start[k].shape[0]      # the embedding matrix has 4 new (EMB) rows at the end
        diff, upd = (a[k][:n] - b[k][:n]).abs(), (a[k][:n] - start[k]).abs()
        assert float(diff.mean()) <= 0.01 * float(upd.mean()) + 1e-9, k
        assert float((diff > 1e-5).float().mean()) < 0.01, k


def test_gradient_cache_under_deepspeed(tiny_lm_path, tiny_catalog, tmp_path):
    from qarm_core.embed.train import train_embedding_model

    items, judgments, qa = tiny_catalog
    rec = train_embedding_model(items, judgments, qa, tmp_path, _mcfg(tiny_lm_path),
                                TrainConfig(batch_size=8, max_steps=3, grad_cache_chunk=4, checkpoint_every=3))
    assert rec.steps == 3 and np.isfinite(rec.final_loss)


def test_frozen_layers_stay_put(tiny_lm_path, tiny_catalog, tmp_path):
    import torch
    from safetensors.torch import load_file

    from qarm_core.embed.train import train_embedding_model

    items, judgments, qa = tiny_catalog
    rec = train_embedding_model(items, judgments, qa, tmp_path, _mcfg(tiny_lm_path),
                                TrainConfig(use_deepspeed=False, batch_size=8, max_steps=3, freeze_layers=1, lr=1e-2))
    before = load_file(str(Path(tiny_lm_path) / "model.safetensors"))
    after = _weights(Path(rec.model_dir))
    k0 = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(after[k0], before[k0])
    k1 = "model.layers.1.self_attn.q_proj.weight"
    assert (after[k1] - before[k1]).abs().max() > 0


def test_lora_option(tiny_lm_path, tiny_catalog, tmp_path):
    pytest.importorskip("peft")
    from qarm_core.embed.train import train_embedding_model

    items, judgments, qa = tiny_catalog
    import torch
    from safetensors.torch import load_file

    from qarm_core.embed.model import load_model

    rec = train_embedding_model(items, judgments, qa, tmp_path, _mcfg(tiny_lm_path),
                                TrainConfig(use_deepspeed=False, dtype="float32", batch_size=8, max_steps=3,
                                            lora_rank=4, lr=1e-2, warmup_steps=0))
    # adapters merged into plain weights: the export is an ordinary model folder
    after = _weights(Path(rec.model_dir))
    before = load_file(str(Path(tiny_lm_path) / "model.safetensors"))
    k = "model.layers.1.self_attn.q_proj.weight"
    assert k in after and not any("lora" in n for n in after)
    assert (after[k] - before[k]).abs().max() > 0
    torch.testing.assert_close(after["model.layers.1.mlp.up_proj.weight"], before["model.layers.1.mlp.up_proj.weight"])
    loaded = load_model(EmbedModelConfig(model=rec.model_dir, dim=16, max_qa_tokens=24))
    assert loaded.fine_tuned


def test_local_world_size_from_either_launcher():
    from qarm_core.embed.train.distributed import local_world_size

    assert local_world_size({}) == 1
    assert local_world_size({"LOCAL_WORLD_SIZE": "2"}) == 2      # torchrun
    assert local_world_size({"LOCAL_SIZE": "4"}) == 4            # the deepspeed launcher
    assert local_world_size({"LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2"}) == 1   # one process per node


def test_launch_commands(tmp_path):
    from qarm_core.embed.train import build_launch_command, deepspeed_config

    job = tmp_path / "job.json"
    tr = build_launch_command(job, TrainConfig(launcher="torchrun", nproc=2, batch_size=8), python="py")
    assert tr[:3] == ["py", "-m", "torch.distributed.run"] and "--nproc_per_node" in tr
    assert tr[tr.index("--nproc_per_node") + 1] == "2" and tr[-3:] == ["-m", "qarm_core.embed.worker", str(job)]
    ds = build_launch_command(job, TrainConfig(launcher="deepspeed", nproc=4, batch_size=8), python="py",
                              extra_launcher_args=["--hostfile", "hosts"])
    assert ds[:3] == ["py", "-m", "deepspeed.launcher.runner"] and ds[ds.index("--num_gpus") + 1] == "4"
    assert ds[-3:] == ["--module", "qarm_core.embed.worker", str(job)] and "--hostfile" in ds
    with pytest.raises(ValueError):
        build_launch_command(job, TrainConfig())
    c = deepspeed_config(TrainConfig(batch_size=8, nproc=2, launcher="torchrun", dtype="bfloat16"), world_size=2)
    assert c["zero_optimization"]["stage"] == 2 and c["train_micro_batch_size_per_gpu"] == 4
    assert c["train_batch_size"] == 8 and c["bf16"] == {"enabled": True}
    # DeepSpeed's bf16 section follows the dtype choice, including auto's
    assert deepspeed_config(TrainConfig(dtype="float32"), world_size=1)["bf16"] == {"enabled": False}
    from qarm_core.devices import cpu_info
    if not torch_cuda():
        assert deepspeed_config(TrainConfig(dtype="auto"), world_size=1)["bf16"]["enabled"] == cpu_info().bf16_native
    for stage in (0, 1, 2, 3):
        assert json.loads((REPO / "configs" / "deepspeed" / f"zero{stage}.json").read_text())["zero_optimization"]["stage"] == stage


def test_launcher_args_reach_the_launch_command(tmp_path):
    """``embed.train.launcher_args`` (multi-node flags) go on the launcher's command line: an
    unknown flag makes torchrun fail, and the error shows the command it was given."""
    from qarm_core.embed.train import run_launched

    job = tmp_path / "job" / "job.json"
    job.parent.mkdir()
    job.write_text(json.dumps({"out_dir": str(tmp_path)}))
    cfg = TrainConfig(launcher="torchrun", nproc=2, batch_size=8, launcher_args=["--no-such-flag"])
    with pytest.raises(RuntimeError, match=r"torch\.distributed\.run .*--no-such-flag.* failed with exit code"):
        run_launched(job, cfg, timeout_s=120)


def _two_process(tiny_lm_path, tiny_catalog, tmp_path, launcher: str, deepspeed: bool = True,
                 grad_cache_chunk: int = 0):
    from qarm_core.embed.train import train_embedding_model

    items, judgments, qa = tiny_catalog
    cfg = TrainConfig(launcher=launcher, nproc=2, batch_size=8, max_steps=4, checkpoint_every=2,
                      use_deepspeed=deepspeed, dtype="bfloat16" if deepspeed else "float32",
                      grad_cache_chunk=grad_cache_chunk,
                      master_port=29500 + (os.getpid() % 500) + (7 if launcher == "deepspeed" else 0)
                      + (0 if deepspeed else 13))
    seen: list[dict] = []
    rec = train_embedding_model(items, judgments, qa, tmp_path, _mcfg(tiny_lm_path), cfg, progress=seen.append)
    assert rec.world_size == 2 and rec.steps == 4 and rec.deepspeed == deepspeed
    assert [s["step"] for s in seen] == [1, 2, 3, 4]
    assert all(s["nce_spread"] == 0.0 for s in seen)        # every rank computed the same global loss
    if deepspeed:
        # ZeRO-2 over 2 ranks: optimizer state partitioned in two
        assert rec.zero_stage == 2
        assert len(list((tmp_path / "checkpoints" / "step-00000004").glob("*optim_states.pt"))) == 2
    assert (Path(rec.model_dir) / "projection.safetensors").exists()
    return rec


@pytest.mark.slow
def test_two_processes_plain_torch(tiny_lm_path, tiny_catalog, tmp_path):
    """Plain torch over gloo (gradients all-reduced by hand), 2 processes x 4 pairs."""
    import torch

    rec = _two_process(tiny_lm_path, tiny_catalog, tmp_path, "torchrun", deepspeed=False)
    w = _weights(Path(rec.model_dir))
    assert all(torch.isfinite(v).all() for v in w.values())


# Loaded by every process of a launch through PYTHONPATH: rank 1 aborts (SIGABRT, as a C++
# terminate does) where the worker destroys its process group, i.e. after its work; with
# forget_done it first removes the mark it wrote, as a rank that died before the end would have none.
_ABORT_AT_TEARDOWN = """
import os
if os.environ.get("RANK") == "1":
    import torch.distributed as dist

    def _abort():
        if {forget_done}:
            from qarm_core.embed.train.record import rank_done_file
            rank_done_file({out!r}, 1).unlink()
        os.abort()

    dist.destroy_process_group = _abort
"""


@pytest.mark.slow
@pytest.mark.parametrize("marked_done", [True, False])
def test_rank_aborting_after_its_work_keeps_the_run(tiny_lm_path, tiny_catalog, tmp_path, monkeypatch, caplog,
                                                    marked_done):
    """A rank killed by SIGABRT after the run's last barrier (model and record written, the rank
    marked done) leaves a complete run: the launch returns its record with a warning. The same
    crash from a rank whose mark is missing fails the launch."""
    import logging

    from qarm_core.embed.train import train_embedding_model
    from qarm_core.embed.train.launch import node_ranks
    from qarm_core.embed.train.record import rank_done_file

    site = tmp_path / "site"
    site.mkdir()
    out = tmp_path / "run"
    (site / "sitecustomize.py").write_text(_ABORT_AT_TEARDOWN.format(forget_done=not marked_done, out=str(out)))
    monkeypatch.setenv("PYTHONPATH", str(site))
    items, judgments, qa = tiny_catalog
    cfg = TrainConfig(launcher="torchrun", nproc=2, batch_size=8, max_steps=2, checkpoint_every=2,
                      use_deepspeed=False, dtype="float32", master_port=29500 + (os.getpid() % 500) + 31)
    caplog.set_level(logging.WARNING, logger="qarm_core")
    if not marked_done:
        with pytest.raises(RuntimeError, match="failed with exit code"):
            train_embedding_model(items, judgments, qa, out, _mcfg(tiny_lm_path), cfg)
        assert rank_done_file(out, 0).is_file() and not rank_done_file(out, 1).is_file()
        return
    rec = train_embedding_model(items, judgments, qa, out, _mcfg(tiny_lm_path), cfg)
    assert rec.steps == 2 and rec.world_size == 2
    assert all(rank_done_file(out, r).is_file() for r in node_ranks(cfg))
    assert "a crash on the way out, the run is kept" in caplog.text
    log = (out / "launch.log").read_text()
    assert "Fatal Python error: Aborted" in log and "in _abort" in log     # the worker's faulthandler


def test_log_relay_keeps_reading_after_the_run_folder_is_renamed(tmp_path):
    """A joining node's relay of rank 0's log: lines from ``start`` on, a partial line held back
    until its end is written, and the lines written before node 0 renamed the run folder (its
    stage publishing it) still read after the rename."""
    from qarm_core.embed.train.launch import LogRelay

    run = tmp_path / "x.run"
    run.mkdir()
    log = run / "train_log.jsonl"
    relay = LogRelay(log, start=0)
    assert relay.poll() == []                                  # no log yet
    with open(log, "w") as w:
        w.write('{"step": 1}\n{"step": 2}\n{"st')
        w.flush()
        assert relay.poll() == [{"step": 1}, {"step": 2}]      # the partial third line waits
        w.write('ep": 3}\n{"step": 4}\n')
    run.rename(tmp_path / "x")                                  # published before the last read
    assert relay.poll() == [{"step": 3}, {"step": 4}]
    assert relay.poll() == []
    relay.close()
    later = LogRelay(tmp_path / "x" / "train_log.jsonl", start=len('{"step": 1}\n'))
    assert [i["step"] for i in later.poll()] == [2, 3, 4]      # a resumed run's earlier lines skipped
    later.close()


def test_node_ranks_follow_node_rank():
    """Both launchers number ranks node by node: node 1 of 2-process nodes starts ranks 2 and 3."""
    from qarm_core.embed.train.launch import node_ranks

    assert list(node_ranks(TrainConfig(launcher="torchrun", nproc=2, nnodes=2, node_rank=1))) == [2, 3]
    assert list(node_ranks(TrainConfig(launcher="torchrun", nproc=3, batch_size=6))) == [0, 1, 2]


@pytest.mark.slow
def test_two_processes_deepspeed_launcher(tiny_lm_path, tiny_catalog, tmp_path):
    """Also the gradient cache across processes (chunks of 2 of each rank's 4 pairs; bf16
    embeddings gathered over gloo)."""
    _two_process(tiny_lm_path, tiny_catalog, tmp_path, "deepspeed", grad_cache_chunk=2)


@pytest.mark.slow
def test_sigkilled_process_resumes(tiny_lm_path, tiny_catalog, tmp_path):
    """A real kill (SIGKILL of the training process after its first checkpoint), then a resume."""
    import signal
    import subprocess
    import time

    from qarm_core.embed.train import train_embedding_model, write_job
    from qarm_core.embed.train.checkpoint import deepspeed_resume_tag

    items, judgments, qa = tiny_catalog
    cfg = TrainConfig(use_deepspeed=True, batch_size=8, max_steps=60, checkpoint_every=5)
    job = write_job(items, judgments, qa, tmp_path, _mcfg(tiny_lm_path), cfg)
    proc = subprocess.Popen([sys.executable, "-m", "qarm_core.embed.worker", str(job)], cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "checkpoints" / "latest"
    try:
        t0 = time.time()
        while not latest.exists() and time.time() - t0 < 240 and proc.poll() is None:
            time.sleep(0.2)
        assert latest.exists(), "no checkpoint written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "train_record.json").exists()
    # `latest` may be empty: the kill can land while DeepSpeed writes it
    done = int(deepspeed_resume_tag(tmp_path / "checkpoints").split("-")[1])
    rec = train_embedding_model(items, judgments, qa, tmp_path, _mcfg(tiny_lm_path),
                                cfg)
    assert rec.resumed_from_step >= done and rec.steps == 60


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_no_pickle_code_forces_weights_only_loads(tmp_path):
    import torch

    from qarm_core.embed.train.checkpoint import no_pickle_code

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"step": 3, "evil": Evil()}, tmp_path / "ck.pt")
    torch.save({"step": 3, "w": torch.ones(2)}, tmp_path / "ok.pt")
    with no_pickle_code(tmp_path):
        assert torch.load(tmp_path / "ok.pt", weights_only=False)["step"] == 3
    with pytest.raises(DataError, match=r"\[stage=train, dataset=checkpoints\] refused to load"):
        with no_pickle_code(tmp_path):
            torch.load(tmp_path / "ck.pt", weights_only=False)      # what DeepSpeed asks for
    assert not marker.exists()
    assert torch.load.__name__ == "load"                             # restored


def test_a_planted_pickle_in_a_deepspeed_checkpoint_is_refused_not_run(tiny_lm_path, tiny_catalog, tmp_path):
    import torch

    from qarm_core.embed.train import train_embedding_model

    items, judgments, qa = tiny_catalog
    cfg = TrainConfig(use_deepspeed=True, dtype="bfloat16", batch_size=8, max_steps=6, lr=3e-3,
                      anneal_steps=4, checkpoint_every=3, warmup_steps=2)
    with pytest.raises(Killed):        # dies after step 5: the checkpoint of step 3 remains
        train_embedding_model(items, judgments, qa, tmp_path / "run", _mcfg(tiny_lm_path), cfg, progress=_kill_at(5))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    step3 = tmp_path / "run" / "checkpoints" / "step-00000003"
    state = torch.load(step3 / "mp_rank_00_model_states.pt", weights_only=False)
    torch.save({**state, "client_note": Evil()}, step3 / "mp_rank_00_model_states.pt")
    with pytest.raises(DataError, match=r"\[stage=train, dataset=checkpoints\] refused to load"):
        train_embedding_model(items, judgments, qa, tmp_path / "run", _mcfg(tiny_lm_path), cfg)
    assert not marker.exists() and not (tmp_path / "run" / "model").exists()


def test_stopping_a_launch_stops_its_workers_too(tmp_path):
    """The launcher runs in its own process group; stopping it (SIGTERM, then SIGKILL after the
    grace) leaves no worker behind."""
    import subprocess
    import time

    from qarm_core.embed.train.launch import _stop_group, live_group_members

    worker = (f"import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              f"open({str(tmp_path / 'started')!r}, 'w').close(); time.sleep(120)")
    launcher = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", launcher], start_new_session=True)
    t0 = time.monotonic()
    while not (tmp_path / "started").exists() and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    t0 = time.monotonic()
    _stop_group(proc, grace_s=1.0)                 # the worker ignores SIGTERM: SIGKILL ends it
    assert 1.0 <= time.monotonic() - t0 < 10 and proc.returncode is not None
    assert live_group_members(proc.pid) == []


# --- multi-node: settings, launch commands, process-group backend, global in-batch negatives ---


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_multi_node_config_is_validated():
    from pydantic import ValidationError

    cfg = TrainConfig(launcher="torchrun", nproc=1, nnodes=2, node_rank=1, batch_size=8)
    assert cfg.world_size == 2 and cfg.master_addr is None        # one process per node is a valid layout
    assert TrainConfig(launcher="deepspeed", nproc=4, nnodes=3, batch_size=24).world_size == 12
    with pytest.raises(ValidationError, match="node_rank 2 must be below nnodes 2"):
        TrainConfig(launcher="torchrun", nproc=2, nnodes=2, node_rank=2, batch_size=8)
    with pytest.raises(ValidationError):
        TrainConfig(launcher="torchrun", nproc=2, nnodes=2, node_rank=-1, batch_size=8)
    with pytest.raises(ValidationError):
        TrainConfig(launcher="torchrun", nproc=2, nnodes=0, batch_size=8)
    # divisible by nproc (6 / 2) is not enough: the world is nnodes * nproc = 4
    with pytest.raises(ValidationError, match=r"batch_size 6 must be divisible by the world size .* = 2 \* 2 = 4"):
        TrainConfig(launcher="torchrun", nproc=2, nnodes=2, batch_size=6)
    with pytest.raises(ValidationError, match=r"grad_cache_chunk 4 must divide .* = 2"):
        TrainConfig(launcher="torchrun", nproc=2, nnodes=2, batch_size=8, grad_cache_chunk=4)
    with pytest.raises(ValidationError, match="nnodes 2 needs a launcher"):
        TrainConfig(nnodes=2, batch_size=8)
    with pytest.raises(ValidationError, match=r"nnodes \* nproc >= 2"):
        TrainConfig(launcher="deepspeed", nproc=1, nnodes=1)


def test_multi_node_launch_commands(tmp_path, monkeypatch):
    """Both launchers get this node's place and node 0's address: from the config, else (several
    nodes) from $MASTER_ADDR, else (one node) 127.0.0.1; the flags parse with the launchers' own argparse."""
    import torch.distributed.run as torchrun
    from deepspeed.launcher import runner as ds_runner

    from qarm_core.embed.train import build_launch_command, write_job
    from qarm_core.embed.train.launch import resolve_master_addr

    job = tmp_path / "job" / "job.json"
    node1 = dict(nproc=2, nnodes=2, node_rank=1, batch_size=8, master_port=29600)
    monkeypatch.setenv("MASTER_ADDR", "10.9.9.9")
    tr = build_launch_command(job, TrainConfig(launcher="torchrun", master_addr="10.0.0.1", **node1), python="py",
                              extra_launcher_args=["--max_restarts", "0"])
    assert tr[:3] == ["py", "-m", "torch.distributed.run"] and tr[-3:] == ["-m", "qarm_core.embed.worker", str(job)]
    assert [_flag(tr, f) for f in ("--nnodes", "--node_rank", "--master_addr", "--master_port", "--nproc_per_node")] \
        == ["2", "1", "10.0.0.1", "29600", "2"]                 # the config's address wins over the environment
    a = torchrun.parse_args(tr[3:])
    assert (a.nnodes, a.node_rank, a.master_addr, a.master_port, a.nproc_per_node, a.max_restarts) == \
        ("2", 1, "10.0.0.1", 29600, "2", 0) and a.module and a.training_script == "qarm_core.embed.worker"
    # no address in the config: $MASTER_ADDR (e.g. set by the cluster's scheduler), else this host
    tr_env = build_launch_command(job, TrainConfig(launcher="torchrun", **node1), python="py")
    assert _flag(tr_env, "--master_addr") == "10.9.9.9"
    one_node = TrainConfig(launcher="torchrun", nproc=2, batch_size=8)      # a stale MASTER_ADDR is ignored
    assert _flag(build_launch_command(job, one_node), "--master_addr") == "127.0.0.1"
    monkeypatch.delenv("MASTER_ADDR")
    # several nodes and no address anywhere: refused (node 1 would wait on its own loopback)
    with pytest.raises(DataError, match=r"\[stage=train, dataset=config\] embed\.train\.nnodes=2 but no address"):
        build_launch_command(job, TrainConfig(launcher="torchrun", **node1))
    two = TrainConfig(launcher="torchrun", **node1)
    assert resolve_master_addr(two, {"MASTER_ADDR": "h0"}) == "h0"
    assert resolve_master_addr(TrainConfig(), {"MASTER_ADDR": "h0"}) == "127.0.0.1"
    assert resolve_master_addr(TrainConfig(master_addr="h1"), {"MASTER_ADDR": "h0"}) == "h1"
    assert resolve_master_addr(TrainConfig(), {}) == "127.0.0.1"

    # deepspeed, several nodes: each node starts its own processes (--no_ssh) from the job's hostfile
    cfg = TrainConfig(launcher="deepspeed", master_addr="10.0.0.1", launcher_args=["--ssh_port", "2222"], **node1)
    write_job(*_tiny_tables(), tmp_path, EmbedModelConfig(), cfg)
    assert (tmp_path / "job" / "hostfile").read_text() == "node0 slots=2\nnode1 slots=2\n"
    ds = build_launch_command(job, cfg, python="py", extra_launcher_args=cfg.launcher_args)
    assert ds[:3] == ["py", "-m", "deepspeed.launcher.runner"]
    assert ds[-3:] == ["--module", "qarm_core.embed.worker", str(job)]
    assert [_flag(ds, f) for f in ("--num_gpus", "--num_nodes", "--node_rank", "--master_addr", "--master_port")] \
        == ["2", "2", "1", "10.0.0.1", "29600"]
    assert "--no_ssh" in ds and _flag(ds, "--hostfile") == str(job.parent / "hostfile")
    assert ds.index("--ssh_port") > ds.index("--hostfile")            # launcher_args come last
    d = ds_runner.parse_args(ds[3:])
    assert (d.num_gpus, d.num_nodes, d.node_rank, d.master_addr, d.master_port, d.no_ssh, d.ssh_port) == \
        (2, 2, 1, "10.0.0.1", 29600, True, 2222) and d.module and d.user_script == "qarm_core.embed.worker"
    # what the DeepSpeed runner makes of it: a local launch of node 1's 2 ranks of a world of 4, no ssh
    started: list[list[str]] = []

    class Started:
        returncode = 0

        def __init__(self, cmd, env=None):
            started.append(cmd)

        def wait(self):
            return 0

    def no_ssh(*args, **kwargs):
        pytest.fail(f"the runner ran {args}: it must not reach other nodes itself")

    monkeypatch.setattr(ds_runner, "subprocess", SimpleNamespace(Popen=Started, check_call=no_ssh, check_output=no_ssh))
    ds_runner.main(ds[3:])
    (cmd,) = started
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.launch"] and "--node_rank=1" in cmd
    assert "--master_addr=10.0.0.1" in cmd and "--master_port=29600" in cmd
    world_info = json.loads(__import__("base64").urlsafe_b64decode(
        next(c for c in cmd if c.startswith("--world_info=")).split("=", 1)[1]))
    assert world_info == {"node0": [0, 1], "node1": [0, 1]}
    # one node: unchanged apart from the explicit node flags (no hostfile, no --no_ssh)
    one = build_launch_command(job, TrainConfig(launcher="deepspeed", nproc=2, batch_size=8), python="py")
    assert "--no_ssh" not in one and "--hostfile" not in one and _flag(one, "--num_nodes") == "1"


def _tiny_tables():
    import pyarrow as pa

    items = pa.table({"item_id": [1, 2], "title": ["a", "b"]})
    return items, pa.table({"src_item": [1], "dst_item": [2]}), None


def test_launched_world_must_match_nnodes_times_nproc(tmp_path, monkeypatch):
    from qarm_core.embed.train.loop import start_session

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    cfg = TrainConfig(launcher="torchrun", nproc=2, nnodes=2, batch_size=8)
    with pytest.raises(DataError, match=r"\[stage=train, dataset=config\] launched with WORLD_SIZE=3 but "
                                        r"embed\.train\.nnodes \* nproc = 2 \* 2 = 4"):
        start_session(*_tiny_tables(), tmp_path, EmbedModelConfig(), cfg)


@pytest.mark.parametrize(("deepspeed", "cuda", "backend"), [(True, True, "nccl"), (True, False, "gloo"),
                                                            (False, True, "nccl"), (False, False, "gloo")])
def test_process_group_backend(monkeypatch, deepspeed, cuda, backend):
    """The run computes on the GPU whenever torch sees one, on both paths (the plain-torch path
    once trained on the CPU of a GPU host: 10x slower on an H200), with NCCL there; gloo on CPUs."""
    import torch

    from qarm_core.embed.train.distributed import process_group_backend, training_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = TrainConfig(use_deepspeed=deepspeed)
    assert process_group_backend(cfg) == backend
    assert training_device(cfg) == ("cuda" if backend == "nccl" else "cpu")


def test_fingerprint_is_the_same_on_every_node():
    from qarm_core.embed.train import run_fingerprint

    m = EmbedModelConfig()
    node = dict(launcher="torchrun", nproc=2, nnodes=2, batch_size=8)
    fps = {run_fingerprint(m, TrainConfig(**node, node_rank=r, master_addr=a), "d", 4)
           for r in (0, 1) for a in (None, "10.0.0.1")}
    assert len(fps) == 1
    assert run_fingerprint(m, TrainConfig(), "d", 1) != run_fingerprint(m, TrainConfig(), "d", 2)


def test_a_summing_deepspeed_config_is_refused(tmp_path):
    from qarm_core.embed.train import deepspeed_config

    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_allreduce_op": "sum"}))
    with pytest.raises(DataError, match=r"dataset=deepspeed_config\] gradient_allreduce_op='sum'"):
        deepspeed_config(TrainConfig(deepspeed_config=str(f), dtype="float32"), world_size=2)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("path", ["plain", "gradient_cache"])
def test_global_negatives_average_to_the_single_process_gradient(world, path):
    """Simulated ranks, no process group: each rank splices its own (grad-carrying) slice into the
    gathered global batch and backwards world * nce; the *average* of the ranks' gradients (what
    DeepSpeed's and the plain path's all-reduce computes) equals the one-process gradient of
    InfoNCE over the concatenated batch, and every rank reports that process's loss. Duplicated
    items across ranks exercise the global same-item mask."""
    import torch

    from qarm_core.embed.losses import global_info_nce, info_nce
    from qarm_core.embed.train.distributed import gather_with_local_grad, splice_local

    local, d_in, d, temp = 3, 6, 5, 0.1
    g = torch.Generator().manual_seed(world)
    xa, xp = torch.randn(world * local, d_in, generator=g), torch.randn(world * local, d_in, generator=g)
    a_ids = torch.arange(world * local)
    p_ids = a_ids + 100
    p_ids[-1] = p_ids[0]                     # the same positive item on the first and the last rank
    xp[-1] = xp[0]
    w = torch.randn(d_in, d, generator=g, requires_grad=True)

    def embed(x):
        return torch.nn.functional.normalize(x @ w, dim=-1)

    full = info_nce(embed(xa), embed(xp), temp, a_ids, p_ids)
    (g_full,) = torch.autograd.grad(full, [w])
    with torch.no_grad():
        ea_all, ep_all = embed(xa), embed(xp)
    grads, sl = [], lambda t, r: t[r * local:(r + 1) * local]
    for r in range(world):
        def gathered(full_t, mine):           # what all_gather + splice gives rank r
            return splice_local([sl(full_t, q) for q in range(world)], mine, r)

        ea, ep = embed(sl(xa, r)), embed(sl(xp, r))
        if path == "gradient_cache":          # the loss on detached leaves, then emb . grad per rank
            la, lp = ea.detach().requires_grad_(True), ep.detach().requires_grad_(True)
            obj, nce = global_info_nce(gathered(ea_all, la), gathered(ep_all, lp), temp,
                                       gathered(a_ids, sl(a_ids, r)), gathered(p_ids, sl(p_ids, r)), world)
            ga, gp = torch.autograd.grad(obj, [la, lp])
            (g_r,) = torch.autograd.grad((ea * ga).sum() + (ep * gp).sum(), [w])
        else:
            obj, nce = global_info_nce(gathered(ea_all, ea), gathered(ep_all, ep), temp,
                                       gathered(a_ids, sl(a_ids, r)), gathered(p_ids, sl(p_ids, r)), world)
            (g_r,) = torch.autograd.grad(obj, [w])
        torch.testing.assert_close(nce, full)                    # every rank reports the global loss
        grads.append(g_r)
    torch.testing.assert_close(torch.stack(grads).mean(0), g_full, rtol=1e-5, atol=1e-6)
    # without the world factor the average would be 1/world of it: the factor is what makes it right
    assert not torch.allclose(torch.stack(grads).mean(0) / world, g_full, rtol=1e-3)
    # alone: the plain loss, no gather
    x = embed(xa)
    obj, nce = global_info_nce(x, x, temp, None, None, 1)
    assert obj is nce and gather_with_local_grad(x, 1, 0) is x


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_nodes_equal_one_node_and_one_process(tiny_lm_path, tiny_catalog, tmp_path):
    """Two "nodes" on this host: two launches of torchrun --nnodes 2 --node_rank {0,1}
    --nproc_per_node 1 through the project's own path (``train_embedding_model`` per node, at the
    same time, into one shared run folder), DeepSpeed ZeRO-2 over gloo, float32. (1) Both ranks
    compute the same global loss every step (nce_spread 0) and the run equals, step by step and in
    the exported weights, a one-node run of 2 processes with the same seed and global batch.
    (2) It computes the single-process update: a 1-process run on the same global batches has the
    same contrastive loss every step (the negatives are the global batch, not each rank's half), the
    same gradient norm before clipping (DeepSpeed's averaging over ranks of the world-scaled
    contrastive loss gives the one-process gradient: a missing factor or a summing reduction would
    show as x0.5 or x2) and the same weights after 3 steps. The QA loss is per rank (a mean of the
    ranks' token means), so it is off here (qa_weight 0) to make the gradients comparable exactly."""
    import threading

    import torch

    from qarm_core.embed.train import train_embedding_model
    from qarm_core.embed.train.distributed import free_port

    items, judgments, qa = tiny_catalog
    base = dict(batch_size=8, max_steps=3, checkpoint_every=3, dtype="float32", qa_weight=0.0, num_threads=1,
                lr=3e-3, warmup_steps=0, seed=3)
    # (0) torchrun, 2 processes, DeepSpeed ZeRO-2: the optimizer state partitioned in two, every step
    # reported back to the driver (the 2-process bf16 path: test_two_processes_deepspeed_launcher)
    seen: list[dict] = []
    one_node = train_embedding_model(items, judgments, qa, tmp_path / "one_node", _mcfg(tiny_lm_path),
                                     TrainConfig(**base, launcher="torchrun", nproc=2, master_port=free_port()),
                                     progress=seen.append)
    assert (one_node.world_size, one_node.steps, one_node.deepspeed, one_node.zero_stage) == (2, 3, True, 2)
    assert [s["step"] for s in seen] == [1, 2, 3]
    assert len(list((tmp_path / "one_node" / "checkpoints" / "step-00000003").glob("*optim_states.pt"))) == 2
    assert (Path(one_node.model_dir) / "projection.safetensors").exists()
    port, recs, errors = free_port(), {}, []

    def node(rank: int) -> None:
        cfg = TrainConfig(**base, launcher="torchrun", nproc=1, nnodes=2, node_rank=rank, master_addr="127.0.0.1",
                          master_port=port)
        try:
            recs[rank] = train_embedding_model(items, judgments, qa, tmp_path / "two_nodes", _mcfg(tiny_lm_path), cfg)
        except BaseException as exc:  # noqa: BLE001 -- re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a node's launch did not finish"
    two_nodes = recs[0]
    assert recs[1] == two_nodes                     # both nodes' launches return the run's record
    assert two_nodes.world_size == 2 and two_nodes.deepspeed and two_nodes.steps == 3 and two_nodes.backend == "gloo"
    assert len(list((tmp_path / "two_nodes" / "checkpoints" / "step-00000003").glob("*optim_states.pt"))) == 2
    assert sorted(f.name for f in (tmp_path / "two_nodes").glob("launch*.log")) == ["launch.node0.log",
                                                                                   "launch.node1.log"]

    two, one = _log(tmp_path / "two_nodes"), _log(tmp_path / "one_node")
    assert [s["step"] for s in two] == [1, 2, 3] and all(s["nce_spread"] == 0.0 for s in two + one)
    # the same ranks computing the same slices: equal (measured: bit-identical), tolerance for safety
    for key in ("loss", "nce", "grad_norm"):
        assert [s[key] for s in two] == pytest.approx([s[key] for s in one], rel=1e-6, abs=1e-7), key
    a, b = _weights(Path(two_nodes.model_dir)), _weights(Path(one_node.model_dir))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)

    # one process on DeepSpeed too (``use_deepspeed: auto`` would take plain torch there)
    alone = train_embedding_model(items, judgments, qa, tmp_path / "alone", _mcfg(tiny_lm_path),
                                  TrainConfig(**base, use_deepspeed=True))
    single = _log(tmp_path / "alone")
    assert alone.world_size == 1 and len(single) == 3
    # measured: equal to ~2e-7 relative (losses, norms) and 1.1e-6 absolute (weights); the ranks'
    # forward passes pad their halves of the batch differently, hence not bit-identical
    for key in ("nce", "grad_norm"):
        assert [s[key] for s in two] == pytest.approx([s[key] for s in single], rel=1e-5), key
    c = _weights(Path(alone.model_dir))
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=2e-5, msg=k)


def test_stability_term_keeps_a_continued_model_near_its_reference(tiny_lm_path, tiny_catalog, tmp_path):
    """Continued fine-tuning with ``stability_weight``: the trained items' embeddings stay nearer the
    reference (the starting model's own embeddings, as the published ones are) than without it, at
    the same steps and learning rate; at step 1 the term is ~0 (the training forward embeds as
    inference does); the reference is part of the run's identity; a reference of the wrong width
    is refused."""
    import pyarrow as pa

    from qarm_core.embed.config import EmbedConfig
    from qarm_core.embed.embed import embed_catalog
    from qarm_core.embed.train import train_embedding_model
    from qarm_core.quantize.io import read_embeddings

    items, judgments, qa = tiny_catalog
    base = dict(batch_size=8, dtype="float32", use_deepspeed=False, warmup_steps=0, seed=3)
    start = train_embedding_model(items, judgments, qa, tmp_path / "start", _mcfg(tiny_lm_path),
                                  TrainConfig(**base, max_steps=4, lr=3e-3))
    ecfg = EmbedConfig(batch_size=8, dtype="float32")
    mcfg = EmbedModelConfig(model=start.model_dir, dim=16, max_qa_tokens=24)
    ref_ids, ref_x = read_embeddings(embed_catalog(items, tmp_path / "ref", mcfg, ecfg).path)
    reference = pa.table({"item_id": ref_ids, "vector": pa.array(list(ref_x), pa.list_(pa.float32()))})

    def moved(weight: float, name: str) -> tuple[float, list[dict]]:
        rec = train_embedding_model(items, judgments, qa, tmp_path / name, mcfg,
                                    TrainConfig(**base, max_steps=6, lr=1e-2, proj_lr=1e-2, stability_weight=weight),
                                    reference=reference)
        ids, x = read_embeddings(embed_catalog(items, tmp_path / f"{name}-emb", EmbedModelConfig(
            model=rec.model_dir, dim=16, max_qa_tokens=24), ecfg).path)
        assert np.array_equal(ids, ref_ids)
        log = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        return float(np.sqrt(((x - ref_x) ** 2).sum(1).mean())), log

    free, free_log = moved(0.0, "free")
    held, held_log = moved(20.0, "held")
    assert "stability" not in free_log[0] and held_log[0]["stability"] < 1e-4
    assert held < 0.6 * free, (held, free)     # 0.66 vs 1.49 here: Adam at lr 1e-2 leaves a floor
    with pytest.raises(DataError, match="stage=train.*reference vectors are 8-d.*16"):
        train_embedding_model(items, judgments, qa, tmp_path / "bad", mcfg,
                              TrainConfig(**base, max_steps=1, stability_weight=1.0),
                              reference=pa.table({"item_id": ref_ids,
                                                  "vector": pa.array(list(ref_x[:, :8]), pa.list_(pa.float32()))}))


def test_the_deepspeed_resume_tag_survives_an_empty_latest_file(tmp_path):
    """``latest`` names the checkpoint; empty, or naming a folder without its model states, the
    newest complete ``step-*`` folder is taken (a half-written newer folder is not)."""
    from qarm_core.embed.train.checkpoint import DEEPSPEED_MODEL_STATES, deepspeed_resume_tag

    assert deepspeed_resume_tag(tmp_path) is None
    for step in (3, 6):
        (tmp_path / f"step-{step:08d}").mkdir()
        (tmp_path / f"step-{step:08d}" / DEEPSPEED_MODEL_STATES).write_bytes(b"x")
    (tmp_path / "step-00000009").mkdir()                  # killed while its files were written
    (tmp_path / "latest").write_text("step-00000003\n")
    assert deepspeed_resume_tag(tmp_path) == "step-00000003"
    (tmp_path / "latest").write_text("")
    assert deepspeed_resume_tag(tmp_path) == "step-00000006"
    (tmp_path / "latest").write_text("step-00000009")
    assert deepspeed_resume_tag(tmp_path) == "step-00000006"


def test_deepspeed_auto_is_plain_torch_for_one_cpu_process_only():
    """``use_deepspeed: auto``: plain torch for one process on a CPU, DeepSpeed for more processes
    (any launcher); true/false as given; anything else refused."""
    from pydantic import ValidationError

    from qarm_core.embed.train.distributed import uses_deepspeed

    auto = TrainConfig()
    assert auto.use_deepspeed == "auto"
    assert not uses_deepspeed(auto, 1)                 # this machine has no GPU
    assert uses_deepspeed(auto, 2)
    assert uses_deepspeed(TrainConfig(launcher="deepspeed", nproc=2), 2)
    assert uses_deepspeed(TrainConfig(use_deepspeed=True), 1)
    assert not uses_deepspeed(TrainConfig(use_deepspeed=False), 2)
    with pytest.raises(ValidationError):
        TrainConfig(use_deepspeed="yes")


_HUNG_PEER = """
import os, sys, time
from pathlib import Path
import torch, torch.distributed as dist
from qarm_core.embed.train.distributed import init_process_group
from qarm_core.embed.worker import exit_now
if {deepspeed}:
    import deepspeed
    from deepspeed.utils import groups
rank = int(os.environ["RANK"])
# both ranks ready (imports done) before the 3 s start, which also bounds the group's start-up
board = Path(sys.argv[1])
(board / f"ready.{{rank}}").touch()
while not (board / f"ready.{{1 - rank}}").exists():
    time.sleep(0.05)
init_process_group(2, {deepspeed}, "gloo", timeout_s=3.0)
# the group DeepSpeed's engine reduces gradients on, or the default one
group = groups._get_data_parallel_group() if {deepspeed} else None
if rank == 1:
    time.sleep(60)          # alive, but never enters the collective: a hung peer
    sys.exit(0)
t0 = time.perf_counter()
try:
    dist.all_reduce(torch.ones(1), group=group)
except Exception as exc:
    print("RAISED", round(time.perf_counter() - t0, 1), type(exc).__name__, str(exc)[:200], flush=True)
    # as the worker leaves: without the teardown, which can abort on gloo's timed-out threads
    exit_now(3)
print("RETURNED", flush=True)
"""


@pytest.mark.parametrize("deepspeed", [False, True])
def test_a_collective_waiting_on_a_hung_peer_fails_after_the_timeout(deepspeed, tmp_path):
    """Two real gloo ranks on two one-process "nodes": rank 1 never enters the all-reduce, and rank
    0's fails after the configured timeout (3 s) instead of torch's default (30 min), on the plain
    path's group and on the group DeepSpeed's engine reduces gradients on."""
    import subprocess

    from qarm_core.embed.train.distributed import free_port

    port = free_port()
    procs = []
    for rank in (0, 1):
        # two one-process "nodes" (DeepSpeed builds no shared-memory op for ranks alone on a host)
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", _HUNG_PEER.format(deepspeed=deepspeed), str(tmp_path)],
                                      cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        out0, _ = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 3, out0[-2000:]
    line = next(x for x in out0.splitlines() if x.startswith("RAISED"))
    waited = float(line.split()[1])
    assert 2.5 <= waited < 30, line


def test_a_failed_worker_prints_its_error_and_exits_1(tmp_path):
    """A rank whose training raises leaves with 1 after its traceback (not whatever the
    interpreter's teardown does next); a bad command line keeps argparse's 2."""
    import subprocess

    missing = tmp_path / "no_such_job.json"
    run = subprocess.run([sys.executable, "-m", "qarm_core.embed.worker", str(missing)], cwd=str(REPO),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "FileNotFoundError" in run.stderr and "no_such_job.json" in run.stderr
    bad = subprocess.run([sys.executable, "-m", "qarm_core.embed.worker"], cwd=str(REPO),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_the_collective_timeout_changes_no_fingerprint():
    """How long a collective may wait is not part of a run's identity: a run resumes and a
    published model stays reused whatever it is set to."""
    from qarm_core.embed.train import run_fingerprint

    a = run_fingerprint(EmbedModelConfig(), TrainConfig(), "d", 2)
    assert a == run_fingerprint(EmbedModelConfig(), TrainConfig(collective_timeout_s=30), "d", 2)
    assert a != run_fingerprint(EmbedModelConfig(), TrainConfig(seed=1), "d", 2)
    # the one list both the fingerprint and the train task's cache key leave out
    from qarm_core.embed.config import RUN_NEUTRAL_TRAIN_FIELDS

    assert RUN_NEUTRAL_TRAIN_FIELDS <= set(TrainConfig.model_fields)
    two = TrainConfig(nnodes=2, launcher="torchrun")
    assert run_fingerprint(EmbedModelConfig(), two, "d", 2) == \
        run_fingerprint(EmbedModelConfig(), TrainConfig(nnodes=2, launcher="torchrun", node_rank=1, collective_timeout_s=5), "d", 2)
    with pytest.raises(ValueError):
        TrainConfig(collective_timeout_s=0)


def test_a_lock_left_by_a_killed_op_build_is_removed_before_a_launch(tmp_path, caplog, monkeypatch):
    """torch waits forever on the lock file of an extension build that was killed (DeepSpeed's
    shared-memory op compiles on a CPU host's first multi-process run): such a lock, older than
    STALE_BUILD_LOCK_S and open in no process, is removed before a launch; a fresh one, or an old
    one a process holds open (a long build under way), is kept. In TORCH_EXTENSIONS_DIR and, when
    that is unset, in torch's default root's per-build folder."""
    import torch.utils.cpp_extension as cpp

    from qarm_core.embed.train.launch import STALE_BUILD_LOCK_S, clear_stale_build_locks

    now = 1_000_000.0

    def locks(root, *ages):
        made = []
        for i, age in enumerate(ages):
            lock = root / f"op{i}" / "lock"
            lock.parent.mkdir(parents=True)
            lock.touch()
            os.utime(lock, (now - age, now - age))
            made.append(lock)
        return made

    old, fresh, held = locks(tmp_path / "set", STALE_BUILD_LOCK_S + 60, 30, 3 * STALE_BUILD_LOCK_S)
    fd = os.open(held, os.O_RDONLY)
    try:
        with caplog.at_level("WARNING"):
            assert clear_stale_build_locks({"TORCH_EXTENSIONS_DIR": str(tmp_path / "set")}, now=now) == [old]
        assert fresh.exists() and held.exists() and not old.exists()
        assert "did not finish" in caplog.text
    finally:
        os.close(fd)
    assert clear_stale_build_locks({"TORCH_EXTENSIONS_DIR": str(tmp_path / "set")}, now=now) == [held]
    # unset: torch's default root, whose builds sit in a folder per Python and accelerator
    monkeypatch.setattr(cpp, "get_default_build_root", lambda: str(tmp_path / "default"))
    (in_build_folder,) = locks(tmp_path / "default" / "py311_cpu", 2 * STALE_BUILD_LOCK_S)
    assert clear_stale_build_locks({}, now=now) == [in_build_folder]
    assert clear_stale_build_locks({"TORCH_EXTENSIONS_DIR": str(tmp_path / "none")}, now=now) == []
