"""The bookkeeping of ``benchmarks/selection_signals.py``: units from a study's records, rank correlations."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).parents[1] / "benchmarks" / "selection_signals.py"
_spec = importlib.util.spec_from_file_location("selection_signals", _PATH)
signals = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(signals)


def _record(method, seed, kept, rate, **extra):
    return {"key": f"finetuned/{method}@0.5/s{seed}", "kind": "finetuned", "method": method, "ratio": 0.5,
            "seed": seed, "kept": {"vlm": kept}, "evaluation": {"success_rate": rate}, **extra}


def test_units_are_one_per_plan_and_seed_and_skip_the_full_model_and_timings(tmp_path):
    records = [{"key": "finetuned/full/s0", "kind": "finetuned", "method": "full", "ratio": None, "seed": 0,
                "evaluation": {"success_rate": 0.5}},
               _record("loss", 0, [0, 3], 0.4), _record("default", 0, [0, 3], 0.4, shared_with="finetuned/loss@0.5/s0"),
               _record("loss", 1, [0, 3], 0.3), _record("first-k", 0, [0, 1], 0.2),
               {"key": "timing/loss@0.5/s0", "kind": "timing", "method": "loss", "ratio": 0.5, "seed": 0,
                "kept": {"vlm": [0, 3]}}]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    units = signals.study_units(path)
    assert [(u["kept"]["vlm"], u["seed"], u["success"]) for u in units] == [([0, 3], 0, 0.4), ([0, 3], 1, 0.3),
                                                                            ([0, 1], 0, 0.2)]
    assert units[0]["variants"] == ["loss@0.5", "default@0.5"]
    # against the full model of the same seed; seed 1 has none
    assert [u["vs_full"] for u in units] == [pytest.approx(-0.1), None, pytest.approx(-0.3)]
    assert {u["group"] for u in units} == {"0.5"}


def test_correlations_per_budget_keep_depths_apart():
    def unit(group, signal, success, vs_full):
        return {"group": group, "cka_cost": signal, "damage": signal, "loss_increase": signal, "success": success,
                "vs_full": vs_full}

    # within each budget a lower signal means less success; pooled, the deeper budget's higher success wins
    units = [unit("0.25", s, r, r - 0.5) for s, r in [(0.1, 0.8), (0.2, 0.9), (0.3, 1.0)]]
    units += [unit("0.5", s, r, r - 0.5) for s, r in [(1.1, 0.1), (1.2, 0.2), (1.3, 0.3)]]
    units.append(unit("0.5+vision", 1, 0, 0))
    assert signals.correlations(units[:6], "success")["damage"]["rho"] > 0
    groups = signals.by_group(units)
    assert set(groups) == {"0.25", "0.5"}  # fewer than 3 units: no figure
    assert groups["0.5"]["units"]["damage"]["rho"] == pytest.approx(-1.0)
    assert groups["0.25"]["seed_matched"]["loss_increase"]["rho"] == pytest.approx(-1.0)


def test_correlation_is_positive_when_a_lower_signal_means_more_success():
    points = [{"cka_cost": c, "damage": d, "loss_increase": li, "s": s}
              for c, d, li, s in [(0.1, 0.3, 0.5, 0.9), (0.2, 0.2, 1.0, 0.5), (0.3, 0.1, 2.0, 0.1)]]
    c = signals.correlations(points, "s")
    assert c["loss_increase"]["rho"] == pytest.approx(1.0) and c["cka_cost"]["rho"] == pytest.approx(1.0)
    assert c["damage"]["rho"] == pytest.approx(-1.0) and c["damage"]["n"] == 3
    assert signals.correlations(points[:2], "s")["damage"]["rho"] is None  # too few points to rank
    flat = [{**p, "s": 0.5} for p in points]
    assert signals.correlations(flat, "s")["damage"]["rho"] is None  # nothing to predict
