"""The testbed scripts' bookkeeping: a pretraining run may be shortened only before it gets there;
the held-out choice keeps the tasks that leave room both ways."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


def _script(name: str):
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _at_step(train: Path, step: int) -> None:
    state = train / "checkpoints" / "last" / "training_state"
    state.mkdir(parents=True)
    (state / "training_step.json").write_text(json.dumps({"step": step}))


def test_a_pretraining_run_can_be_shortened_only_before_it_gets_there(tmp_path):
    pretrain = _script("testbed_pretrain")
    settings = {"steps": 4000, "batch_size": 16, "seed": 0}
    record = {"settings": settings}
    pretrain.check_settings(record, settings, tmp_path / "train")  # the same settings
    with pytest.raises(SystemExit, match="at step None"):  # no checkpoint yet: nothing to resume
        pretrain.check_settings(record, {**settings, "steps": 3000}, tmp_path / "train")
    _at_step(tmp_path / "train", 500)
    pretrain.check_settings(record, {**settings, "steps": 3000}, tmp_path / "train")
    assert record["steps_changes"] == [{"at_step": 500, "from": 4000, "to": 3000}]
    with pytest.raises(SystemExit, match="at step 500"):
        pretrain.check_settings(record, {**settings, "steps": 400}, tmp_path / "train")
    with pytest.raises(SystemExit, match="recorded with"):
        pretrain.check_settings(record, {**settings, "batch_size": 8}, tmp_path / "train")


def test_the_held_out_choice_keeps_tasks_strictly_inside_the_range():
    heldout = _script("testbed_heldout")
    success = {"a": 0.0, "b": 0.1, "c": 0.3, "d": 0.5, "e": 0.8, "f": 0.9, "g": 1.0}
    choice = heldout.choose(success, 0.1, 0.9)
    assert choice["tasks"] == ["c", "d", "e"] and choice["mean"] == pytest.approx(0.5333, abs=1e-4)
    assert not choice["enough"]
    assert heldout.choose({**success, "h": 0.6}, 0.1, 0.9)["enough"]
    assert heldout.choose({"a": 1.0}, 0.1, 0.9) == {"tasks": [], "mean": None, "enough": False, "floor": 0.1,
                                                     "ceiling": 0.9}
