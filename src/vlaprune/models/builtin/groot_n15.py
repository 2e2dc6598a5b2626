"""Built-in GR00T N1.5 (``tiny:groot_n15``), built offline with LeRobot 0.5.1's real N1.5 code.

The model is ``GR00TN15`` from :mod:`vlaprune.families.isaac_n15` (Isaac-GR00T's N1.5 as LeRobot ported it),
at N1.5's depths: 12 language layers kept by ``select_layer`` (of 14 built), 4 VL self-attention
blocks, 16 DiT blocks, so the paper's hand-picked plan applies as is, but at tiny widths (Qwen3
text width 64, a four-layer SigLIP on 28 px frames, 4 image tokens). Its Eagle 2.5 VL config is
generated into the cache (the Eagle backbone reads ``config.json`` from ``tokenizer_assets_repo``);
the tokenizer and image processor are not needed: calibration batches carry the model's own inputs
(``eagle_input_ids`` with the image tokens, ``eagle_pixel_values``, ...), seeded. Weights are seeded,
spread and perturbed away from their initial values, as for the other tiny built-ins.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vlaprune.io.cache import generated_dir
from vlaprune.io.calibration import SYNTHETIC_TASKS, CalibrationConfig
from vlaprune.models.builtin.common import PolicyBundle, perturb_parameters, spread_linear_weights

_FORMAT_VERSION = 1
WIDTH, TEXT_LAYERS, SELECT_LAYER = 64, 14, 12
IMAGE_TOKEN, IMAGE_SIZE, PATCH = 200, 28, 14  # (28 / 14)^2 = 4 image tokens per frame, no pixel shuffle
ACTION_DIM, HORIZON, STATE_DIM, SEQUENCE = 8, 4, 10, 12
DIT_LAYERS, VLSA_LAYERS, VISION_LAYERS = 16, 4, 4

_EAGLE = {
    "architectures": ["Eagle25VLForConditionalGeneration"],
    "auto_map": {"AutoConfig": "configuration_eagle2_5_vl.Eagle25VLConfig",
                 "AutoModel": "modeling_eagle2_5_vl.Eagle25VLForConditionalGeneration"},
    "model_type": "eagle_2_5_vl", "_attn_implementation": "sdpa", "downsample_ratio": 0.5,
    "force_image_size": IMAGE_SIZE, "image_token_index": IMAGE_TOKEN, "mlp_connector_layers": 1,
    "use_pixel_shuffle": False, "select_layer": -1, "template": "qwen3-chat", "use_backbone_lora": 0,
    "use_llm_lora": 0,
    "text_config": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": WIDTH,
                    "intermediate_size": 128, "num_hidden_layers": TEXT_LAYERS, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 128,
                    "tie_word_embeddings": True, "use_cache": False, "rms_norm_eps": 1e-6, "rope_theta": 1000000},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": VISION_LAYERS, "num_attention_heads": 2, "image_size": IMAGE_SIZE,
                      "patch_size": PATCH, "num_channels": 3},
}
# Files the Eagle backbone would otherwise try to download next to its config (tokenizer, processor).
_PLACEHOLDERS = ("vocab.json", "added_tokens.json", "chat_template.json", "special_tokens_map.json",
                 "generation_config.json", "preprocessor_config.json", "processor_config.json",
                 "tokenizer_config.json")


def eagle_dir() -> Path:
    """The generated tiny Eagle 2.5 VL config directory (the backbone's ``tokenizer_assets_repo``)."""

    def write(path: Path) -> None:
        for name in _PLACEHOLDERS:
            (path / name).write_text("{}")
        (path / "merges.txt").write_text("")
        (path / "config.json").write_text(json.dumps(_EAGLE, indent=1))

    return generated_dir("eagle-n15-tiny", {"format": _FORMAT_VERSION, "eagle": _EAGLE}, marker="config.json",
                         write=write)


def model_config(module: Any) -> Any:
    """The tiny ``GR00TN15Config`` (N1.5's depths, tiny widths)."""
    return module.GR00TN15Config(
        action_dim=ACTION_DIM, action_horizon=HORIZON, compute_dtype="float32", model_dtype="float32",
        hidden_size=WIDTH, architectures=["GR00T_N1_5"],
        backbone_cfg={"select_layer": SELECT_LAYER, "project_to_dim": None, "tune_llm": False, "tune_visual": True,
                      "reproject_vision": False, "load_bf16": False, "use_flash_attention": False,
                      "tokenizer_assets_repo": str(eagle_dir())},
        action_head_cfg={
            "action_dim": ACTION_DIM, "action_horizon": HORIZON, "add_pos_embed": True,
            "backbone_embedding_dim": WIDTH, "hidden_size": 48, "input_embedding_dim": 32,
            "max_action_dim": ACTION_DIM, "max_state_dim": STATE_DIM, "max_num_embodiments": 4,
            "num_inference_timesteps": 4, "num_target_vision_tokens": 4, "max_seq_len": 16,
            "noise_beta_alpha": 1.5, "noise_beta_beta": 1.0, "noise_s": 0.999, "num_timestep_buckets": 1000,
            "tune_projector": True, "tune_diffusion_model": True, "use_vlln": True, "model_dtype": "float32",
            "diffusion_model_cfg": {"attention_head_dim": 16, "num_attention_heads": 2, "cross_attention_dim": WIDTH,
                                    "dropout": 0.0, "final_dropout": True, "interleave_self_attention": True,
                                    "norm_type": "ada_norm", "num_layers": DIT_LAYERS, "output_dim": 48,
                                    "positional_embeddings": None},
            "vl_self_attention_cfg": {"attention_head_dim": 16, "num_attention_heads": 4, "dropout": 0.0,
                                      "final_dropout": True, "num_layers": VLSA_LAYERS,
                                      "positional_embeddings": None},
        },
    )


def build(size: str = "tiny", *, seed: int = 0) -> PolicyBundle:
    """``tiny:groot_n15``: an ``N15Policy`` (eval, float32, CPU) around a seeded tiny ``GR00TN15``."""
    from vlaprune.families.isaac_n15 import N15Policy, load

    if size != "tiny":
        raise ValueError(f"GR00T N1.5 comes as tiny:groot_n15 only; got {size}:groot_n15")
    module = load()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = module.GR00TN15(model_config(module), local_model_path=str(eagle_dir()))
    spread_linear_weights(model, seed=seed)
    perturb_parameters(model, seed=seed)
    policy = N15Policy(model).to(dtype=torch.float32).eval()
    return PolicyBundle(spec=f"{size}:groot_n15", policy=policy, preprocessor=None, postprocessor=None,
                        synthetic=synthetic_batches)


def synthetic_batches(config: CalibrationConfig) -> Iterator[dict[str, Any]]:
    """Seeded batches of the tiny model's inputs: one frame and a left-padded prompt around its image
    tokens per sample, state, embodiment, and an action chunk with its mask. Labelled ``synthetic``."""
    gen = torch.Generator().manual_seed(config.seed)
    start = 0
    tokens = (IMAGE_SIZE // PATCH) ** 2
    for size in config.batch_sizes:
        ids = torch.randint(0, 150, (size, SEQUENCE), generator=gen)
        mask = torch.ones(size, SEQUENCE, dtype=torch.long)
        for i in range(size):  # prompts of different lengths, left-padded like Eagle's processor
            pad = int(torch.randint(0, 3, (1,), generator=gen))
            mask[i, :pad] = 0
            ids[i, pad + 1: pad + 1 + tokens] = IMAGE_TOKEN
        yield {
            "eagle_input_ids": ids,
            "eagle_attention_mask": mask,
            "eagle_pixel_values": torch.rand(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 2 - 1,
            "eagle_image_sizes": torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * size),
            "state": torch.randn(size, 1, STATE_DIM, generator=gen),
            "embodiment_id": torch.zeros(size, dtype=torch.long),
            "action": torch.randn(size, HORIZON, ACTION_DIM, generator=gen),
            "action_mask": torch.ones(size, HORIZON, ACTION_DIM),
            "task": [SYNTHETIC_TASKS[(start + i) % len(SYNTHETIC_TASKS)] for i in range(size)],
        }
        start += size
