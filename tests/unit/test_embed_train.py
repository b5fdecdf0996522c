"""Training of the three-segment model: loss falls, DeepSpeed ZeRO-2 on CPU, resume, gradient
cache, multi-process launch. Tiny random llama; the 2-process runs are marked slow."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

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


def test_deepspeed_zero2_single_process(tiny_lm_path, tiny_catalog, tmp_path):
    from qarm_core.embed.config import EmbedConfig
    from qarm_core.embed.embed import embed_catalog
    from qarm_core.embed.train import train_embedding_model

    items, judgments, qa = tiny_catalog
    cfg = TrainConfig(use_deepspeed=True, zero_stage=2, dtype="bfloat16", batch_size=8, max_steps=6, lr=3e-3,
                      anneal_steps=3, checkpoint_every=3)
    rec = train_embedding_model(items, judgments, qa, tmp_path, _mcfg(tiny_lm_path), cfg)
    assert rec.deepspeed and rec.zero_stage == 2 and rec.dtype == "bfloat16" and rec.steps == 6 and rec.world_size == 1
    assert np.isfinite(rec.final_loss) and rec.tokens_per_s > 0
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


def _two_process(tiny_lm_path, tiny_catalog, tmp_path, launcher: str, deepspeed: bool = True):
    from qarm_core.embed.train import train_embedding_model

    items, judgments, qa = tiny_catalog
    cfg = TrainConfig(launcher=launcher, nproc=2, batch_size=8, max_steps=4, checkpoint_every=2,
                      use_deepspeed=deepspeed, dtype="bfloat16" if deepspeed else "float32",
                      master_port=29500 + (os.getpid() % 500) + (7 if launcher == "deepspeed" else 0)
                      + (0 if deepspeed else 13))
    seen: list[dict] = []
    rec = train_embedding_model(items, judgments, qa, tmp_path, _mcfg(tiny_lm_path), cfg, progress=seen.append)
    assert rec.world_size == 2 and rec.steps == 4 and rec.deepspeed == deepspeed
    assert [s["step"] for s in seen] == [1, 2, 3, 4]
    if deepspeed:
        # ZeRO-2 over 2 ranks: optimizer state partitioned in two
        assert rec.zero_stage == 2
        assert len(list((tmp_path / "checkpoints" / "step-00000004").glob("*optim_states.pt"))) == 2
    assert (Path(rec.model_dir) / "projection.safetensors").exists()
    return rec


@pytest.mark.slow
def test_two_processes_torchrun(tiny_lm_path, tiny_catalog, tmp_path):
    _two_process(tiny_lm_path, tiny_catalog, tmp_path, "torchrun")


@pytest.mark.slow
def test_two_processes_plain_torch(tiny_lm_path, tiny_catalog, tmp_path):
    """Plain torch over gloo (gradients all-reduced by hand), 2 processes x 4 pairs."""
    import torch

    rec = _two_process(tiny_lm_path, tiny_catalog, tmp_path, "torchrun", deepspeed=False)
    w = _weights(Path(rec.model_dir))
    assert all(torch.isfinite(v).all() for v in w.values())


@pytest.mark.slow
def test_two_processes_deepspeed_launcher(tiny_lm_path, tiny_catalog, tmp_path):
    _two_process(tiny_lm_path, tiny_catalog, tmp_path, "deepspeed")


@pytest.mark.slow
def test_sigkilled_process_resumes(tiny_lm_path, tiny_catalog, tmp_path):
    """A real kill (SIGKILL of the training process after its first checkpoint), then a resume."""
    import signal
    import subprocess
    import time

    from qarm_core.embed.train import train_embedding_model, write_job

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
    done = int(latest.read_text().strip().split("-")[1])
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
