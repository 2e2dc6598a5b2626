"""Fine-tune a checkpoint with stock ``lerobot-train`` (a subprocess), as a user would: the quality study
and the demo fine-tune full and pruned policies this way."""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrainRun:
    checkpoint: Path  # the final pretrained_model directory
    wall_s: float  # the whole lerobot-train process (start-up and saving included)
    update_s: float | None  # median over lerobot-train's log lines of its update time per step (forward,
    #   backward, optimizer; each line averages the steps since the previous one)
    data_s: float | None  # ... and of its data loading time per step
    final_loss: float | None  # the last logged training loss

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "checkpoint": str(self.checkpoint)}


def lerobot_train(start: Path | str, *, repo_id: str, root: Path | str, out: Path, steps: int, batch_size: int,
                  seed: int = 0, device: str = "cpu", lr: float | None = None, num_workers: int = 1,
                  log: Path | None = None) -> TrainRun:
    """Run ``lerobot-train --policy.path=start`` on the LeRobotDataset ``repo_id`` at ``root`` for ``steps``.

    The learning rate warms up over the first tenth of the steps and decays (cosine) to the end. A
    directory left at ``out`` by an interrupted run is removed first (lerobot-train would refuse it).
    Output goes to ``log`` (default ``<out>.log``); a failure raises with its last lines.
    """
    log = log or out.with_name(out.name + ".log")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).with_name("lerobot-train")), f"--policy.path={start}",
           f"--dataset.repo_id={repo_id}", f"--dataset.root={root}", f"--steps={steps}", f"--batch_size={batch_size}",
           f"--save_freq={steps}", f"--log_freq={max(1, steps // 10)}", f"--num_workers={num_workers}",
           f"--output_dir={out}", f"--policy.device={device}", "--policy.push_to_hub=false", "--wandb.enable=false",
           "--env_eval_freq=0", f"--seed={seed}", *schedule_flags(Path(start), steps)]
    if lr is not None:
        cmd.append(f"--policy.optimizer_lr={lr}")
    t0 = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if done.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise RuntimeError(f"lerobot-train exited with {done.returncode} (full output in {log}):\n{tail}")
    checkpoint = out / "checkpoints" / f"{steps:06d}" / "pretrained_model"
    if not (checkpoint / "model.safetensors").is_file():
        raise RuntimeError(f"lerobot-train finished without saving {checkpoint}; see {log}")

    return TrainRun(checkpoint=checkpoint, wall_s=wall, **parse_log(text))


def schedule_flags(checkpoint: Path, steps: int) -> list[str]:
    """lerobot-train flags for a warm-up over the first tenth of ``steps`` and a cosine decay to the end,
    in the terms of the checkpoint's policy config: pi0 / SmolVLA name both lengths; GR00T derives its
    warm-up from ``max_steps × warmup_ratio`` and decays over the run's ``--steps``."""
    import json

    fields = json.loads((checkpoint / "config.json").read_text())
    if "scheduler_warmup_steps" in fields:
        return [f"--policy.scheduler_warmup_steps={max(1, steps // 10)}", f"--policy.scheduler_decay_steps={steps}"]
    if "warmup_ratio" in fields and "max_steps" in fields:
        return [f"--policy.max_steps={steps}", "--policy.warmup_ratio=0.1"]
    raise ValueError(f"{checkpoint}/config.json ({fields.get('type')}): no known learning-rate schedule fields")


def parse_log(text: str) -> dict[str, float | None]:
    """``update_s``, ``data_s`` (medians over the log lines: robust to one slow stretch) and the last ``loss``
    of a lerobot-train log."""

    def median(name: str) -> float | None:
        values = [float(x) for x in re.findall(rf"\b{name}:([0-9.]+)", text)]
        return statistics.median(values) if values else None

    losses = re.findall(r"\bloss:([0-9.]+)", text)
    return {"update_s": median("updt_s"), "data_s": median("data_s"),
            "final_loss": float(losses[-1]) if losses else None}


def as_stock_smolvla(checkpoint: Path) -> Path:
    """Turn a ``smolvla_connector`` checkpoint (robot pretraining on a pretrained VLM) into a stock
    ``smolvla`` one, in place: the types share every field and every tensor, only ``type`` differs.
    The config is replaced atomically; a stock checkpoint is left as it is."""
    import json
    import os

    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    if config.get("type") not in ("smolvla_connector", "smolvla"):
        raise ValueError(f"{path}: type {config.get('type')!r} is neither smolvla_connector nor smolvla")
    if config["type"] == "smolvla_connector":
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({**config, "type": "smolvla"}, indent=4) + "\n")
        os.replace(tmp, path)
    return checkpoint
