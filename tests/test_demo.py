"""``make demo`` end to end on the shipped model, shortened: every stage runs, results and report are written."""

from __future__ import annotations

import json

import pytest

from vlaprune.models import shipped
from vlaprune.studies import demo


@pytest.mark.parametrize(("spec", "depth"), [
    (shipped.SMALL, 12),
    pytest.param(shipped.SPEC, 16, marks=pytest.mark.slow),  # the default: real pretrained weights, minutes
])
def test_demo_runs_the_whole_job_on_the_shipped_model(spec, depth, tmp_path, capsys, caplog):
    out = tmp_path / "demo"
    (tmp_path / "demo.partial").mkdir()  # left by an interrupted run: replaced
    assert demo.main(["--policy", spec, "--out", str(out), "--steps", "2", "--batch_size", "4", "--episodes", "1",
                      "--max_steps", "15", "--num_workers", "0"]) == 0
    assert not (tmp_path / "demo.partial").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["policy"] == spec and results["lr"] == shipped.get(spec).demo.lr
    assert 0.0 <= results["success_full"] <= 1.0 and 0.0 <= results["success_pruned"] <= 1.0
    assert set(results["success_per_task"]["pruned"]) == set(shipped.get(spec).held_out)
    # half depth in both stacks, as the plan in the pruned checkpoint says
    plan = results["plan"]
    assert {name: (len(p["kept"]), p["source_num_layers"]) for name, p in plan.items() if name != "vision"} == {
        "vlm": (depth // 2, depth), "expert": (depth // 2, depth)}
    assert len(plan["vision"]["kept"]) == plan["vision"]["source_num_layers"]  # opt-in: not planned by default
    assert results["speed"]["train_step_ratio"] > 0 and results["finetune"]["pruned"]["final_loss"] is not None
    for path in ("analysis/cka_vlm.png", "pruned/prune_manifest.json", "bench.json", "report.md",
                 "finetune/pruned/checkpoints/000002/pretrained_model/model.safetensors"):
        assert (out / path).is_file(), path
    printed = capsys.readouterr()
    assert "success on held-out tasks" in printed.out and "report:" in printed.out
    # a first run is quiet: no page of video-decoder tracebacks when FFmpeg's libraries are missing
    assert "libtorchcodec" not in printed.err + caplog.text and "Traceback" not in printed.err + caplog.text
