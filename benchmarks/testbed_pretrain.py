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
5. with ``--ship``: the result stored as the shipped ``metaworld:smolvla`` (only the tensors training
   changed, large matrices as int8 rows), and how far the shipped model's action chunks are from the
   float32 checkpoint's (same frames, same noise);
6. with ``--evaluate``: closed-loop success of the shipped model (else of the checkpoint) on the
   pretraining tasks.

Everything is recorded in ``<out>/pretrain.json`` as it finishes, and copied to ``--results``.

The held-out candidates (``kept_out`` of ``metaworld:smolvla`` in :mod:`vlaprune.models.shipped`) are
kept out of pretraining: ``benchmarks/testbed_heldout.py`` picks the fine-tuning study's tasks among
them by measurement (the full model fine-tuned lands at 40-85%).

    python benchmarks/testbed_pretrain.py --out outputs/testbed --demos data/mt50 [--steps 3000]
        [--batch_size 16] [--save_freq 500] [--ship] [--evaluate]
        [--results benchmarks/results/testbed_pretrain_cpu.json]
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
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlaprune.io.calibration import CalibrationConfig, calibration_batches
from vlaprune.io.provenance import library_versions, machine_description
from vlaprune.models import shipped
from vlaprune.models.builtin import smolvla
from vlaprune.models.builtin.common import PolicyBundle
from vlaprune.models.loading import load_policy
from vlaprune.studies import metaworld as mw
from vlaprune.studies.train import as_stock_smolvla, schedule_flags

HELD_OUT_CANDIDATES = shipped.get(shipped.SPEC).kept_out  # kept out of pretraining
IMAGE_SIZE = 112  # pretrained:smolvla's vision tower: 8x8 DINOv2 patches
DEMO_STEPS = 250


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--demos", type=Path, required=True, help="root of the per-task demonstration datasets")
    parser.add_argument("--episodes", type=int, default=20, help="demonstrations per task")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--save_freq", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ship", action="store_true", help="store the result as the shipped metaworld:smolvla")
    parser.add_argument("--evaluate", action="store_true", help="closed-loop success on the pretraining tasks")
    parser.add_argument("--eval_episodes", type=int, default=5)
    parser.add_argument("--results", type=Path, default=None, help="also write the record here, each time it is saved")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    record_path = args.out / "pretrain.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"timings": {}}
    settings = {"episodes": args.episodes, "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                "image_size": IMAGE_SIZE, "held_out_candidates": list(HELD_OUT_CANDIDATES)}
    check_settings(record, settings, args.out / "train")
    record.update(settings=settings, machine=machine_description(), versions=library_versions())

    def save() -> None:
        tmp = record_path.with_name(record_path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
        tmp.replace(record_path)
        if args.results:
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(record_path.read_text())

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
    if args.ship and "shipped" not in record:
        def ship() -> None:
            shipped.export(final, shipped.SPEC, seed=args.seed)
            files = shipped.get(shipped.SPEC).stored.iterdir()
            record["shipped"] = {"files": {p.name: p.stat().st_size for p in sorted(files)},
                                 "fidelity": chunk_fidelity(load_policy(str(final)), load_policy(shipped.SPEC), data)}
        timed("ship_s", ship)
    if args.evaluate:
        policy = shipped.SPEC if "shipped" in record else str(final)
        bundle = load_policy(policy)
        result = mw.evaluate(bundle.policy, bundle.preprocessor, bundle.postprocessor, usable,
                             episodes_per_task=args.eval_episodes, image_size=IMAGE_SIZE, max_steps=200,
                             seed=args.seed)
        record["evaluation"] = {"policy": policy, **result}
        save()
        for task, r in result["tasks"].items():
            print(f"{task:<32} {r['successes']}/{r['episodes']}")
        print(json.dumps({"success_rate": result["success_rate"], **record["timings"]}))


def chunk_fidelity(reference: PolicyBundle, candidate: PolicyBundle, data: Path, samples: int = 64) -> dict[str, float]:
    """How far ``candidate``'s action chunks are from ``reference``'s on ``samples`` frames of the
    dataset at ``data`` with the same flow noise, in normalised action units (dataset standard deviations)."""
    import torch

    config = CalibrationConfig(num_samples=samples, batch_size=16, seed=0)
    generator = torch.Generator().manual_seed(0)
    diffs, scale = [], []
    for batch in calibration_batches(reference.policy, reference.preprocessor, repo_id="local/metaworld", root=data,
                                     config=config, allow_synthetic=False):
        noise = torch.randn(batch["observation.state"].shape[0], *mw.flow_noise_shape(reference.policy),
                            generator=generator)
        with torch.inference_mode():
            a = reference.policy.predict_action_chunk(dict(batch), noise=noise.clone())
            b = candidate.policy.predict_action_chunk(dict(batch), noise=noise.clone())
        diffs.append((a - b).abs().flatten())
        scale.append(a.abs().flatten())
    diff, size = torch.cat(diffs), torch.cat(scale)
    return {"samples": samples, "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "mean_abs_action": size.mean().item()}


def check_settings(record: dict[str, Any], settings: dict[str, Any], train: Path) -> None:
    """Refuse a rerun whose settings differ from the recorded ones, but for ``steps`` while the run
    has not reached either length (the change is appended to ``record["steps_changes"]``)."""
    recorded = record.get("settings", settings)
    if {**recorded, "steps": settings["steps"]} != settings:
        raise SystemExit(f"the run under {train.parent} was recorded with {recorded}: use another --out")
    if recorded["steps"] != settings["steps"]:  # a run shortened or lengthened before it finished
        reached = _last_step(train)
        if reached is None or reached >= min(recorded["steps"], settings["steps"]):
            raise SystemExit(f"--steps {settings['steps']} differs from the recorded {recorded['steps']} and the run "
                             f"is at step {reached}: use another --out")
        record.setdefault("steps_changes", []).append({"at_step": reached, "from": recorded["steps"],
                                                        "to": settings["steps"]})


def _last_step(train: Path) -> int | None:
    """The step of a run's last checkpoint, or None before the first."""
    step_file = train / "checkpoints" / "last" / "training_state" / "training_step.json"
    return json.loads(step_file.read_text())["step"] if step_file.is_file() else None


if __name__ == "__main__":
    main()
