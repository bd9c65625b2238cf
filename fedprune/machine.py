"""Which machine a result came from, in one line.

Runs are deterministic on one machine but not across CPUs (float32 kernels differ, and
training amplifies the last digits), so every run summary and every sweep invocation says
where it ran; a table mixing machines can then say which cells ran where.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str:
    """The GPUs nvidia-smi lists ("none" without nvidia-smi); never imports CUDA."""
    if not shutil.which("nvidia-smi"):
        return "none"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return ", ".join(out.stdout.split("\n")).strip(", ") or "none"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe_machine() -> str:
    """CPU model, cores, memory and GPU, e.g. 'x86_64, Intel(R) Xeon(R) Processor, 2 cores
    (2 usable), 24 GiB RAM, GPU: none'."""
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = psutil.virtual_memory().total / 2**30
    return (f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} cores ({usable} usable), "
            f"{ram:.0f} GiB RAM, GPU: {gpu_name()}")
