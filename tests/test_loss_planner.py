"""``--plan.method=loss``: greedy removal scored by the measured training loss, on every family."""

from __future__ import annotations

import pytest
import torch

from vlaprune.core.plan import Budget, greedy_evaluations, greedy_removal
from vlaprune.core.surgery import remove_blocks
from vlaprune.core.verify import PlanLoss
from vlaprune.families import family_for
from vlaprune.io.calibration import CalibrationConfig, calibration_batches
from vlaprune.pipelines.planning import build_problem, compute_stack_cka
from vlaprune.pipelines.prune import run_prune

from .lerobot_data import make_dataset
from .test_prune import _cfg


def _batches(bundle, n=2, seed=0):
    return list(calibration_batches(bundle.policy, bundle.preprocessor, repo_id="synthetic", root=None,
                                    config=CalibrationConfig(num_samples=n, batch_size=n, seed=seed),
                                    allow_synthetic=True, synthetic=bundle.synthetic))


# GR00T: a few blocks of the stacks with rules (deepstack layers, DiT roles), to keep the search short
@pytest.mark.parametrize(("spec", "budget"), [pytest.param(spec, budget, id=spec) for spec, budget in [
    ("tiny:smolvla", Budget(ratio=0.5)), ("tiny:pi0", Budget(ratio=0.5)), ("tiny:pi05", Budget(ratio=0.5)),
    ("tiny:groot", Budget(keep={"llm": 6, "dit": 6})), ("tiny:groot_n15", Budget(keep={"llm": 11, "dit": 14}))]])
def test_the_loss_plan_obeys_the_rules_and_its_score_is_the_pruned_models_loss(spec, budget, tiny):
    bundle = tiny(spec)
    source, family = bundle.policy, family_for(bundle.policy)
    problem = build_problem(family, source, compute_stack_cka(source, _batches(bundle), family=family), [])
    meter = PlanLoss(source, family, _batches(bundle, seed=1))
    assert meter({n: range(d) for n, d in family.depths(source).items()}) == meter.full
    plan = greedy_removal(problem, budget, meter)  # validates every rule of the family before returning
    assert 0 < plan.details["evaluations"] <= greedy_evaluations(problem, budget)
    order = plan.details["order"]
    lockstep = {m for group in problem.lockstep for m in group[1:]}  # removed together with the group's first
    assert len(order) == sum(s.num_layers - len(plan.kept[s.name]) for s in problem.stacks if s.name not in lockstep)
    assert order[-1]["score"] == meter(plan.kept)  # deterministic: fixed noise and times
    pruned = remove_blocks(source, family, {n: list(k) for n, k in plan.kept.items()})
    real = PlanLoss(pruned, family, _batches(bundle, seed=1)).full
    assert real == pytest.approx(order[-1]["score"], rel=1e-5)  # what was scored is what is built
    assert order[-1]["score"] != pytest.approx(meter.full, rel=1e-4)  # the removed blocks did something


def test_the_loss_is_smolvlas_own_training_loss(tiny):
    bundle = tiny("tiny:smolvla")
    data = _batches(bundle, n=3, seed=4)
    data[0]["action_is_pad"][1, -3:] = True  # steps past an episode's end do not count
    meter = PlanLoss(bundle.policy, family_for(bundle.policy), data, draws=1)
    batch, noise, time = meter.inputs[0]
    with torch.no_grad():
        loss, _ = bundle.policy.forward(dict(batch), noise=noise, time=time)
    assert meter.full == pytest.approx(float(loss), rel=1e-6)


def test_the_loss_needs_labelled_frames(tiny, tmp_path):
    bundle = tiny("tiny:smolvla")
    unlabelled = [{k: v for k, v in b.items() if not k.startswith("action")} for b in _batches(bundle)]
    with pytest.raises(ValueError, match=r"action labels.*--plan.method=cka-dp"):
        PlanLoss(bundle.policy, family_for(bundle.policy), unlabelled)
    with pytest.raises(ValueError, match=r"--plan.method=loss needs demonstrations: .*--plan.method=cka-dp"):
        run_prune(_cfg(tmp_path / "p", method="loss"))
    assert not (tmp_path / "p").exists()


def test_prune_with_the_loss_planner_records_its_search(tmp_path):
    make_dataset(tmp_path / "data")
    result = run_prune(_cfg(tmp_path / "p", method="loss", repo_id="local/calib", root=str(tmp_path / "data"),
                            refine="off"))
    manifest = result.manifest
    assert manifest.method == manifest.requested_method == "loss"
    details = manifest.plan["details"]
    # the expert's self/cross roles rule out some single removals: fewer than the 8 + 7 + 6 + 5 bound
    assert len(details["order"]) == 4 and 0 < details["evaluations"] < 8 + 7 + 6 + 5 and details["seconds"] > 0
    assert [step["removed"] for step in details["order"]] == sorted(manifest.stacks["vlm"].removed, key=[
        step["removed"] for step in details["order"]].index)
    assert manifest.verify["chunk_max_abs_diff"] < 1e-4
