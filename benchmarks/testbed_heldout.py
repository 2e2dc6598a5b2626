"""Which held-out tasks tell plans apart: the full ``metaworld:smolvla`` fine-tuned on the candidates.

The tasks kept out of robot pretraining (``kept_out`` of ``metaworld:smolvla``) are the fine-tuning
set of the study: every model of the study is fine-tuned on the demonstrations of all of them. It is
evaluated on those that leave room both ways (``held_out``): a task the full fine-tuned model always
solves, or never, cannot show a pruned model doing better or worse. This run is the study's recipe
for the full model, on the study's data, evaluated on every candidate. Stages, each resumable:

1. the candidates' scripted demonstrations, ``--episodes`` each, recorded as LeRobot's AV1 video
   (the episodes ``benchmarks/testbed_pretrain.py`` recorded for them: each task seeded by its MT50
   index), combined into one LeRobotDataset: the study's calibration and fine-tuning set;
2. stock ``lerobot-train`` of the full shipped model on it (``--steps`` at ``--batch_size``);
3. closed-loop success per candidate (``--eval_episodes`` each, evaluation positions no
   demonstration uses);
4. the choice (:func:`choose`): candidates strictly between ``--floor`` and ``--ceiling``, at least
   four, written with the measurements to ``--results``;
5. with ``--ship``: the dataset of stage 1 stored as ``metaworld:smolvla``'s calibration and
   fine-tuning set. Its ``held_out`` in :mod:`vlaprune.models.shipped` is then set to the chosen
   tasks by hand.

    python benchmarks/testbed_heldout.py --out outputs/heldout \\
        --results benchmarks/results/testbed_heldout_cpu.json [--ship]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlaprune.io.provenance import library_versions, machine_description
from vlaprune.models import shipped
from vlaprune.models.loading import load_policy
from vlaprune.studies import metaworld as mw
from vlaprune.studies.train import lerobot_train

MINIMUM = 4
DEMO_STEPS = 250  # as the pretraining demonstrations


def choose(success: dict[str, float], floor: float, ceiling: float) -> dict[str, Any]:
    """The candidates with ``floor < success < ceiling`` and their mean; ``enough`` says whether there are
    at least :data:`MINIMUM`."""
    chosen = [t for t, rate in success.items() if floor < rate < ceiling]
    return {"tasks": chosen, "mean": statistics.mean(success[t] for t in chosen) if chosen else None,
            "enough": len(chosen) >= MINIMUM, "floor": floor, "ceiling": ceiling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    recipe = shipped.get(shipped.SPEC).recipe  # the study's
    parser.add_argument("--steps", type=int, default=recipe.steps)
    parser.add_argument("--batch_size", type=int, default=recipe.batch_size)
    parser.add_argument("--lr", type=float, default=recipe.lr)
    parser.add_argument("--eval_episodes", type=int, default=10)
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--floor", type=float, default=0.1)
    parser.add_argument("--ceiling", type=float, default=0.9)
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--episodes", type=int, default=20, help="demonstrations per candidate")
    parser.add_argument("--ship", action="store_true", help="store the candidates' demonstrations as the "
                        "shipped calibration and fine-tuning set")
    args = parser.parse_args()
    model = shipped.get(shipped.SPEC)
    candidates = list(model.kept_out)
    mw.check_tasks(candidates)
    args.out.mkdir(parents=True, exist_ok=True)
    record_path = args.out / "heldout.json"
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("out", "results", "floor", "ceiling", "ship")}
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
        demonstrations(candidates, model.image_size, args.episodes, args.out / "demos", data)
    if "finetune" not in record:
        run = lerobot_train(shipped.policy_dir(model.spec), repo_id=shipped.CALIBRATION_REPO_ID, root=data,
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
        staged = model.calibration_root.with_name(model.calibration_root.name + ".new")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(data, staged)
        shutil.rmtree(model.calibration_root, ignore_errors=True)
        staged.rename(model.calibration_root)
        size = sum(p.stat().st_size for p in model.calibration_root.rglob("*") if p.is_file())
        print(f"shipped {model.calibration_root} ({size / 2**20:.1f} MB)")
    print("| candidate | success, full fine-tuned |\n|---|---|")
    for task, rate in success.items():
        print(f"| {task} | {rate:.0%} |")
    choice = record["choice"]
    mean = f"{choice['mean']:.0%}" if choice["mean"] is not None else "-"
    print(f"\nchosen ({args.floor:.0%} < success < {args.ceiling:.0%}): {choice['tasks']}, mean {mean}"
          + ("" if choice["enough"] else f": fewer than {MINIMUM}"))
    print(f"fine-tune {record['finetune']['wall_s']:.0f} s, evaluation {record['evaluation']['seconds']:.0f} s; "
          f"{record['machine']}")


def demonstrations(tasks: list[str], image_size: int, episodes: int, work: Path, dest: Path) -> None:
    """The scripted demonstrations of ``tasks`` that the pretraining demonstrations' seeds give (each task
    seeded by its MT50 index), as video, one dataset per task under ``work``, combined at ``dest``."""
    config = mw.DemoConfig(episodes_per_task=episodes, image_size=image_size, max_steps=DEMO_STEPS, seed=0,
                           video=True)
    for task in tasks:
        if not (work / task).is_dir():
            mw.generate_demos(replace(config, tasks=(task,), first_task_index=mw.task_names().index(task)),
                              work / task, f"local/{task}")
    mw.combine_task_demos(work, tasks, dest, repo_id=shipped.CALIBRATION_REPO_ID)


if __name__ == "__main__":
    main()
