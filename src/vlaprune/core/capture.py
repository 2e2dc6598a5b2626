"""Record the residual stream of every block of every stack during one calibration pass.

For a stack of L blocks we record L+1 states: the input of each block (index i = input of block i)
and the output of the last block (index L). Hooks sit on each block's input norm and on the
stack's final norm (or, for a stack without one, on the output of the module that ends it), whose
inputs are exactly these residual states; they fire whether or not the
family's forward calls the block modules themselves (pi0's joint path does not).

One pass = the prefix once (VLM stacks, with its padding mask) and then the action expert once per
flow-matching timestep, on ``x_t = t·noise + (1 − t)·actions`` with seeded noise, so the analysis
is deterministic and sees the states the expert sees in fine-tuning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vlaprune.core.family import Family, StackSpec

logger = logging.getLogger(__name__)

DEFAULT_TIMESTEPS: tuple[float, ...] = (0.9, 0.5, 0.1)


class CaptureError(RuntimeError):
    """A pass did not produce a complete, finite set of residual states."""


@dataclass(frozen=True)
class CaptureConfig:
    """Flow-matching timesteps (1 = pure noise, 0 = data) at which the expert is captured, and the noise seed."""

    timesteps: tuple[float, ...] = DEFAULT_TIMESTEPS
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.timesteps:
            raise ValueError("capture.timesteps is empty: give at least one flow timestep in [0, 1]")
        bad = [t for t in self.timesteps if not 0.0 <= t <= 1.0]
        if bad:
            raise ValueError(f"capture.timesteps must lie in [0, 1]; got {bad}")


@dataclass
class StackStates:
    """The L+1 residual states of one stack for one pass."""

    stack: str
    states: list[Tensor]  # L+1 tensors, each (batch, tokens, hidden)
    mask: Tensor | None  # (batch, tokens) bool, True = real token; None = all tokens real
    timestep: float | None  # flow time for expert stacks, None for prefix stacks


class ResidualRecorder:
    """Hooks on a stack's stream points (input norms, final norm or module); armed only while its phase runs."""

    def __init__(self, policy: nn.Module, spec: StackSpec, layers: nn.ModuleList) -> None:
        self.spec = spec
        self.num_layers = len(layers)
        self._points = spec.stream_points(policy, layers)
        self._slots: list[Tensor | None] = [None] * (self.num_layers + 1)
        self._calls: list[list[Tensor]] = [[] for _ in range(self.num_layers + 1)]  # per_image stacks
        self._armed = False
        self._stray_calls = 0

    def __enter__(self) -> ResidualRecorder:
        self._handles = [point.hook(self._hook(i)) for i, point in enumerate(self._points)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, index: int) -> Any:
        def hook(hidden: Any) -> None:
            if not self._armed:
                self._stray_calls += 1
                return
            if not isinstance(hidden, Tensor):
                raise CaptureError(f"stack {self.spec.name!r}: stream point {index} got no hidden-state tensor")
            if self.spec.per_image:  # one call per camera image: stacked as examples
                # (tokens, dim): every image of the pass in one flat sequence (Qwen3-VL), one example
                self._calls[index].append(hidden.detach() if hidden.dim() == 3 else hidden.detach()[None])
                return
            if self._slots[index] is not None:
                raise CaptureError(
                    f"stack {self.spec.name!r}: {_state_name(index, self.num_layers)} recorded twice in one pass "
                    "(gradient checkpointing or a repeated block?)"
                )
            self._slots[index] = hidden.detach()

        return hook

    def arm(self) -> None:
        self._slots = [None] * (self.num_layers + 1)
        self._calls = [[] for _ in range(self.num_layers + 1)]
        self._armed = True

    def take(self) -> list[Tensor]:
        """The recorded states of the pass just run; errors if any is missing or not finite."""
        self._armed = False
        if self._stray_calls:
            raise CaptureError(
                f"stack {self.spec.name!r} ran {self._stray_calls} norm calls outside its phase; "
                "the family's forward does not match its adapter"
            )
        if self.spec.per_image:
            counts = {len(calls) for calls in self._calls}
            if len(counts) != 1:
                raise CaptureError(f"stack {self.spec.name!r}: its stream points ran {sorted(counts)} times in one "
                                   "pass; each must run once per image")
            self._slots = [torch.cat(calls) if calls else None for calls in self._calls]
        states: list[Tensor] = []
        for i, state in enumerate(self._slots):
            name = _state_name(i, self.num_layers)
            if state is None:
                raise CaptureError(f"stack {self.spec.name!r}: {name} was not reached by the forward pass")
            if not torch.isfinite(state).all():
                raise CaptureError(
                    f"stack {self.spec.name!r}: {name} contains NaN or Inf; check the calibration inputs "
                    "and the policy weights"
                )
            states.append(state)
        self._slots = [None] * (self.num_layers + 1)
        return states


def _state_name(index: int, num_layers: int) -> str:
    return f"output of block {num_layers - 1}" if index == num_layers else f"input of block {index}"


@torch.no_grad()
def collect_residuals(
    policy: nn.Module,
    family: Family,
    batch: dict[str, Any],
    *,
    config: CaptureConfig,
    generator: torch.Generator,
) -> Iterator[StackStates]:
    """Run one calibration pass and yield each stack's residual states as soon as they exist.

    States are yielded (not returned) so the caller can fold them into CKA accumulators and drop
    them before the next phase: memory holds one phase of one batch, whatever the number of batches.
    """
    runner = family.runner
    with ExitStack() as stack:
        recorders = {
            spec.name: stack.enter_context(ResidualRecorder(policy, spec, family.layers(policy, spec.name)))
            for spec in family.stacks
        }
        for name in family.prefix_stacks:
            recorders[name].arm()
        prefix = runner.prefix(policy, batch)
        for name in family.prefix_stacks:
            mask = None if family.stack(name).per_image else prefix.pad_mask.bool()
            yield StackStates(name, recorders[name].take(), mask, None)

        actions = prefix.actions.float()  # (batch, chunk, max_action_dim)
        noise = torch.randn(actions.shape, generator=generator, dtype=torch.float32).to(actions.device)
        for t in config.timesteps:
            time = torch.full((actions.shape[0],), float(t), dtype=torch.float32, device=actions.device)
            x_t = t * noise + (1.0 - t) * actions
            for name in family.expert_stacks:
                recorders[name].arm()
            runner.expert(policy, prefix, x_t, time)
            for name in family.expert_stacks:
                yield StackStates(name, recorders[name].take(), None, float(t))
