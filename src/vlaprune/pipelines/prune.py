"""``vlaprune prune``: source policy + calibration data → a verified pruned LeRobot checkpoint.

analyse (or reuse analysis.json) → plan under the family's rules and the budget → refine: measure every
plan of the pool on held-out frames (training-loss increase, action-chunk damage), keep the lowest → surgery →
verify against the source with the removed blocks skipped → save (atomically) with the manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlaprune.core.family import policy_type
from vlaprune.core.flops import chunk_flops, parameter_counts
from vlaprune.core.plan import Plan
from vlaprune.core.surgery import remove_blocks
from vlaprune.core.verify import PlanDamage, PlanLoss, verify_pruned
from vlaprune.families import family_for
from vlaprune.io.calibration import SYNTHETIC, CalibrationConfig, calibration_batches, describe_calibration
from vlaprune.io.manifest import Manifest, StackRecord, original_indices, read_manifest, save_pruned
from vlaprune.io.outputs import prepare_output_dir
from vlaprune.io.provenance import library_versions
from vlaprune.models.loading import is_builtin, load_policy
from vlaprune.pipelines.config import PruneConfig
from vlaprune.pipelines.planning import (
    build_problem,
    choose_plan,
    compute_stack_cka,
    load_analysis,
    planned_stacks,
    refine_signal,
    settings_dict,
    warn_degenerate,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneResult:
    out: Path
    plan: Plan
    manifest: Manifest
    pruned: Any  # the in-memory pruned policy that was saved


def run_prune(cfg: PruneConfig, *, on_batch: Callable[[int], None] | None = None) -> PruneResult:
    """The ``vlaprune prune`` entry point. Nothing is written unless the pruned policy verifies."""

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
    holdout = batches(calib.holdout(cfg.holdout_samples))
    if cfg.analysis:
        stacks = load_analysis(Path(cfg.analysis))
    else:
        stacks = compute_stack_cka(source, batches(calib), family=family, cka=cka, capture=capture,
                                   on_batch=on_batch)
    if cfg.plan.kept is None:
        warn_degenerate(stacks, cka)
    planned = planned_stacks(family, cfg.plan)
    problem = build_problem(family, source, stacks, cfg.plan.protect, cfg.plan.allow, planned)
    meter: list[PlanDamage] = []  # built on first use: the full source's chunks are computed once

    def damage(plan: Plan) -> float:
        if not meter:
            meter.append(PlanDamage(source, family, holdout))
        return meter[0](plan.kept)

    labelled = cfg.dataset.repo_id != SYNTHETIC  # demonstrations carry action labels; synthetic frames do not
    plan, candidates = choose_plan(cfg.plan, problem, damage,
                                   (lambda: PlanLoss(source, family, holdout)) if labelled else None)
    kept = family.complete(source, plan.kept)  # stacks left out of the plan keep every block

    pruned = remove_blocks(source, family, kept)
    report = verify_pruned(source, pruned, family, kept, holdout[0], tolerance=cfg.tolerance)
    flops_full, flops_pruned = chunk_flops(family, source, holdout[0]), chunk_flops(family, pruned, holdout[0])

    source_manifest = read_manifest(Path(cfg.policy.path)) if Path(cfg.policy.path).is_dir() else None
    kept_original = original_indices(source_manifest, kept)
    depths = family.depths(source)
    manifest = Manifest(
        family=family.name,
        policy_type=policy_type(pruned),
        source=cfg.policy.path,
        method=plan.method,
        requested_method="manual" if cfg.plan.kept is not None else cfg.plan.method,
        stacks={name: StackRecord(kept=tuple(kept[name]), removed=tuple(i for i in range(depths[name])
                                                                        if i not in kept[name]),
                                  source_num_layers=depths[name], kept_original=tuple(kept_original[name]))
                for name in depths},
        plan=plan.to_json(),
        candidates=tuple(candidates),
        verify=report.to_json(),
        parameters={"source": parameter_counts(source), "pruned": parameter_counts(pruned)},
        chunk_linear_flops={"source": flops_full, "pruned": flops_pruned,
                            "predicted_time_ratio": flops_pruned / flops_full},
        calibration={**describe_calibration(cfg.dataset.repo_id, cfg.dataset.root, calib),
                     "holdout_samples": cfg.holdout_samples, "analysis": cfg.analysis},
        settings={**settings_dict(cka, capture), "budget": {"ratio": cfg.plan.ratio, "keep": cfg.plan.keep,
                  "threshold": cfg.plan.threshold}, "stacks": list(planned), "refine": cfg.plan.refine,
                  "refine_signal": refine_signal(cfg.plan.refine), "protect": cfg.plan.protect,
                  "allow": cfg.plan.allow, "tolerance": cfg.tolerance},
        versions=library_versions(),
    )
    if manifest.removed_nothing():
        logger.warning("the plan removes no block (%s): the checkpoint written to %s computes exactly what %s "
                       "computes", _budget_text(cfg), out, cfg.policy.path)
    save_pruned(pruned, bundle, manifest, out, overwrite=cfg.overwrite)
    return PruneResult(out=out, plan=plan, manifest=manifest, pruned=pruned)


def _budget_text(cfg: PruneConfig) -> str:
    return ", ".join(f"--plan.{name}={getattr(cfg.plan, name)}" for name in cfg.plan.budgets())
