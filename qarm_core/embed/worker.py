"""Entry point of one training process started by torchrun or the deepspeed launcher.

    python -m qarm_core.embed.worker JOB_JSON [--local_rank=N]

Reads the job written by ``train.write_job``, trains (rank/world from the launcher's environment)
and exits 0; rank 0 writes ``train_record.json`` next to the model.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("job")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the deepspeed launcher passes it
    args = ap.parse_args(argv)

    import os

    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    import pyarrow.parquet as pq

    from qarm_core.embed.config import EmbedModelConfig, TrainConfig
    from qarm_core.embed.train import _train

    job = json.loads(open(args.job).read())
    model_cfg = EmbedModelConfig.model_validate(job["model_config"])
    cfg = TrainConfig.model_validate(job["train_config"])
    items = pq.read_table(job["items"])
    judgments = pq.read_table(job["judgments"])
    qa = pq.read_table(job["qa"]) if job.get("qa") else None
    from pathlib import Path

    _train(items, judgments, qa, Path(job["out_dir"]), model_cfg, cfg, None)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
