"""Which training-free signal predicts fine-tuned success? Rank correlations over a study's units.

For every distinct plan a quality study fine-tuned (``benchmarks/metaworld_study.py``: its
``records.jsonl``), on the study's policy and the frames ``vlaprune prune`` holds out:

- ``cka_cost``: the cka-dp path cost of the plan, from the study's ``analysis.json`` (what
  ``--plan.method=cka-dp`` minimises);
- ``damage``: the relative action-chunk deviation at fixed noise (``--plan.refine=damage``);
- ``loss_increase``: the family's training loss at fixed noise and times minus the full model's
  (``--plan.method=loss`` and ``--plan.refine=loss``).

Then Spearman's rank correlation between each signal (negated: lower is better) and the fine-tuned
success, over the units (one per plan and seed), over the plans (success averaged over seeds), and
seed-matched: over the units whose seed has a fine-tuned full model, of the success minus that full
model's (the seeds differ in difficulty by several points, which the pooled figures mix into the
plans' ranks). Each figure also comes per budget (``group``: the ratio, and ``+vision`` where the
vision encoder was planned too), since a choice among plans is made at one budget: pooled over
budgets, a signal that only tells depths apart scores well. The signal with the highest seed-matched
correlation at a budget is the one ``--plan.refine`` should pick by.

    python benchmarks/selection_signals.py --study outputs/mw_study_pretrained \\
        --out benchmarks/results/selection_signals_cpu.json

Writes the JSON and a markdown table beside it (``.md``), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from scipy.stats import spearmanr

from vlaprune.core.plan import path_cost
from vlaprune.core.verify import PlanDamage, PlanLoss
from vlaprune.families import family_for
from vlaprune.io.calibration import calibration_batches
from vlaprune.io.provenance import machine_description
from vlaprune.models import shipped
from vlaprune.models.loading import load_policy
from vlaprune.pipelines.config import CalibrationArgs, PruneConfig
from vlaprune.pipelines.planning import load_analysis

SIGNALS = ("cka_cost", "damage", "loss_increase")


def study_units(records_path: Path) -> list[dict[str, Any]]:
    """The pruned, fine-tuned units of a study: one per plan and seed (a shared unit counts once), each
    with ``vs_full``, its success minus the full model's at the same seed (None where that is not run)."""
    units: dict[tuple[str, int], dict[str, Any]] = {}
    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    full = {r["seed"]: r["evaluation"]["success_rate"] for r in records
            if r["kind"] == "finetuned" and r["method"] == "full"}
    for record in records:
        if record["kind"] != "finetuned" or "kept" not in record:
            continue
        key = (json.dumps(record["kept"], sort_keys=True), record["seed"])
        success = record["evaluation"]["success_rate"]
        vs_full = None if record["seed"] not in full else success - full[record["seed"]]
        group = f"{record['ratio']:g}" + ("+vision" if record["method"].endswith("+vision") else "")
        unit = units.setdefault(key, {"kept": record["kept"], "seed": record["seed"], "variants": [],
                                      "success": success, "vs_full": vs_full, "group": group})
        unit["variants"].append(f"{record['method']}@{record['ratio']:g}")
    return list(units.values())


def correlations(points: list[dict[str, Any]], success: str) -> dict[str, dict[str, float | int | None]]:
    """Spearman's ρ between each negated signal and ``success`` over ``points`` (None below 3 points or
    when a side is constant)."""
    out: dict[str, dict[str, float | int | None]] = {}
    for signal in SIGNALS:
        xs, ys = [-p[signal] for p in points], [p[success] for p in points]
        rho = None
        if len(points) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1:
            result = spearmanr(xs, ys)
            rho = float(result.statistic)
        out[signal] = {"rho": rho, "n": len(points)}
    return out


