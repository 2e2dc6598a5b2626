"""GR00T N1.7 (LeRobot 0.6.1): the tiny built-in, the family's runner against ``GR00TN17`` itself, the
role and deepstack rules, ``groot_pruned`` checkpoints (verified, reloaded exactly, loaded strictly)
and stock ``lerobot-train`` on one."""

from __future__ import annotations

import json

import pytest
import torch

from vlaprune import load_policy
from vlaprune.core.family import action_chunk, flow_loss
from vlaprune.core.surgery import remove_blocks, removed_blocks, skip_blocks
from vlaprune.core.verify import VerificationError, verify_pruned
from vlaprune.families import family_for
from vlaprune.pipelines.config import CalibrationArgs, DatasetArgs, PlanArgs, PolicyArgs, PruneConfig
from vlaprune.pipelines.prune import run_prune
from vlaprune.studies.train import lerobot_train

from .flow import assert_matches_skipped, batch, groot_loss_and_chunk
from .lerobot_data import make_dataset

SPEC = "tiny:groot"
DEPTHS = {"vision": 8, "llm": 8, "vl_self_attention": 4, "dit": 8}
WITHOUT_VISION = {n: d for n, d in DEPTHS.items() if n != "vision"}  # what groot_pruned records by default
HALF = {"vision": 8, "llm": 4, "vl_self_attention": 2, "dit": 4}  # the default stacks at ratio 0.5


def _cfg(out, repo_id="synthetic", root=None, **plan):
    plan = {"ratio": 0.5, **plan} if not {"keep", "kept", "threshold"} & set(plan) else plan
    return PruneConfig(policy=PolicyArgs(path=SPEC), dataset=DatasetArgs(repo_id=repo_id, root=root),
                       calibration=CalibrationArgs(num_samples=4, batch_size=2), holdout_samples=2,
                       plan=PlanArgs(**plan), out=str(out))


def test_tiny_groot_has_the_n17_structure_and_seeded_weights(tiny):
    bundle = tiny(SPEC)
    family = family_for(bundle.policy)
    assert family.name == "groot" and family.depths(bundle.policy) == DEPTHS
    roles = family.roles(bundle.policy)
    assert roles == {"dit": ["cross-text", "self", "cross-image", "self"] * 2}
    why = {rule.name: rule.why for rule in family.protections}
    assert family.protected(bundle.policy) == {"llm": dict.fromkeys([0, 1, 2], why["deepstack"]),
                                               "vision": {**dict.fromkeys([1, 3, 5], why["deepstack-vision"]),
                                                          7: why["vision-merger"]}}
    again = load_policy(SPEC)
    other = load_policy(SPEC, seed=1)
    state, state_again, state_other = (b.policy.state_dict() for b in (bundle, again, other))
    assert all(torch.equal(v, state_again[k]) for k, v in state.items())
    assert not all(torch.equal(v, state_other[k]) for k, v in state.items())
    norm = bundle.policy._groot_model.backbone.language_model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, torch.ones_like(norm))  # perturbed away from init


def test_runner_reproduces_grootn17_loss_and_action_sampling(tiny):
    """The runner's loss and chunk are GR00TN17's own forward / get_action at the same noise and time."""
    bundle = tiny(SPEC)
    policy = bundle.policy
    data = batch(bundle)
    model = policy._groot_model
    inputs = policy._filter_groot_inputs(data, include_action=True)
    head = model.action_head
    shape = (data["state"].shape[0], head.action_horizon, head.action_dim)

    torch.manual_seed(11)  # GR00T draws noise, then its Beta time, from the global generator
    with torch.no_grad():
        reference = model.forward(inputs)["action_loss"]
    torch.manual_seed(11)
    noise = torch.randn(shape)
    tau = (1 - torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0)).sample([shape[0]])) * head.config.noise_s
    loss = flow_loss(family_for(policy), policy, data, noise, 1 - tau)
    torch.testing.assert_close(loss, reference, rtol=1e-4, atol=1e-5)

    torch.manual_seed(5)
    with torch.no_grad():
        reference_chunk = model.get_action(policy._filter_groot_inputs(data, include_action=False))["action_pred"]
    torch.manual_seed(5)
    chunk = action_chunk(family_for(policy), policy, data, torch.randn(shape))
    torch.testing.assert_close(chunk, reference_chunk, rtol=1e-5, atol=1e-6)


