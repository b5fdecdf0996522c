"""What torch's CPU thread settings are, as torch reports them."""

from __future__ import annotations

import re


def mkl_threads() -> int | None:
    """MKL's thread count (torch's float32 matmuls), which ``torch.get_num_threads()`` does not show:
    it reads OpenMP's. None: a torch build without MKL."""
    import torch

    m = re.search(r"mkl_get_max_threads\(\) : (\d+)", torch.__config__.parallel_info())
    return int(m.group(1)) if m else None
