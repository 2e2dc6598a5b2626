"""Where a result came from: library versions and the machine it was measured on."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import torch


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("vlaprune", "lerobot", "transformers", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine_description(device: str | torch.device = "cpu") -> str:
    """The machine a measurement ran on, for results and tables: architecture, CPU cores, torch version
    and threads, and the GPU's name when ``device`` is a CUDA device."""
    text = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
    if str(device).startswith("cuda"):
        text += f", {torch.cuda.get_device_name(torch.device(device))}"
    return text
