"""Checkpoint IO of a training run: its fingerprint (which checkpoints belong to it), plain-torch
checkpoints (safetensors + JSON), DeepSpeed checkpoints through its engine, pruning, and the fp32
weights reassembled from a ZeRO checkpoint.

No pickle code runs on the resume path: DeepSpeed's checkpoints are torch.save files, which it loads
with ``weights_only=False`` (a file planted under ``work/train/*/checkpoints`` would run its code on
the next refresh). ``no_pickle_code`` makes every ``torch.load`` inside it (DeepSpeed's included)
a ``weights_only`` load that allows tensors, plain containers and only the three DeepSpeed classes
its checkpoints hold (``DEEPSPEED_SAFE_GLOBALS``); anything else is refused, not executed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import shutil
from pathlib import Path
from typing import Any, Iterator

from qarm_core.embed.config import RUN_NEUTRAL_TRAIN_FIELDS, EmbedModelConfig, TrainConfig
from qarm_core.embed.train.distributed import barrier
from qarm_core.embed.train.record import STAGE
from qarm_core.errors import DataError

# The non-tensor objects DeepSpeed (ZeRO 1-3, bf16) writes into its checkpoints, found with
# torch.serialization.get_unsafe_globals_in_checkpoint on this version's files.
DEEPSPEED_SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                          "deepspeed.utils.tensor_fragment.fragment_address",
                          "deepspeed.runtime.zero.config.ZeroStageEnum")


@contextlib.contextmanager
def no_pickle_code(where: Path | str) -> Iterator[None]:
    """Inside: ``torch.load`` runs with ``weights_only=True`` and ``DEEPSPEED_SAFE_GLOBALS`` allowed;
    a checkpoint under ``where`` holding any other object raises DataError (refused, not run)."""
    import importlib

    import torch

    allowed = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, attr = name.rsplit(".", 1)
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):   # another DeepSpeed layout: that class is simply not allowed
            pass
    original = torch.load

    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = weights_only_load
    try:
        yield
    except pickle.UnpicklingError as exc:
        raise DataError(STAGE, "checkpoints", f"refused to load a checkpoint under {where}: it holds objects other "
                                              f"than tensors and DeepSpeed's own state, which loading would run "
                                              f"as code ({str(exc).splitlines()[0][:300]}); remove the folder to "
                                              "train from scratch") from None
    finally:
        torch.load = original


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def run_fingerprint(model_cfg: EmbedModelConfig, cfg: TrainConfig, data_digest: str, world_size: int) -> str:
    """Identity of a training run: everything that changes its result (not checkpoint cadence,
    time budget, thread count, nor where the processes run: the ranks of one run on different
    nodes differ in node_rank and must agree on the fingerprint; the world size is in it)."""
    t = cfg.model_dump(exclude={"checkpoint_every", "keep_checkpoints", "max_seconds", "num_threads",
                                "launcher", "launcher_args", "master_port", "master_addr", "nnodes"}
                       | RUN_NEUTRAL_TRAIN_FIELDS)
    ident = {"model": model_cfg.model_dump(), "train": t, "data": data_digest, "world": world_size}
    if world_size > 1:
        # multi-process runs contrast against the global batch since in-batch negatives were
        # gathered across ranks: checkpoints of the older per-rank objective are another run
        ident["negatives"] = "global"
    return digest(ident)[:20]


def save_plain(root: Path, tag: str, model: Any, opt: Any, client: dict) -> None:
    from safetensors.torch import save_file, save_model

    tmp = root / f".{tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))           # handles tied (shared) weights
    sd = opt.state_dict()
    tensors = {f"{i}/{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    if tensors:
        save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"]}))
    (tmp / "client_state.json").write_text(json.dumps(client))
    shutil.rmtree(root / tag, ignore_errors=True)
    tmp.rename(root / tag)
    (root / "latest.tmp").write_text(tag)
    (root / "latest.tmp").rename(root / "latest")


def load_plain(root: Path, model: Any, opt: Any) -> dict | None:
    import torch
    from safetensors.torch import load_file, load_model

    latest = root / "latest"
    if not latest.exists():
        return None
    d = root / latest.read_text().strip()
    load_model(model, str(d / "model.safetensors"))
    groups = json.loads((d / "optimizer.json").read_text())["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    if (d / "optimizer.safetensors").exists():
        for key, v in load_file(str(d / "optimizer.safetensors")).items():
            i, k = key.split("/", 1)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})
    return json.loads((d / "client_state.json").read_text())


# The file of a DeepSpeed checkpoint folder that its engine writes for every rank (the module and the
# client state); the ZeRO optimizer partitions are beside it.
DEEPSPEED_MODEL_STATES = "mp_rank_00_model_states.pt"


def deepspeed_resume_tag(root: Path) -> str | None:
    """The DeepSpeed checkpoint under ``root`` to resume from: the tag ``latest`` names, or, when
    ``latest`` is empty or names no folder, the newest ``step-*`` folder holding its model states;
    None when there is none. DeepSpeed writes ``latest`` in place after the tag's files, so a kill
    at that moment leaves it empty beside a complete checkpoint (seen in a SIGKILL test)."""
    latest = root / "latest"
    tag = latest.read_text().strip() if latest.is_file() else ""
    if tag and (root / tag / DEEPSPEED_MODEL_STATES).is_file():
        return tag
    complete = sorted(p.name for p in root.glob("step-*") if (p / DEEPSPEED_MODEL_STATES).is_file())
    return complete[-1] if complete else None


def prune_checkpoints(root: Path, keep: int) -> None:
    tags = sorted(p for p in root.glob("step-*") if p.is_dir())
    for p in tags[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(root: Path, step: int, fingerprint: str, model: Any, opt: Any, engine: Any,
                    rank: int, world: int, keep: int) -> None:
    """Checkpoint ``step`` under ``root`` (DeepSpeed's format through ``engine``, else plain torch
    from rank 0), then keep the newest ``keep``."""
    tag = f"step-{step:08d}"
    client = {"step": step, "fingerprint": fingerprint}
    if engine is not None:
        engine.save_checkpoint(str(root), tag=tag, client_state=client)
    elif rank == 0:
        save_plain(root, tag, model, opt, client)
    barrier(world)
    if rank == 0:
        prune_checkpoints(root, keep)


def fp32_state_from_checkpoint(ckpt_root: Path, model: Any) -> dict | None:
    """Full-precision weights reassembled from the newest DeepSpeed checkpoint (every ZeRO stage),
    or None when DeepSpeed cannot (then the module's own weights are exported)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with no_pickle_code(ckpt_root):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root))
    except DataError:
        raise
    except Exception:  # noqa: BLE001 -- any other failure: fall back to the module weights
        return None
    # zero_to_fp32 lists a tied (shared) parameter under one name only: find it by identity
    alias: dict[int, list[str]] = {}
    for name, prm in model.named_parameters(remove_duplicate=False):
        alias.setdefault(id(prm), []).append(name)
    out = {}
    for name, prm in model.named_parameters(remove_duplicate=False):
        hit = next((sd[a] for a in alias[id(prm)] if a in sd), None)
        out[name] = (hit if hit is not None else prm.detach()).float()
    for name, buf in model.named_buffers():
        out[name] = buf
    return out
