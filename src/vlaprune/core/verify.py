"""Check a pruned policy against its source, and measure what a plan costs before any surgery.

Both use :func:`vlaprune.core.surgery.pruned_reference`: the source run with the removed blocks made exact
identities (plus the family's reference adjustments where its pruning changes more than that).
``verify_pruned`` demands that the pruned policy equals that reference (loss at fixed noise and
time, action chunk at fixed noise) within float32 tolerance; ``PlanDamage`` measures how
far that reference's action chunks move from the full source's, the real damage of a plan without
training, used to choose between candidate plans; ``PlanLoss`` measures that reference's training
loss on labelled frames, the score of the ``loss`` planner.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlaprune.core.family import Family, action_chunk, flow_loss, noise_shape
from vlaprune.core.surgery import pruned_reference

logger = logging.getLogger(__name__)


class VerificationError(RuntimeError):
    """The pruned policy does not compute what the source computes with the removed blocks skipped."""


def _noise_and_time(family: Family, policy: Any, batch: dict[str, Any], seed: int) -> tuple[Tensor, Tensor]:
    shape = noise_shape(family, policy, batch)  # (batch, chunk, padded action dim)
    device = next(policy.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=gen).to(device)
    time = (torch.rand(shape[0], generator=gen) * 0.9 + 0.05).to(device)
    return noise, time


@dataclass(frozen=True)
class VerifyReport:
    loss_max_abs_diff: float
    chunk_max_abs_diff: float
    tolerance: float

    def to_json(self) -> dict[str, float]:
        return {"loss_max_abs_diff": self.loss_max_abs_diff, "chunk_max_abs_diff": self.chunk_max_abs_diff,
                "tolerance": self.tolerance}


def verify_pruned(
    source: Any,
    pruned: Any,
    family: Family,
    kept: Mapping[str, Sequence[int]],
    batch: dict[str, Any],
    *,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> VerifyReport:
    """Pruned outputs must equal the source's with the removed blocks skipped (relative to output scale)."""
    noise, time = _noise_and_time(family, source, batch, seed)
    with pruned_reference(source, family, kept):
        ref_loss = flow_loss(family, source, batch, noise, time)
        ref_chunk = action_chunk(family, source, batch, noise)
    loss = flow_loss(family, pruned, batch, noise, time)
    chunk = action_chunk(family, pruned, batch, noise)
    report = VerifyReport(
        loss_max_abs_diff=float((loss - ref_loss).abs().max()),
        chunk_max_abs_diff=float((chunk - ref_chunk).abs().max()),
        tolerance=tolerance,
    )
    loss_scale = float(ref_loss.abs().max()) + 1.0
    chunk_scale = float(ref_chunk.abs().max()) + 1.0
    if report.loss_max_abs_diff > tolerance * loss_scale or report.chunk_max_abs_diff > tolerance * chunk_scale:
        raise VerificationError(
            f"pruned {family.name} policy differs from the source with the removed blocks skipped: "
            f"loss max |diff| {report.loss_max_abs_diff:.3g}, action chunk max |diff| "
            f"{report.chunk_max_abs_diff:.3g} (tolerance {tolerance} relative to output scale). "
            "This is a surgery bug: please report it with the plan."
        )
    logger.info("verified: loss max |diff| %.3g, chunk max |diff| %.3g", report.loss_max_abs_diff,
                report.chunk_max_abs_diff)
    return report


class PlanDamage:
    """``damage(kept)``: relative action-chunk deviation ``||a_skip − a_full|| / ||a_full||`` over
    held-out batches at fixed noise. The full source's chunks are computed once, when the meter is
    built, and reused for every candidate plan."""

    @torch.no_grad()
    def __init__(self, source: Any, family: Family, batches: Sequence[dict[str, Any]], *, seed: int = 0) -> None:
        self.source, self.family, self.batches = source, family, list(batches)
        self.noise = [_noise_and_time(family, source, batch, seed + i)[0] for i, batch in enumerate(self.batches)]
        self.full = [action_chunk(family, source, b, n) for b, n in zip(self.batches, self.noise, strict=True)]
        self.scale = sum(float(chunk.square().sum()) for chunk in self.full)
        if self.scale == 0.0:
            raise ValueError("the source policy's action chunks are all zero; cannot measure damage")

    @torch.no_grad()
    def __call__(self, kept: Mapping[str, Sequence[int]]) -> float:
        num = 0.0
        with pruned_reference(self.source, self.family, kept):
            for batch, noise, full in zip(self.batches, self.noise, self.full, strict=True):
                num += float((action_chunk(self.family, self.source, batch, noise) - full).square().sum())
        return (num / self.scale) ** 0.5


class PlanLoss:
    """``loss(kept)``: the training loss of the source with the removed blocks skipped, on labelled
    held-out batches at fixed noise and flow times (``draws`` pairs per batch), so that every plan
    meets the same noise. The loss is the family's flow-matching loss per element over the dataset's
    action dimensions, averaged over the steps before an episode's end (``action_is_pad``), as
    SmolVLA's ``lerobot-train`` loss is. ``full`` is the unpruned source's."""

    @torch.no_grad()
    def __init__(self, source: Any, family: Family, batches: Sequence[dict[str, Any]], *, seed: int = 0,
                 draws: int = 2) -> None:
        self.source, self.family, self.batches, self.draws = source, family, list(batches), draws
        unlabelled = [i for i, batch in enumerate(self.batches) if "action" not in batch]
        if unlabelled or not self.batches:
            raise ValueError("the loss planner needs calibration frames with action labels (a LeRobotDataset "
                             "with an 'action' feature); these have none: use a label-free method instead, "
                             "--plan.method=cka-dp (similarity) with --plan.refine (action-chunk damage)")
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        self.inputs = [(batch, *_noise_and_time(family, source, batch, seed + 1000 * d + i))
                       for i, batch in enumerate(self.batches) for d in range(draws)]
        self.full = self._loss()

    def _loss(self) -> float:
        total, count = 0.0, 0
        for batch, noise, time in self.inputs:
            losses = flow_loss(self.family, self.source, batch, noise, time)[..., : batch["action"].shape[-1]]
            if "action_is_pad" in batch:
                valid = ~batch["action_is_pad"].to(losses.device)
                total += float((losses * valid[:, :, None]).sum())
                count += int(valid.sum()) * losses.shape[-1]
            else:
                total += float(losses.sum())
                count += losses.numel()
        return total / max(count, 1)

    @torch.no_grad()
    def __call__(self, kept: Mapping[str, Sequence[int]]) -> float:
        with pruned_reference(self.source, self.family, kept):
            return self._loss()
