"""Device selection: auto follows what torch sees; asking for a GPU that is not there fails clearly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qarm_core.devices import resolve_device
from qarm_core.errors import DataError

REPO = Path(__file__).resolve().parents[2]


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


# ---------------------------------------------------------------- the dtype decision
from qarm_core.devices import CpuInfo, DTypeChoice, choose_dtype, cpu_info, parse_cpuinfo  # noqa: E402

AVX2_EPYC = CpuInfo("AMD EPYC 7B12", frozenset({"avx2", "fma", "f16c"}), 2)
BF16_EPYC = CpuInfo("AMD EPYC 9B14", frozenset({"avx2", "fma", "avx512f", "avx512_bf16"}), 2)
AMX_XEON = CpuInfo("Intel Xeon Platinum 8481C", frozenset({"avx2", "avx512f", "amx_bf16", "amx_tile"}), 2)


@pytest.mark.parametrize("name, device, cuda_bf16, cpu, expected", [
    ("auto", "cpu", False, AVX2_EPYC, "float32"),          # bf16 would be emulated: 45x slower
    ("auto", "cpu", False, BF16_EPYC, "bfloat16"),
    ("auto", "cpu", False, AMX_XEON, "bfloat16"),
    ("auto", "cuda", True, AVX2_EPYC, "bfloat16"),         # the GPU decides, not the host CPU
    ("auto", "cuda:1", False, BF16_EPYC, "float32"),       # a GPU without bf16 (pre-Ampere)
    ("float32", "cpu", False, BF16_EPYC, "float32"),       # an explicit type always wins
    ("bfloat16", "cpu", False, AVX2_EPYC, "bfloat16"),
    ("bfloat16", "cuda", False, AVX2_EPYC, "bfloat16"),
])
def test_dtype_decision_table(name, device, cuda_bf16, cpu, expected):
    choice = choose_dtype(name, device, cuda_bf16=cuda_bf16, cpu=cpu, key="judge.local.dtype")
    assert choice.name == expected
    assert choice.reason.startswith("auto:" if name == "auto" else "set by judge.local.dtype")


def test_dtype_unknown_name_names_the_key():
    with pytest.raises(DataError, match=r"\[stage=embed, dataset=config\] embed.infer.dtype='fp8'"):
        choose_dtype("fp8", "cpu", stage="embed", key="embed.infer.dtype")


def test_cpuinfo_probe_reads_flags_and_honours_isa_caps():
    text = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n"
    assert parse_cpuinfo(text, 2, env={}).bf16_native
    assert parse_cpuinfo(text, 2, env={}).model == "AMD EPYC 9B14"
    # an instruction-set cap below bf16 (how a bf16 box stands in for an AVX2 one) means no native bf16
    assert not parse_cpuinfo(text, 2, env={"ATEN_CPU_CAPABILITY": "avx2"}).bf16_native
    assert not parse_cpuinfo(text, 2, env={"ONEDNN_MAX_CPU_ISA": "AVX2"}).bf16_native
    assert parse_cpuinfo(text, 2, env={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}).bf16_native
    assert not parse_cpuinfo("model name : Old CPU\nflags : sse2 avx2\n", 1, env={}).bf16_native
    assert "native bf16: no" in parse_cpuinfo("flags : avx2\n", 2, env={}).summary()


def test_summary_names_every_library_cap_but_only_torchs_decide_bf16():
    text = "model name : Xeon\nflags : avx2 fma avx512f amx_bf16\n"
    env = {"OPENBLAS_CORETYPE": "Haswell", "NUMBA_CPU_NAME": "haswell", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    info = parse_cpuinfo(text, 2, env=env)
    assert "[capped: MKL_ENABLE_INSTRUCTIONS=AVX2, OPENBLAS_CORETYPE=Haswell, NUMBA_CPU_NAME=haswell]" in info.summary()
    assert info.bf16_native          # these caps leave torch's oneDNN bf16 kernels alone
    assert "capped" not in parse_cpuinfo(text, 2, env={}).summary()


def test_numpy_blas_reports_the_kernels_a_cap_selects():
    """A figure of the quantizer depends on the kernels numpy's BLAS runs: the report line must show
    the set actually chosen, which ``OPENBLAS_CORETYPE`` changes (any AVX2 CPU runs Haswell's)."""
    from qarm_core.devices import numpy_blas

    here = numpy_blas()
    if here is None or not here.startswith("openblas"):
        pytest.skip(f"numpy's BLAS is not a readable OpenBLAS here: {here}")
    if "avx2" not in cpu_info().flags:
        pytest.skip("Haswell kernels need AVX2")
    code = "from qarm_core.devices import hardware_summary; print(hardware_summary())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OPENBLAS_CORETYPE": "Haswell"}, cwd=REPO).stdout
    assert "numpy BLAS openblas" in out and "(Haswell)" in out and "OPENBLAS_CORETYPE=Haswell" in out


