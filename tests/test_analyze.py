"""``vlaprune analyze`` end to end on the tiny built-ins, synthetic and LeRobotDataset calibration."""

from __future__ import annotations

import json

import pytest

from vlaprune.cli import main
from vlaprune.families import family_for
from vlaprune.pipelines.analyze import run_analyze
from vlaprune.pipelines.config import AnalyzeConfig, CalibrationArgs, CKAArgs, DatasetArgs, PolicyArgs
from vlaprune.pipelines.planning import load_analysis

from .conftest import TINY_SPECS
from .lerobot_data import make_dataset


def _cfg(out, spec="tiny:smolvla", repo_id="synthetic", root=None, **calib):
    calib = {"num_samples": 6, "batch_size": 3, **calib}
    return AnalyzeConfig(policy=PolicyArgs(path=spec), dataset=DatasetArgs(repo_id=repo_id, root=root),
                         calibration=CalibrationArgs(**calib), out=str(out))


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_cli_writes_analysis_and_heatmaps(tmp_path, spec, capsys):
    out = tmp_path / "x"
    code = main(["analyze", f"--policy.path={spec}", "--dataset.repo_id=synthetic", f"--out={out}",
                 "--calibration.num_samples=4", "--calibration.batch_size=4"])
    assert code == 0
    data = json.loads((out / "analysis.json").read_text())
    assert set(data["stacks"]) == {stack.name for stack in family_for(spec.split(":")[1]).stacks}
    for name, stack in data["stacks"].items():
        n = stack["num_layers"] + 1
        cka = stack["cka"]
        assert len(cka) == n and all(len(row) == n for row in cka)
        assert all(abs(cka[i][i] - 1) < 1e-9 for i in range(n))
        assert all(abs(cka[i][j] - cka[j][i]) < 1e-12 for i in range(n) for j in range(n))
        assert (out / f"cka_{name}.png").stat().st_size > 1000
        assert len(stack["top_direction"]) == n and all(0 < v <= 1 for v in stack["top_direction"])
    assert data["calibration"]["synthetic"] is True
    assert data["settings"]["capture"]["timesteps"] == [0.9, 0.5, 0.1]
    assert data["versions"]["lerobot"] == "0.6.1"
    assert data["stacks"]["expert"]["num_updates"] == 12  # per-sample estimator: 4 samples × 3 flow timesteps
    assert "most similar input/output" in capsys.readouterr().out


def test_analysis_is_deterministic(tmp_path):
    a = run_analyze(_cfg(tmp_path / "a"))
    b = run_analyze(_cfg(tmp_path / "b"))
    assert a.stacks["vlm"].cka == b.stacks["vlm"].cka
    assert a.stacks["expert"].cka == b.stacks["expert"].cka
    c = run_analyze(_cfg(tmp_path / "c", seed=1))
    assert c.stacks["vlm"].cka != a.stacks["vlm"].cka
    stored = load_analysis(tmp_path / "a" / "analysis.json")  # what prune --analysis reads back
    assert stored == a.stacks and stored["vlm"].top_direction == a.stacks["vlm"].top_direction is not None


def test_existing_out_refused_unless_overwrite(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_analyze(_cfg(out))
    assert (out / "keep.txt").exists()
    cfg = _cfg(out)
    cfg.overwrite = True
    run_analyze(cfg)
    assert (out / "analysis.json").exists() and not (out / "keep.txt").exists()


def test_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    import vlaprune.pipelines.analyze as analyze_module

    def broken(analysis, directory):
        (directory / "analysis.json").write_text("{")
        raise RuntimeError("disk full")

    monkeypatch.setattr(analyze_module, "write_analysis", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_analyze(_cfg(tmp_path / "x"))
    assert list(tmp_path.iterdir()) == []


def test_debiased_with_too_few_examples_is_an_error(tmp_path):
    cfg = _cfg(tmp_path / "x", num_samples=3, batch_size=3)
    cfg.cka = CKAArgs(preset="minibatch", debiased=True, tokens="mean")
    with pytest.raises(ValueError, match="at least 4 examples"):
        run_analyze(cfg)


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["analyze", "--policy.path=tiny:act", "--dataset.repo_id=synthetic", f"--out={tmp_path}/o"]) == 1
    assert "built-in policies" in capsys.readouterr().err
    assert main(["analyze", "--policy.path=/no/such/dir", "--dataset.repo_id=synthetic", f"--out={tmp_path}/o"]) == 1
    assert "no such directory" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


def test_a_missing_dataset_root_is_named(tmp_path, capsys):
    args = ["analyze", "--policy.path=tiny:pi0", "--dataset.repo_id=local/x", f"--out={tmp_path}/o"]
    assert main([*args, f"--dataset.root={tmp_path}/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert f"--dataset.root={tmp_path}/nonexistent does not exist" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert main([*args, f"--dataset.root={tmp_path}/empty"]) == 1
    assert "holds no LeRobotDataset (no meta/info.json)" in capsys.readouterr().err
    assert main(args) == 1  # no root: a hub dataset, and the hub is offline
    assert "'local/x' is not on this machine and the hub is offline" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_lerobot_dataset_calibration(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root)
    analysis = run_analyze(_cfg(tmp_path / "x", repo_id="local/calib", root=str(root)))
    assert analysis.calibration["synthetic"] is False
    assert analysis.stacks["vlm"].num_examples > 0


def test_dataset_missing_a_feature_names_the_key(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, drop="observation.state")
    with pytest.raises(ValueError, match=r"lacks feature\(s\) \['observation.state'\]"):
        run_analyze(_cfg(tmp_path / "x", repo_id="local/calib", root=str(root)))
    assert not (tmp_path / "x").exists()
