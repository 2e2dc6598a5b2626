"""Compact storage of trained weights: large matrices as int8 with one scale per row.

A 2-D floating tensor of at least ``min_numel`` elements is stored as ``q`` (int8) and ``scale``
(float16, one per row) with ``q = round(w / scale)``, ``scale = max |row| / 127``: it reloads as
``q · scale``, within half a step (``scale / 2``) of every original element. Everything else (biases,
norms, small matrices) is stored as float32, exactly. The file is a safetensors file: a matrix
``name`` is the pair ``name`` (int8) and ``name:scale``; its metadata says the format.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "vlaprune.int8-rows.v1"
_SCALE = ":scale"


def quantize_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float16 per-row scales) of a 2-D tensor; an all-zero row gets scale 1."""
    if tensor.ndim != 2 or not tensor.is_floating_point():
        raise ValueError(f"row quantization takes a 2-D floating tensor, not {tuple(tensor.shape)} {tensor.dtype}")
    w = tensor.detach().to(torch.float32)
    peak = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(peak > 0, peak / 127, torch.ones_like(peak)).to(torch.float16)
    q = torch.round(w / scale.to(torch.float32)).clamp_(-127, 127).to(torch.int8)
    return q, scale.squeeze(1)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale.to(torch.float32)[:, None]


def save_quantized(tensors: dict[str, torch.Tensor], path: Path, *, min_numel: int = 65536,
                   metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` in this module's format, atomically."""
    from safetensors.torch import save_file

    stored: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(_SCALE):
            raise ValueError(f"tensor name {name!r} ends with {_SCALE!r}, which this format reserves")
        if tensor.ndim == 2 and tensor.is_floating_point() and tensor.numel() >= min_numel:
            stored[name], stored[name + _SCALE] = quantize_rows(tensor)
        else:
            stored[name] = tensor.detach().to(torch.float32) if tensor.is_floating_point() else tensor.detach()
    tmp = Path(path).with_name(Path(path).name + ".partial")
    save_file({k: v.contiguous() for k, v in stored.items()}, str(tmp), metadata={**(metadata or {}), "format": FORMAT})
    os.replace(tmp, path)


def load_quantized(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(float32 tensors, metadata) of a file written by :func:`save_quantized`."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format {metadata.get('format')!r})")
        raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name.endswith(_SCALE):
            continue
        scale = raw.get(name + _SCALE)
        if scale is None:
            tensors[name] = tensor
        elif tensor.dtype != torch.int8 or scale.shape != (tensor.shape[0],):
            raise ValueError(f"{path}: {name} is stored as {tensor.dtype} {tuple(tensor.shape)} with scales "
                             f"{tuple(scale.shape)}; expected int8 rows and one scale per row")
        else:
            tensors[name] = dequantize_rows(tensor, scale)
    return tensors, metadata
