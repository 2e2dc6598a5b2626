"""The quality study's bookkeeping: a rerun resumes from finished units and never mixes settings."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).parents[1] / "benchmarks" / "metaworld_study.py"
_spec = importlib.util.spec_from_file_location("metaworld_study", _PATH)
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


def _args(out: Path, **kw) -> argparse.Namespace:
    base = {"out": out, "policy": "metaworld:smolvla-small", "data_root": Path("d"), "data_repo_id": "local/x",
            "ratios": [0.5], "methods": ["cka-dp"], "seeds": [0], "steps": 400, "batch_size": 32, "lr": 1e-4,
            "eval_episodes": 20, "max_steps": 200, "device": "cpu", "timing_rounds": 10, "quick": False,
            "resume_from": None}
    return argparse.Namespace(**{**base, **kw})


def _evaluation(rate: float) -> dict:
    return {"success_rate": rate, "tasks": {"drawer-close-v3": {"success_rate": rate}}}


def test_a_torn_record_is_dropped_and_finished_units_are_kept(tmp_path):
    s = study.Study(_args(tmp_path))
    s.check_settings()
    s.save_record({"key": "finetuned/full/s0", "kind": "finetuned", "method": "full", "ratio": None, "seed": 0})
    with s.records_path.open("a") as f:
        f.write('{"key": "finetuned/cka-dp@0.5/s0", "kind": "fine')  # killed while writing
    assert list(s.records()) == ["finetuned/full/s0"]
    s.save_record({"key": "finetuned/full/s1", "kind": "finetuned", "method": "full", "ratio": None, "seed": 1})
    lines = s.records_path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["finetuned/full/s0", "finetuned/full/s1"]


def test_a_rerun_with_other_unit_settings_is_refused_but_more_seeds_are_fine(tmp_path):
    study.Study(_args(tmp_path)).check_settings()
    study.Study(_args(tmp_path, seeds=[0, 1, 2], ratios=[0.25, 0.5])).check_settings()
    with pytest.raises(SystemExit, match=r"other settings.*steps"):
        study.Study(_args(tmp_path, steps=200)).check_settings()


def test_summary_is_mean_and_sd_over_seeds(tmp_path):
    records = {}
    for seed, (full, pruned) in enumerate([(0.5, 0.6), (0.7, 0.8)]):
        for method, ratio, rate in (("full", None, full), ("cka-dp", 0.5, pruned)):
            key = f"finetuned/{study.Study.name(method, ratio)}/s{seed}"
            records[key] = {"key": key, "kind": "finetuned", "method": method, "ratio": ratio, "seed": seed,
                            "evaluation": _evaluation(rate), "update_s": 0.3}
    rows = study.summarize(records, [("full", None), ("cka-dp", 0.5)])
    assert rows[0]["success"] == [0.5, 0.7] and rows[0]["success_mean"] == pytest.approx(0.6)
    assert rows[0]["success_sd"] == pytest.approx(0.1414, abs=1e-4) and rows[1]["depth"] == 0.5
    text = study.table(rows)
    assert "| cka-dp@0.5 | 50% | 70.0% ± 14.1% | 60% / 80% | +10.0 ± 0.0 (2 seeds) |" in text
    assert rows[1]["vs_full"]["differences"] == pytest.approx([0.1, 0.1]) and "vs_full" not in rows[0]
    # seed-matched: only the seeds both have count, one of them gives no standard error
    one = study.paired_difference({0: 0.4, 1: 0.9}, {0: 0.5, 2: 0.1})
    assert one == {"seeds": [0], "differences": [pytest.approx(-0.1)], "mean": pytest.approx(-0.1), "se": None}
    assert study.paired_difference({1: 0.4}, {0: 0.5}) is None
    study.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_units_run_the_first_seeds_comparison_then_the_full_models_spread(tmp_path):
    s = study.Study(_args(tmp_path, methods=["cka-dp", "first-k"], seeds=[0, 1, 2]))
    units = [(kind, study.Study.name(m, r), seed) for kind, m, r, seed in s.units()]
    assert units[:5] == [("finetuned", "full", 0), ("finetuned", "cka-dp@0.5", 0), ("finetuned", "first-k@0.5", 0),
                         ("finetuned", "full", 1), ("finetuned", "full", 2)]
    assert units[5:9] == [("finetuned", v, seed) for seed in (1, 2) for v in ("cka-dp@0.5", "first-k@0.5")]
    assert units[9:] == [("timing", "cka-dp@0.5", 0), ("timing", "first-k@0.5", 0), ("training_free", "full", 0),
                         ("training_free", "cka-dp@0.5", 0), ("training_free", "first-k@0.5", 0)]
    assert len(set(units)) == len(units)


def test_a_committed_copy_of_the_units_seeds_a_new_out(tmp_path):
    first = study.Study(_args(tmp_path / "a"))
    first.check_settings()
    first.save_record({"key": "finetuned/full/s0", "kind": "finetuned", "method": "full", "ratio": None, "seed": 0})
    resumed = study.Study(_args(tmp_path / "b", resume_from=tmp_path / "a", seeds=[0, 1]))
    resumed.check_settings()
    assert list(resumed.records()) == ["finetuned/full/s0"]
    with pytest.raises(SystemExit, match=r"other settings.*steps"):
        study.Study(_args(tmp_path / "c", resume_from=tmp_path / "a", steps=200)).check_settings()
    with pytest.raises(SystemExit, match=r"has no settings\.json"):
        study.Study(_args(tmp_path / "d", resume_from=tmp_path / "empty")).check_settings()


def test_the_shipped_calibration_set_is_recorded_relative_to_the_assets():
    from vlaprune.models import shipped

    assert study._setting(shipped.get(shipped.SPEC).calibration_root) == "<assets>/metaworld/heldout"
    assert study._setting(Path("/data/elsewhere")) == "/data/elsewhere" and study._setting(400) == "400"


def test_a_variant_replanned_differently_cannot_join_its_recorded_units(tmp_path):
    recorded = {"finetuned/cka-dp@0.5/s0": {"key": "finetuned/cka-dp@0.5/s0", "method": "cka-dp", "ratio": 0.5,
                                            "seed": 0, "kept": {"vlm": [0, 1]}},
                "finetuned/random@0.5/s0": {"key": "finetuned/random@0.5/s0", "method": "random", "ratio": 0.5,
                                            "seed": 0, "kept": {"vlm": [0, 3]}}}
    same = {"method": "cka-dp", "ratio": 0.5, "seed": 1, "kept": {"vlm": [0, 1]}}
    study.check_same_plan(recorded, same, tmp_path)
    study.check_same_plan(recorded, {"method": "random", "ratio": 0.5, "seed": 1, "kept": {"vlm": [2, 3]}}, tmp_path)
    with pytest.raises(SystemExit, match=r"recorded unit finetuned/cka-dp@0\.5/s0 .* kept \{'vlm': \[0, 1\]\}"):
        study.check_same_plan(recorded, {**same, "kept": {"vlm": [0, 2]}}, tmp_path)


def test_the_table_keeps_variants_recorded_by_earlier_runs(tmp_path):
    s = study.Study(_args(tmp_path, methods=["first-k"]))
    records = {"finetuned/loss@0.5/s0": {"key": "finetuned/loss@0.5/s0", "method": "loss", "ratio": 0.5, "seed": 0},
               "finetuned/first-k@0.5/s0": {"key": "finetuned/first-k@0.5/s0", "method": "first-k", "ratio": 0.5,
                                            "seed": 0}}
    assert s.reported(records) == [("full", None), ("first-k", 0.5), ("loss", 0.5)]


def test_results_leave_out_variants_with_no_unit_yet(tmp_path):
    records = {f"finetuned/{name}/s0": {"key": f"finetuned/{name}/s0", "kind": "finetuned", "method": method,
                                        "ratio": ratio, "seed": 0, "evaluation": _evaluation(0.5), "update_s": 0.3}
               for name, method, ratio in (("full", "full", None), ("cka-dp@0.5", "cka-dp", 0.5))}
    study.write_results(tmp_path, _args(tmp_path), records, [("full", None), ("first-k", 0.25), ("cka-dp", 0.5)])
    table = (tmp_path / "table.md").read_text()
    assert "| cka-dp@0.5 |" in table and "first-k" not in table
    assert [r["variant"] for r in json.loads((tmp_path / "results.json").read_text())["rows"]] == ["full", "cka-dp@0.5"]


def test_a_variant_with_another_variants_plan_shares_its_unit_at_the_same_seed():
    loss = {"key": "finetuned/loss@0.5/s0", "kind": "finetuned", "method": "loss", "ratio": 0.5, "seed": 0,
            "kept": {"vlm": [0, 3]}, "evaluation": _evaluation(0.4)}
    records = {loss["key"]: loss}
    default = {"key": "finetuned/default@0.5/s0", "kind": "finetuned", "method": "default", "ratio": 0.5, "seed": 0,
               "kept": {"vlm": [0, 3]}}
    assert study.same_unit(records, default) is loss
    assert study.same_unit(records, {**default, "seed": 1}) is None  # another seed trains another model
    assert study.same_unit(records, {**default, "kept": {"vlm": [0, 1]}}) is None
    assert study.same_unit(records, {**default, "kind": "timing"}) is None
    assert study.same_unit(records, {"key": "finetuned/full/s0", "kind": "finetuned", "seed": 0}) is None


def test_a_vision_variant_plans_the_vision_encoder_too(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(study, "run_prune", made.append)
    monkeypatch.setattr(study.Study, "analysis", lambda self: tmp_path / "analysis.json")
    s = study.Study(_args(tmp_path, methods=["first-k+vision", "default+vision"]))
    s.pruned("first-k+vision", 0.5, 0)
    s.pruned("default+vision", 0.5, 0)
    s.pruned("first-k", 0.5, 0)
    plans = [cfg.plan for cfg in made]
    assert [(p.method, p.refine, p.stacks) for p in plans] == [
        ("first-k", "off", ["vision", "vlm", "expert"]), ("cka-dp", "auto", ["vision", "vlm", "expert"]),
        ("first-k", "off", None)]
    assert made[0].out.endswith("first-k+vision@0.5")
    assert s.name("random+vision", 0.5, 1) == "random+vision@0.5-s1"  # a plan per seed, as random's
