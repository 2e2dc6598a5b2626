"""What the loss planner costs and what it finds, against the similarity plans, on a shipped model.

In one process, on ``--policy`` (default the pretrained-weights ``metaworld:smolvla``) and its shipped
calibration set (demonstrations of the held-out tasks):

1. one calibration pass as ``vlaprune analyze`` runs it (CKA and cosine matrices), timed;
2. the ``loss`` planner's greedy search at ``--ratio``, timed, with its number of loss evaluations
   against the bound ``greedy_evaluations``;
3. every plan (``loss`` and each similarity or baseline method) scored three ways on the same
   held-out frames: the cka-dp path cost, the training-free action-chunk damage that
   ``--plan.refine`` uses, and the training-loss increase that ``loss`` minimises.

    python benchmarks/loss_planner.py --out benchmarks/results/loss_planner_cpu.json

Writes the JSON and prints a table. Time it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from vlaprune.core.plan import METHODS, Budget, PlanError, greedy_evaluations, greedy_removal, plan_removal
from vlaprune.core.verify import PlanDamage, PlanLoss
from vlaprune.families import family_for
from vlaprune.io.calibration import CalibrationConfig, calibration_batches
from vlaprune.io.provenance import machine_description
from vlaprune.models import shipped
from vlaprune.models.loading import load_policy
from vlaprune.pipelines.config import CalibrationArgs, PruneConfig
from vlaprune.pipelines.planning import build_problem, compute_stack_cka


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default=shipped.SPEC, choices=tuple(shipped.MODELS))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = shipped.get(args.policy)
    bundle = load_policy(args.policy)
    policy, family = bundle.policy, family_for(bundle.policy)
    defaults, calibration = PruneConfig(), CalibrationArgs().calibration()  # what `vlaprune prune` uses

    def frames(config: CalibrationConfig) -> list[dict[str, Any]]:
        return list(calibration_batches(policy, bundle.preprocessor, repo_id=shipped.CALIBRATION_REPO_ID,
                                        root=model.calibration_root, config=config, allow_synthetic=False))

    holdout = frames(calibration.holdout(defaults.holdout_samples))
    calib = frames(calibration)
    start = time.perf_counter()
    stacks = compute_stack_cka(policy, calib, family=family)
    calibration_s = time.perf_counter() - start
    problem = build_problem(family, policy, stacks, [])
    budget = Budget(ratio=args.ratio)

    loss = PlanLoss(policy, family, holdout)
    damage = PlanDamage(policy, family, holdout)
    start = time.perf_counter()
    found = greedy_removal(problem, budget, loss)
    search_s = time.perf_counter() - start
    plans = [found]
    for method in METHODS:
        try:
            plans.append(plan_removal(problem, budget, method, seed=0))
        except PlanError as err:
            print(f"{method}: {err}")
    rows = [{"method": p.method, "kept": {k: list(v) for k, v in p.kept.items()}, "cka_cost": p.cost,
             "damage": damage(p.kept), "loss_increase": loss(p.kept) - loss.full} for p in plans]
    result = {
        "policy": args.policy, "ratio": args.ratio, "machine": machine_description("cpu"),
        "calibration": {"samples": calibration.num_samples, "batch_size": calibration.batch_size,
                        "seconds": calibration_s},
        "loss_search": {"holdout_samples": defaults.holdout_samples, "draws": loss.draws, "seconds": search_s,
                        "evaluations": found.details["evaluations"], "bound": greedy_evaluations(problem, budget),
                        "seconds_per_evaluation": search_s / max(1, found.details["evaluations"]),
                        "order": found.details["order"]},
        "full_loss": loss.full, "plans": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"calibration pass: {calibration_s:.1f} s ({calibration.num_samples} samples); loss search: "
          f"{search_s:.1f} s, {found.details['evaluations']} evaluations (bound "
          f"{result['loss_search']['bound']}) = {search_s / calibration_s:.1f} calibration passes")
    print("| method | kept (first stack) | cka-dp cost | chunk damage | loss increase |")
    print("|---|---|---|---|---|")
    for r in rows:
        first = next(iter(r["kept"].values()))
        print(f"| {r['method']} | {first} | {r['cka_cost']:.4f} | {r['damage']:.4f} | {r['loss_increase']:+.4f} |")
    print(f"\nfull model loss {loss.full:.4f}; {result['machine']}; written to {args.out}")


if __name__ == "__main__":
    main()
