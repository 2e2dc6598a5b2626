"""Checks every pruned type needs, and vlaprune's loaders with them: kept lists, a checkpoint's tensors
against the policy its config builds, finite weights, dotted config paths.

LeRobot's loaders are lenient (``PI0Policy.from_pretrained`` prints a warning and keeps random layers;
the base loader only logs missing keys), so a checkpoint is compared with its policy here, key by key
and shape by shape, before anything is trusted. Nothing in this module imports LeRobot.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


class PrunedCheckpointError(ValueError):
    """A checkpoint whose tensors do not fit the policy its config builds, or hold non-finite values."""


def check_kept_list(what: str, kept: Any, depth_field: str, depth: Any) -> list[int]:
    """``kept`` as a list of sorted, unique ORIGINAL indices in ``range(depth)``, or a ValueError
    naming the field (``what``) and the fix."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"{depth_field}={depth!r}: must be a positive integer, the depth of the unpruned source")
    if not isinstance(kept, list | tuple) or not kept:
        raise ValueError(
            f"{what}={kept!r}: list the ORIGINAL indices (0..{depth - 1}) of the source blocks to keep, "
            "e.g. [0, 1, 2, 5]; vlaprune's surgery writes this list"
        )
    bad = [i for i in kept if isinstance(i, bool) or not isinstance(i, int)]
    if bad:
        raise ValueError(f"{what} holds non-integers {bad}: give original block indices as integers")
    outside = [i for i in kept if not 0 <= i < depth]
    if outside:
        raise ValueError(
            f"{what}={list(kept)} has {outside} outside range({depth}) ({depth_field}={depth}): "
            "use indices of the unpruned source, or set the source depth"
        )
    duplicates = sorted({i for i in kept if list(kept).count(i) > 1})
    if duplicates:
        raise ValueError(f"{what}={list(kept)} repeats {duplicates}: each source block is kept once")
    if list(kept) != sorted(kept):
        raise ValueError(
            f"{what}={list(kept)} is not sorted: kept blocks stay in their original order, write {sorted(kept)}"
        )
    return list(kept)


def weight_mismatch(policy: nn.Module, weights: Path) -> str | None:
    """What keeps ``weights`` (a safetensors file) from covering ``policy``'s state dict exactly, or None.

    Tensors that share storage in the policy (tied weights, saved once by ``save_model``) count as
    present when any of their names is in the file.
    """
    from safetensors import safe_open

    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: a checkpoint directory needs model.safetensors")
    with safe_open(str(weights), framework="pt") as f:
        saved = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    state = policy.state_dict()
    expected = {key: tuple(t.shape) for key, t in state.items()}
    aliases: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for key, tensor in state.items():
        aliases.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)),
                           []).append(key)
    covered = {key for group in aliases.values() if any(k in saved for k in group) for key in group}
    missing = sorted(set(expected) - set(saved) - covered)
    unexpected = sorted(set(saved) - set(expected))
    reshaped = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
    if not (missing or unexpected or reshaped):
        return None
    return "; ".join(
        f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("with other shapes", reshaped))
        if keys
    )


def check_weights(policy: nn.Module, weights: Path, what: str = "the policy its config builds") -> None:
    """Raise :class:`PrunedCheckpointError` unless ``weights`` covers ``policy``'s state dict exactly."""
    problem = weight_mismatch(policy, weights)
    if problem:
        raise PrunedCheckpointError(
            f"{weights} does not match {what}: {problem}. Loading it would leave random weights or drop tensors; "
            "check that the checkpoint's config (kept blocks, depths) belongs to these weights"
        )


def check_finite(module: nn.Module, where: str | Path) -> None:
    """Raise :class:`PrunedCheckpointError` naming the first parameter or buffer of ``module`` that holds
    NaN or Inf (a diverged or corrupted checkpoint loads without complaint otherwise)."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise PrunedCheckpointError(
                f"{where}: tensor {name!r} holds {bad} NaN or Inf value(s) of {tensor.numel()}: the checkpoint is "
                "corrupted or its training diverged; use an earlier checkpoint"
            )


def get_path(obj: Any, dotted: str) -> Any:
    """``get_path(config, "diffusion_model_cfg.num_layers")``: attributes, or keys of mappings, by dots."""
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, Mapping) else getattr(obj, part)
    return obj


def set_path(obj: Any, dotted: str, value: Any) -> None:
    """Set the attribute or mapping key that ``dotted`` names (see :func:`get_path`). Mappings on the
    way are replaced by edited copies, never changed in place: a config's nested dict may be a
    default shared with every other config of its class."""
    head, _, rest = dotted.partition(".")
    if rest:
        child = get_path(obj, head)
        if isinstance(child, Mapping):
            child = dict(child)
        set_path(child, rest, value)
        value = child
    if isinstance(obj, dict):
        obj[head] = value
    else:
        setattr(obj, head, value)
