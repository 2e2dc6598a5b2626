"""Surgery: a fresh pruned policy from the pruned config and the source's renumbered state dict.

The source policy is never modified. The pruned policy is built by the family's surgeon from its
pruned config (the same path LeRobot's loaders take), then the source state dict is renumbered per
stack (``<stack>.layers.<orig_idx>.`` → ``<stack>.layers.<new_idx>.``, removed blocks dropped) and
loaded with ``strict=True``: a checkpoint written from it is valid by construction.

``skip_blocks`` is the independent reference: it runs the SOURCE policy with the removed blocks made
exact identities (their residual branches output zeros), without touching any module list. Verify
compares the two, so a surgery bug (a wrong renumbering, a role swap, a stale ``layer_idx``) shows.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .families.base import Family, resolve

logger = logging.getLogger(__name__)


def renumber_state_dict(
    state_dict: Mapping[str, Tensor], family: Family, kept: Mapping[str, Sequence[int]]
) -> dict[str, Tensor]:
    """Keys of kept blocks renumbered 0..K-1 in their new order, keys of removed blocks dropped."""
    patterns = {
        spec.name: re.compile(rf"^{re.escape(spec.layers)}\.(\d+)\.(.*)$") for spec in family.stacks
    }
    new_index = {name: {orig: new for new, orig in enumerate(kept[name])} for name in kept}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for name, pattern in patterns.items():
            match = pattern.match(key)
            if match:
                orig = int(match.group(1))
                if orig in new_index[name]:
                    spec = family.stack(name)
                    out[f"{spec.layers}.{new_index[name][orig]}.{match.group(2)}"] = value
                break
        else:
            out[key] = value
    return out


def remove_blocks(policy: Any, family: Family, kept: Mapping[str, Sequence[int]]) -> Any:
    """A new policy holding only the ``kept`` blocks (original indices per stack); ``policy`` is untouched."""
    if family.surgeon is None:
        raise ValueError(f"family {family.name!r} cannot be pruned yet (no surgeon)")
    depths = family.depths(policy)
    missing = set(depths) - set(kept)
    if missing:
        raise ValueError(f"the plan names no kept blocks for stack(s) {sorted(missing)} of {family.name}")
    config = family.surgeon.pruned_config(policy, kept)
    pruned = family.surgeon.build(config)
    pruned.to(next(policy.parameters()).device)
    state = renumber_state_dict(policy.state_dict(), family, kept)
    result = pruned.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys  # strict=True raised otherwise
    new_depths = family.depths(pruned)
    expected = {name: len(kept[name]) for name in depths}
    if new_depths != expected:
        raise RuntimeError(f"surgery produced depths {new_depths}, expected {expected}")
    pruned.eval()
    return pruned


@contextmanager
def skip_blocks(policy: nn.Module, family: Family, removed: Mapping[str, Sequence[int]]) -> Iterator[None]:
    """Within the block, the ``removed`` blocks (original indices) of ``policy`` are exact identities.

    Forward hooks replace the outputs of each removed block's residual branches (attention output
    projection, MLP) with zeros, so the residual stream passes through unchanged. Independent of
    surgery by design: no module list, config or ``layer_idx`` is touched.
    """
    with ExitStack() as stack:
        for name, indices in removed.items():
            spec = family.stack(name)
            layers = family.layers(policy, name)
            for idx in indices:
                for branch in spec.residual_branches:
                    module = resolve(layers[idx], branch)
                    stack.enter_context(_zero_output(module))
        yield


@contextmanager
def _zero_output(module: nn.Module) -> Iterator[None]:
    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, Tensor):
            return torch.zeros_like(output)
        raise TypeError(f"{type(_module).__name__} returned {type(output).__name__}; cannot zero it")

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
