"""Built-in pi0 / pi0.5 policies: offline, seeded, tiny through a scoped patch, stock processors."""

from __future__ import annotations

import importlib

import pytest
import torch

from vlaprune.models.builtin import pi0
from vlaprune.models.builtin.common import PolicyBundle

from .flow import raw_batch

VARIANTS = ("pi0", "pi05")


def modeling(variant: str):
    return importlib.import_module(f"lerobot.policies.{variant}.modeling_{variant}")


@pytest.fixture(scope="module", params=VARIANTS)
def built(request) -> PolicyBundle:
    """One tiny build per variant for the read-only checks of this module."""
    return pi0.build(request.param, "tiny", seed=0)


def variant_of(built: PolicyBundle) -> str:
    return built.spec.split(":")[1]


def tokenizer_of(built: PolicyBundle):
    (step,) = [s for s in built.preprocessor.steps if type(s).__name__ == "TokenizerProcessorStep"]
    return step


def assert_stock_modules(variant: str) -> None:
    """The module globals that :func:`pi0.tiny_architecture` swaps are LeRobot's originals."""
    from lerobot.policies import pi_gemma
    from lerobot.processor import TokenizerProcessorStep

    mod = modeling(variant)
    assert mod.get_gemma_config.__module__ == mod.__name__
    assert mod.get_gemma_config("gemma_2b").depth == 18
    paligemma_cls = pi_gemma.PaliGemmaForConditionalGenerationWithPiGemma
    assert mod.PaliGemmaForConditionalGenerationWithPiGemma is paligemma_cls
    assert mod.PiGemmaForCausalLM is pi_gemma.PiGemmaForCausalLM
    processor = importlib.import_module(f"lerobot.policies.{variant}.processor_{variant}")
    assert processor.TokenizerProcessorStep is TokenizerProcessorStep


