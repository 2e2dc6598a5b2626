"""pi0_pruned / pi05_pruned (plugin ``lerobot_policy_vlaprune``) and the pi surgeon.

Surgery is done by hand here (renumbered state dict, strict load) and checked against an independent
reference: the SOURCE policy with the removed blocks made exact identities by forward hooks. Saved
checkpoints must reload exactly, through our class and through LeRobot's generic lookup, and a
checkpoint that does not fit must raise instead of leaving random layers (LeRobot's pi0 loader only
prints a warning).
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlaprune.core.family import resolve
from vlaprune.families import family_for
from vlaprune.families.pi0 import PiSurgeon
from vlaprune.io.calibration import CalibrationConfig, synthetic_batches
from vlaprune.models.builtin import pi0

VARIANTS = ("pi0", "pi05")
KEPT = [0, 2, 3, 5, 7]  # original indices, of 8 tiny layers
REMOVED = [1, 4, 6]
STACK_MODELS = {
    "vlm": "model.paligemma_with_expert.paligemma.model.language_model",
    "expert": "model.paligemma_with_expert.gemma_expert.model",
}


def _renumber(state: dict[str, torch.Tensor], kept: list[int]) -> dict[str, torch.Tensor]:
    """``<stack>.layers.<orig_idx>.`` → ``<stack>.layers.<new_idx>.`` in both stacks; removed layers dropped."""
    new_idx = {orig: new for new, orig in enumerate(kept)}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for path in STACK_MODELS.values():
            prefix = f"{path}.layers."
            if key.startswith(prefix):
                orig, rest = key[len(prefix):].split(".", 1)
                if int(orig) in new_idx:
                    out[f"{prefix}{new_idx[int(orig)]}.{rest}"] = value
                break
        else:
            out[key] = value
    return out


def _prune(policy: Any, kept: list[int]) -> Any:
    surgeon = PiSurgeon()
    config = surgeon.pruned_config(policy, {"vlm": kept, "expert": kept})
    pruned = surgeon.build(config)
    pruned.load_state_dict(_renumber(policy.state_dict(), kept), strict=True)
    return pruned.eval()


@pytest.fixture(scope="module")
def case() -> Callable[[str], tuple[Any, Any, dict[str, Any]]]:
    """``case(variant)``: (source bundle, pruned policy, preprocessed batch), built once per module."""
    from vlaprune.models.builtin.pi0 import build

    built: dict[str, tuple[Any, Any, dict[str, Any]]] = {}

    def get(variant: str) -> tuple[Any, Any, dict[str, Any]]:
        if variant not in built:
            source = build(variant, "tiny", seed=0)  # type: ignore[arg-type]
            raw = next(synthetic_batches(source.policy.config, CalibrationConfig(num_samples=2, batch_size=2)))
            built[variant] = (source, _prune(source.policy, KEPT), source.preprocessor(raw))
        return built[variant]

    return get


@contextmanager
def _removed_blocks_skipped(policy: Any, removed: list[int]) -> Iterator[None]:
    """Removed blocks (original indices) of both stacks become identities: their attention output
    projection and MLP return zeros, so ``x + 0`` (pi0) and ``x + 0 * gate`` (pi0.5's AdaRMS gated
    residual) leave the residual stream unchanged. Works on the joint path too, which calls these
    submodules but never the block modules."""
    handles = []
    for path in STACK_MODELS.values():
        layers = resolve(policy, f"{path}.layers")
        for idx in removed:
            for module in (layers[idx].self_attn.o_proj, layers[idx].mlp):
                handles.append(module.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _outputs(policy: Any, batch: dict[str, Any], variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(flow-matching losses at fixed noise and time, action chunk from fixed noise)."""
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

    images, img_masks = policy._preprocess_images(batch)
    inputs = [images, img_masks, batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK]]
    if variant == "pi0":
        inputs.append(policy.prepare_state(batch))
    actions = policy.prepare_action(batch)  # (batch, chunk, max_action_dim)
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(actions.shape, generator=gen)
    time = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        losses = policy.model.forward(*inputs, actions, noise, time)
        chunk = policy.model.sample_actions(*inputs, noise=noise)
    return losses, chunk


