"""Entry point of one training process started by torchrun or the deepspeed launcher.

    python -m qarm_core.embed.worker JOB_JSON [--local_rank=N]

Reads the job written by ``train.write_job``, trains (rank/world from the launcher's environment)
and exits 0; rank 0 writes ``train_record.json`` next to the model, every rank marks itself done
(``record.mark_rank_done``) before it exits. A rank that fails prints its traceback and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("job")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the deepspeed launcher passes it
    args = ap.parse_args(argv)

    import faulthandler

    # a crash in native code (gloo, oneDNN, a C++ terminate) prints every thread's Python stack to
    # stderr, which the launcher's log keeps: it names the line the rank was on
    faulthandler.enable(all_threads=True)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from qarm_core.embed.train import run_job

    run_job(args.job)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def exit_now(code: int) -> None:
    """Flush and leave without the interpreter's teardown: the work is done and written, and the
    teardown of native thread pools and communication libraries (gloo, OpenMP) only adds a place
    to crash (a rank once aborted late in a finished CI run; where exactly was not found)."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_and_exit(argv: list[str] | None = None) -> None:
    """``main``, then ``exit_now`` whatever happened: 0 when it trained, argparse's code for a bad
    command line, 1 after printing the traceback when it raised (a collective that timed out, a
    missing job file). A failed rank must also skip the teardown: gloo's threads, still joinable
    after a timed-out collective, made the interpreter abort (SIGABRT, "terminate called without an
    active exception") after the real error was printed, so the exit code varied from run to run."""
    import traceback

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_now(code)


if __name__ == "__main__":
    run_and_exit()
