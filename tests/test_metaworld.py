"""MetaWorld demonstrations: LeRobot's env, its frames and instructions, clean restarts, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from vlaprune import metaworld as mw


def _small(**kw):
    return mw.DemoConfig(**{"tasks": ("reach-v3",), "episodes_per_task": 2, "image_size": 32, "max_steps": 150, **kw})


def test_demonstrations_are_lerobot_env_frames(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    summary = mw.generate_demos(_small(), tmp_path / "demos", progress=False)
    assert summary.episodes == {"reach-v3": 2} and summary.attempts["reach-v3"] >= 2
    ds = LeRobotDataset("local/metaworld", root=tmp_path / "demos")
    assert ds.num_episodes == 2 and len(ds) == summary.frames
    first = ds[0]
    assert first["task"] == mw.instruction("reach-v3") == "Reach a goal position"
    assert tuple(first[mw.IMAGE_KEY].shape) == (3, 32, 32)
    assert first["action"].abs().max() <= 1.0

    # the first frame is what LeRobot's env shows after reset with the episode's seed (upright corner2)
    env = mw.make_env("reach-v3", 32)
    try:
        obs, _ = env.reset(seed=mw.DEMO_SEED_BASE)
    finally:
        env.close()
    stored = (first[mw.IMAGE_KEY].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(stored, obs["pixels"])
    np.testing.assert_allclose(first[mw.STATE_KEY].numpy(), obs["agent_pos"].astype(np.float32))


def test_interrupted_run_restarts_cleanly(tmp_path):
    partial = tmp_path / "demos.partial"
    partial.mkdir()
    (partial / "stale.txt").write_text("left by a killed run")
    mw.generate_demos(_small(episodes_per_task=1), tmp_path / "demos", progress=False)
    assert not partial.exists() and not (tmp_path / "demos" / "stale.txt").exists()
    with pytest.raises(FileExistsError, match="overwrite"):
        mw.generate_demos(_small(episodes_per_task=1), tmp_path / "demos", progress=False)


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown MetaWorld task\(s\) \['open-the-fridge'\].*reach-v3"):
        mw.generate_demos(_small(tasks=("open-the-fridge",)), tmp_path / "x", progress=False)
    with pytest.raises(RuntimeError, match="raise max_steps"):
        mw.generate_demos(_small(max_steps=1, max_attempts_per_task=2), tmp_path / "y", progress=False)
    assert not (tmp_path / "y").exists() and not (tmp_path / "y.partial").exists()
