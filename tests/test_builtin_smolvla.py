"""Built-in SmolVLA policies: offline, seeded, runnable through LeRobot's stock processors."""

from __future__ import annotations

import pytest
import torch

from vlaprune.models.builtin import smolvla
from vlaprune.models.builtin.common import CAMERA_KEY, STATE_KEY, PolicyBundle

from .flow import TASKS, raw_batch


@pytest.fixture(scope="module")
def built() -> PolicyBundle:
    """One tiny build for the read-only checks of this module."""
    return smolvla.build("tiny", seed=0)


def test_same_seed_same_weights_other_seed_differs(built) -> None:
    again = smolvla.build("tiny", seed=0).policy.state_dict()
    other = smolvla.build("tiny", seed=1).policy.state_dict()
    ref = built.policy.state_dict()
    assert ref.keys() == again.keys() == other.keys()
    assert all(torch.equal(ref[k], again[k]) for k in ref)
    assert not all(torch.equal(ref[k], other[k]) for k in ref if ref[k].is_floating_point())


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    smolvla.build("tiny", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_policy_is_eval_float32_cpu_and_spec(built) -> None:
    policy = built.policy
    assert built.spec == "tiny:smolvla"
    assert not policy.training
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert {p.device.type for p in policy.parameters()} == {"cpu"}
    assert sum(p.numel() for p in policy.parameters()) < 2_000_000  # a few MB at most


def test_parameters_are_perturbed_away_from_init(built) -> None:
    params = dict(built.policy.named_parameters())
    norms = [p for name, p in params.items() if "norm" in name and name.endswith("weight")]
    biases = [p for name, p in params.items() if name.endswith("bias")]
    assert norms and biases
    assert all(not torch.any(p == 1.0) for p in norms)
    assert all(not torch.any(p == 0.0) for p in biases)


def test_stacks_and_roles(built) -> None:
    vlm_with_expert = built.policy.model.vlm_with_expert
    text_layers = vlm_with_expert.get_vlm_model().text_model.layers
    expert_layers = vlm_with_expert.lm_expert.layers
    assert len(text_layers) == 8
    assert len(expert_layers) == 8
    config = built.policy.config
    assert (config.attention_mode, config.self_attn_every_n_layers) == ("cross_attn", 2)
    # Cross-attention expert layers (odd positions) project the VLM's K/V width: roles alternate.
    text_config = vlm_with_expert.config.text_config
    kv_width = text_config.num_key_value_heads * text_config.head_dim
    expert_width = vlm_with_expert.expert_hidden_size
    for new_idx, layer in enumerate(expert_layers):
        in_features = layer.self_attn.k_proj.in_features
        assert in_features == (expert_width if new_idx % 2 == 0 else kv_width)


def test_preprocessor_tokenizes_with_the_local_tokenizer(built) -> None:
    batch = built.preprocessor(raw_batch(built.policy.config.chunk_size))
    tokens = batch["observation.language.tokens"]
    mask = batch["observation.language.attention_mask"]
    assert tokens.shape == mask.shape and tokens.shape[0] == 2
    tokenizer = built.policy.model.vlm_with_expert.processor.tokenizer
    assert (tokens[mask] != tokenizer.unk_token_id).all()  # every task word is in the vocabulary
    assert tokenizer.decode(tokens[0][mask[0]]) == TASKS[0]


def test_training_forward_backward_and_select_action(built) -> None:
    policy = built.policy
    config = policy.config
    batch = built.preprocessor(raw_batch(config.chunk_size))
    policy.zero_grad()
    loss, _ = policy.forward(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in policy.model.vlm_with_expert.lm_expert.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    policy.zero_grad(set_to_none=True)

    obs = built.preprocessor(raw_batch(config.chunk_size, with_action=False))
    policy.reset()
    action = policy.select_action(obs)
    assert action.shape == (2, 6) and torch.isfinite(action).all()
    assert built.postprocessor(action).shape == (2, 6)


def test_prefix_token_count(built) -> None:
    """16 image tokens (64 px / 8 px patches, pixel shuffle 2) + task tokens + 1 state token."""
    policy = built.policy
    obs = built.preprocessor(raw_batch(policy.config.chunk_size, with_action=False))
    images, img_masks = policy.prepare_images(obs)
    lang = obs["observation.language.tokens"]
    embs, _, _ = policy.model.embed_prefix(
        images, img_masks, lang, obs["observation.language.attention_mask"], state=policy.prepare_state(obs)
    )
    assert embs.shape == (2, 16 + lang.shape[1] + 1, 64)  # (batch, prefix tokens, text hidden)


def test_generated_directory_is_cached_and_loads_offline(built, monkeypatch) -> None:
    from transformers import AutoConfig, AutoProcessor

    path = smolvla.smolvlm_dir("tiny")
    assert built.policy.config.vlm_model_name == str(path)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind

    def fail(*args, **kwargs):
        raise AssertionError("the cached directory should have been reused")

    monkeypatch.setattr(smolvla, "_write_smolvlm", fail)
    assert smolvla.build("tiny", seed=0).policy.config.vlm_model_name == str(path)

    config = AutoConfig.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert config.vision_config.image_size == built.policy.config.resize_imgs_with_padding[0]
    tokenizer = processor.tokenizer
    assert len(tokenizer) <= config.text_config.vocab_size
    assert tokenizer.convert_ids_to_tokens(tokenizer.fake_image_token_id) == "<fake_token_around_image>"
    assert tokenizer.convert_ids_to_tokens(tokenizer.global_image_token_id) == "<global-img>"


def test_vocabulary_covers_metaworld_task_descriptions(built) -> None:
    import json
    from importlib import resources

    descriptions = json.loads((resources.files("lerobot") / "envs" / "metaworld_config.json").read_text())
    tokenizer = built.policy.model.vlm_with_expert.processor.tokenizer
    unknown = [text for text in descriptions["TASK_DESCRIPTIONS"].values()
               if tokenizer.unk_token_id in tokenizer(text)["input_ids"]]
    assert not unknown


def test_interrupted_generation_leaves_no_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VLAPRUNE_CACHE", str(tmp_path))

    def crash(path, spec, tokenizer):
        (path / "config.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(smolvla, "_write_smolvlm", crash)
    with pytest.raises(KeyboardInterrupt):
        smolvla.smolvlm_dir("tiny")
    assert list(tmp_path.iterdir()) == []


def test_unknown_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="tiny"):
        smolvla.build("huge")  # type: ignore[arg-type]


@pytest.mark.slow
def test_real_builds_with_smolvla_shapes() -> None:
    built = smolvla.build("real", seed=0)
    policy = built.policy
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"real:smolvla parameters: {n_params:,}")
    assert 400_000_000 <= n_params <= 500_000_000
    vlm_with_expert = policy.model.vlm_with_expert
    assert len(vlm_with_expert.get_vlm_model().text_model.layers) == 16
    assert len(vlm_with_expert.lm_expert.layers) == 16
    assert vlm_with_expert.expert_hidden_size == 720
    assert policy.config.resize_imgs_with_padding == (512, 512)
    raw = {CAMERA_KEY: torch.rand(1, 3, 512, 512), STATE_KEY: torch.randn(1, 6), "task": TASKS[:1]}
    policy.reset()
    assert policy.select_action(built.preprocessor(raw)).shape == (1, 6)