def test_prune_half_depth_gives_a_verified_checkpoint_that_reloads_identically(tmp_path, tiny):
    result = run_prune(_cfg(tmp_path / "p"))
    manifest = json.loads((tmp_path / "p" / "prune_manifest.json").read_text())
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert manifest["family"] == "groot" and config["type"] == "groot_pruned"
    kept = {name: s["kept"] for name, s in manifest["stacks"].items()}
    assert {name: len(k) for name, k in kept.items()} == HALF
    del kept["vision"]  # the vision tower kept whole: groot_pruned does not record it
    assert config["kept_blocks"] == kept and config["source_depths"] == WITHOUT_VISION
    assert kept["llm"][:3] == [0, 1, 2]  # deepstack layers stay
    roles = ["cross-text", "self", "cross-image", "self"] * 2
    assert [roles[k] for k in kept["dit"]] == roles[: len(kept["dit"])]
    assert manifest["verify"]["chunk_max_abs_diff"] < 1e-4

    source = tiny(SPEC)
    reloaded = load_policy(str(tmp_path / "p"))
    assert type(reloaded.policy).__name__ == "GrootPrunedPolicy"
    assert family_for(reloaded.policy).depths(reloaded.policy) == HALF
    data = batch(source)
    removed = {n: s["removed"] for n, s in manifest["stacks"].items()}
    loss, chunk = assert_matches_skipped(source.policy, reloaded.policy, removed, groot_loss_and_chunk, data)
    full_loss, _ = groot_loss_and_chunk(source.policy, data)
    assert not torch.allclose(loss, full_loss, atol=1e-3)  # the removed blocks did something
    mem = groot_loss_and_chunk(result.pruned, data)  # the in-memory pruned policy: bit-identical to the reload
    assert torch.equal(loss, mem[0]) and torch.equal(chunk, mem[1])
    # the stock processors and the pruned policy end to end, as lerobot-eval runs them
    actions = reloaded.policy.predict_action_chunk({k: v for k, v in data.items() if not k.startswith("action")})
    assert actions.shape == (3, 8, 6) and torch.isfinite(actions).all()


def test_plans_that_break_groot_rules_are_refused(tmp_path):
    ok = {"llm": [0, 1, 2, 5], "vl_self_attention": [0, 1, 2, 3], "dit": [0, 1, 2, 3]}
    assert run_prune(_cfg(tmp_path / "ok", kept=ok)).manifest.method == "manual"
    text_image_swap = {**ok, "dit": [2, 3, 4, 5]}  # block 2 attends to image tokens, position 0 to text
    with pytest.raises(ValueError, match="role rule broken: original block 2 \\('cross-image'\\)"):
        run_prune(_cfg(tmp_path / "bad", kept=text_image_swap))
    with pytest.raises(ValueError, match="deepstack"):
        run_prune(_cfg(tmp_path / "bad", kept={**ok, "llm": [0, 2, 3, 4]}))
    with pytest.raises(ValueError, match="deepstack"):
        run_prune(_cfg(tmp_path / "bad", keep={"llm": 2}))  # fewer than the three deepstack layers
    assert not (tmp_path / "bad").exists()


def test_deepstack_layers_can_be_removed_knowingly(tmp_path, tiny):
    kept = {"llm": [0, 2, 3, 4], "vl_self_attention": [0, 1, 2, 3], "dit": [0, 1, 2, 3]}
    with pytest.raises(ValueError, match=r"deepstack.*--plan.allow='\[deepstack\]'"):
        run_prune(_cfg(tmp_path / "no", kept=kept))
    with pytest.raises(ValueError, match="protections: deepstack"):
        run_prune(_cfg(tmp_path / "no", kept=kept, allow=["vision"]))
    result = run_prune(_cfg(tmp_path / "p", kept=kept, allow=["deepstack"]))
    assert result.manifest.verify["chunk_max_abs_diff"] < 1e-4
    assert json.loads((tmp_path / "p" / "config.json").read_text())["deepstack_moved"] is True
    source = tiny(SPEC)
    data = batch(source)
    reloaded = groot_loss_and_chunk(load_policy(str(tmp_path / "p")).policy, data)
    assert all(torch.equal(a, b) for a, b in zip(reloaded, groot_loss_and_chunk(result.pruned, data), strict=True))
    # the features moved with the kept layers: skipping the removed layer alone computes something else
    with skip_blocks(source.policy, family_for(source.policy), removed_blocks(family_for(source.policy),
                                                                              source.policy, kept)):
        skipped = groot_loss_and_chunk(source.policy, data)
    assert not torch.allclose(skipped[1], reloaded[1], atol=1e-4)
    # a budget may now take deepstack layers too; and with as many layers kept as there are features,
    # the last one's feature is added after the layer the action head reads: not seen (verified)
    assert run_prune(_cfg(tmp_path / "r", keep={"llm": 2}, allow=["deepstack"])).manifest.verify[
        "loss_max_abs_diff"] < 1e-4
    assert run_prune(_cfg(tmp_path / "k", keep={"llm": 3})).manifest.kept()["llm"] == [0, 1, 2]


def test_a_text_image_swap_is_invisible_to_shapes_but_not_to_verification(tiny, monkeypatch):
    """Why the role rule exists: with the loader's check disabled, a swapped plan builds and loads
    (same shapes) and only the comparison with the source exposes it."""
    import lerobot_policy_vlaprune.modeling_groot_pruned as groot_pruned

    source = tiny(SPEC).policy
    family = family_for(source)
    kept = {"llm": list(range(8)), "vl_self_attention": [0, 1, 2, 3], "dit": [2, 3, 4, 5]}
    monkeypatch.setattr(groot_pruned, "check_dit_roles", lambda *a: None)  # the groot_pruned loader's check
    pruned = remove_blocks(source, family, kept)
    with pytest.raises(VerificationError):
        verify_pruned(source, pruned, family, kept, batch(tiny(SPEC)))
    assert removed_blocks(family, source, kept)["dit"] == [0, 1, 6, 7]


