"""``vlaprune prune``: source policy + calibration data → a verified pruned LeRobot checkpoint.

analyse (or reuse analysis.json) → plan under the family's rules and the budget → refine: measure the
real damage of the cheapest candidate plans on held-out batches, keep the least damaging → surgery →
verify against the source with the removed blocks skipped → save (atomically) with the manifest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .analyze import StackAnalysis, compute_stack_cka, library_versions, settings_dict
from .calibration import CalibrationConfig, calibration_batches, describe_calibration
from .checkpoint import original_indices, read_manifest, save_pruned
from .config import PlanArgs, PruneConfig
from .families import family_for
from .families.base import Family, policy_type
from .flops import chunk_flops, parameter_counts
from .outputs import prepare_output_dir
from .plan import (
    Budget,
    Plan,
    PlanProblem,
    StackProblem,
    candidate_plans,
    path_cost,
    plan_removal,
    validate_kept,
)
from .surgery import remove_blocks
from .verify import PlanDamage, verify_pruned

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneResult:
    out: Path
    plan: Plan
    manifest: dict[str, Any]
    pruned: Any  # the in-memory pruned policy that was saved


def build_problem(family: Family, policy: Any, stacks: dict[str, StackAnalysis], protect: list[int],
                  allow: list[str] | None = None) -> PlanProblem:
    """The planner's view of a policy: CKA / cosine matrices per stack plus the family's rules
    (``allow`` lifts the family protections it names)."""
    depths = family.depths(policy)
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
        lockstep=family.lockstep,
    )


def load_analysis(path: Path) -> dict[str, StackAnalysis]:
    """The per-stack matrices of an ``analysis.json`` written by ``vlaprune analyze``."""
    data = json.loads(path.read_text())
    return {name: StackAnalysis.from_json(name, s) for name, s in data["stacks"].items()}


def choose_plan(
    args: PlanArgs, problem: PlanProblem, damage: Callable[[Plan], float]
) -> tuple[Plan, list[dict[str, Any]]]:
    """The plan to apply, and every candidate considered (with its cost and measured damage)."""
    if args.kept is not None:
        validate_kept(problem, args.kept)
        kept = {name: tuple(idx) for name, idx in args.kept.items()}
        cost = sum(path_cost(s.cka, kept[s.name]) for s in problem.stacks)
        chosen = Plan(method="manual", kept=kept, cost=cost)
        return chosen, [{**chosen.to_json(), "damage": damage(chosen), "chosen": True}]
    budget = Budget(ratio=args.ratio, keep=args.keep, threshold=args.threshold)
    requested = plan_removal(problem, budget, args.method, seed=args.seed, run_threshold=args.run_threshold)
    candidates = [requested]
    if args.refine > 1:
        for plan in candidate_plans(problem, budget, limit=args.refine, seed=args.seed):
            if len(candidates) >= args.refine:
                break
            if all(dict(plan.kept) != dict(c.kept) for c in candidates):
                candidates.append(plan)
    if args.refine == 0:
        return requested, [{**requested.to_json(), "damage": None, "chosen": True}]
    scored = [(damage(plan), plan) for plan in candidates]
    best = min(scored, key=lambda item: item[0])[1]
    return best, [{**plan.to_json(), "damage": d, "chosen": plan is best} for d, plan in scored]


def run_prune(cfg: PruneConfig, *, on_batch: Callable[[int], None] | None = None) -> PruneResult:
    """The ``vlaprune prune`` entry point. Nothing is written unless the pruned policy verifies."""
    from .policies import is_builtin, load_policy

    cfg.validate()
    assert cfg.policy.path and cfg.dataset.repo_id and cfg.out  # checked by validate()
    out = Path(cfg.out)
    prepare_output_dir(out, cfg.overwrite)
    bundle = load_policy(cfg.policy.path, seed=cfg.policy.seed, device=cfg.policy.device)
    source = bundle.policy
    family = family_for(source)
    calib = cfg.calibration.calibration()
    capture = cfg.calibration.capture()
    cka = cfg.cka.config()

    def batches(config: CalibrationConfig) -> list[dict[str, Any]]:
        return list(calibration_batches(source, bundle.preprocessor, repo_id=cfg.dataset.repo_id or "",
                                        root=cfg.dataset.root, config=config,
                                        allow_synthetic=is_builtin(cfg.policy.path or ""),
                                        synthetic=bundle.synthetic))

    # held-out frames: another seed (a LeRobotDataset may repeat a few frames; synthetic never does)
    holdout = batches(CalibrationConfig(num_samples=cfg.holdout_samples, batch_size=calib.batch_size,
                                        seed=calib.seed + 10_007))
    if cfg.analysis:
        stacks = load_analysis(Path(cfg.analysis))
    else:
        stacks = compute_stack_cka(source, batches(calib), family=family, cka=cka, capture=capture,
                                   on_batch=on_batch)
    problem = build_problem(family, source, stacks, cfg.plan.protect, cfg.plan.allow)
    meter: list[PlanDamage] = []  # built on first use: the full source's chunks are computed once

    def damage(plan: Plan) -> float:
        if not meter:
            meter.append(PlanDamage(source, family, holdout))
        return meter[0](plan.kept)

    plan, candidates = choose_plan(cfg.plan, problem, damage)
    kept = {name: list(idx) for name, idx in plan.kept.items()}

    pruned = remove_blocks(source, family, kept)
    report = verify_pruned(source, pruned, family, kept, holdout[0], tolerance=cfg.tolerance)
    flops_full, flops_pruned = chunk_flops(family, source, holdout[0]), chunk_flops(family, pruned, holdout[0])

    source_manifest = read_manifest(Path(cfg.policy.path)) if Path(cfg.policy.path).is_dir() else None
    kept_original = original_indices(source_manifest, kept)
    depths = family.depths(source)
    manifest: dict[str, Any] = {
        "family": family.name,
        "policy_type": policy_type(pruned),
        "source": cfg.policy.path,
        "method": plan.method,
        "requested_method": "manual" if cfg.plan.kept is not None else cfg.plan.method,
        "stacks": {
            name: {
                "kept": kept[name],
                "removed": [i for i in range(depths[name]) if i not in kept[name]],
                "source_num_layers": depths[name],
                "kept_original": kept_original[name],
            }
            for name in depths
        },
        "plan": plan.to_json(),
        "candidates": candidates,
        "verify": report.to_json(),
        "parameters": {"source": parameter_counts(source), "pruned": parameter_counts(pruned)},
        "chunk_linear_flops": {"source": flops_full, "pruned": flops_pruned,
                               "predicted_time_ratio": flops_pruned / flops_full},
        "calibration": {**describe_calibration(cfg.dataset.repo_id, cfg.dataset.root, calib),
                        "holdout_samples": cfg.holdout_samples, "analysis": cfg.analysis},
        "settings": {**settings_dict(cka, capture), "budget": {"ratio": cfg.plan.ratio, "keep": cfg.plan.keep,
                     "threshold": cfg.plan.threshold}, "refine": cfg.plan.refine, "protect": cfg.plan.protect,
                     "allow": cfg.plan.allow, "tolerance": cfg.tolerance},
        "versions": library_versions(),
    }
    save_pruned(pruned, bundle, manifest, out, overwrite=cfg.overwrite)
    return PruneResult(out=out, plan=plan, manifest=manifest, pruned=pruned)
