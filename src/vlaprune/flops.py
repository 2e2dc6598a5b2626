"""Parameter counts and the linear-layer FLOPs of one action chunk, for predicted speed-ups.

FLOPs are counted, not estimated: forward hooks on every ``nn.Linear`` add ``2 · in · out`` per row
they process while the policy samples one action chunk (prefix + every denoising step). Attention
score products and norms are not linear layers and are not counted; at VLA token counts the linear
layers carry most of the arithmetic, and the speed benchmark measures real time anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .families.base import Family, action_chunk


def parameter_counts(policy: nn.Module) -> dict[str, int]:
    params = list(policy.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


@contextmanager
def _count_linear_flops(module: nn.Module) -> Iterator[list[int]]:
    total = [0]

    def hook(layer: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
        assert isinstance(layer, nn.Linear)
        rows = args[0].numel() // layer.in_features
        total[0] += 2 * rows * layer.in_features * layer.out_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Linear)]
    try:
        yield total
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def chunk_flops(family: Family, policy: Any, batch: dict[str, Any]) -> int:
    """Linear-layer FLOPs of sampling one action chunk for the observations in ``batch`` (zero noise)."""
    from lerobot.utils.constants import OBS_STATE

    state = batch[OBS_STATE]  # (batch, state_dim): only its batch size and device are used
    cfg = policy.config
    noise = torch.zeros((state.shape[0], cfg.chunk_size, cfg.max_action_dim), device=state.device)
    with _count_linear_flops(policy) as total:
        action_chunk(family, policy, batch, noise)
    return total[0]