@pytest.mark.parametrize("variant", VARIANTS)
def test_pruned_structure(case, variant):
    source, pruned, _ = case(variant)
    assert pruned.config.type == f"{variant}_pruned"
    assert pruned.config.kept_layers == KEPT
    assert pruned.config.source_num_layers == 8
    assert pruned.config.architecture == pi0.TINY_ARCHITECTURE  # the dimensions it was built with, recorded
    assert pruned.config.vocab_size == len(pi0.vocabulary())
    for path in STACK_MODELS.values():
        model = resolve(pruned, path)
        assert len(model.layers) == len(KEPT)
        assert [layer.self_attn.layer_idx for layer in model.layers] == list(range(len(KEPT)))
        assert model.config.num_hidden_layers == len(KEPT)
    pwe = pruned.model.paligemma_with_expert
    assert pwe.paligemma.config.text_config.num_hidden_layers == len(KEPT)
    assert pwe.gemma_expert.config.num_hidden_layers == len(KEPT)
    assert family_for(pruned).depths(pruned) == {"vision": 2, "vlm": len(KEPT), "expert": len(KEPT)}
    # the source is untouched
    assert family_for(source.policy).depths(source.policy) == {"vision": 2, "vlm": 8, "expert": 8}
    assert source.policy.config.type == variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_pruned_equals_source_with_removed_blocks_skipped(case, variant):
    source, pruned, batch = case(variant)
    losses, chunk = _outputs(pruned, batch, variant)
    with _removed_blocks_skipped(source.policy, REMOVED):
        ref_losses, ref_chunk = _outputs(source.policy, batch, variant)
    torch.testing.assert_close(losses, ref_losses)
    torch.testing.assert_close(chunk, ref_chunk)
    # the removed blocks mattered: the full source gives other outputs
    full_losses, full_chunk = _outputs(source.policy, batch, variant)
    assert not torch.allclose(full_losses, losses, atol=1e-4)
    assert not torch.allclose(full_chunk, chunk, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_reload_exactly(case, variant, tmp_path):
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class
    from lerobot.utils.import_utils import register_third_party_plugins

    from vlaprune import load_policy

    source, pruned, batch = case(variant)
    pruned.save_pretrained(tmp_path)
    source.preprocessor.save_pretrained(tmp_path)
    source.postprocessor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["type"] == f"{variant}_pruned"
    assert saved["kept_layers"] == KEPT and saved["source_num_layers"] == 8
    assert saved["architecture"] == pi0.TINY_ARCHITECTURE and "builtin_architecture" not in saved

    register_third_party_plugins()
    assert PreTrainedConfig.from_pretrained(tmp_path).kept_layers == KEPT
    generic_cls = get_policy_class(f"{variant}_pruned")
    assert generic_cls is type(pruned)
    expected = pruned.state_dict()
    reference = _outputs(pruned, batch, variant)
    for loaded in (type(pruned).from_pretrained(tmp_path), generic_cls.from_pretrained(tmp_path),
                   load_policy(str(tmp_path)).policy):
        state = loaded.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
        for ours, ref in zip(_outputs(loaded, batch, variant), reference, strict=True):
            torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_that_does_not_fit_raises(case, variant, tmp_path):
    from lerobot_policy_vlaprune.checks import PrunedCheckpointError

    _, pruned, _ = case(variant)
    pruned.save_pretrained(tmp_path / "good")
    tensors = load_file(tmp_path / "good" / "model.safetensors")
    vlm_layer = f"{STACK_MODELS['vlm']}.layers.4.mlp.down_proj.weight"

    def variant_dir(name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
        path = tmp_path / name
        shutil.copytree(tmp_path / "good", path)
        edited = dict(tensors)
        edit(edited)
        save_file(edited, path / "model.safetensors")
        return path

    missing = variant_dir("missing", lambda t: t.pop(vlm_layer))
    with pytest.raises(PrunedCheckpointError, match=r"1 missing .*layers\.4\.mlp\.down_proj"):
        type(pruned).from_pretrained(missing)
    extra = variant_dir("extra", lambda t: t.update({vlm_layer.replace("layers.4", "layers.5"): t[vlm_layer].clone()}))
    with pytest.raises(PrunedCheckpointError, match="1 unexpected"):
        type(pruned).from_pretrained(extra)
    # a config that keeps one more layer than the weights hold: layer 5 would be random
    more = tmp_path / "more"
    shutil.copytree(tmp_path / "good", more)
    config = json.loads((more / "config.json").read_text())
    config["kept_layers"] = [0, 2, 3, 5, 6, 7]
    (more / "config.json").write_text(json.dumps(config))
    with pytest.raises(PrunedCheckpointError, match="missing"):
        type(pruned).from_pretrained(more)
    with pytest.raises(ValueError, match="strict=False"):
        type(pruned).from_pretrained(tmp_path / "good", strict=False)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"kept_layers": [3, 1]}, r"kept_layers=\[3, 1\] is not sorted.*write \[1, 3\]"),
        ({"kept_layers": [0, 8], "source_num_layers": 8}, r"\[8\] outside range\(8\)"),
        ({"kept_layers": []}, "kept_layers=.*ORIGINAL indices"),
        ({"kept_layers": [1, 1]}, r"repeats \[1\]"),
        ({"kept_layers": [0], "source_num_layers": 0}, "source_num_layers=0"),
        ({"kept_layers": [0]}, r"architecture must map \['expert', 'vision', 'vlm'\]"),
        ({"kept_layers": [0], "architecture": {**pi0.TINY_ARCHITECTURE, "vision": {"hidden_size": 32}}},
         r"architecture\['vision'\] must give exactly"),
        ({"kept_layers": [0], "architecture": pi0.TINY_ARCHITECTURE, "vocab_size": 0}, "vocab_size=0"),
    ],
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_config_validation(variant, fields, match):
    from lerobot_policy_vlaprune import PI0PrunedConfig, PI05PrunedConfig

    config_cls = PI0PrunedConfig if variant == "pi0" else PI05PrunedConfig
    with pytest.raises(ValueError, match=match):
        config_cls(device="cpu", **fields)


