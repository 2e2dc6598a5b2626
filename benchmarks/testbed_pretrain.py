"""Robot pretraining of ``pretrained:smolvla`` on MetaWorld: the realistic testbed's model.

Stages, each resumable, so a run longer than one session continues where it stopped:

1. scripted demonstrations of every task, one dataset per task (``--demos``; see
   ``benchmarks/metaworld_demos.py``, which this stage runs the same way);
2. the pretraining set: every task but the held-out candidates, combined into one LeRobotDataset;
3. the starting checkpoint: ``pretrained:smolvla`` (SmolLM2-135M text layers, DINOv2-S tower) for that
   dataset's features and statistics, as the plugin's training-time type ``smolvla_connector``
   (pretrained text and vision layers frozen; connector, projections and expert trained);
4. stock ``lerobot-train``, checkpointing every ``--save_freq`` steps; an interrupted run resumes
   from its last checkpoint (``--resume=true``);
5. with ``--evaluate``: closed-loop success on the pretraining tasks, written to ``<out>/pretrain.json``.

The held-out candidates (``HELD_OUT_CANDIDATES``) are kept out of pretraining: the fine-tuning study
picks at least four of them by measurement (the full model fine-tuned lands at 40-85%).

    python benchmarks/testbed_pretrain.py --out outputs/testbed --demos data/mt50 [--steps 4000]
        [--batch_size 16] [--save_freq 250] [--evaluate]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlaprune.io.provenance import library_versions, machine_description
from vlaprune.models.builtin import smolvla
from vlaprune.models.loading import load_policy
from vlaprune.studies import metaworld as mw
from vlaprune.studies.train import as_stock_smolvla, schedule_flags

# easy and medium tasks whose sibling skills stay in pretraining (door-unlock, faucet-close, coffee-pull,
# sweep, push, ...): candidates for fine-tuning that neither start at the ceiling nor at the floor
HELD_OUT_CANDIDATES = ("door-lock-v3", "faucet-open-v3", "coffee-push-v3", "sweep-into-v3", "box-close-v3",
                       "push-wall-v3", "hammer-v3", "basketball-v3")
IMAGE_SIZE = 112  # pretrained:smolvla's vision tower: 8x8 DINOv2 patches
DEMO_STEPS = 250


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--demos", type=Path, required=True, help="root of the per-task demonstration datasets")
    parser.add_argument("--episodes", type=int, default=20, help="demonstrations per task")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--save_freq", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate", action="store_true", help="closed-loop success on the pretraining tasks")
    parser.add_argument("--eval_episodes", type=int, default=5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    record_path = args.out / "pretrain.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"timings": {}}
    settings = {"episodes": args.episodes, "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                "image_size": IMAGE_SIZE, "held_out_candidates": list(HELD_OUT_CANDIDATES)}
    recorded = record.get("settings", settings)
    if {**recorded, "steps": args.steps} != settings:
        raise SystemExit(f"{record_path} was recorded with {recorded}: use another --out")
    if recorded["steps"] != args.steps:  # a run shortened or lengthened before it finished
        reached = _last_step(args.out / "train")
        if reached is None or reached >= min(recorded["steps"], args.steps):
            raise SystemExit(f"{record_path}: --steps {args.steps} differs from the recorded {recorded['steps']} and "
                             f"the run is at step {reached}: use another --out")
        record.setdefault("steps_changes", []).append({"at_step": reached, "from": recorded["steps"],
                                                        "to": args.steps})
    record.update(settings=settings, machine=machine_description(), versions=library_versions())

    def save() -> None:
        tmp = record_path.with_name(record_path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
        tmp.replace(record_path)

    def timed(stage: str, fn: Callable[[], object]) -> None:
        t0 = time.perf_counter()
        fn()
        record["timings"][stage] = record["timings"].get(stage, 0.0) + round(time.perf_counter() - t0, 1)
        save()

    tasks = [t for t in mw.task_names() if t not in HELD_OUT_CANDIDATES]
    config = mw.DemoConfig(tasks=tuple(mw.task_names()), episodes_per_task=args.episodes, image_size=IMAGE_SIZE,
                           max_steps=DEMO_STEPS, seed=args.seed)
    timed("demos_s", lambda: record.update(demos=mw.generate_task_demos(config, args.demos)))
    usable = [t for t in tasks if "error" not in record["demos"][t]]
    record["pretraining_tasks"] = usable
    data, start, train = args.out / "pretrain_data", args.out / "start", args.out / "train"
    if not data.exists():
        timed("combine_s", lambda: mw.combine_task_demos(args.demos, usable, data))
    if not start.exists():
        def build() -> None:
            bundle = smolvla.build_for_dataset("pretrained", data, "local/metaworld", seed=args.seed)
            tmp = start.with_name(start.name + ".partial")
            for part in (bundle.policy, bundle.preprocessor, bundle.postprocessor):
                part.save_pretrained(tmp)
            tmp.rename(start)
        timed("start_s", build)
    final = train / "checkpoints" / f"{args.steps:06d}" / "pretrained_model"
    if not final.exists():
        last = train / "checkpoints" / "last" / "pretrained_model" / "train_config.json"
        lerobot_train = str(Path(sys.executable).with_name("lerobot-train"))
        if last.is_file():  # an interrupted run: continue from its last checkpoint
            # --steps shorter than the recorded decay length rescales LeRobot's warm-up and cosine decay to it
            cmd = [lerobot_train, f"--config_path={last}", "--resume=true", f"--steps={args.steps}"]
        else:
            if train.exists():
                raise SystemExit(f"{train} holds a run without a checkpoint; remove it to start over")
            cmd = [lerobot_train, f"--policy.path={start}", "--dataset.repo_id=local/metaworld",
                   f"--dataset.root={data}", f"--steps={args.steps}", f"--batch_size={args.batch_size}",
                   f"--save_freq={args.save_freq}", "--log_freq=50", "--num_workers=1", f"--output_dir={train}",
                   "--policy.device=cpu", "--policy.push_to_hub=false", "--wandb.enable=false", "--env_eval_freq=0",
                   f"--seed={args.seed}", *schedule_flags(start, args.steps)]
        timed("train_s", lambda: subprocess.run(cmd, check=True))
    as_stock_smolvla(final)
    record["checkpoint"] = str(final)
    save()
    if args.evaluate:
        bundle = load_policy(str(final))
        result = mw.evaluate(bundle.policy, bundle.preprocessor, bundle.postprocessor, usable,
                             episodes_per_task=args.eval_episodes, image_size=IMAGE_SIZE, max_steps=200,
                             seed=args.seed)
        record["evaluation"] = result
        save()
        for task, r in result["tasks"].items():
            print(f"{task:<32} {r['successes']}/{r['episodes']}")
        print(json.dumps({"success_rate": result["success_rate"], **record["timings"]}))


def _last_step(train: Path) -> int | None:
    """The step of a run's last checkpoint, or None before the first."""
    step_file = train / "checkpoints" / "last" / "training_state" / "training_step.json"
    return json.loads(step_file.read_text())["step"] if step_file.is_file() else None


if __name__ == "__main__":
    main()
