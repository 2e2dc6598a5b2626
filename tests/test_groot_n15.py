"""GR00T N1.5 (Isaac-GR00T layout), tested against the real N1.5 model code: LeRobot 0.5.1's port of
Isaac-GR00T's ``GR00T_N1_5`` (``vlaprune.families.isaac_n15``), at N1.5's depths (12 / 4 / 16) and tiny widths."""

from __future__ import annotations

import json

import pytest
import torch

from vlaprune import load_policy
from vlaprune.core.family import action_chunk, flow_loss
from vlaprune.families import family_for
from vlaprune.families.groot_n15 import PAPER_PLAN
from vlaprune.pipelines.config import CalibrationArgs, DatasetArgs, PlanArgs, PolicyArgs, PruneConfig
from vlaprune.pipelines.prune import run_prune

from .flow import assert_matches_skipped

SPEC = "tiny:groot_n15"
DEPTHS = {"vision": 4, "llm": 12, "vl_self_attention": 4, "dit": 16}
PLANNED = ("llm", "vl_self_attention", "dit")  # by default; the vision encoder when named


def _cfg(out, **plan):
    plan = {"ratio": 0.5, **plan} if not {"keep", "kept", "threshold"} & set(plan) else plan
    return PruneConfig(policy=PolicyArgs(path=SPEC), dataset=DatasetArgs(repo_id="synthetic"),
                       calibration=CalibrationArgs(num_samples=4, batch_size=2), holdout_samples=2,
                       plan=PlanArgs(**plan), out=str(out))


def _batch(bundle, n=3, seed=0):
    from vlaprune.io.calibration import CalibrationConfig

    assert bundle.synthetic is not None
    return next(bundle.synthetic(CalibrationConfig(num_samples=n, batch_size=n, seed=seed)))


def _outputs(policy, data):
    family = family_for(policy)
    head = policy.model.action_head
    noise = torch.randn((data["state"].shape[0], head.action_horizon, head.action_dim),
                        generator=torch.Generator().manual_seed(3))
    time = torch.linspace(0.2, 0.8, data["state"].shape[0])
    return flow_loss(family, policy, data, noise, time), action_chunk(family, policy, data, noise)


def test_tiny_n15_is_the_real_n15_code_at_n15_depths(tiny):
    bundle = tiny(SPEC)
    model = bundle.policy.model
    assert type(model).__name__ == "GR00TN15" and type(model).__module__ == "lerobot_groot_n15.groot_n1"
    family = family_for(bundle.policy)
    assert family.name == "groot_n15" and family.depths(bundle.policy) == DEPTHS
    assert family.roles(bundle.policy) == {"dit": ["cross", "self"] * 8}
    # odd DiT blocks are built without cross-attention weights: the role is in the shapes
    blocks = model.action_head.model.transformer_blocks
    assert blocks[0].attn1.to_k.in_features != blocks[1].attn1.to_k.in_features


def test_runner_reproduces_gr00tn15_loss_and_action_sampling(tiny):
    bundle = tiny(SPEC)
    policy, model = bundle.policy, bundle.policy.model
    data = _batch(bundle)
    head = model.action_head
    shape = data["action"].shape

    torch.manual_seed(11)  # N1.5 draws noise, then its Beta time, from the global generator
    with torch.no_grad():
        reference = model.forward({k: v for k, v in data.items() if k != "task"})["loss"]
    torch.manual_seed(11)
    noise = torch.randn(shape)
    sample = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0)).sample([shape[0]])
    tau = (head.config.noise_s - sample) / head.config.noise_s
    loss = flow_loss(family_for(policy), policy, data, noise, 1 - tau)
    torch.testing.assert_close(loss.sum() / data["action_mask"].sum(), reference, rtol=1e-4, atol=1e-5)

    torch.manual_seed(5)
    reference_chunk = policy.predict_action_chunk(data)
    torch.manual_seed(5)
    chunk = action_chunk(family_for(policy), policy, data, torch.randn(shape))
    torch.testing.assert_close(chunk, reference_chunk, rtol=1e-5, atol=1e-6)


