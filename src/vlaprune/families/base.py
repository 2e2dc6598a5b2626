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
    """

    name: str
    layers: str
    final_norm: str
    input_norm: str = "input_layernorm"
    depth_key: str | None = None  # policy config field holding the depth, if any
    description: str = ""
    # submodules of a block whose outputs are added to the residual stream: zeroing them makes the
    # block an exact identity, which is how a removed block is "skipped" without surgery (verify)
    residual_branches: tuple[str, ...] = ("self_attn.o_proj", "mlp")


@dataclass(frozen=True)
class RoleRule:
    """Role of a block decided by its position: ``role(i) = residue_roles.get(i % period, default)``.

    ``period`` is either a number or the name of a policy-config field. ``when`` optionally names a
    config predicate under which the rule applies (for example SmolVLA's cross-attention mode).
    A kept block must keep its role at its new position; shapes catch some violations, not all.
    """

    stack: str
    period: int | str
    residue_roles: tuple[tuple[int, str], ...]
    default: str
    why: str
    when: Callable[[Any], bool] | None = None

    def roles(self, config: Any, num_layers: int) -> list[str] | None:
        """Role of every position in a stack of ``num_layers`` blocks, or None if it does not apply."""
        if self.when is not None and not self.when(config):
            return None
        period = getattr(config, self.period) if isinstance(self.period, str) else self.period
        if period is None or int(period) <= 0:
            return None
        table = dict(self.residue_roles)
        return [table.get(i % int(period), self.default) for i in range(num_layers)]


@dataclass
class PrefixPass:
    """What the prefix pass leaves for the expert passes of the same batch."""

    pad_mask: Tensor  # (batch, prefix_tokens) bool, True = real token
    cache: Any  # family-specific KV cache
    actions: Tensor  # (batch, chunk, max_action_dim) padded ground-truth actions
    extra: dict[str, Any] = field(default_factory=dict)


class FlowRunner(Protocol):
    """Drives one calibration forward pass of a flow-matching VLA (prefix once, expert per timestep)."""

    def prefix(self, policy: Any, batch: dict[str, Any]) -> PrefixPass:
        """Run the VLM over images, language (and state) tokens; fill the KV cache."""
        ...

    def expert(self, policy: Any, prefix: PrefixPass, x_t: Tensor, t: Tensor) -> Tensor:
        """Run the action expert on the noisy chunk ``x_t`` at flow time ``t``; return the velocity."""
        ...

    def inputs(self, policy: Any, batch: dict[str, Any]) -> tuple[Any, ...]:
        """The observation inputs of ``policy.model.forward`` / ``sample_actions`` (images, masks,
        language tokens and mask, and the state where the family takes it there)."""
        ...


class Surgeon(Protocol):
    """How a family expresses a pruned policy: its config, and a fresh (untrained) policy of that config.

    Surgery (``vlaprune.surgery``) then loads the source's state dict, renumbered per stack, strictly.
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
    lockstep: tuple[tuple[str, ...], ...] = ()  # stacks that must lose the same indices
    role_rules: tuple[RoleRule, ...] = ()
    notes: tuple[str, ...] = ()
    # modules of the VLM backbone (vision encoder, connector, language model): what LeRobot's
    # ``train_expert_only`` freezes; everything else is the action head
    backbone: tuple[str, ...] = ()
    runner: FlowRunner | None = None
    surgeon: Surgeon | None = None

    def __post_init__(self) -> None:
        names = [s.name for s in self.stacks]
        if len(set(names)) != len(names):
            raise ValueError(f"family {self.name!r}: duplicate stack names {names}")
        for group in (self.prefix_stacks, self.expert_stacks, *self.lockstep):
            unknown = set(group) - set(names)
            if unknown:
                raise ValueError(f"family {self.name!r}: unknown stacks {sorted(unknown)}; stacks: {names}")
        for rule in self.role_rules:
            if rule.stack not in names:
                raise ValueError(f"family {self.name!r}: role rule for unknown stack {rule.stack!r}")

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

    def roles(self, policy: nn.Module) -> dict[str, list[str]]:
        """Role of each block per stack, for the stacks whose roles are fixed by position."""
        depths = self.depths(policy)
        out: dict[str, list[str]] = {}
        for rule in self.role_rules:
            roles = rule.roles(policy.config, depths[rule.stack])
            if roles is not None:
                out[rule.stack] = roles
        return out

    def describe(self, policy: nn.Module) -> dict[str, Any]:
        """JSON-ready summary of the family's structure for one policy (saved with every analysis)."""
        return {
            "family": self.name,
            "stacks": {s.name: {"path": s.layers, "depth_key": s.depth_key, "description": s.description}
                       for s in self.stacks},
            "prefix_stacks": list(self.prefix_stacks),
            "expert_stacks": list(self.expert_stacks),
            "lockstep": [list(g) for g in self.lockstep],
            "roles": self.roles(policy),
            "role_rules": [{"stack": r.stack, "period": r.period, "why": r.why} for r in self.role_rules],
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


def family_for(policy_or_type: Any) -> Family:
    """The family of a policy (or of a LeRobot policy type name)."""
    ptype: str = policy_or_type if isinstance(policy_or_type, str) else policy_or_type.config.type
    try:
        return _REGISTRY[ptype]
    except KeyError:
        raise ValueError(
            f"policy type {ptype!r} is not supported; supported types: {', '.join(supported_types())}"
        ) from None


@torch.no_grad()
def flow_loss(family: Family, policy: Any, batch: dict[str, Any], noise: Tensor, time: Tensor) -> Tensor:
    """LeRobot's per-element flow-matching training loss (batch, chunk, max_action_dim), fixed noise/time."""
    assert family.runner is not None
    actions = policy.prepare_action(batch)
    return policy.model.forward(*family.runner.inputs(policy, batch), actions, noise, time)


@torch.no_grad()
def action_chunk(family: Family, policy: Any, batch: dict[str, Any], noise: Tensor) -> Tensor:
    """A sampled action chunk (batch, chunk, max_action_dim) from fixed noise: prefix + all denoising steps."""
    assert family.runner is not None
    return policy.model.sample_actions(*family.runner.inputs(policy, batch), noise=noise)