def test_groot_pruned_checkpoints_load_strictly(tmp_path):
    from lerobot_policy_vlaprune.checks import PrunedCheckpointError

    run_prune(_cfg(tmp_path / "p", kept={"llm": [0, 1, 2, 5], "vl_self_attention": [0, 1], "dit": [0, 1, 2, 3]}))
    path = tmp_path / "p" / "config.json"
    original = json.loads(path.read_text())

    def load_with(**change):
        path.write_text(json.dumps({**original, **change}))
        return load_policy(str(tmp_path / "p"))

    with pytest.raises(ValueError, match="role"):  # same shapes, text and image blocks swapped
        load_with(kept_blocks={**original["kept_blocks"], "dit": [2, 3, 4, 5]})
    with pytest.raises(PrunedCheckpointError, match=r"base model .* has depths"):
        load_with(source_depths={**original["source_depths"], "dit": 16})
    with pytest.raises(PrunedCheckpointError, match="missing"):  # depths that disagree with the weights
        load_with(kept_blocks={**original["kept_blocks"], "dit": [0, 1, 2, 3, 4, 5]})
    path.write_text(json.dumps(original))
    assert family_for("groot_pruned").depths(load_policy(str(tmp_path / "p")).policy)["vl_self_attention"] == 2


def test_groot_pruned_config_validation():
    from lerobot_policy_vlaprune import GrootPrunedConfig

    kept = {"llm": [0, 1, 2, 5], "vl_self_attention": [0, 1], "dit": [0, 1, 2, 3]}
    GrootPrunedConfig(device="cpu", kept_blocks=kept, source_depths=WITHOUT_VISION)
    with pytest.raises(ValueError, match=r"kept_blocks\['llm'\]=\[0, 2, 1, 5\] is not sorted"):
        GrootPrunedConfig(device="cpu", kept_blocks={**kept, "llm": [0, 2, 1, 5]}, source_depths=WITHOUT_VISION)
    with pytest.raises(ValueError, match=r"\[9\] outside range\(8\)"):
        GrootPrunedConfig(device="cpu", kept_blocks={**kept, "dit": [0, 9]}, source_depths=WITHOUT_VISION)
    with pytest.raises(ValueError, match="must name the stacks"):
        GrootPrunedConfig(device="cpu", kept_blocks={"llm": [0]}, source_depths=WITHOUT_VISION)


@pytest.mark.timeout(600)
def test_lerobot_train_trains_the_pruned_groot(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, episodes=3, frames=15, image_hw=48)
    pruned = tmp_path / "pruned"
    run_prune(_cfg(pruned, repo_id="local/calib", root=str(root), stacks=["vision", "llm", "vl_self_attention", "dit"]))
    ckpt = lerobot_train(pruned, repo_id="local/calib", root=root, out=tmp_path / "train", steps=2, batch_size=2,
                         num_workers=0).checkpoint
    trained, before = load_policy(str(ckpt)), load_policy(str(pruned))
    family = family_for(trained.policy)
    assert trained.policy.config.type == "groot_pruned"
    assert family.depths(trained.policy) == family.depths(before.policy) == {n: d // 2 for n, d in DEPTHS.items()}
    changed = [k for k, v in trained.policy.state_dict().items() if not torch.equal(v, before.policy.state_dict()[k])]
    assert any(".transformer_blocks." in k for k in changed), "two training steps changed no DiT weight"

    from lerobot.policies.factory import get_policy_class

    stock = get_policy_class("groot_pruned").from_pretrained(str(ckpt))
    stock.eval()
    data = batch(trained)
    for a, b in zip(groot_loss_and_chunk(trained.policy, data), groot_loss_and_chunk(stock, data), strict=True):
        assert torch.equal(a, b)


def test_cli_analyze_and_bench(tmp_path, capsys):
    from vlaprune.cli import main

    assert main(["analyze", f"--policy.path={SPEC}", "--dataset.repo_id=synthetic", f"--out={tmp_path / 'a'}",
                 "--calibration.num_samples=4", "--calibration.batch_size=2"]) == 0
    analysis = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert {n: s["num_layers"] for n, s in analysis["stacks"].items()} == DEPTHS
    assert analysis["family"] == "groot"
    assert analysis["structure"]["protected"] == {"llm": [0, 1, 2], "vision": [1, 3, 5, 7]}
    assert {f"cka_{n}.png" for n in DEPTHS} <= {p.name for p in (tmp_path / "a").iterdir()}
    assert main(["bench", f"--policy.path={SPEC}", "--ratio=0.5", "--rounds=1", "--warmup=0",
                 f"--out={tmp_path / 'bench.json'}"]) == 0
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["inference_ratio"] > 0 and bench["train_step_ratio"] > 0 and bench["cameras"] == 1
    assert "chunk linear GFLOP, vl_self_attention" in capsys.readouterr().out