def test_the_papers_plan_gives_an_isaac_checkpoint_the_n15_loader_reads(tmp_path, tiny):
    from vlaprune.families import isaac_n15

    result = run_prune(_cfg(tmp_path / "p", kept=PAPER_PLAN))
    out = tmp_path / "p"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "prune_manifest.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gr00t_n1_5"
    assert config["backbone_cfg"]["select_layer"] == 5
    assert config["action_head_cfg"]["vl_self_attention_cfg"]["num_layers"] == 3
    assert config["action_head_cfg"]["diffusion_model_cfg"]["num_layers"] == 8
    manifest = json.loads((out / "prune_manifest.json").read_text())
    assert manifest["method"] == "manual"
    assert {n: s["kept"] for n, s in manifest["stacks"].items()} == {"vision": [0, 1, 2, 3], **PAPER_PLAN}
    assert manifest["verify"]["chunk_max_abs_diff"] < 1e-4

    # the N1.5 loader itself (GR00TN15.from_pretrained) builds the pruned depths and fills every tensor
    model = isaac_n15.load().GR00TN15.from_pretrained(str(out))
    assert len(model.backbone.eagle_model.language_model.model.layers) == 5
    assert len(model.action_head.model.transformer_blocks) == 8
    assert len(model.action_head.vl_self_attention.transformer_blocks) == 3
    from lerobot_policy_vlaprune.checks import weight_mismatch

    assert weight_mismatch(model, out / "model.safetensors") is None

    source = tiny(SPEC)
    reloaded = load_policy(str(out))
    data = _batch(source)
    removed = {n: s["removed"] for n, s in manifest["stacks"].items()}
    loss, chunk = assert_matches_skipped(source.policy, reloaded.policy, removed, _outputs, data)
    assert not torch.allclose(loss, _outputs(source.policy, data)[0], atol=1e-3)
    mem = _outputs(result.pruned, data)
    assert torch.equal(loss, mem[0]) and torch.equal(chunk, mem[1])


def test_planned_half_depth_keeps_dit_roles(tmp_path):
    result = run_prune(_cfg(tmp_path / "p"))
    kept = result.manifest.kept()
    assert {n: len(k) for n, k in kept.items()} == {n: d if n not in PLANNED else d // 2 for n, d in DEPTHS.items()}
    assert all(k % 2 == j % 2 for j, k in enumerate(kept["dit"]))  # self stays odd, cross even


def test_bad_n15_plans_and_checkpoints_are_refused(tmp_path):
    with pytest.raises(ValueError, match="role rule broken"):
        run_prune(_cfg(tmp_path / "bad", kept={**PAPER_PLAN, "dit": [0, 2, 4, 6]}))
    assert not (tmp_path / "bad").exists()
    run_prune(_cfg(tmp_path / "p", kept=PAPER_PLAN))
    path = tmp_path / "p" / "config.json"
    config = json.loads(path.read_text())
    config["action_head_cfg"]["diffusion_model_cfg"]["num_layers"] = 10  # depths that disagree with the weights
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing"):
        load_policy(str(tmp_path / "p"))


def test_cli_analyze_and_bench(tmp_path):
    from vlaprune.cli import main

    assert main(["analyze", f"--policy.path={SPEC}", "--dataset.repo_id=synthetic", f"--out={tmp_path / 'a'}",
                 "--calibration.num_samples=4", "--calibration.batch_size=2"]) == 0
    analysis = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert {n: s["num_layers"] for n, s in analysis["stacks"].items()} == DEPTHS
    assert main(["bench", f"--policy.path={SPEC}", "--ratio=0.5", "--rounds=1", "--warmup=0",
                 f"--out={tmp_path / 'bench.json'}"]) == 0
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["inference_ratio"] > 0 and bench["train_step_ratio"] > 0


def test_n15_needs_a_dataset_it_can_read(tmp_path):
    with pytest.raises(ValueError, match="LeRobotDataset"):
        run_prune(PruneConfig(policy=PolicyArgs(path=SPEC), dataset=DatasetArgs(repo_id="local/x", root=str(tmp_path)),
                              plan=PlanArgs(ratio=0.5), out=str(tmp_path / "p")))


# ---- the vision encoder (opt-in): Eagle's SigLIP tower, whose depth lives in the Eagle config directory ----

VISION_STACKS = ["vision", "llm", "vl_self_attention", "dit"]


def test_n15_pruned_vision_equals_the_source_with_its_blocks_skipped():
    from vlaprune.core.surgery import remove_blocks, skip_blocks

    bundle = load_policy(SPEC)
    source = bundle.policy
    family = family_for(source)
    assert family.default_planned() == PLANNED
    with torch.no_grad():  # away from the initial values, so that equality means something
        for p in family.layers(source, "vision").parameters():
            p.add_(0.05 * torch.randn_like(p))
    plan = {"vision": [1, 3], **PAPER_PLAN}
    pruned = remove_blocks(source, family, plan)
    assert len(pruned.model.backbone.eagle_model.vision_model.vision_model.encoder.layers) == 2
    assert source.config.backbone_cfg["tokenizer_assets_repo"] != pruned.config.backbone_cfg["tokenizer_assets_repo"]

    data = _batch(bundle)
    removed = {name: [i for i in range(depth) if i not in plan[name]] for name, depth in family.depths(source).items()}
    assert_matches_skipped(source, pruned, removed, _outputs, data)
    with skip_blocks(source, family, {**removed, "vision": []}):  # the removed vision blocks mattered
        language_only = _outputs(source, data)[0]
    assert (language_only - _outputs(pruned, data)[0]).abs().max() > 1e-4


def test_n15_vision_checkpoint_carries_its_eagle_config_and_reloads_anywhere(tmp_path, monkeypatch):
    import shutil

    from lerobot_policy_vlaprune.checks import weight_mismatch
    from vlaprune.core.surgery import remove_blocks
    from vlaprune.families import isaac_n15

    result = run_prune(_cfg(tmp_path / "p", stacks=VISION_STACKS))
    out = tmp_path / "p"
    manifest = json.loads((out / "prune_manifest.json").read_text())
    assert len(manifest["stacks"]["vision"]["kept"]) == 2 and manifest["verify"]["chunk_max_abs_diff"] < 1e-4
    eagle = json.loads((out / "eagle" / "config.json").read_text())
    assert eagle["vision_config"]["num_hidden_layers"] == 2
    # Isaac-GR00T's own loader reads it where it was written (config.json names the Eagle copy) and fills every tensor
    model = isaac_n15.load().GR00TN15.from_pretrained(str(out))
    assert len(model.backbone.eagle_model.vision_model.vision_model.encoder.layers) == 2
    assert weight_mismatch(model, out / "model.safetensors") is None

    # moved to another place, with an empty cache: vlaprune's loader rebuilds the Eagle copy from eagle/
    moved = tmp_path / "moved"
    shutil.move(str(out), moved)
    monkeypatch.setenv("VLAPRUNE_CACHE", str(tmp_path / "fresh-cache"))
    reloaded = load_policy(str(moved))
    assert str(tmp_path / "fresh-cache") in reloaded.policy.config.backbone_cfg["tokenizer_assets_repo"]
    data = _batch(tiny_source := load_policy(SPEC))
    mem, again = _outputs(result.pruned, data), _outputs(reloaded.policy, data)
    assert torch.equal(mem[0], again[0]) and torch.equal(mem[1], again[1])
    removed = {n: s["removed"] for n, s in manifest["stacks"].items()}
    assert_matches_skipped(tiny_source.policy, reloaded.policy, removed, _outputs, data)

    # pruning the language stacks again keeps the pruned vision encoder: the new checkpoint carries it too
    family = family_for(reloaded.policy)
    depths = family.depths(reloaded.policy)
    twice = remove_blocks(reloaded.policy, family, {"llm": [0, 1, 2], "vl_self_attention": [0, 1],
                                                    "dit": list(range(depths["dit"]))})
    twice.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "eagle" / "config.json").read_text())["vision_config"]["num_hidden_layers"] == 2
    assert family.depths(load_policy(str(tmp_path / "q")).policy)["vision"] == 2


