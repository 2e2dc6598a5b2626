"""A small local LeRobotDataset written with LeRobot's own API (no hub), and stock ``lerobot-train`` on one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def make_dataset(root: Path, *, repo_id: str = "local/calib", episodes: int = 3, frames: int = 12,
                 image_hw: int = 96, drop: str | None = None, seed: int = 0):
    """Episodes of a random walk with one 96×96 camera, 6-d state and action (the built-ins' features)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {
        "observation.images.top": {"dtype": "image", "shape": (image_hw, image_hw, 3),
                                   "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (6,), "names": [f"s{i}" for i in range(6)]},
        "action": {"dtype": "float32", "shape": (6,), "names": [f"a{i}" for i in range(6)]},
    }
    if drop:
        features.pop(drop)
    ds = LeRobotDataset.create(repo_id, fps=10, features=features, root=root, use_videos=False)
    rng = np.random.default_rng(seed)
    for ep in range(episodes):
        state = rng.normal(size=6).astype(np.float32)
        for _ in range(frames):
            action = rng.normal(scale=0.1, size=6).astype(np.float32)
            frame = {"task": ["open the drawer", "pick up the cube", "push the button"][ep % 3]}
            if "observation.images.top" in features:
                frame["observation.images.top"] = rng.integers(0, 256, (image_hw, image_hw, 3), dtype=np.uint8)
            if "observation.state" in features:
                frame["observation.state"] = state
            if "action" in features:
                frame["action"] = action
            ds.add_frame(frame)
            state = state + action
        ds.save_episode()
    ds.finalize()
    return ds


def lerobot_train(policy_dir: Path, repo_id: str, root: Path, out: Path, *, steps: int = 2) -> Path:
    """Run stock ``lerobot-train --policy.path=policy_dir`` on the local dataset for ``steps`` steps at
    batch 2 on the CPU; return the final checkpoint's ``pretrained_model`` directory."""
    cmd = [str(Path(sys.executable).with_name("lerobot-train")), f"--policy.path={policy_dir}",
           f"--dataset.repo_id={repo_id}", f"--dataset.root={root}", f"--steps={steps}", "--batch_size=2",
           f"--save_freq={steps}", "--log_freq=1", "--num_workers=0", f"--output_dir={out}", "--policy.device=cpu",
           "--policy.push_to_hub=false", "--wandb.enable=false", "--env_eval_freq=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=580)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out / "checkpoints" / f"{steps:06d}" / "pretrained_model"
