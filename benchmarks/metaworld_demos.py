"""Scripted demonstrations of every MetaWorld task LeRobot knows (MT50), one LeRobotDataset per task.

The first stage of the realistic testbed: the pretraining set of ``pretrained:smolvla`` is every task
but the held-out ones, which are chosen later by measurement, so each task gets a dataset of its own
(``<out>/<task>``, repo id ``local/<task>``) and the pretraining run combines the ones it needs.
Resumable: each finished task is recorded in ``<out>/tasks.jsonl`` as it ends, and a rerun continues
(see ``vlaprune.studies.metaworld.generate_task_demos``). It also measures how often each task's
scripted expert succeeds within ``--max-steps``, which bounds what can be demonstrated at all.

    python benchmarks/metaworld_demos.py --out data/mt50 [--episodes 20] [--image-size 112] [--max-steps 250]
        [--tasks reach-v3 ...] [--results benchmarks/results/metaworld_mt50_demos_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlaprune.io.provenance import library_versions, machine_description
from vlaprune.studies import metaworld as mw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="root of the per-task datasets")
    parser.add_argument("--tasks", nargs="*", default=None, help="default: every task LeRobot knows")
    parser.add_argument("--episodes", type=int, default=20, help="successful demonstrations per task")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--max-steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=None, help="also write the summary JSON here")
    args = parser.parse_args()

    tasks = tuple(args.tasks or mw.task_names())
    config = mw.DemoConfig(tasks=tasks, episodes_per_task=args.episodes, image_size=args.image_size,
                           max_steps=args.max_steps, seed=args.seed)
    start = time.perf_counter()
    records = mw.generate_task_demos(config, args.out)
    print(f"{'task':<32}{'episodes':>9}{'attempts':>9}{'expert':>8}{'frames':>8}{'s':>7}")
    for task, r in records.items():
        if "error" in r:
            print(f"{task:<32}  {r['error']}")
            continue
        print(f"{task:<32}{r['episodes']:>9}{r['attempts']:>9}{r['episodes'] / r['attempts']:>8.0%}"
              f"{r['frames']:>8}{r['seconds']:>7.0f}")
    summary = {"benchmark": "metaworld_demos", "out": str(args.out), "config": {**vars(args), "out": str(args.out),
               "results": None}, "tasks": records, "machine": machine_description(), "versions": library_versions(),
               "seconds_this_run": round(time.perf_counter() - start, 1)}
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(json.dumps({"tasks": len(records), "failed": [t for t, r in records.items() if "error" in r],
                      "episodes": sum(r.get("episodes", 0) for r in records.values()),
                      "frames": sum(r.get("frames", 0) for r in records.values())}))


if __name__ == "__main__":
    main()
