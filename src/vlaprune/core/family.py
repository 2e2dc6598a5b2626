"""What a model family is: its stacks, how they are coupled and which roles positions carry.

A family is data plus a small runner (how to drive one calibration forward pass). The data says
where each stack of transformer blocks lives (dotted module paths from the policy), which module's
input is the residual stream entering a block, which config field holds the depth, which stacks
must lose the same indices (lockstep), and which blocks have a role fixed by their position. The
runner knows the family's forward pass well enough to run the prefix once and the action expert at
chosen flow-matching timesteps. Nothing here guesses layer indices from parameter names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class StackSpec:
    """One stack of transformer blocks.

    ``layers`` is the dotted path (from the policy) of the ``nn.ModuleList`` of blocks; the input
    of ``block.<input_norm>`` is the residual stream entering the block, and the input of the
    module at ``final_norm`` is the output of the last block. Hooking these norms (not the blocks)
    works whether or not the family's forward calls the block modules (pi0's joint path does not).
    A stack with no final norm names instead, in ``final_output``, the module whose OUTPUT is the
    last block's (GR00T's VL self-attention transformer).
    """

    name: str
    layers: str
    final_norm: str | None
    input_norm: str = "input_layernorm"
    # the config entry holding the stack's depth (dotted into nested configs and dicts), which the
    # family's surgeon writes; None where the depth is not a config field (pi0)
    depth_key: str | None = None
    description: str = ""
    # submodules of a block whose outputs are added to the residual stream: zeroing them makes the
    # block an exact identity, which is how a removed block is "skipped" without surgery (verify)
    residual_branches: tuple[str, ...] = ("self_attn.o_proj", "mlp")
    final_output: str | None = None
    # the stack runs over the camera images in the prefix pass (a vision encoder), once per image with
    # (images, tokens, dim) states or once over one flat (tokens, dim) sequence of all of them: the states
    # of every call of a pass are stacked as examples (a flat sequence is one example), every token real
    per_image: bool = False
    # planned only when the user names it (``--plan.stacks``); a plan that does not name it keeps all of it
    opt_in: bool = False

    def __post_init__(self) -> None:
        if (self.final_norm is None) == (self.final_output is None):
            raise ValueError(f"stack {self.name!r}: give exactly one of final_norm and final_output")

    def stream_points(self, policy: nn.Module, layers: nn.ModuleList) -> list[StreamPoint]:
        """Where the L+1 residual states of this stack can be observed: each block's input norm
        (its input), then the final norm (its input) or the final module (its output)."""
        points = [StreamPoint(resolve(block, self.input_norm), output=False) for block in layers]
        if self.final_norm is not None:
            return [*points, StreamPoint(resolve(policy, self.final_norm), output=False)]
        assert self.final_output is not None
        return [*points, StreamPoint(resolve(policy, self.final_output), output=True)]


@dataclass(frozen=True)
class StreamPoint:
    """A module whose input (``output=False``: its first argument) or output is a residual state."""

    module: nn.Module
    output: bool

    def hook(self, fn: Callable[[Any], None]) -> Any:
        """Call ``fn(state)`` each time the state passes; returns the removable hook handle."""
        if self.output:
            return self.module.register_forward_hook(lambda _m, _args, out: fn(out))

        def pre(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            fn(args[0] if args else kwargs.get("hidden_states", kwargs.get("x")))

        return self.module.register_forward_pre_hook(pre, with_kwargs=True)


@dataclass(frozen=True)
class RoleRule:
    """Role of a block decided by its position: ``role(i) = residue_roles.get(i % period, default)``,
    or ``role_of(config, i)`` where a residue table cannot say it.

    ``period`` is either a number or the name of a field of the config. The config is the object at
    ``config_path`` from the policy (LeRobot's policy config by default; GR00T keeps its structure in
    the base model's config). ``when`` optionally names a config predicate under which the rule
    applies (for example SmolVLA's cross-attention mode). A kept block must keep its role at its new
    position; shapes catch some violations, not all.
    """

    stack: str
    why: str
    period: int | str = 0
    residue_roles: tuple[tuple[int, str], ...] = ()
    default: str = ""
    when: Callable[[Any], bool] | None = None
    role_of: Callable[[Any, int], str] | None = None
    config_path: str = "config"

    def roles(self, config: Any, num_layers: int) -> list[str] | None:
        """Role of every position in a stack of ``num_layers`` blocks, or None if it does not apply."""
        if self.when is not None and not self.when(config):
            return None
        if self.role_of is not None:
            return [self.role_of(config, i) for i in range(num_layers)]
        period = getattr(config, self.period) if isinstance(self.period, str) else self.period
        if period is None or int(period) <= 0:
            return None
        table = dict(self.residue_roles)
        return [table.get(i % int(period), self.default) for i in range(num_layers)]


@dataclass(frozen=True)
class Protection:
    """Blocks of a stack that a plan must keep, decided by the model (``blocks(policy)``), and why.

    GR00T N1.7 adds deepstack visual features into its first language layers by loop position:
    removing one of them would move a feature into another layer. ``name`` is what a user passes to
    ``--plan.allow`` to lift the protection knowingly (the family's ``reference`` then says what the
    pruned model computes instead).
    """

    name: str
    stack: str
    blocks: Callable[[Any], Sequence[int]]
    why: str


@dataclass
class PrefixPass:
    """What the prefix pass leaves for the expert passes of the same batch."""

    pad_mask: Tensor  # (batch, prefix_tokens) bool, True = real token
    cache: Any  # family-specific KV cache
    actions: Tensor  # (batch, chunk, max_action_dim) padded ground-truth actions
    extra: dict[str, Any] = field(default_factory=dict)


class FlowRunner(Protocol):
    """Drives the forward passes of a flow-matching VLA that vlaprune needs: the calibration pass
    (prefix once, expert per timestep) and, for verification and damage, the training loss and a
    sampled action chunk at fixed noise.

    Flow time follows LeRobot's pi0 / SmolVLA convention whatever the family's own: ``t = 1`` is pure
    noise, ``t = 0`` the data, ``x_t = t·noise + (1 − t)·actions`` (GR00T's runner converts).
    """

    def prefix(self, policy: Any, batch: dict[str, Any]) -> PrefixPass:
        """Run the VLM over images, language (and state) tokens; fill the KV cache."""
        ...

    def expert(self, policy: Any, prefix: PrefixPass, x_t: Tensor, t: Tensor) -> Tensor:
        """Run the action expert on the noisy chunk ``x_t`` at flow time ``t``; return its output."""
        ...

    def action_shape(self, policy: Any, batch: dict[str, Any]) -> tuple[int, int, int]:
        """(batch, chunk, padded action dim) of the noise the expert denoises for ``batch``."""
        ...

    def flow_loss(self, policy: Any, batch: dict[str, Any], noise: Tensor, time: Tensor) -> Tensor:
        """The family's per-element flow-matching training loss (batch, chunk, action dim) at fixed
        noise and time (one time per sample)."""
        ...

    def chunk(self, policy: Any, batch: dict[str, Any], noise: Tensor) -> Tensor:
        """A sampled action chunk (batch, chunk, action dim) from fixed noise: prefix + every denoising step."""
        ...


class ModelForwardRunner:
    """``flow_loss`` / ``chunk`` of families whose ``policy.model`` has LeRobot's pi0-style
    ``forward(*inputs, actions, noise, time)`` and ``sample_actions(*inputs, noise=...)`` (pi0, pi0.5,
    SmolVLA); subclasses give ``inputs``, the observation arguments of both."""

    def inputs(self, policy: Any, batch: dict[str, Any]) -> tuple[Any, ...]:
        raise NotImplementedError

    def action_shape(self, policy: Any, batch: dict[str, Any]) -> tuple[int, int, int]:
        from lerobot.utils.constants import OBS_STATE

        cfg = policy.config
        return (int(batch[OBS_STATE].shape[0]), int(cfg.chunk_size), int(cfg.max_action_dim))

    def flow_loss(self, policy: Any, batch: dict[str, Any], noise: Tensor, time: Tensor) -> Tensor:
        actions = policy.prepare_action(batch)
        return policy.model.forward(*self.inputs(policy, batch), actions, noise, time)

    def chunk(self, policy: Any, batch: dict[str, Any], noise: Tensor) -> Tensor:
        return policy.model.sample_actions(*self.inputs(policy, batch), noise=noise)


class Surgeon(Protocol):
    """How a family expresses a pruned policy: its config, and a fresh (untrained) policy of that config.

    Surgery (``vlaprune.core.surgery``) then loads the source's state dict, renumbered per stack, strictly.
    ``kept`` holds ORIGINAL indices of the source policy per stack.
    """

    def pruned_config(self, policy: Any, kept: Mapping[str, Sequence[int]]) -> Any:
        """The LeRobot config of the pruned policy (a new object; the source config is untouched)."""
        ...

    def build(self, config: Any) -> Any:
        """A fresh policy of ``config``, float32, on the default device (surgery builds it on the meta
        device and then gives it the source's tensors)."""
        ...


@dataclass(frozen=True)
class Family:
    """A model family: stacks, coupling and role rules as data, plus its forward runner."""

    name: str
    policy_types: tuple[str, ...]  # LeRobot config ``type`` names handled by this family
    stacks: tuple[StackSpec, ...]
    prefix_stacks: tuple[str, ...]  # stacks that run in the prefix pass
    expert_stacks: tuple[str, ...]  # stacks that run once per flow timestep
    runner: FlowRunner  # drives the family's forward passes (calibration, loss, action chunk)
    surgeon: Surgeon  # expresses a pruned policy of the family (config + fresh policy)
    lockstep: tuple[tuple[str, ...], ...] = ()  # stacks that must lose the same indices
    role_rules: tuple[RoleRule, ...] = ()
    protections: tuple[Protection, ...] = ()
    notes: tuple[str, ...] = ()
    # modules of the VLM backbone (vision encoder, connector, language model): what LeRobot's
    # ``train_expert_only`` freezes; everything else is the action head
    backbone: tuple[str, ...] = ()
    # ``reference(policy, kept)``: a context in which the source, with the removed blocks skipped,
    # computes what the pruned policy computes where pruning changes more than skipping (GR00T N1.7
    # with deepstack layers removed: the features enter the kept layers at their new positions)
    reference: Callable[[Any, Mapping[str, Sequence[int]]], AbstractContextManager[None]] | None = None
    # how a user loads a pruned checkpoint of this family ({path} = the checkpoint directory)
    load_hint: str = "train it: lerobot-train --policy.path={path} ...; evaluate it: lerobot-eval --policy.path={path}"

    def __post_init__(self) -> None:
        names = [s.name for s in self.stacks]
        if len(set(names)) != len(names):
            raise ValueError(f"family {self.name!r}: duplicate stack names {names}")
        for group in (self.prefix_stacks, self.expert_stacks, *self.lockstep):
            unknown = set(group) - set(names)
            if unknown:
                raise ValueError(f"family {self.name!r}: unknown stacks {sorted(unknown)}; stacks: {names}")
        for kind, stack in [("role rule", r.stack) for r in self.role_rules] + [
                ("protection", p.stack) for p in self.protections]:
            if stack not in names:
                raise ValueError(f"family {self.name!r}: {kind} for unknown stack {stack!r}")

    def stack(self, name: str) -> StackSpec:
        for spec in self.stacks:
            if spec.name == name:
                return spec
        raise KeyError(f"family {self.name!r} has no stack {name!r}; stacks: {[s.name for s in self.stacks]}")

    def layers(self, policy: nn.Module, stack: str) -> nn.ModuleList:
        module = resolve(policy, self.stack(stack).layers)
        if not isinstance(module, nn.ModuleList):
            raise TypeError(f"{self.name}: {self.stack(stack).layers} is {type(module).__name__}, not a ModuleList")
        return module

    def depths(self, policy: nn.Module) -> dict[str, int]:
        return {spec.name: len(self.layers(policy, spec.name)) for spec in self.stacks}

    def default_planned(self) -> tuple[str, ...]:
        """The stacks a budget applies to when the user names none: all but the opt-in ones."""
        return tuple(s.name for s in self.stacks if not s.opt_in)

    def complete(self, policy: nn.Module, kept: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
        """``kept`` for every stack: an opt-in stack it does not name keeps all its blocks; a stack it
        does not know, or a missing stack that is always planned, raises."""
        depths = self.depths(policy)
        unknown = sorted(set(kept) - set(depths))
        if unknown:
            raise ValueError(f"the plan names stack(s) {unknown}, which {self.name} does not have; its stacks: "
                             f"{', '.join(depths)}")
        missing = sorted(set(self.default_planned()) - set(kept))
        if missing:
            raise ValueError(f"the plan names no kept blocks for stack(s) {missing} of {self.name}")
        return {name: list(kept[name]) if name in kept else list(range(depth)) for name, depth in depths.items()}

    def roles(self, policy: nn.Module) -> dict[str, list[str]]:
        """Role of each block per stack, for the stacks whose roles are fixed by position."""
        depths = self.depths(policy)
        out: dict[str, list[str]] = {}
        for rule in self.role_rules:
            roles = rule.roles(resolve(policy, rule.config_path), depths[rule.stack])
            if roles is not None:
                out[rule.stack] = roles
        return out

    def protected(self, policy: nn.Module, allow: Sequence[str] = ()) -> dict[str, dict[int, str]]:
        """Per stack, the blocks the family's rules keep, each with the reason; ``allow`` names
        protections lifted by the user (unknown names raise, listing the family's)."""
        unknown = sorted(set(allow) - {rule.name for rule in self.protections})
        if unknown:
            names = [rule.name for rule in self.protections] or ["none"]
            raise ValueError(f"--plan.allow={list(allow)}: {unknown} name no protection of {self.name}; its "
                             f"protections: {', '.join(names)}")
        out: dict[str, dict[int, str]] = {}
        for rule in self.protections:
            if rule.name in allow:
                continue
            for index in rule.blocks(policy):
                out.setdefault(rule.stack, {})[int(index)] = rule.why
        return out

    def describe(self, policy: nn.Module) -> dict[str, Any]:
        """JSON-ready summary of the family's structure for one policy (saved with every analysis)."""
        return {
            "family": self.name,
            "stacks": {s.name: {"path": s.layers, "depth_key": s.depth_key, "description": s.description,
                                "opt_in": s.opt_in} for s in self.stacks},
            "prefix_stacks": list(self.prefix_stacks),
            "expert_stacks": list(self.expert_stacks),
            "lockstep": [list(g) for g in self.lockstep],
            "roles": self.roles(policy),
            "role_rules": [{"stack": r.stack, "period": r.period if r.role_of is None else None, "why": r.why}
                           for r in self.role_rules],
            "protected": {stack: sorted(blocks) for stack, blocks in self.protected(policy).items()},
            "notes": list(self.notes),
        }


def resolve(root: nn.Module, dotted: str) -> Any:
    """``resolve(policy, "model.a.b")`` → ``policy.model.a.b``, with an error naming the missing part."""
    obj: Any = root
    for i, part in enumerate(dotted.split(".")):
        if not hasattr(obj, part):
            done = ".".join(dotted.split(".")[:i]) or type(root).__name__
            raise AttributeError(f"{done} has no attribute {part!r} (resolving {dotted!r})")
        obj = getattr(obj, part)
    return obj


_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Register a family for its policy types; a type claimed twice raises."""
    for ptype in family.policy_types:
        if ptype in _REGISTRY:
            raise ValueError(f"policy type {ptype!r} already handled by family {_REGISTRY[ptype].name!r}")
    for ptype in family.policy_types:
        _REGISTRY[ptype] = family
    return family


def supported_types() -> list[str]:
    return sorted(_REGISTRY)


def policy_type(policy: Any) -> str:
    """A LeRobot policy config's ``type``, or a transformers config's ``model_type`` (Isaac-GR00T N1.5)."""
    config = policy.config
    return str(getattr(config, "type", None) or getattr(config, "model_type", ""))


def family_for(policy_or_type: Any) -> Family:
    """The family of a policy (or of a LeRobot policy type name)."""
    ptype = policy_or_type if isinstance(policy_or_type, str) else policy_type(policy_or_type)
    try:
        return _REGISTRY[ptype]
    except KeyError:
        raise ValueError(
            f"policy type {ptype!r} is not supported; supported types: {', '.join(supported_types())}"
        ) from None


def check_positions(what: str, positions: Sequence[int], depth: int) -> None:
    """Surgeons' check of a kept list given in positions of the policy being pruned."""
    if not positions or list(positions) != sorted(set(positions)) or not 0 <= positions[0] <= positions[-1] < depth:
        raise ValueError(f"{what} {list(positions)} must be non-empty, sorted, unique indices in range({depth}) of "
                         "this policy")


@torch.no_grad()
def flow_loss(family: Family, policy: Any, batch: dict[str, Any], noise: Tensor, time: Tensor) -> Tensor:
    """The family's per-element flow-matching training loss (batch, chunk, action dim), fixed noise/time."""
    return family.runner.flow_loss(policy, batch, noise, time)


@torch.no_grad()
def action_chunk(family: Family, policy: Any, batch: dict[str, Any], noise: Tensor) -> Tensor:
    """A sampled action chunk (batch, chunk, action dim) from fixed noise: prefix + all denoising steps."""
    return family.runner.chunk(policy, batch, noise)


def noise_shape(family: Family, policy: Any, batch: dict[str, Any]) -> tuple[int, int, int]:
    """(batch, chunk, padded action dim): the shape of the noise ``action_chunk`` takes for ``batch``."""
    return family.runner.action_shape(policy, batch)
