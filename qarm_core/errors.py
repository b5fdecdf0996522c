"""Errors that name the stage, the dataset and what is wrong."""

from __future__ import annotations


class QarmError(Exception):
    """Base class of every error qarm raises on purpose."""


class ConfigError(QarmError):
    """The pipeline config is unreadable, has unknown keys or wrong types."""


class StorageError(QarmError):
    """A snapshot or pointer in QARM_HOME is missing or inconsistent."""


class DataError(QarmError):
    """Input data of a stage is unusable.

    The message always starts with ``[stage=..., dataset=...]`` so that a failed Prefect run or a CLI
    error tells the operator where to look without reading a traceback.
    """

    def __init__(self, stage: str, dataset: str, problem: str):
        self.stage = stage
        self.dataset = dataset
        self.problem = problem
        super().__init__(f"[stage={stage}, dataset={dataset}] {problem}")


class GateError(DataError):
    """A data gate failed; ``failures`` holds one entry per failed expectation."""

    def __init__(self, stage: str, dataset: str, failures: list[dict]):
        self.failures = failures
        lines = []
        for f in failures:
            sample = f.get("sample")
            sample_txt = f"; e.g. {sample}" if sample else ""
            lines.append(f"  - {f['expectation']}{_kwargs_txt(f.get('kwargs'))}: "
                         f"{f.get('unexpected_count', '?')} unexpected{sample_txt}")
        problem = f"gate failed, {len(failures)} expectation(s) not met:\n" + "\n".join(lines)
        super().__init__(stage, dataset, problem)


def _kwargs_txt(kwargs: dict | None) -> str:
    if not kwargs:
        return ""
    return "(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