def test_config_json_is_validated(case, tmp_path):
    from lerobot.configs.policies import PreTrainedConfig

    _, pruned, _ = case("pi0")
    pruned.config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["kept_layers"] = [5, 2]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception) as info:  # draccus wraps our ValueError
        PreTrainedConfig.from_pretrained(tmp_path)
    chain, error = [], info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, ValueError) and "kept_layers=[5, 2] is not sorted" in str(e) for e in chain), chain


@pytest.mark.parametrize("variant", VARIANTS)
def test_pruning_a_pruned_policy_maps_to_original_indices(case, variant):
    source, pruned, _ = case(variant)
    config_before = copy.deepcopy(pruned.config)
    twice = _prune(pruned, [1, 3, 4])  # positions in the pruned policy = original [2, 5, 7]
    assert pruned.config == config_before
    assert twice.config.kept_layers == [2, 5, 7]
    assert twice.config.source_num_layers == 8
    assert twice.config.architecture == pruned.config.architecture == pi0.TINY_ARCHITECTURE
    direct = _prune(source.policy, [2, 5, 7])
    assert twice.config == direct.config
    expected = direct.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in twice.state_dict().items())


@pytest.mark.parametrize("variant", VARIANTS)
def test_pruned_config_copies_source_and_checks_lockstep(case, variant):
    source, _, _ = case(variant)
    before = copy.deepcopy(source.policy.config)
    config = PiSurgeon().pruned_config(source.policy, {"vlm": KEPT, "expert": KEPT})
    assert source.policy.config == before
    for name in ("chunk_size", "tokenizer_max_length", "image_resolution", "input_features", "dtype"):
        assert getattr(config, name) == getattr(before, name)
    assert config.input_features is not source.policy.config.input_features
    with pytest.raises(ValueError, match="lockstep"):
        PiSurgeon().pruned_config(source.policy, {"vlm": KEPT, "expert": [0, 1]})
    with pytest.raises(ValueError, match=r"range\(8\)"):
        PiSurgeon().pruned_config(source.policy, {"vlm": [0, 8], "expert": [0, 8]})
    assert family_for(f"{variant}_pruned") is family_for(variant)
    assert family_for(variant).surgeon is not None


@pytest.mark.parametrize("variant", VARIANTS)
def test_lerobots_stock_architecture_round_trips_through_the_recorded_dimensions(variant):
    """A pruned config of a stock (real-size) pi0 records the stock dimensions, and the plugin then builds
    exactly the stock modules and HF configs (on the meta device: no memory, no weights)."""
    import importlib

    from lerobot.configs import FeatureType, PolicyFeature

    from lerobot_policy_vlaprune import PI0PrunedConfig, PI05PrunedConfig
    from lerobot_policy_vlaprune.pi_architecture import measure_architecture
    from lerobot_policy_vlaprune.pruned import config_as

    config_module = importlib.import_module(f"lerobot.policies.{variant}.configuration_{variant}")
    modeling = importlib.import_module(f"lerobot.policies.{variant}.modeling_{variant}")
    prefix = variant.upper()
    features = {"observation.images.top": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 224, 224)),
                "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(6,))}
    config = getattr(config_module, f"{prefix}Config")(
        device="cpu", dtype="float32", input_features=features,
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(6,))})

    def on_meta(cls, cfg):
        cfg.device = "meta"  # LeRobot's constructors move the model to config.device
        try:
            with torch.device("meta"):
                return cls(cfg)
        finally:
            cfg.device = "cpu"

    stock = on_meta(getattr(modeling, f"{prefix}Policy"), config)
    architecture, vocab_size = measure_architecture(stock)
    assert architecture["vlm"]["width"] == 2048 and architecture["vision"]["num_hidden_layers"] == 27
    assert vocab_size == 257152
    target = PI0PrunedConfig if variant == "pi0" else PI05PrunedConfig
    pruned_config = config_as(target, config, kept_layers=list(range(18)), source_num_layers=18,
                              architecture=architecture, vocab_size=vocab_size)
    from lerobot_policy_vlaprune import PI0PrunedPolicy, PI05PrunedPolicy

    rebuilt = on_meta(PI0PrunedPolicy if variant == "pi0" else PI05PrunedPolicy, pruned_config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}
    for path in ("model.paligemma_with_expert.paligemma.config", "model.paligemma_with_expert.gemma_expert.config"):
        assert resolve(rebuilt, path).to_dict() == resolve(stock, path).to_dict(), path