def test_choice_converts_to_torch():
    import torch

    assert DTypeChoice("bfloat16", "x").torch is torch.bfloat16 and DTypeChoice("float32", "x").torch is torch.float32


@pytest.mark.slow
def test_auto_dtype_is_not_slower_than_the_other_on_this_machine():
    """What ``auto`` picks here must not be the slow choice: time a SmolLM2-sized layer's matmuls
    (512 tokens x 576 -> 1536, and back) in both types on this CPU, best of several rounds."""
    import time

    import torch

    chosen = choose_dtype("auto", "cpu")
    other = torch.float32 if chosen.bf16 else torch.bfloat16

    def rounds(dtype, n: int, enough: float | None = None) -> float:
        """Best time of up to ``n`` rounds of 2 layer passes; stops after two rounds that are both
        over ``enough`` s (a type ~45x slower needs no more rounds to show it: load only slows a round)."""
        x = torch.randn(512, 576).to(dtype)
        w1, w2 = torch.randn(576, 1536).to(dtype), torch.randn(1536, 576).to(dtype)
        (x @ w1) @ w2                                      # warm-up (kernel selection, page faults)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            for _ in range(2):
                (x @ w1) @ w2
            times.append(time.perf_counter() - t0)
            if enough is not None and len(times) >= 2 and min(times) > enough:
                break
        return min(times)

    t_chosen = rounds(chosen.torch, 7)
    t_other = rounds(other, 7, enough=3 * t_chosen)
    # 1.3x slack: both types are within noise of each other on a few CPUs; the point is never to
    # pick the one that is several times slower (bf16 without native support: ~45x)
    assert t_chosen <= 1.3 * t_other, (f"{cpu_info().summary()}: auto chose {chosen.name} "
                                       f"({t_chosen:.4f}s) but {other} took {t_other:.4f}s")


def test_swing_then_torch_leaves_torch_on_its_own_openmp_runtime():
    """Regression: numba's OpenMP layer loaded the system libgomp before torch's, and torch then ran
    on it several times slower. After a Swing kernel, numba runs on its workqueue layer and the only
    OpenMP runtime in the process is the one torch ships."""
    import json
    import subprocess
    import sys

    code = (
        "import json, os, numpy as np\n"
        "from qarm_core.pairs.swing import mine_swing_pairs\n"
        "mine_swing_pairs(np.random.randint(0, 50, 500), np.random.randint(0, 30, 500))\n"
        "import numba, torch\n"
        "maps = open(f'/proc/{os.getpid()}/maps').read().splitlines()\n"
        "gomp = sorted({l.split()[-1] for l in maps if 'libgomp' in l})\n"
        "print(json.dumps({'layer': numba.threading_layer(), 'gomp': gomp}))\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["layer"] == "workqueue"
    assert all("/torch/" in g for g in got["gomp"]), got["gomp"]


def test_visible_gpus_reads_cuda_visible_devices_as_cuda_does():
    from qarm_core.devices import visible_gpus

    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": " 1 , GPU-8a1b "}) == ["1", "GPU-8a1b"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,2"}) == ["0"]          # CUDA stops at an invalid entry
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == [] == visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"})
    assert visible_gpus({}) == []                                          # unset: torch's count (a CPU build: none)


def test_cpu_threads_restores_openmp_and_mkl_after_a_nested_torch_block():
    """The two-tower's pattern: a faiss thread limit with a torch block nested in it that restores
    "the caller's" count as it reads it (the limit). After the outer block both OpenMP and MKL are
    back at the caller's count (restoring OpenMP through faiss alone left MKL at 1)."""
    import faiss
    import torch

    from qarm_core.devices import cpu_threads, mkl_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cpu_threads(1, faiss_too=True):
            inner = torch.get_num_threads()
            torch.set_num_threads(1)
            torch.set_num_threads(inner)
            assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
            assert mkl_threads() in (None, 1)
        assert torch.get_num_threads() == 2 and faiss.omp_get_max_threads() == 2
        assert mkl_threads() in (None, 2)
    finally:
        torch.set_num_threads(before)


def test_thread_note_says_when_mkl_runs_on_fewer_threads_than_torch_reports():
    """The state the two-tower's recall check used to leave (OpenMP restored through faiss, MKL not):
    torch says 2, MKL 1. A stage's notes say so; with both at 2 they say that."""
    import faiss
    import torch

    from qarm_core.devices import mkl_threads, thread_note

    if mkl_threads() is None:
        pytest.skip("this torch build has no MKL")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert thread_note() == "2 (MKL 2)"
        faiss.omp_set_num_threads(1)
        torch.set_num_threads(1)
        faiss.omp_set_num_threads(2)
        if torch.get_num_threads() != 2:
            pytest.skip("faiss and torch do not share one OpenMP runtime in this build")
        assert mkl_threads() == 1
        assert thread_note() == "2 (MKL 1: fewer than torch, matmuls on fewer cores)"
    finally:
        torch.set_num_threads(before)
