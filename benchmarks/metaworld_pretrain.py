"""Pretrain the small SmolVLA of the quality study on MetaWorld demonstrations.

1. scripted demonstrations of the pretraining tasks (MT10 minus the held-out ones) at 64 px;
2. an untrained ``small`` SmolVLA for that dataset (12 VLM + 12 expert layers, 3.6M parameters),
   saved as a LeRobot checkpoint;
3. stock ``lerobot-train`` for ``--steps``;
4. closed-loop success on the pretraining tasks (evaluation seeds, not the demonstrations');
5. with ``--ship``: the trained checkpoint and demonstrations of the held-out tasks (the calibration
   and fine-tuning set) replace the ones shipped in ``src/vlaprune/assets/metaworld``
   (``metaworld:smolvla``, see :mod:`vlaprune.models.shipped`).

    python benchmarks/metaworld_pretrain.py --out outputs/mw_pretrain [--episodes 20] [--steps 3000] [--ship]

The shipped model is ``--episodes 20 --steps 3000 --batch_size 32 --seed 0`` (20 minutes on 2 CPU cores).

Every stage reuses what a previous run of the same settings finished under ``--out`` (timings list
only the stages this run did); the results (settings, timings, success per task) go to
``<out>/pretrain.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlaprune.models import shipped
from vlaprune.models.builtin import smolvla
from vlaprune.models.loading import load_policy
from vlaprune.studies import metaworld as mw

MODEL = shipped.get(shipped.SMALL)
HELD_OUT = MODEL.held_out
CALIBRATION_EPISODES = 10  # per held-out task (the shipped assets stay under 30 MB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--episodes", type=int, default=20, help="demonstrations per pretraining task")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--eval_episodes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ship", action="store_true", help="store the result as the shipped metaworld:smolvla-small")
    args = parser.parse_args()
    tasks = tuple(t for t in mw.MT10 if t not in HELD_OUT)
    args.out.mkdir(parents=True, exist_ok=True)
    data, start, train = args.out / "demos", args.out / "start", args.out / f"train_{args.steps}"
    timings: dict[str, float] = {}

    if not data.exists():
        t0 = time.perf_counter()
        mw.generate_demos(mw.DemoConfig(tasks=tasks, episodes_per_task=args.episodes, image_size=MODEL.image_size,
                                        seed=args.seed), data)
        timings["demos_s"] = time.perf_counter() - t0
    if not start.exists():
        bundle = smolvla.build_for_dataset("small", data, "local/metaworld", seed=args.seed)
        tmp = start.with_name(start.name + ".partial")
        for part in (bundle.policy, bundle.preprocessor, bundle.postprocessor):
            part.save_pretrained(tmp)
        tmp.rename(start)
    final = train / "checkpoints" / f"{args.steps:06d}" / "pretrained_model"
    if not final.exists():
        t0 = time.perf_counter()
        cmd = [str(Path(sys.executable).with_name("lerobot-train")), f"--policy.path={start}",
               "--dataset.repo_id=local/metaworld", f"--dataset.root={data}", f"--steps={args.steps}",
               f"--batch_size={args.batch_size}", f"--save_freq={args.steps}", "--log_freq=100",
               "--num_workers=1", f"--output_dir={train}", "--policy.device=cpu", "--policy.push_to_hub=false",
               "--wandb.enable=false", "--env_eval_freq=0", f"--seed={args.seed}",
               "--policy.scheduler_warmup_steps=200", f"--policy.scheduler_decay_steps={args.steps}"]
        if train.exists():
            raise SystemExit(f"{train} holds an unfinished run; remove it to start over")
        subprocess.run(cmd, check=True)
        timings["train_s"] = time.perf_counter() - t0

    bundle = load_policy(str(final))
    result = mw.evaluate(bundle.policy, bundle.preprocessor, bundle.postprocessor, tasks,
                         episodes_per_task=args.eval_episodes, image_size=MODEL.image_size, max_steps=200,
                         seed=args.seed)
    summary = {"settings": {k: str(v) for k, v in vars(args).items()}, "tasks": list(tasks),
               "held_out": list(HELD_OUT), "checkpoint": str(final), "timings": timings, "evaluation": result}
    (args.out / "pretrain.json").write_text(json.dumps(summary, indent=1))
    for task, r in result["tasks"].items():
        print(f"{task:<28} {r['successes']}/{r['episodes']}")
    print(json.dumps({"success_rate": result["success_rate"], **timings}))
    if args.ship:
        ship(final, args.seed)


def ship(checkpoint: Path, seed: int) -> None:
    calibration = MODEL.calibration_root.with_name(MODEL.calibration_root.name + ".new")
    if calibration.exists():
        shutil.rmtree(calibration)
    mw.generate_demos(mw.DemoConfig(tasks=HELD_OUT, episodes_per_task=CALIBRATION_EPISODES,
                                    image_size=MODEL.image_size, seed=seed), calibration,
                      repo_id=shipped.CALIBRATION_REPO_ID)
    shipped.export(checkpoint, MODEL.spec)
    if MODEL.calibration_root.exists():
        shutil.rmtree(MODEL.calibration_root)
    calibration.rename(MODEL.calibration_root)
    print(f"shipped: {MODEL.stored} and {MODEL.calibration_root}")


if __name__ == "__main__":
    main()
