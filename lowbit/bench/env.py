"""What a benchmark ran on: device, versions, date and commit, recorded beside its numbers."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch


def environment(device: str = "cuda") -> dict:
    """The commit is $LOWBIT_COMMIT where set (the GPU machine gets a copy of the tree, not the repo)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    env = dict(torch=torch.__version__, triton=triton_version, python=platform.python_version(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               commit=os.environ.get("LOWBIT_COMMIT", commit))
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):  # the caching allocator's settings change step times
        env["alloc_conf"] = os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return dict(device=props.name, sms=props.multi_processor_count,
                    memory_GiB=round(props.total_memory / 2**30, 1), **env)
    return dict(device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", **env)
