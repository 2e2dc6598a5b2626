"""A small local LeRobotDataset written with LeRobot's own API (no hub), and stock ``lerobot-train`` on one."""

from __future__ import annotations

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