def test_n15_default_stacks_leave_the_vision_encoder_and_its_config(tmp_path, tiny):
    run_prune(_cfg(tmp_path / "p"))
    assert not (tmp_path / "p" / "eagle").exists()
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    source = tiny(SPEC).policy.config.backbone_cfg
    assert config["backbone_cfg"]["tokenizer_assets_repo"] == source["tokenizer_assets_repo"]


def test_n15_vision_needs_the_towers_output_and_a_checkpoint_that_fits(tmp_path):
    from vlaprune.families import isaac_n15

    bundle = load_policy(SPEC)
    eagle = json.loads((isaac_n15.eagle_dir(bundle.policy.config) / "config.json").read_text())
    copy = isaac_n15.eagle_copy(isaac_n15.eagle_dir(bundle.policy.config), {**eagle, "select_layer": -2})
    bundle.policy.config.backbone_cfg = {**bundle.policy.config.backbone_cfg, "tokenizer_assets_repo": str(copy)}
    with pytest.raises(ValueError, match=r"reads vision layer -2 \(select_layer"):
        isaac_n15.vision_pruned_eagle(bundle.policy.config, 2)

    run_prune(_cfg(tmp_path / "p", stacks=VISION_STACKS))
    path = tmp_path / "p" / "eagle" / "config.json"
    eagle = json.loads(path.read_text())
    eagle["vision_config"]["num_hidden_layers"] = 3  # an Eagle config that disagrees with the weights
    path.write_text(json.dumps(eagle))
    with pytest.raises(ValueError, match="missing"):
        load_policy(str(tmp_path / "p"))
