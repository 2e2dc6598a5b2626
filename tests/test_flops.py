"""The linear-layer FLOP counter against counts computed by hand from the tiny pi0 config."""

from __future__ import annotations

from vlaprune.core.flops import chunk_flops_by_part, parameter_counts
from vlaprune.families import family_for

from .flow import batch


def _decoder_layer_macs(cfg) -> int:
    """Multiply-accumulates per token of one Gemma decoder layer's linear layers (q, k, v, o, MLP)."""
    attn = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    return cfg.hidden_size * (attn + 2 * kv) + attn * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size


def test_chunk_flops_match_hand_count_for_tiny_pi0(tiny):
    bundle = tiny("tiny:pi0")
    policy, config = bundle.policy, bundle.policy.config
    observation = {k: v for k, v in batch(bundle, n=1).items() if not k.startswith("action")}
    parts = chunk_flops_by_part(family_for(policy), policy, observation)

    pwe = policy.model.paligemma_with_expert
    vision, text, expert = pwe.paligemma.config.vision_config, pwe.paligemma.config.text_config, pwe.gemma_expert.config
    image_tokens = (vision.image_size // vision.patch_size) ** 2 * len(config.image_features)
    prefix = image_tokens + config.tokenizer_max_length  # language is padded to the max length
    suffix = config.chunk_size + 1  # pi0: the state token, then the noisy actions
    assert parts["vlm"] == 2 * prefix * text.num_hidden_layers * _decoder_layer_macs(text)
    assert parts["expert"] == (2 * suffix * config.num_inference_steps * expert.num_hidden_layers
                               * _decoder_layer_macs(expert))
    assert parts["other"] > 0  # vision encoder, projections


def test_parameter_counts_follow_requires_grad(tiny):
    policy = tiny("tiny:smolvla").policy
    counts = parameter_counts(policy)
    assert counts["total"] == sum(p.numel() for p in policy.parameters())
    assert 0 < counts["trainable"] < counts["total"]  # SmolVLA's default freezes the VLM
