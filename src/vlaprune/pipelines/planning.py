"""What every entry point needs to plan: the similarity pass over calibration batches, the planner's
view of a policy under its family's rules, and the choice of the plan to apply."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlaprune.core.capture import CaptureConfig, collect_residuals
from vlaprune.core.cka import CKAConfig, StreamingCKA, StreamingCosine, saturation_warning, top_direction_share
from vlaprune.core.family import Family
from vlaprune.core.plan import (
    LOSS,
    Budget,
    Plan,
    PlanProblem,
    StackProblem,
    candidate_plans,
    distinct_plans,
    greedy_evaluations,
    greedy_removal,
    path_cost,
    plan_removal,
    validate_kept,
)
from vlaprune.core.verify import PlanLoss
from vlaprune.families import family_for
from vlaprune.io.analysis import StackAnalysis
from vlaprune.pipelines.config import REFINE, PlanArgs

logger = logging.getLogger(__name__)


def compute_stack_cka(
    policy: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    family: Family | None = None,
    cka: CKAConfig | None = None,
    capture: CaptureConfig | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, StackAnalysis]:
    """Stream calibration batches through ``policy`` and return a CKA matrix per stack.

    Each pass folds its residual states into one streaming accumulator per stack and drops them,
    so memory does not grow with the number of batches. The expert stacks see one update per flow
    timestep per batch. The noise of batch ``i`` is seeded by ``(capture.seed, i)``, so a batch gets
    the same noise whichever process runs it.

    Under ``torch.distributed`` (e.g. ``torchrun`` or ``accelerate launch``), rank r runs batches
    r, r + W, ... and the accumulators are summed across ranks before the matrices are computed:
    the result equals one process running every batch (exactly, when no token subsampling is used).
    """
    family = family or family_for(policy)
    cka = cka or CKAConfig()
    capture = capture or CaptureConfig()
    rank, world = rank_and_world()
    depths = family.depths(policy)
    accumulators = {name: StreamingCKA(depth + 1, cka) for name, depth in depths.items()}
    cosines = {name: StreamingCosine(depth + 1) for name, depth in depths.items()}
    spectra: dict[str, list[float]] = {}  # top-direction share per state, from each stack's first update
    policy.eval()
    for index, batch in enumerate(batches):
        if index % world == rank:
            generator = torch.Generator().manual_seed(capture.seed * 1_000_003 + index)
            for recorded in collect_residuals(policy, family, batch, config=capture, generator=generator):
                accumulators[recorded.stack].update(recorded.states, recorded.mask)
                cosines[recorded.stack].update(recorded.states, recorded.mask)
                if recorded.stack not in spectra:
                    spectra[recorded.stack] = top_direction_share(recorded.states, recorded.mask,
                                                                  generator=torch.Generator().manual_seed(cka.seed))
                del recorded
        if on_batch is not None:
            on_batch(1)
    if world > 1:
        for acc in accumulators.values():
            acc.all_reduce()
        for cos in cosines.values():
            cos.all_reduce()
    results: dict[str, StackAnalysis] = {}
    for name, acc in accumulators.items():
        results[name] = StackAnalysis(
            name=name,
            num_layers=depths[name],
            cka=_as_tuples(acc.compute()),
            cosine=_as_tuples(cosines[name].compute()),
            num_updates=acc.num_updates,
            num_examples=acc.num_examples,
            top_direction=tuple(spectra[name]) if name in spectra else None,
        )
    return results


def _as_tuples(matrix: torch.Tensor) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in matrix.cpu().tolist())


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def settings_dict(cka: CKAConfig, capture: CaptureConfig) -> dict[str, Any]:
    return {"cka": asdict(cka), "capture": {"timesteps": list(capture.timesteps), "seed": capture.seed}}


def planned_stacks(family: Family, args: PlanArgs) -> tuple[str, ...]:
    """The stacks a plan covers: ``--plan.stacks``, else the family's default ones (all but opt-in stacks)
    and any stack ``--plan.keep`` or ``--plan.kept`` names. Lockstep partners are planned together."""
    names = [s.name for s in family.stacks]
    named = [*(args.keep or {}), *(args.kept or {})]
    chosen = list(args.stacks) if args.stacks is not None else [*family.default_planned(), *named]
    unknown = sorted(set(chosen) - set(names))
    if unknown or not chosen:
        raise ValueError(f"--plan.stacks={args.stacks}: {unknown or 'no stack'} is not a stack of {family.name}; its "
                         f"stacks: {', '.join(names)}")
    outside = sorted(set(named) - set(chosen))
    if outside:
        raise ValueError(f"--plan.keep / --plan.kept name {outside}, outside --plan.stacks={args.stacks}: add them "
                         "to --plan.stacks or leave them out")
    for group in family.lockstep:
        if set(group) & set(chosen) and not set(group) <= set(chosen):
            raise ValueError(f"--plan.stacks={args.stacks}: {family.name}'s stacks {list(group)} lose the same blocks "
                             "(lockstep), so they are planned together: name all of them or none")
    return tuple(name for name in names if name in chosen)


def build_problem(family: Family, policy: Any, stacks: dict[str, StackAnalysis], protect: list[int],
                  allow: list[str] | None = None, planned: tuple[str, ...] | None = None) -> PlanProblem:
    """The planner's view of a policy: CKA / cosine matrices of the ``planned`` stacks (default: the
    family's default ones) plus the family's rules (``allow`` lifts the family protections it names).
    Stacks outside the problem keep every block (``Family.complete``)."""
    planned = planned or family.default_planned()
    depths = {name: depth for name, depth in family.depths(policy).items() if name in planned}
    for name, depth in depths.items():
        if name not in stacks or stacks[name].num_layers != depth:
            found = stacks[name].num_layers if name in stacks else "no"
            raise ValueError(f"the analysis has {found} blocks for stack {name!r}; the policy has {depth}")
        bad = [i for i in protect if not 0 <= i < depth]
        if bad:
            raise ValueError(f"--plan.protect {bad} out of range for stack {name!r} with {depth} blocks")
    roles = family.roles(policy)
    by_family = family.protected(policy, allow or [])
    user_why = [f"--plan.protect={protect}"] if protect else []

    def why(name: str) -> str:
        return "; ".join([*sorted(set(by_family.get(name, {}).values())), *user_why])

    return PlanProblem(
        stacks=tuple(
            StackProblem(
                name=name,
                num_layers=depths[name],
                cka=np.array(stacks[name].cka, dtype=float),
                cosine=np.array(stacks[name].cosine, dtype=float),
                roles=tuple(roles[name]) if name in roles else None,
                protected=frozenset(protect) | frozenset(by_family.get(name, {})),
                protected_why=why(name),
            )
            for name in depths
        ),
        lockstep=tuple(group for group in family.lockstep if set(group) <= set(depths)),
    )


def warn_degenerate(stacks: dict[str, StackAnalysis], cka: CKAConfig) -> list[str]:
    """Log (and return) a warning per stack whose matrix cannot rank its blocks
    (:func:`vlaprune.core.cka.saturation_warning`): a plan is never made silently on one."""
    warnings = []
    for name, stack in stacks.items():
        warning = saturation_warning(name, torch.tensor(stack.cka), cka, stack.top_direction)
        if warning:
            logger.warning(warning)
            warnings.append(warning)
    return warnings


def load_analysis(path: Path) -> dict[str, StackAnalysis]:
    """The per-stack matrices of an ``analysis.json`` written by ``vlaprune analyze``."""
    data = json.loads(path.read_text())
    return {name: StackAnalysis.from_json(name, s) for name, s in data["stacks"].items()}


def refine_signal(setting: str) -> str | None:
    """The signal ``--plan.refine`` picks by (None = off). ``auto`` is the action-chunk damage, with or
    without action labels: over the MetaWorld study's fine-tuned units it ranks plans by success better
    than the training-loss increase does (``benchmarks/selection_signals.py``)."""
    if setting not in REFINE:
        raise ValueError(f"--plan.refine={setting!r} is unknown; choose one of {', '.join(REFINE)}")
    if setting == "off":
        return None
    if setting == "auto":
        return "damage"
    return setting


def choose_plan(
    args: PlanArgs, problem: PlanProblem, damage: Callable[[Plan], float], loss: Callable[[], PlanLoss] | None = None
) -> tuple[Plan, list[dict[str, Any]]]:
    """The plan to apply, and every candidate considered (with its cost and measured signals).

    ``loss`` builds the training-loss meter (called at most once); None when the calibration frames
    carry no action labels. With ``--plan.refine`` on, the pool is the requested plan, the loss plan
    (when ``loss`` is given) and :func:`candidate_plans`; each candidate's chunk damage and loss
    increase are measured and recorded, and the refine signal picks the lowest.
    """
    if args.kept is not None:
        validate_kept(problem, args.kept)
        kept = {name: tuple(idx) for name, idx in args.kept.items()}
        cost = sum(path_cost(s.cka, kept[s.name]) for s in problem.stacks)
        chosen = Plan(method="manual", kept=kept, cost=cost)
        return chosen, [{**chosen.to_json(), "damage": damage(chosen), "chosen": True}]
    # cka-run's --plan.run_threshold decides the depth itself; the pool then meets the depth it chose
    budget = None if args.run_threshold is not None else Budget(ratio=args.ratio, keep=args.keep,
                                                                threshold=args.threshold)
    signal = refine_signal(args.refine)
    if (args.method == LOSS or signal == LOSS) and loss is None:
        flag = "--plan.method" if args.method == LOSS else "--plan.refine"
        raise ValueError(f"{flag}={LOSS} needs demonstrations: it measures the training loss on calibration frames "
                         "with action labels, and synthetic frames carry random actions. Prune on a LeRobotDataset "
                         "(--dataset.repo_id, --dataset.root; bench: give the pruned checkpoint, --pruned.path) or "
                         "use the label-free --plan.method=cka-dp with --plan.refine=damage")
    meter: list[PlanLoss] = []

    def loss_of(kept: Mapping[str, tuple[int, ...]]) -> float:
        assert loss is not None
        if not meter:
            meter.append(loss())
        return meter[0](kept)

    def loss_plan(budget: Budget) -> Plan:
        logger.info("%s planner: at most %d training-loss evaluations", LOSS, greedy_evaluations(problem, budget))
        start = time.perf_counter()
        found = greedy_removal(problem, budget, loss_of)
        seconds = time.perf_counter() - start
        logger.info("%s planner: %d evaluations in %.1f s", LOSS, found.details["evaluations"], seconds)
        return replace(found, details={**found.details, "seconds": seconds})

    if args.method == LOSS:
        if budget is None:
            raise ValueError(f"--plan.run_threshold is the cka-run rule; --plan.method={LOSS} takes a budget "
                             "(--plan.ratio, --plan.keep or --plan.threshold)")
        requested = loss_plan(budget)
    else:
        requested = plan_removal(problem, budget, args.method, seed=args.seed, run_threshold=args.run_threshold)
    if signal is None:
        return requested, [{**requested.to_json(), "damage": None, "chosen": True}]
    depth = budget or Budget(keep={name: len(idx) for name, idx in requested.kept.items()})
    found = [loss_plan(depth)] if loss is not None and args.method != LOSS else []
    pool = distinct_plans([requested, *found, *candidate_plans(problem, depth)])
    records = []
    for plan in pool:
        record = {**plan.to_json(), "damage": damage(plan)}
        if loss is not None:
            value = loss_of(plan.kept)
            record["loss_increase"] = value - meter[0].full
        records.append(record)
    key = "loss_increase" if signal == LOSS else "damage"
    best = min(range(len(pool)), key=lambda i: records[i][key])
    logger.info("refine: %d candidates by %s; chose %s", len(pool), key.replace("_", " "), pool[best].method)
    return pool[best], [{**r, "chosen": i == best, "signal": key} for i, r in enumerate(records)]
