"""How a CPU rank's freed memory goes back to the OS (glibc's malloc thresholds).

glibc serves a block of at least its mmap threshold with its own mapping, unmapped on free; smaller
blocks come from the heap, whose freed space below a live block stays resident. The threshold adapts:
each freed mapped block raises it to that block's size (up to 32 MiB). Under ZeRO-3 every pass gathers
each block's weights into fresh buffers of 5-30 MB at Wan2.1-1.3B width and frees them again; once the
threshold has risen they come from the heap, and what they leave behind stays in the resident set
(~0.8 GiB per rank at 4 blocks of that width, the whole measured excess of ZeRO-3 over ZeRO-2;
BENCHMARKS.md, "ZeRO-2 vs ZeRO-3"). A fixed threshold stops the adaptation. There is no Python or torch
API for this, hence `mallopt` through ctypes; on GPU ranks the weights live in CUDA memory, untouched.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch

ENV_OVERRIDE = "MALLOC_MMAP_THRESHOLD_"  # set by the user: glibc reads it at start-up and we leave it be
MAX_THRESHOLD = 32 * 2**20  # glibc refuses larger values on 64-bit (HEAP_MAX_SIZE / 2)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


def fix_mmap_threshold(threshold: Optional[int], device: "torch.device") -> bool:
    """On a CPU rank under glibc: blocks of at least `threshold` bytes mapped (and unmapped on free), and
    the heap's free top given back past the same size. Returns whether the setting was applied (None,
    a GPU device, a user's MALLOC_MMAP_THRESHOLD_ or a libc without mallopt: left as it is)."""
    if threshold is None or device.type != "cpu" or ENV_OVERRIDE in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold))) and bool(mallopt(_M_TRIM_THRESHOLD, int(threshold)))
