"""Calibration frames: seeded, spread over episodes, through the policy's preprocessor."""

from __future__ import annotations

import pytest
import torch

from vlaprune.io.calibration import (
    CalibrationConfig,
    calibration_batches,
    spread_frame_indices,
    synthetic_batches,
)


def test_batch_sizes():
    assert CalibrationConfig(num_samples=10, batch_size=4).batch_sizes == [4, 4, 2]
    with pytest.raises(ValueError, match="num_samples"):
        CalibrationConfig(num_samples=0)


def test_spread_frame_indices_covers_episodes_and_is_seeded():
    bounds = [(0, 10), (10, 30), (30, 35), (35, 60)]
    picked = spread_frame_indices(bounds, 8, seed=1)
    assert len(set(picked)) == 8
    episodes = {next(e for e, (a, b) in enumerate(bounds) if a <= i < b) for i in picked}
    assert episodes == {0, 1, 2, 3}  # 8 samples over 4 episodes: every episode twice
    assert picked == spread_frame_indices(bounds, 8, seed=1)
    assert picked != spread_frame_indices(bounds, 8, seed=2)
    with pytest.raises(ValueError, match="exceeds"):
        spread_frame_indices(bounds, 61, seed=0)


def test_synthetic_batches_match_policy_features(tiny):
    policy = tiny("tiny:smolvla").policy
    batches = list(synthetic_batches(policy.config, CalibrationConfig(num_samples=5, batch_size=2, seed=3)))
    assert [len(b["task"]) for b in batches] == [2, 2, 1]
    for key, feat in policy.config.input_features.items():
        assert tuple(batches[0][key].shape[1:]) == tuple(feat.shape)
    again = list(synthetic_batches(policy.config, CalibrationConfig(num_samples=5, batch_size=2, seed=3)))
    assert torch.equal(batches[0]["observation.state"], again[0]["observation.state"])


def test_synthetic_refused_for_non_builtin(tiny):
    bundle = tiny("tiny:smolvla")
    with pytest.raises(ValueError, match="only allowed for the built-in"):
        next(calibration_batches(bundle.policy, bundle.preprocessor, repo_id="synthetic", root=None,
                                 config=CalibrationConfig(), allow_synthetic=False))