def test_same_seed_same_weights_other_seed_differs(built) -> None:
    variant = variant_of(built)
    again = pi0.build(variant, "tiny", seed=0).policy.state_dict()
    other = pi0.build(variant, "tiny", seed=1).policy.state_dict()
    ref = built.policy.state_dict()
    assert ref.keys() == again.keys() == other.keys()
    assert all(torch.equal(ref[k], again[k]) for k in ref)
    assert not any(torch.equal(ref[k], other[k]) for k in ref if ref[k].is_floating_point())


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pi0.build("pi0", "tiny", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_policy_is_eval_float32_cpu_and_spec(built) -> None:
    policy = built.policy
    assert built.spec == f"tiny:{variant_of(built)}"
    assert type(policy).__name__ == {"pi0": "PI0Policy", "pi05": "PI05Policy"}[variant_of(built)]
    assert not policy.training
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert {p.device.type for p in policy.parameters()} == {"cpu"}
    assert sum(p.numel() for p in policy.parameters()) < 1_000_000


def test_every_weight_moved_from_its_init_value(built) -> None:
    policy = built.policy
    with torch.random.fork_rng(devices=[]):  # the build's construction, without the perturbation
        torch.manual_seed(0)
        with pi0.tiny_architecture(variant_of(built)):
            init = dict(type(policy)(policy.config).named_parameters())
    norms = [p for n, p in init.items() if "language_model" in n and n.endswith("layernorm.weight")]
    assert norms and all(torch.all(p == 0) for p in norms)  # Gemma's (1 + w) norms start at 0
    for name, param in policy.named_parameters():
        assert (param != init[name]).all(), name


def test_tiny_shapes_and_stacks(built) -> None:
    with_expert = built.policy.model.paligemma_with_expert
    vlm_layers = with_expert.paligemma.model.language_model.layers
    expert_layers = with_expert.gemma_expert.model.layers
    assert len(vlm_layers) == len(expert_layers) == 8
    for stack in (vlm_layers, expert_layers):
        assert [layer.self_attn.layer_idx for layer in stack] == list(range(8))
        assert {layer.self_attn.head_dim for layer in stack} == {8}
    text, vision = with_expert.paligemma.config.text_config, with_expert.paligemma.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (64, 8, 8)
    assert with_expert.gemma_expert.config.hidden_size == 32
    vision_shape = (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers)
    assert vision_shape == (64, 16, 32, 2)
    assert built.policy.config.image_resolution == (64, 64)
    # The expert's AdaRMS norms (pi0.5 only) are conditioned on the time embedding.
    has_adarms = expert_layers[0].input_layernorm.dense is not None
    assert has_adarms == (variant_of(built) == "pi05")


def test_patch_is_gone_after_build_and_after_errors(built) -> None:
    variant = variant_of(built)
    assert_stock_modules(variant)
    with pytest.raises(RuntimeError, match="boom"), pi0.tiny_architecture(variant):
        assert modeling(variant).get_gemma_config("gemma_2b").depth == 8
        raise RuntimeError("boom")
    assert_stock_modules(variant)


def test_vocabulary_is_the_tokenizers(built) -> None:
    tokenizer = tokenizer_of(built).input_tokenizer
    embed = built.policy.model.paligemma_with_expert.paligemma.model.language_model.embed_tokens
    assert embed.num_embeddings == len(tokenizer) == len(pi0.vocabulary())
    # PaliGemma's special-token ids.
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    batch = built.preprocessor(raw_batch(built.policy.config.chunk_size))
    tokens = batch["observation.language.tokens"]
    mask = batch["observation.language.attention_mask"]
    assert tokens.shape == (2, built.policy.config.tokenizer_max_length)
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert (tokens[mask] != tokenizer.unk_token_id).all()  # every prompt token is in the vocabulary
    assert (tokens < embed.num_embeddings).all()
    assert not mask[:, -1].any()  # nothing truncated


def test_prompts_follow_the_stock_processors(built) -> None:
    tokenizer = tokenizer_of(built).input_tokenizer
    batch = built.preprocessor(raw_batch(built.policy.config.chunk_size))
    tokens = batch["observation.language.tokens"][0][batch["observation.language.attention_mask"][0]]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if variant_of(built) == "pi0":  # Pi0NewLineProcessor appends "\n"
        assert text == "pick up the cube \n"
    else:  # Pi05PrepareStateTokenizerProcessorStep: "Task: ..., State: <6 bins>;\nAction: "
        assert text.startswith("task : pick up the cube , state : ")
        assert text.endswith("; \n action :")


def test_training_forward_backward_and_select_action(built) -> None:
    policy = built.policy
    config = policy.config
    batch = built.preprocessor(raw_batch(config.chunk_size))
    policy.zero_grad()
    loss, _ = policy.forward(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    with_expert = policy.model.paligemma_with_expert
    for stack in (with_expert.gemma_expert, with_expert.paligemma.model.language_model):
        grads = [p.grad for p in stack.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    policy.zero_grad(set_to_none=True)
    policy.eval()

    obs = built.preprocessor(raw_batch(config.chunk_size, with_action=False))
    policy.reset()
    action = policy.select_action(obs)
    assert action.shape == (2, 6) and torch.isfinite(action).all()
    assert built.postprocessor(action).shape == (2, 6)


def test_prefix_token_count(built) -> None:
    """16 image tokens (64 px / 16 px patches) + the padded prompt (16 for pi0, 48 for pi0.5)."""
    policy = built.policy
    obs = built.preprocessor(raw_batch(policy.config.chunk_size, with_action=False))
    images, img_masks = policy._preprocess_images(obs)
    tokens, masks = obs["observation.language.tokens"], obs["observation.language.attention_mask"]
    embs, _, _ = policy.model.embed_prefix(images, img_masks, tokens, masks)
    n_text = {"pi0": 16, "pi05": 48}[variant_of(built)]
    assert embs.shape == (2, 16 + n_text, 64)  # (batch, prefix tokens, VLM width)


def test_tokenizer_directory_is_cached_and_loads_offline(built, monkeypatch) -> None:
    from transformers import AutoTokenizer

    path = pi0.paligemma_tokenizer_dir("tiny")
    assert tokenizer_of(built).get_config()["tokenizer_name"] == str(path)  # saved processors reload offline
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind

    def fail(*args, **kwargs):
        raise AssertionError("the cached directory should have been reused")

    monkeypatch.setattr(pi0, "_make_tokenizer", fail)
    assert pi0.paligemma_tokenizer_dir("tiny") == path
    assert AutoTokenizer.from_pretrained(path)("open the drawer\n")["input_ids"][0] == 2


def test_interrupted_generation_leaves_no_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VLAPRUNE_CACHE", str(tmp_path))

    def crash(max_length):
        raise KeyboardInterrupt

    monkeypatch.setattr(pi0, "_make_tokenizer", crash)
    with pytest.raises(KeyboardInterrupt):
        pi0.paligemma_tokenizer_dir("tiny")
    assert list(tmp_path.iterdir()) == []


def test_vocabulary_covers_metaworld_task_descriptions() -> None:
    import json
    from importlib import resources

    from transformers import AutoTokenizer

    descriptions = json.loads((resources.files("lerobot") / "envs" / "metaworld_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(pi0.paligemma_tokenizer_dir("tiny"))
    unknown = [text for text in descriptions["TASK_DESCRIPTIONS"].values()
               if tokenizer.unk_token_id in tokenizer(text)["input_ids"]]
    assert not unknown


def test_save_and_reload_under_the_patch(built, tmp_path) -> None:
    """A saved tiny policy reloads exactly, but only while :func:`pi0.tiny_architecture` is active."""
    built.policy.save_pretrained(tmp_path)
    with pi0.tiny_architecture(variant_of(built)):
        again = type(built.policy).from_pretrained(tmp_path)
    ref = built.policy.state_dict()
    loaded = again.state_dict()
    assert ref.keys() == loaded.keys()
    assert all(torch.equal(ref[k], loaded[k]) for k in ref)


def test_unknown_variant_or_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="pi05"):
        pi0.build("pi1", "tiny")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tiny"):
        pi0.build("pi0", "huge")  # type: ignore[arg-type]


@pytest.mark.slow
def test_real_pi0_has_stock_shapes() -> None:
    import gc

    built = pi0.build("pi0", "real", seed=0)
    policy = built.policy
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"real:pi0 parameters: {n_params:,}")
    # 4,028,019,472 with LeRobot 0.6.1: the untied PaliGemma lm_head (527M) and the expert's lm_head
    # (263M) come on top of the ~3.2B of the two Gemma stacks, embeddings and SigLIP.
    assert 3_900_000_000 <= n_params <= 4_100_000_000
    with_expert = policy.model.paligemma_with_expert
    assert len(with_expert.paligemma.model.language_model.layers) == 18
    assert len(with_expert.gemma_expert.model.layers) == 18
    assert with_expert.paligemma.model.language_model.embed_tokens.num_embeddings == 257152
    assert policy.config.image_resolution == (224, 224)
    del built, policy, with_expert
    gc.collect()