def seed_matched(units: list[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """:func:`correlations` of the signals with the success minus the same seed's full model's."""
    return correlations([u for u in units if u["vs_full"] is not None], "vs_full")


def by_group(units: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per budget group with at least 3 units: the correlations over its units, pooled and seed-matched."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for unit in units:
        groups.setdefault(unit["group"], []).append(unit)
    return {g: {"units": correlations(members, "success"), "seed_matched": seed_matched(members)}
            for g, members in sorted(groups.items()) if len(members) >= 3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, required=True, help="a study's --out (records.jsonl, analysis/)")
    parser.add_argument("--policy", default=shipped.SPEC, choices=tuple(shipped.MODELS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    units = study_units(args.study / "records.jsonl")
    if not units:
        raise SystemExit(f"{args.study}/records.jsonl has no fine-tuned pruned unit yet")
    stacks = load_analysis(args.study / "analysis" / "analysis.json")
    model = shipped.get(args.policy)
    bundle = load_policy(args.policy)
    policy, family = bundle.policy, family_for(bundle.policy)
    holdout_config = CalibrationArgs().calibration().holdout(PruneConfig().holdout_samples)  # what prune holds out
    holdout = list(calibration_batches(policy, bundle.preprocessor, repo_id=shipped.CALIBRATION_REPO_ID,
                                       root=model.calibration_root, config=holdout_config, allow_synthetic=False))
    loss, damage = PlanLoss(policy, family, holdout), PlanDamage(policy, family, holdout)

    plans: dict[str, dict[str, Any]] = {}
    for unit in units:
        key = json.dumps(unit["kept"], sort_keys=True)
        if key not in plans:
            kept = {name: tuple(idx) for name, idx in unit["kept"].items()}
            plans[key] = {"kept": unit["kept"], "variants": [], "seeds": [], "success": [],
                          "cka_cost": sum(path_cost(stacks[name].cka, idx) for name, idx in kept.items()),
                          "damage": damage(kept), "loss_increase": loss(kept) - loss.full}
        plan = plans[key]
        plan["variants"] += [v for v in unit["variants"] if v not in plan["variants"]]
        plan["seeds"].append(unit["seed"])
        plan["success"].append(unit["success"])
        unit.update({s: plan[s] for s in SIGNALS})
    for plan in plans.values():
        plan["success_mean"] = statistics.mean(plan["success"])
    rows = sorted(plans.values(), key=lambda p: -p["success_mean"])
    result = {"study": str(args.study), "policy": args.policy, "machine": machine_description("cpu"),
              "full_loss": loss.full, "holdout_samples": holdout_config.num_samples,
              "correlation_over_units": correlations(units, "success"),
              "correlation_over_plans": correlations(rows, "success_mean"),
              "correlation_seed_matched": seed_matched(units), "correlation_by_group": by_group(units),
              "plans": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    text = table(result)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"\n{result['machine']}; written to {args.out} and {args.out.with_suffix('.md')}")


def table(result: dict[str, Any]) -> str:
    lines = ["| plan (variants) | kept (first stack) | seeds | success (mean) | cka-dp cost | chunk damage | "
             "loss increase |", "|---|---|---|---|---|---|---|"]
    for p in result["plans"]:
        first = next(iter(p["kept"].values()))
        per_seed = " / ".join(f"{s:.1%}" for s in p["success"])
        lines.append(f"| {', '.join(p['variants'])} | {first} | {len(p['seeds'])} | {per_seed} "
                     f"({p['success_mean']:.1%}) | {p['cka_cost']:.4f} | {p['damage']:.4f} | "
                     f"{p['loss_increase']:+.4f} |")
    lines += ["", "| Spearman ρ with success (lower signal = better) | cka-dp cost | chunk damage | loss increase |",
              "|---|---|---|---|"]
    for label, key in (("units", "correlation_over_units"), ("plans", "correlation_over_plans"),
                       ("units, seed-matched (success − the full model's at that seed)", "correlation_seed_matched")):
        lines.append(_row(f"over {{n}} {label}", result[key]))
    for group, both in result["correlation_by_group"].items():
        lines.append(_row(f"at ratio {group}: over {{n}} units", both["units"]))
        lines.append(_row(f"at ratio {group}: over {{n}} units, seed-matched", both["seed_matched"]))
    return "\n".join(lines)


def _row(label: str, c: dict[str, dict[str, Any]]) -> str:
    """A table row of the signals' ρ (``label`` with ``{n}`` for the number of points)."""
    cells = " | ".join("–" if c[s]["rho"] is None else f"{c[s]['rho']:+.2f}" for s in SIGNALS)
    return f"| {label.format(n=c['cka_cost']['n'])} | {cells} |"


if __name__ == "__main__":
    main()
