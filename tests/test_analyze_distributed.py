"""``torchrun --nproc_per_node=2 vlaprune analyze``: batches split over ranks, same matrices as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlaprune.pipelines.analyze import run_analyze
from vlaprune.pipelines.config import AnalyzeConfig, CalibrationArgs, DatasetArgs, PolicyArgs

ARGS = ["--policy.path=tiny:smolvla", "--dataset.repo_id=synthetic",
        "--calibration.num_samples=8", "--calibration.batch_size=2"]


@pytest.mark.slow  # 16 s of torchrun start-up; the all-reduce itself is tested in test_cka_distributed
@pytest.mark.timeout(300)
def test_two_ranks_equal_one_process(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "vlaprune.cli", "analyze", *ARGS, f"--out={out}"],
        capture_output=True, text=True, env=env, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = json.loads((out / "analysis.json").read_text())

    # few tokens per batch (< max_tokens): no subsampling, so the split result must be exact
    single = run_analyze(AnalyzeConfig(
        policy=PolicyArgs(path="tiny:smolvla"), dataset=DatasetArgs(repo_id="synthetic"),
        calibration=CalibrationArgs(num_samples=8, batch_size=2), out=str(tmp_path / "one"),
    ))
    for name, stack in single.stacks.items():
        assert dist["stacks"][name]["num_updates"] == stack.num_updates
        for row_d, row_s in zip(dist["stacks"][name]["cka"], stack.cka, strict=True):
            assert row_d == pytest.approx(list(row_s), abs=1e-10)
