"""Which held-out tasks tell plans apart: the full ``metaworld:smolvla`` fine-tuned on the candidates.

The tasks kept out of robot pretraining (``kept_out`` of ``metaworld:smolvla``) are the fine-tuning
set of the study: every model of the study is fine-tuned on the demonstrations of all of them. It is
evaluated on those that leave room both ways (``held_out``): a task the full fine-tuned model always
solves, or never, cannot show a pruned model doing better or worse. This run is the study's recipe
for the full model, evaluated on every candidate. Stages, each resumable:

1. the candidates' scripted demonstrations (``--demos``, as ``benchmarks/testbed_pretrain.py`` made
   them) combined into one LeRobotDataset;
2. stock ``lerobot-train`` of the full shipped model on it (``--steps`` at ``--batch_size``);
3. closed-loop success per candidate (``--eval_episodes`` each, evaluation positions no
   demonstration uses);
4. the choice (:func:`choose`): candidates strictly between ``--floor`` and ``--ceiling``, at least
   four, written with the measurements to ``--results``;
5. with ``--ship``: the candidates' demonstrations (the same episodes, frames as AV1 video) stored as
   ``metaworld:smolvla``'s calibration and fine-tuning set. Its ``held_out`` in
   :mod:`vlaprune.models.shipped` is then set to the chosen tasks by hand.

    python benchmarks/testbed_heldout.py --out outputs/heldout --demos data/mt50 \\
        --results benchmarks/results/testbed_heldout_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlaprune.io.provenance import library_versions, machine_description
from vlaprune.models import shipped
from vlaprune.models.loading import load_policy
from vlaprune.studies import metaworld as mw
from vlaprune.studies.train import lerobot_train

MINIMUM = 4


def choose(success: dict[str, float], floor: float, ceiling: float) -> dict[str, Any]:
    """The candidates with ``floor < success < ceiling`` and their mean; ``enough`` says whether there are
    at least :data:`MINIMUM`."""
    chosen = [t for t, rate in success.items() if floor < rate < ceiling]
    return {"tasks": chosen, "mean": statistics.mean(success[t] for t in chosen) if chosen else None,
            "enough": len(chosen) >= MINIMUM, "floor": floor, "ceiling": ceiling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--demos", type=Path, required=True, help="root of the per-task demonstration datasets")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval_episodes", type=int, default=10)
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--floor", type=float, default=0.1)
    parser.add_argument("--ceiling", type=float, default=0.9)
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--ship", action="store_true", help="store the candidates' demonstrations as the "
                        "shipped calibration and fine-tuning set")
    parser.add_argument("--episodes", type=int, default=20, help="demonstrations per candidate to ship")
    args = parser.parse_args()
    model = shipped.get(shipped.SPEC)
    candidates = list(model.kept_out)
    mw.check_tasks(candidates)
    args.out.mkdir(parents=True, exist_ok=True)
    record_path = args.out / "heldout.json"
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("out", "demos", "results", "floor", "ceiling")}
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"settings": settings}
    if record["settings"] != settings:
        raise SystemExit(f"{record_path} was recorded with {record['settings']}: use another --out")

    def save() -> None:
        record.update(machine=machine_description(), versions=library_versions())
        tmp = record_path.with_name(record_path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(record_path)

    data = args.out / "data"
    if not data.exists():
        mw.combine_task_demos(args.demos, candidates, data)
    if "finetune" not in record:
        run = lerobot_train(shipped.policy_dir(model.spec), repo_id="local/metaworld", root=data,
                            out=args.out / "full-s0", steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                            lr=args.lr)
        record["finetune"] = run.to_json()
        save()
    if "evaluation" not in record:
        bundle = load_policy(record["finetune"]["checkpoint"])
        record["evaluation"] = mw.evaluate(bundle.policy, bundle.preprocessor, bundle.postprocessor, candidates,
                                           episodes_per_task=args.eval_episodes, image_size=model.image_size,
                                           max_steps=args.max_steps, seed=args.seed,
                                           batch_size=min(args.eval_episodes, 10))
        save()
    success = {t: r["success_rate"] for t, r in record["evaluation"]["tasks"].items()}
    record["choice"] = choose(success, args.floor, args.ceiling)
    save()
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(record_path.read_text())
    if args.ship:
        ship(candidates, model, args.out / "ship", args.episodes)
    print("| candidate | success, full fine-tuned |\n|---|---|")
    for task, rate in success.items():
        print(f"| {task} | {rate:.0%} |")
    choice = record["choice"]
    mean = f"{choice['mean']:.0%}" if choice["mean"] is not None else "-"
    print(f"\nchosen ({args.floor:.0%} < success < {args.ceiling:.0%}): {choice['tasks']}, mean {mean}"
          + ("" if choice["enough"] else f": fewer than {MINIMUM}"))
    print(f"fine-tune {record['finetune']['wall_s']:.0f} s, evaluation {record['evaluation']['seconds']:.0f} s; "
          f"{record['machine']}")


def ship(tasks: list[str], model: shipped.ShippedModel, work: Path, episodes: int) -> None:
    """The demonstrations of ``tasks`` that the pretraining demonstrations' seeds give (each task seeded by
    its MT50 index, as ``benchmarks/testbed_pretrain.py`` recorded it), as video, combined into
    ``model.calibration_root`` (replaced at the end)."""
    import shutil
    from dataclasses import replace

    from vlaprune.studies.metaworld import DemoConfig, combine_task_demos, generate_demos, task_names

    config = DemoConfig(episodes_per_task=episodes, image_size=model.image_size, max_steps=250, seed=0, video=True)
    for task in tasks:
        if not (work / task).is_dir():
            generate_demos(replace(config, tasks=(task,), first_task_index=task_names().index(task)), work / task,
                           f"local/{task}")
    staged = work / "combined"
    shutil.rmtree(staged, ignore_errors=True)
    combine_task_demos(work, tasks, staged, repo_id=shipped.CALIBRATION_REPO_ID)
    shutil.rmtree(model.calibration_root, ignore_errors=True)
    shutil.move(staged, model.calibration_root)
    size = sum(p.stat().st_size for p in model.calibration_root.rglob("*") if p.is_file())
    print(f"shipped {len(tasks)} tasks x {episodes} demonstrations to {model.calibration_root} ({size / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
