"""Surgery: a fresh pruned policy from the pruned config and the source's renumbered state dict.

The source policy is never modified. The pruned policy is built by the family's surgeon from its
pruned config (the same classes LeRobot's loaders build) on the meta device, then takes the source's
tensors renumbered per stack (``<stack>.layers.<orig_idx>.`` → ``<stack>.layers.<new_idx>.``,
removed blocks dropped); its state dict must equal the source's renumbered one, names and shapes:
a checkpoint written from it is valid by construction.

``skip_blocks`` is the independent reference: it runs the SOURCE policy with the removed blocks made
exact identities (their residual branches output zeros), without touching any module list. Verify
compares the two, so a surgery bug (a wrong renumbering, a role swap, a stale ``layer_idx``) shows.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from vlaprune.core.family import Family, resolve

logger = logging.getLogger(__name__)


def _stack_patterns(family: Family) -> dict[str, re.Pattern[str]]:
    return {spec.name: re.compile(rf"^{re.escape(spec.layers)}\.(\d+)(\..*)?$") for spec in family.stacks}


def renumber_state_dict(
    state_dict: Mapping[str, Tensor], family: Family, kept: Mapping[str, Sequence[int]]
) -> dict[str, Tensor]:
    """Keys of kept blocks renumbered 0..K-1 in their new order, keys of removed blocks dropped; the keys
    of a stack that ``kept`` does not name stay as they are."""
    patterns = {name: pattern for name, pattern in _stack_patterns(family).items() if name in kept}
    new_index = {name: {orig: new for new, orig in enumerate(kept[name])} for name in kept}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for name, pattern in patterns.items():
            match = pattern.match(key)
            if match:
                orig = int(match.group(1))
                if orig in new_index[name]:
                    spec = family.stack(name)
                    out[f"{spec.layers}.{new_index[name][orig]}{match.group(2) or ''}"] = value
                break
        else:
            out[key] = value
    return out


def remove_blocks(
    policy: Any, family: Family, kept: Mapping[str, Sequence[int]], *, share_weights: bool = False
) -> Any:
    """A new policy holding only the ``kept`` blocks (original indices per stack); ``policy`` is untouched.

    The pruned policy is built by the family's surgeon on the meta device (no memory, no random
    init), then every parameter, buffer and tensor attribute is taken from the source under its
    renumbered name: copied, or with ``share_weights`` the source's very objects (a pruned *view* for
    timing: no second copy of the weights, but training one trains the other). The result must hold
    exactly the source's renumbered state dict, names and shapes, or this raises.
    """
    kept = family.complete(policy, kept)
    depths = family.depths(policy)
    config = family.surgeon.pruned_config(policy, kept)
    device = getattr(config, "device", None)
    if device is not None:
        config.device = "meta"  # LeRobot's constructors move the model to config.device
    try:
        with torch.device("meta"):
            pruned = family.surgeon.build(config)
    finally:
        if device is not None:
            config.device = device
    _take_tensors(pruned, policy, _source_namer(family, kept), share=share_weights)
    expected = {k: tuple(v.shape) for k, v in renumber_state_dict(policy.state_dict(), family, kept).items()}
    got = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise RuntimeError(f"surgery of {family.name}: the pruned state dict differs from the source's renumbered "
                           f"one at {diff[:5]}")
    new_depths = family.depths(pruned)
    expected_depths = {name: len(kept[name]) for name in depths}
    if new_depths != expected_depths:
        raise RuntimeError(f"surgery produced depths {new_depths}, expected {expected_depths}")
    pruned.eval()
    return pruned


def _source_namer(family: Family, kept: Mapping[str, Sequence[int]]) -> Callable[[str], str]:
    """Dotted name in the pruned policy → the same object's name in the source."""
    patterns = _stack_patterns(family)

    def source_name(name: str) -> str:
        for stack, pattern in patterns.items():
            match = pattern.match(name)
            if match:
                return f"{family.stack(stack).layers}.{kept[stack][int(match.group(1))]}{match.group(2) or ''}"
        return name

    return source_name


def _take_tensors(
    pruned: nn.Module, source: nn.Module, source_name: Callable[[str], str], *, share: bool
) -> None:
    """Replace every meta tensor of ``pruned`` (parameters, buffers, plain tensor attributes) by the source's.

    Tied parameters stay tied (one new parameter per meta parameter object).
    """
    modules = dict(source.named_modules(remove_duplicate=False))
    made: dict[int, Tensor] = {}

    def take(meta: Tensor, src: Any, where: str) -> Tensor:
        if id(meta) in made:
            return made[id(meta)]
        if not isinstance(src, Tensor):
            raise RuntimeError(f"surgery: the source has no tensor for {where} of the pruned policy")
        if tuple(src.shape) != tuple(meta.shape):
            raise RuntimeError(f"surgery: shape mismatch at {where}: {tuple(meta.shape)} in the pruned policy, "
                               f"{tuple(src.shape)} in the source (a block moved to a position of another role?)")
        if share and isinstance(meta, nn.Parameter) == isinstance(src, nn.Parameter):
            out = src  # the very same parameter or buffer object
        else:
            data = src.detach() if share else src.detach().clone()
            out = nn.Parameter(data, requires_grad=meta.requires_grad) if isinstance(meta, nn.Parameter) else data
        made[id(meta)] = out
        return out

    for name, module in pruned.named_modules(remove_duplicate=False):
        src_name = source_name(name)
        if src_name not in modules:
            raise RuntimeError(f"surgery: module {name!r} of the pruned policy has no source module {src_name!r}")
        src_module = modules[src_name]
        for key, value in module._parameters.items():
            if value is not None and value.is_meta:
                module._parameters[key] = take(value, src_module._parameters.get(key), f"{name}.{key}")
        for key, value in module._buffers.items():
            if value is not None and value.is_meta:
                module._buffers[key] = take(value, src_module._buffers.get(key), f"{name}.{key}")
        for key, value in vars(module).items():
            if isinstance(value, Tensor) and value.is_meta:
                setattr(module, key, take(value, getattr(src_module, key, None), f"{name}.{key}"))


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


def removed_blocks(family: Family, policy: Any, kept: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Per stack, the original indices of ``policy``'s blocks that ``kept`` leaves out (an opt-in stack
    that ``kept`` does not name loses none)."""
    kept = family.complete(policy, kept)
    depths = family.depths(policy)
    return {name: [i for i in range(depth) if i not in set(kept[name])] for name, depth in depths.items()}


@contextmanager
def pruned_reference(policy: nn.Module, family: Family, kept: Mapping[str, Sequence[int]]) -> Iterator[None]:
    """Within the block, the source computes what a pruned policy keeping ``kept`` computes:
    :func:`skip_blocks` for the removed blocks, plus the family's ``reference`` where pruning changes
    more than skipping (GR00T N1.7 with deepstack layers removed)."""
    with ExitStack() as stack:
        stack.enter_context(skip_blocks(policy, family, removed_blocks(family, policy, kept)))
        if family.reference is not None:
            stack.enter_context(family.reference(policy, kept))
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
