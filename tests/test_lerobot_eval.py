"""Stock ``lerobot-eval`` runs a pruned, fine-tuned checkpoint in LeRobot's MetaWorld environment, as a
user would: the shipped model pruned to half depth, fine-tuned with stock ``lerobot-train``, evaluated
closed-loop. Slow (LeRobot renders MetaWorld at 480 px): ``pytest -m slow``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlaprune.models import shipped
from vlaprune.pipelines.config import CalibrationArgs, DatasetArgs, PolicyArgs, PruneConfig
from vlaprune.pipelines.prune import run_prune
from vlaprune.studies.train import lerobot_train


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stock_lerobot_eval_runs_a_pruned_fine_tuned_checkpoint(tmp_path):
    data = {"repo_id": shipped.CALIBRATION_REPO_ID, "root": str(shipped.get(shipped.SMALL).calibration_root)}
    pruned = run_prune(PruneConfig(policy=PolicyArgs(path=shipped.SMALL), dataset=DatasetArgs(**data),
                                   calibration=CalibrationArgs(num_samples=8, batch_size=4), holdout_samples=4,
                                   ratio=0.5, out=str(tmp_path / "pruned"))).out
    tuned = lerobot_train(pruned, **data, out=tmp_path / "train", steps=2, batch_size=4, num_workers=0).checkpoint
    out = tmp_path / "eval"
    cmd = [str(Path(sys.executable).with_name("lerobot-eval")), f"--policy.path={tuned}", "--policy.device=cpu",
           "--env.type=metaworld", "--env.task=drawer-close-v3", "--env.episode_length=20",
           "--eval.n_episodes=1", "--eval.batch_size=1", f"--output_dir={out}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MUJOCO_GL": "egl"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    info = json.loads((out / "eval_info.json").read_text())
    assert info["overall"]["n_episodes"] == 1 and 0.0 <= info["overall"]["pc_success"] <= 100.0
    assert [task["task_group"] for task in info["per_task"]] == ["drawer-close-v3"]
