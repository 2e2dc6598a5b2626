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

from vlaprune.core.family import Family, action_chunk, noise_shape


def parameter_counts(policy: nn.Module) -> dict[str, int]:
    params = list(policy.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


@contextmanager
def _count_linear_flops(policy: nn.Module, family: Family) -> Iterator[dict[str, int]]:
    """FLOPs per part: each stack's blocks, and "other" (vision encoder, projections, heads)."""
    parts: dict[str, int] = {spec.name: 0 for spec in family.stacks}
    parts["other"] = 0
    prefixes = [(f"{spec.layers}.", spec.name) for spec in family.stacks]

    def make(part: str) -> Any:
        def hook(layer: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
            assert isinstance(layer, nn.Linear)
            rows = args[0].numel() // layer.in_features
            parts[part] += 2 * rows * layer.in_features * layer.out_features

        return hook

    handles = []
    for name, module in policy.named_modules():
        if isinstance(module, nn.Linear):
            part = next((p for prefix, p in prefixes if name.startswith(prefix)), "other")
            handles.append(module.register_forward_hook(make(part)))
    try:
        yield parts
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def chunk_flops_by_part(family: Family, policy: Any, batch: dict[str, Any]) -> dict[str, int]:
    """Linear-layer FLOPs of sampling one action chunk (prefix + every denoising step) for the
    observations in ``batch`` (zero noise), per stack and "other"."""
    noise = torch.zeros(noise_shape(family, policy, batch), device=next(policy.parameters()).device)
    with _count_linear_flops(policy, family) as parts:
        action_chunk(family, policy, batch, noise)
    return dict(parts)


def chunk_flops(family: Family, policy: Any, batch: dict[str, Any]) -> int:
    """Total linear-layer FLOPs of one action chunk."""
    return sum(chunk_flops_by_part(family, policy, batch).values())
