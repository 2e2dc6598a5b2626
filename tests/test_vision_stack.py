"""The vision encoder as an opt-in stack (SmolVLA, pi0, pi0.5, GR00T N1.7): planned only when named,
pruned into a checkpoint that equals the source with the removed vision blocks skipped and reloads
strictly (SmolVLA: the plugin type ``smolvla_pruned``; pi0 / pi0.5: ``pi0_pruned`` / ``pi05_pruned`` at
the kept depth; GR00T: ``groot_pruned`` with a fourth stack and its deepstack mergers remapped)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from lerobot_policy_vlaprune.checks import PrunedCheckpointError
from lerobot_policy_vlaprune.configuration_smolvla_pruned import SmolVLAPrunedConfig
from vlaprune import load_policy
from vlaprune.core.surgery import remove_blocks
from vlaprune.families import family_for
from vlaprune.pipelines.config import CalibrationArgs, DatasetArgs, PlanArgs, PolicyArgs, PruneConfig
from vlaprune.pipelines.prune import run_prune

from .conftest import TINY_SPECS
from .flow import assert_matches_skipped, batch, groot_loss_and_chunk, loss_and_chunk
from .lerobot_data import make_dataset

KEPT = [0, 3, 4, 7]  # tiny:smolvla's expert roles alternate self/cross: each kept block keeps its role


def _cfg(out, spec="tiny:smolvla", dataset=None, **plan):
    plan = {"ratio": 0.5, **plan} if not {"keep", "kept"} & set(plan) else plan
    return PruneConfig(policy=PolicyArgs(path=str(spec)), dataset=dataset or DatasetArgs(repo_id="synthetic"),
                       calibration=CalibrationArgs(num_samples=4, batch_size=2), holdout_samples=2,
                       plan=PlanArgs(refine="off", **plan), out=str(out))


@pytest.mark.parametrize("spec", TINY_SPECS)
@pytest.mark.parametrize("plan", [
    {"vision": [1], "vlm": KEPT, "expert": KEPT},  # block 1 becomes block 0: renumbered
    {"vision": [0], "vlm": list(range(8)), "expert": list(range(8))},  # the vision encoder alone
], ids=["with-language", "vision-only"])
def test_pruned_vision_equals_the_source_with_its_blocks_skipped(spec, plan):
    bundle = load_policy(spec)
    source = bundle.policy
    family = family_for(source)
    with torch.no_grad():  # away from the initial values, so that equality means something
        for p in family.layers(source, "vision").parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = {k: v.clone() for k, v in source.state_dict().items()}
    pruned = remove_blocks(source, family, plan)

    assert family.depths(pruned) == {name: len(kept) for name, kept in plan.items()}
    if spec == "tiny:smolvla":  # the vision depth is no SmolVLA field: the plugin's type records it
        assert isinstance(pruned.config, SmolVLAPrunedConfig) and pruned.config.type == "smolvla_pruned"
        assert pruned.config.vision_kept_layers == plan["vision"] and pruned.config.vision_source_num_layers == 2
        assert pruned.model.vlm_with_expert.get_vlm_model().vision_model.config.num_hidden_layers == 1
    else:  # pi0_pruned / pi05_pruned record the dimensions they are built with
        assert pruned.config.type.endswith("_pruned") and pruned.config.architecture["vision"]["num_hidden_layers"] == 1
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items()), "source was modified"

    data = batch(bundle)
    removed = {name: [i for i in range(depth) if i not in plan[name]] for name, depth in family.depths(source).items()}
    loss, _ = assert_matches_skipped(source, pruned, removed, loss_and_chunk, data)
    full_loss, _ = loss_and_chunk(source, data)  # the skipped vision block mattered: not a vacuous test
    assert (full_loss - loss).abs().max() > 1e-4


@pytest.mark.parametrize("spec", ["tiny:pi0", "tiny:pi05"])
def test_pi_checkpoints_with_a_pruned_vision_encoder_reload_strictly(tmp_path, spec):
    result = run_prune(_cfg(tmp_path / "p", spec, stacks=["vision", "vlm", "expert"]))
    assert {name: len(s.kept) for name, s in result.manifest.stacks.items()} == {"vision": 1, "vlm": 4, "expert": 4}
    source = load_policy(spec)
    reloaded = load_policy(str(tmp_path / "p"))
    assert family_for(reloaded.policy).depths(reloaded.policy) == {"vision": 1, "vlm": 4, "expert": 4}
    data = batch(source)
    removed = {name: list(s.removed) for name, s in result.manifest.stacks.items()}
    loss, chunk = assert_matches_skipped(source.policy, reloaded.policy, removed, loss_and_chunk, data)
    mem_loss, mem_chunk = loss_and_chunk(result.pruned, data)
    assert torch.equal(loss, mem_loss) and torch.equal(chunk, mem_chunk)


def test_prune_with_the_vision_stack_writes_a_strict_smolvla_pruned_checkpoint(tmp_path):
    result = run_prune(_cfg(tmp_path / "p", stacks=["vision", "vlm", "expert"]))
    manifest = json.loads((tmp_path / "p" / "prune_manifest.json").read_text())
    assert manifest["policy_type"] == "smolvla_pruned" and manifest["settings"]["stacks"] == ["vision", "vlm", "expert"]
    assert {name: len(s["kept"]) for name, s in manifest["stacks"].items()} == {"vision": 1, "vlm": 4, "expert": 4}
    assert manifest["verify"]["chunk_max_abs_diff"] < 1e-4
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["type"] == "smolvla_pruned" and config["vision_kept_layers"] == manifest["stacks"]["vision"]["kept"]

    source = load_policy("tiny:smolvla")
    reloaded = load_policy(str(tmp_path / "p"))
    assert family_for(reloaded.policy).depths(reloaded.policy) == {"vision": 1, "vlm": 4, "expert": 4}
    data = batch(source)
    removed = {name: s["removed"] for name, s in manifest["stacks"].items()}
    loss, chunk = assert_matches_skipped(source.policy, reloaded.policy, removed, loss_and_chunk, data)
    mem_loss, mem_chunk = loss_and_chunk(result.pruned, data)  # the in-memory pruned policy: bit-identical
    assert torch.equal(loss, mem_loss) and torch.equal(chunk, mem_chunk)

    # pruning the pruned checkpoint again composes: the vision block it holds is still named by its original index
    make_dataset(tmp_path / "ds", episodes=2, frames=10)
    again = run_prune(_cfg(tmp_path / "q", spec=tmp_path / "p", keep={"vlm": 2, "expert": 2},
                           dataset=DatasetArgs(repo_id="local/calib", root=str(tmp_path / "ds"))))
    assert again.pruned.config.type == "smolvla_pruned"
    assert again.pruned.config.vision_kept_layers == manifest["stacks"]["vision"]["kept"]
    assert again.manifest.stacks["vision"].kept_original == tuple(manifest["stacks"]["vision"]["kept"])


def test_default_stacks_leave_the_vision_encoder_and_a_stock_smolvla(tmp_path):
    result = run_prune(_cfg(tmp_path / "p"))
    assert result.manifest.policy_type == "smolvla" and result.manifest.settings["stacks"] == ["vlm", "expert"]
    assert result.manifest.stacks["vision"].removed == ()
    # --plan.keep naming the vision stack plans it too; the stacks it leaves out keep every block
    only = run_prune(_cfg(tmp_path / "v", keep={"vision": 1}))
    assert {name: len(s.kept) for name, s in only.manifest.stacks.items()} == {"vision": 1, "vlm": 8, "expert": 8}
    assert only.manifest.settings["stacks"] == ["vision", "vlm", "expert"]


@pytest.mark.parametrize(("plan", "message"), [
    ({"stacks": ["vison", "vlm", "expert"]}, r"\['vison'\] is not a stack of smolvla; its stacks: vision, vlm, expert"),
    ({"stacks": ["vision", "vlm"]}, r"\['vlm', 'expert'\] lose the same blocks \(lockstep\).*name all of them or none"),
    ({"stacks": ["vlm", "expert"], "keep": {"vision": 1}}, r"name \['vision'\], outside --plan.stacks"),
])
def test_bad_stack_requests_name_the_fix(tmp_path, plan, message):
    with pytest.raises(ValueError, match=message):
        run_prune(_cfg(tmp_path / "p", **plan))
    assert not (tmp_path / "p").exists()


def test_a_smolvla_pruned_checkpoint_that_does_not_fit_is_refused(tmp_path):
    run_prune(_cfg(tmp_path / "p", kept={"vision": [1], "vlm": KEPT, "expert": KEPT}))
    config_path = tmp_path / "p" / "config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**config, "vision_source_num_layers": 3}))
    with pytest.raises(PrunedCheckpointError, match=r"has 2 vision blocks, but this checkpoint was pruned from one "
                                                    r"with 3"):
        load_policy(str(tmp_path / "p"))
    for bad, message in (({"vision_kept_layers": [2]}, r"outside range\(2\)"),
                         ({"load_vlm_weights": True}, "set load_vlm_weights=false")):
        config_path.write_text(json.dumps({**config, **bad}))
        with pytest.raises(Exception) as info:  # draccus wraps the config's ValueError
            load_policy(str(tmp_path / "p"))
        chain, error = [], info.value
        while error is not None:
            chain.append(error)
            error = error.__cause__ or error.__context__
        assert any(isinstance(e, ValueError) and re.search(message, str(e)) for e in chain), chain

    config_path.write_text(json.dumps(config))
    weights = tmp_path / "p" / "model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if ".vision_model.encoder.layers.0.mlp." in k)
    save_file({k: v for k, v in tensors.items() if k != key}, weights, metadata={"format": "pt"})
    with pytest.raises(PrunedCheckpointError, match="missing"):
        load_policy(str(tmp_path / "p"))


# ---- GR00T N1.7: Qwen3-VL's vision tower, deepstack mergers reading blocks 1, 3, 5 and the patch merger block 7

GROOT_LANGUAGE = {"llm": [0, 1, 2, 5], "vl_self_attention": [0, 1], "dit": [0, 1, 2, 3]}
GROOT_STACKS = ["vision", "llm", "vl_self_attention", "dit"]


def _groot_cfg(out, spec="tiny:groot", dataset=None, **plan):
    plan = {"ratio": 0.5, **plan} if not {"keep", "kept"} & set(plan) else plan
    return PruneConfig(policy=PolicyArgs(path=str(spec)), dataset=dataset or DatasetArgs(repo_id="synthetic"),
                       calibration=CalibrationArgs(num_samples=4, batch_size=2), holdout_samples=2,
                       plan=PlanArgs(refine="off", **plan), out=str(out))


@pytest.mark.parametrize(("vision", "taps"), [
    ([1, 2, 3, 5, 7], [0, 2, 3]),  # the tapped blocks kept: each merger reads its block at the new position
    ([0, 2, 4, 7], [0, 1, 2]),  # tapped blocks 1, 3, 5 removed: mergers read blocks 0, 2, 4, as the skipped source
], ids=["taps-kept", "taps-removed"])
def test_groot_pruned_vision_equals_the_source_with_its_blocks_skipped(vision, taps):
    bundle = load_policy("tiny:groot")
    source = bundle.policy
    family = family_for(source)
    with torch.no_grad():  # away from the initial values, so that equality means something
        for p in family.layers(source, "vision").parameters():
            p.add_(0.05 * torch.randn_like(p))
    plan = {"vision": vision, **GROOT_LANGUAGE}
    pruned = remove_blocks(source, family, plan)

    visual = pruned._groot_model.backbone.visual
    assert len(visual.blocks) == len(vision) and visual.deepstack_visual_indexes == taps
    assert pruned.config.kept_blocks["vision"] == vision and pruned.config.source_depths["vision"] == 8
    data = batch(bundle)
    removed = {name: [i for i in range(depth) if i not in plan[name]] for name, depth in family.depths(source).items()}
    assert_matches_skipped(source, pruned, removed, groot_loss_and_chunk, data)
    only_language = {name: [] if name == "vision" else blocks for name, blocks in removed.items()}
    from vlaprune.core.surgery import skip_blocks

    with skip_blocks(source, family, only_language):  # the removed vision blocks mattered: not a vacuous test
        language_loss, _ = groot_loss_and_chunk(source, data)
    assert (language_loss - groot_loss_and_chunk(pruned, data)[0]).abs().max() > 1e-4


def test_groot_prune_with_the_vision_stack_writes_a_strict_checkpoint_that_composes(tmp_path):
    result = run_prune(_groot_cfg(tmp_path / "p", stacks=GROOT_STACKS))
    manifest = json.loads((tmp_path / "p" / "prune_manifest.json").read_text())
    assert manifest["policy_type"] == "groot_pruned" and manifest["settings"]["stacks"] == GROOT_STACKS
    # half of 8 vision blocks, with the 4 the mergers read protected: exactly those stay
    assert manifest["stacks"]["vision"]["kept"] == [1, 3, 5, 7]
    assert manifest["verify"]["chunk_max_abs_diff"] < 1e-4
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["kept_blocks"]["vision"] == [1, 3, 5, 7] and config["source_depths"]["vision"] == 8

    source = load_policy("tiny:groot")
    reloaded = load_policy(str(tmp_path / "p"))
    assert reloaded.policy._groot_model.backbone.visual.deepstack_visual_indexes == [0, 1, 2]
    data = batch(source)
    removed = {name: s["removed"] for name, s in manifest["stacks"].items()}
    loss, chunk = assert_matches_skipped(source.policy, reloaded.policy, removed, groot_loss_and_chunk, data)
    mem_loss, mem_chunk = groot_loss_and_chunk(result.pruned, data)  # the in-memory pruned policy: bit-identical
    assert torch.equal(loss, mem_loss) and torch.equal(chunk, mem_chunk)

    # pruning again composes: the vision blocks are still named by their original indices
    make_dataset(tmp_path / "ds", episodes=2, frames=10, image_hw=48)
    again = run_prune(_groot_cfg(tmp_path / "q", spec=tmp_path / "p", keep={"llm": 3, "vl_self_attention": 1, "dit": 2},
                                 dataset=DatasetArgs(repo_id="local/calib", root=str(tmp_path / "ds"))))
    assert again.pruned.config.kept_blocks["vision"] == [1, 3, 5, 7]
    assert again.manifest.stacks["vision"].kept_original == (1, 3, 5, 7)


def test_groot_vision_rules_name_the_fix(tmp_path):
    kept = {"vision": [0, 1, 3, 5, 6], **GROOT_LANGUAGE}  # drops block 7, which the patch merger reads
    with pytest.raises(ValueError, match=r"vision-merger"):
        run_prune(_groot_cfg(tmp_path / "bad", kept=kept))
    kept = {"vision": [0, 2, 4, 7], **GROOT_LANGUAGE}  # drops 1, 3, 5, which the deepstack mergers read
    with pytest.raises(ValueError, match=r"deepstack-vision"):
        run_prune(_groot_cfg(tmp_path / "bad", kept=kept))
    assert not (tmp_path / "bad").exists()
    allowed = run_prune(_groot_cfg(tmp_path / "ok", kept=kept, allow=["deepstack-vision"]))
    assert allowed.pruned._groot_model.backbone.visual.deepstack_visual_indexes == [0, 1, 2]
    # lifted, but two mergers would read one block: the pruned model cannot express that
    with pytest.raises(ValueError, match=r"would read the same kept blocks"):
        run_prune(_groot_cfg(tmp_path / "bad", kept={"vision": [0, 7], **GROOT_LANGUAGE}, allow=["deepstack-vision"]))
    assert not (tmp_path / "bad").exists()


def test_a_groot_pruned_vision_checkpoint_that_does_not_fit_is_refused(tmp_path):
    from lerobot_policy_vlaprune import GrootPrunedConfig

    run_prune(_groot_cfg(tmp_path / "p", kept={"vision": [1, 3, 5, 7], **GROOT_LANGUAGE}))
    path = tmp_path / "p" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "source_depths": {**config["source_depths"], "vision": 12}}))
    with pytest.raises(PrunedCheckpointError, match=r"has 8 vision blocks, but this checkpoint was pruned from one "
                                                    r"with 12 \(source_depths\['vision'\]"):
        load_policy(str(tmp_path / "p"))
    depths = {k: v for k, v in config["source_depths"].items() if k != "vision"}
    with pytest.raises(ValueError, match="'vision' in both or neither"):
        GrootPrunedConfig(device="cpu", kept_blocks=config["kept_blocks"], source_depths=depths)
