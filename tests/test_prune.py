"""``vlaprune prune`` end to end: verified checkpoints that reload exactly and that stock
``lerobot-train`` trains."""

from __future__ import annotations

import json

import pytest
import torch

from vlaprune import load_policy
from vlaprune.cli import main
from vlaprune.core.plan import POOL
from vlaprune.families import family_for
from vlaprune.io.manifest import Manifest, read_manifest
from vlaprune.pipelines.config import CalibrationArgs, DatasetArgs, PlanArgs, PolicyArgs, PruneConfig
from vlaprune.pipelines.prune import run_prune
from vlaprune.studies.train import lerobot_train

from .conftest import TINY_SPECS
from .flow import assert_matches_skipped, batch, loss_and_chunk
from .lerobot_data import make_dataset

METHODS = ("cka-dp", "cka-run", "bi", "angular", "first-k", "random")


def _cfg(out, spec="tiny:smolvla", method="cka-dp", repo_id="synthetic", root=None, **plan):
    plan = {"ratio": 0.5, **plan} if not {"keep", "kept", "threshold"} & set(plan) else plan
    return PruneConfig(policy=PolicyArgs(path=spec), dataset=DatasetArgs(repo_id=repo_id, root=root),
                       calibration=CalibrationArgs(num_samples=4, batch_size=2), holdout_samples=2,
                       plan=PlanArgs(method=method, **plan), out=str(out))


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_prune_writes_a_checkpoint_that_reloads_identically(tmp_path, spec):
    result = run_prune(_cfg(tmp_path / "p", spec))
    manifest = json.loads((tmp_path / "p" / "prune_manifest.json").read_text())
    assert manifest["family"] == family_for(spec.split(":")[1]).name
    for name, stack in manifest["stacks"].items():
        if name == "vision":  # opt-in (--plan.stacks): not planned, every block kept
            assert stack["removed"] == [] and stack["kept"] == list(range(stack["source_num_layers"]))
            continue
        assert len(stack["kept"]) == 4 and len(stack["removed"]) == 4, name
        assert sorted(stack["kept"] + stack["removed"]) == list(range(8))
    assert manifest["stacks"]["vlm"]["kept"] == manifest["stacks"]["expert"]["kept"]  # lockstep
    assert manifest["verify"]["loss_max_abs_diff"] < 1e-4
    assert manifest["chunk_linear_flops"]["predicted_time_ratio"] < 1
    assert {"policy_preprocessor.json", "policy_postprocessor.json", "config.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "p").iterdir()}

    source = load_policy(spec)
    reloaded = load_policy(str(tmp_path / "p"))
    family = family_for(reloaded.policy)
    assert family.depths(reloaded.policy) == {**family.depths(source.policy), "vlm": 4, "expert": 4}
    data = batch(source)
    removed = {name: s["removed"] for name, s in manifest["stacks"].items()}
    loss, chunk = assert_matches_skipped(source.policy, reloaded.policy, removed, loss_and_chunk, data)
    mem_loss, mem_chunk = loss_and_chunk(result.pruned, data)  # the in-memory pruned policy: bit-identical
    assert torch.equal(loss, mem_loss) and torch.equal(chunk, mem_chunk)
    assert result.plan.method in METHODS


@pytest.mark.parametrize("spec", TINY_SPECS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_verified_checkpoint(tmp_path, spec, method):
    result = run_prune(_cfg(tmp_path / method, spec, method=method, refine="off"))
    assert result.manifest.method == method
    assert result.manifest.verify["chunk_max_abs_diff"] < 1e-4
    reloaded = load_policy(str(result.out))
    family = family_for(reloaded.policy)
    assert family.depths(reloaded.policy) == {**result.manifest.source_depths(), "vlm": 4, "expert": 4}
    if spec == "tiny:smolvla":
        kept = result.manifest.kept()["expert"]
        roles = ["self" if i % 2 == 0 else "cross" for i in range(8)]
        assert [roles[k] for k in kept] == roles[: len(kept)]  # every kept block keeps its role


def test_refine_on_synthetic_frames_keeps_the_least_damaging_plan_of_the_pool(tmp_path):
    result = run_prune(_cfg(tmp_path / "p", "tiny:pi0"))  # refine=auto: by chunk damage
    candidates = result.manifest.candidates
    assert candidates[0]["method"] == "cka-dp"
    found = [m for c in candidates for m in (c["method"], *c["details"].get("also", []))]
    assert set(found) == set(POOL)  # the requested cka-dp and every plan of the pool, each kept set once
    assert len({json.dumps(c["kept"], sort_keys=True) for c in candidates}) == len(candidates) >= 2
    chosen = [c for c in candidates if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["damage"] == min(c["damage"] for c in candidates)
    assert {c["signal"] for c in candidates} == {"damage"} and result.manifest.settings["refine_signal"] == "damage"
    assert result.manifest.kept() == {"vision": [0, 1], **{n: list(k) for n, k in chosen[0]["kept"].items()}}


def test_refine_on_demonstrations_measures_both_signals_and_auto_picks_by_the_chunk_damage(tmp_path):
    make_dataset(tmp_path / "data")
    result = run_prune(_cfg(tmp_path / "p", repo_id="local/calib", root=str(tmp_path / "data")))
    candidates = result.manifest.candidates
    found = {m for c in candidates for m in (c["method"], *c["details"].get("also", []))}
    assert {"cka-dp", "loss", *POOL} <= found  # with action labels the loss plan joins the pool
    assert all(c["damage"] is not None and c["loss_increase"] is not None for c in candidates)
    assert {c["signal"] for c in candidates} == {"damage"} and result.manifest.settings["refine_signal"] == "damage"
    chosen = [c for c in candidates if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["damage"] == min(c["damage"] for c in candidates)
    by_loss = run_prune(_cfg(tmp_path / "l", repo_id="local/calib", root=str(tmp_path / "data"), refine="loss"))
    # the same pool, measured the same way: only the signal that picks differs
    assert [c["kept"] for c in by_loss.manifest.candidates] == [c["kept"] for c in candidates]
    assert [c["damage"] for c in by_loss.manifest.candidates] == pytest.approx([c["damage"] for c in candidates])
    assert [c["loss_increase"] for c in by_loss.manifest.candidates] == pytest.approx(
        [c["loss_increase"] for c in candidates])
    picked = next(c for c in by_loss.manifest.candidates if c["chosen"])
    assert picked["loss_increase"] == min(c["loss_increase"] for c in candidates)
    assert by_loss.manifest.settings["refine_signal"] == "loss"


def test_refine_by_loss_without_labels_and_unknown_signals_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--plan.refine=loss needs demonstrations"):
        run_prune(_cfg(tmp_path / "p", refine="loss"))
    with pytest.raises(ValueError, match=r"--plan.refine='best' is unknown; choose auto, off, damage or loss"):
        run_prune(_cfg(tmp_path / "p", refine="best"))
    assert not (tmp_path / "p").exists()


def test_explicit_plan_and_bad_plans(tmp_path):
    kept = {"vlm": [0, 1, 2, 3, 4, 7], "expert": [0, 1, 2, 3, 4, 7]}
    result = run_prune(_cfg(tmp_path / "ok", kept=kept))
    assert result.manifest.method == "manual" and result.manifest.kept()["vlm"] == kept["vlm"]
    bad = {"vlm": [0, 2, 3, 5], "expert": [0, 2, 3, 5]}  # block 2 (self) would land at position 1 (cross)
    with pytest.raises(ValueError, match="role"):
        run_prune(_cfg(tmp_path / "bad", kept=bad))
    with pytest.raises(ValueError, match="lockstep"):
        run_prune(_cfg(tmp_path / "bad", kept={"vlm": [0, 1], "expert": [0, 3]}))
    assert not (tmp_path / "bad").exists()


def test_cli_prune_and_overwrite(tmp_path, capsys):
    out = tmp_path / "p"
    args = ["prune", "--policy.path=tiny:smolvla", "--dataset.repo_id=synthetic", "--ratio=0.5", f"--out={out}",
            "--calibration.num_samples=4", "--holdout_samples=2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "keep  4/8" in text and "predicted time ratio" in text and "(refined by damage)" in text
    assert "(also " in text  # tiny:smolvla's cka-dp plan is first-k's too
    assert main(args) == 1 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite=true"]) == 0
    capsys.readouterr()
    assert main([*args, "--overwrite=true", "--plan.refine=off"]) == 0  # a bare off: YAML's false on the line
    assert "(refined by" not in capsys.readouterr().out
    assert main(["prune", "--policy.path=tiny:smolvla", "--dataset.repo_id=synthetic", f"--out={out}2"]) == 1
    assert "exactly one budget" in capsys.readouterr().err


def test_manifest_that_disagrees_with_weights_is_refused(tmp_path):
    run_prune(_cfg(tmp_path / "p"))
    path = tmp_path / "p" / "prune_manifest.json"
    manifest = json.loads(path.read_text())
    vlm = manifest["stacks"]["vlm"]
    vlm.update(kept=[0, 1, 2], kept_original=[0, 1, 2], removed=list(range(3, vlm["source_num_layers"])))
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="do not belong to this manifest"):
        load_policy(str(tmp_path / "p"))
    vlm["kept"] = [0, 1]  # kept and removed no longer split the source's blocks
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"kept \[0, 1\] and removed .* do not split range\(8\)"):
        load_policy(str(tmp_path / "p"))
    manifest["surprise"] = 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"unknown keys \['surprise'\]"):
        load_policy(str(tmp_path / "p"))


def test_manifest_round_trips(tmp_path):
    result = run_prune(_cfg(tmp_path / "p"))
    assert Manifest.from_json(result.manifest.to_json()) == result.manifest
    assert read_manifest(tmp_path / "p") == result.manifest


@pytest.mark.timeout(600)
@pytest.mark.parametrize("spec", [  # 15 s each: pi0 / pi0.5 in the slow suite (their strict plugin loading
    # and discovery by LeRobot are tested in test_pi_pruned)
    pytest.param(s, marks=pytest.mark.slow) if s != "tiny:smolvla" else s for s in TINY_SPECS])
def test_lerobot_train_trains_the_pruned_checkpoint(tmp_path, spec):
    root = tmp_path / "ds"
    make_dataset(root, episodes=3, frames=15)
    pruned = tmp_path / "pruned"
    # the vision encoder pruned too: SmolVLA's checkpoint is then the plugin's smolvla_pruned type
    run_prune(_cfg(pruned, spec, repo_id="local/calib", root=str(root), stacks=["vision", "vlm", "expert"]))
    ckpt = lerobot_train(pruned, repo_id="local/calib", root=root, out=tmp_path / "train", steps=2, batch_size=2,
                         num_workers=0).checkpoint
    trained = load_policy(str(ckpt))
    before = load_policy(str(pruned))
    family = family_for(trained.policy)
    assert family.depths(trained.policy) == family.depths(before.policy)
    assert trained.policy.config.type == {"tiny:smolvla": "smolvla_pruned"}.get(spec, f"{spec[5:]}_pruned")
    changed = [k for k, v in trained.policy.state_dict().items() if not torch.equal(v, before.policy.state_dict()[k])]
    assert changed, "two training steps changed no weight"

    from lerobot.policies.factory import get_policy_class

    stock = get_policy_class(trained.policy.config.type).from_pretrained(str(ckpt))
    stock.eval()
    data = batch(trained)
    for a, b in zip(loss_and_chunk(trained.policy, data), loss_and_chunk(stock, data), strict=True):
        assert torch.equal(a, b)


def test_reusing_analysis_json_gives_the_same_plan(tmp_path):
    from vlaprune.pipelines.analyze import run_analyze
    from vlaprune.pipelines.config import AnalyzeConfig

    run_analyze(AnalyzeConfig(policy=PolicyArgs(path="tiny:smolvla"), dataset=DatasetArgs(repo_id="synthetic"),
                              calibration=CalibrationArgs(num_samples=4, batch_size=2), out=str(tmp_path / "a")))
    fresh = run_prune(_cfg(tmp_path / "fresh", refine="off"))
    cfg = _cfg(tmp_path / "reused", refine="off")
    cfg.analysis = str(tmp_path / "a" / "analysis.json")
    reused = run_prune(cfg)
    assert reused.manifest.stacks == fresh.manifest.stacks
    assert reused.manifest.calibration["analysis"] == cfg.analysis


def test_a_plan_that_removes_nothing_says_so(tmp_path, caplog, capsys):
    with caplog.at_level("WARNING", logger="vlaprune.pipelines.prune"):
        result = run_prune(_cfg(tmp_path / "p", ratio=0.0))
    assert result.manifest.removed_nothing()
    assert "the plan removes no block (--plan.ratio=0.0)" in caplog.text
    assert main(["prune", "--policy.path=tiny:smolvla", "--dataset.repo_id=synthetic", "--ratio=0",
                 "--calibration.num_samples=2", "--holdout_samples=1", f"--out={tmp_path}/cli"]) == 0
    assert "no block was removed: this checkpoint computes exactly what its source computes" in capsys.readouterr().out


def test_a_plan_on_a_degenerate_matrix_is_never_silent(tmp_path, caplog):
    from vlaprune.pipelines.analyze import run_analyze
    from vlaprune.pipelines.config import AnalyzeConfig

    run_analyze(AnalyzeConfig(policy=PolicyArgs(path="tiny:pi0"), dataset=DatasetArgs(repo_id="synthetic"),
                              calibration=CalibrationArgs(num_samples=4, batch_size=2), out=str(tmp_path / "a")))
    path = tmp_path / "a" / "analysis.json"
    data = json.loads(path.read_text())
    n = data["stacks"]["vlm"]["num_layers"] + 1
    data["stacks"]["vlm"]["cka"] = [[1.0 if i == j else 0.9995 for j in range(n)] for i in range(n)]  # saturated
    path.write_text(json.dumps(data))
    cfg = _cfg(tmp_path / "p", "tiny:pi0", refine="off")
    cfg.analysis = str(path)
    with caplog.at_level("WARNING"):
        run_prune(cfg)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith("stack vlm: CKA between the input and output of 8 of its 8 blocks") for m in warned)
    assert not any(m.startswith("stack expert") for m in warned)


def test_cka_runs_threshold_decides_the_depth_and_the_pool_meets_it(tmp_path):
    result = run_prune(_cfg(tmp_path / "p", "tiny:pi0", method="cka-run", ratio=None, run_threshold=0.9))
    candidates = result.manifest.candidates
    requested = candidates[0]
    assert requested["method"] == "cka-run" and requested["details"]["run_threshold"]["vlm/expert"] == 0.9
    depth = len(requested["kept"]["vlm"])
    assert all(len(c["kept"]["vlm"]) == depth for c in candidates) and len(candidates) >= 2
    assert len(result.manifest.kept()["vlm"]) == depth
    with pytest.raises(ValueError, match=r"--plan.run_threshold is the cka-run rule; with --plan.method=cka-dp"):
        run_prune(_cfg(tmp_path / "q", "tiny:pi0", ratio=None, run_threshold=0.9))
    with pytest.raises(ValueError, match=r"exactly one budget.*got \['ratio', 'run_threshold'\]"):
        run_prune(_cfg(tmp_path / "q", "tiny:pi0", method="cka-run", run_threshold=0.9))
