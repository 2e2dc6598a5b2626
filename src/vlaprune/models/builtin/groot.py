"""Built-in GR00T N1.7 policies (``tiny:groot``, ``real:groot``), built with no download.

LeRobot's ``GrootPolicy`` always rebuilds its model with ``GR00TN17.from_pretrained(base_model_path)``,
and the base model builds its Qwen3-VL backbone from the config at ``model_name``; the preprocessor
loads the Qwen3-VL tokenizer and image processor from a name too. So we generate two local
directories into the content-addressed cache: a Qwen3-VL "model directory" (config, a word-level
tokenizer with Qwen's special tokens and a minimal chat template, image and video processors) and a
GR00T N1.7 base checkpoint (``config.json`` pointing ``model_name`` at the Qwen3-VL directory, plus
seeded weights), and let LeRobot build everything else with its own code.

``tiny`` is a few-MB model with N1.7's structure: Qwen3-VL text layers cut at ``select_layer`` with
deepstack visual features entering layers 0-2, the 4-block VL self-attention, and an AlternateVLDiT
whose even blocks cross-attend to text (``idx % 4 == 0``) or image tokens; its weights are spread
and perturbed away from init. ``real`` has the shapes of nvidia/GR00T-N1.7-3B (Cosmos-Reason2-2B
backbone cut at layer 16, 32 DiT blocks, 4 VL self-attention blocks) with seeded random weights,
for timing only; it is built in memory (its base directory holds a config, no weights).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch

from vlaprune.io.cache import generated_dir
from vlaprune.models.builtin.common import (
    ACTION_DIM,
    ACTION_KEY,
    CAMERA_KEY,
    STATE_DIM,
    STATE_KEY,
    PolicyBundle,
    perturb_parameters,
    spread_linear_weights,
    synthetic_dataset_stats,
    word_vocabulary,
)

logger = logging.getLogger(__name__)

Size = Literal["tiny", "real"]

_FORMAT_VERSION = 1

# Qwen's special tokens (the names Qwen3VLProcessor looks up) and the words of the chat template.
_UNK, _PAD = "<|endoftext|>", "<|endoftext|>"
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
_CHAT_WORDS = ["user", "assistant", "system", "perform"]
# What Qwen3-VL's template renders for one user message of images and text (no system prompt).
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# nvidia/Cosmos-Reason2-2B (Qwen3-VL-2B layout), as LeRobot 0.6.1 hard-codes it in groot_n1_7.py.
_REAL_TEXT = {
    "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 262144,
    "rope_theta": 5000000, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True,
    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
}
_REAL_VISION = {
    "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
    "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "gelu_pytorch_tanh",
}
# Tiny: 10 text layers, of which GR00T keeps select_layer = 8; three deepstack features as in N1.7.
_TINY_TEXT = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 10, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 1024,
    "rope_theta": 10000, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True,
    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
}
_TINY_VISION = {  # 8 blocks, deepstack mergers reading 1, 3, 5 (N1.7: 24 blocks, mergers reading 5, 11, 17)
    "deepstack_visual_indexes": [1, 3, 5], "depth": 8, "hidden_size": 32, "intermediate_size": 64,
    "num_heads": 2, "num_position_embeddings": 64, "out_hidden_size": 64, "patch_size": 8,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "gelu_pytorch_tanh",
}

_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "text": _TINY_TEXT, "vision": _TINY_VISION,
        # frames resized to 32 x 32 px: 4 x 4 patches of 8 px, merged 2 x 2 -> 4 image tokens
        "image_target_size": [32, 32], "image_crop_size": [32, 32], "raw_image_hw": 48,
        "model": {
            "select_layer": 8, "backbone_embedding_dim": 64, "hidden_size": 64, "input_embedding_dim": 64,
            "max_state_dim": 8, "max_action_dim": 8, "action_horizon": 8, "max_seq_len": 64,
            "num_inference_timesteps": 4, "max_num_embodiments": 16,
            "diffusion_model_cfg": {"positional_embeddings": None, "num_layers": 8, "num_attention_heads": 4,
                                    "attention_head_dim": 16, "norm_type": "ada_norm", "dropout": 0.0,
                                    "final_dropout": True, "output_dim": 64, "interleave_self_attention": True},
            "vl_self_attention_cfg": {"positional_embeddings": None, "num_layers": 4, "num_attention_heads": 4,
                                      "attention_head_dim": 16, "dropout": 0.0, "final_dropout": True},
        },
        "policy": {"chunk_size": 8, "n_action_steps": 8, "max_state_dim": 8, "max_action_dim": 8},
    },
    "real": {
        "text": _REAL_TEXT, "vision": _REAL_VISION,
        "image_target_size": [256, 256], "image_crop_size": [230, 230], "raw_image_hw": 256,
        "model": {},  # LeRobot's GR00T N1.7 defaults: select_layer 16, 32 DiT blocks, 4 VL self-attention
        "policy": {"chunk_size": 40, "n_action_steps": 40},
    },
}


def build(size: Size, *, seed: int = 0) -> PolicyBundle:
    """Build ``<size>:groot``: a ``GrootPolicy`` (eval, float32, CPU, no bf16 autocast) and LeRobot's
    stock GR00T processors (Qwen3-VL encoding from the generated directory, synthetic statistics).

    Deterministic for a given ``seed``; the global torch RNG state is left as it was.
    """
    spec = _size_spec(size)
    from lerobot.configs import FeatureType, PolicyFeature
    from lerobot.policies.groot.configuration_groot import GrootConfig
    from lerobot.policies.groot.modeling_groot import GrootPolicy
    from lerobot.policies.groot.processor_groot import make_groot_pre_post_processors

    hw = spec["raw_image_hw"]
    config = GrootConfig(
        base_model_path=str(base_model_dir(size, seed=seed)),
        device="cpu",
        push_to_hub=False,
        use_bf16=False,  # float32 compute: equivalence checks and CPU timing without autocast
        input_features={CAMERA_KEY: PolicyFeature(type=FeatureType.VISUAL, shape=(3, hw, hw)),
                        STATE_KEY: PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))},
        output_features={ACTION_KEY: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
        **spec["policy"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # tiny: GrootPolicy loads the seeded weights of the generated base directory
        policy = _real_policy(config) if size == "real" else GrootPolicy(config)
    policy.to(device="cpu", dtype=torch.float32)
    policy.eval()
    stats = synthetic_dataset_stats({**config.input_features, **config.output_features})
    preprocessor, postprocessor = make_groot_pre_post_processors(config, dataset_stats=stats)
    point_vlm_encoder(preprocessor, qwen3vl_dir(size), spec)
    return PolicyBundle(spec=f"{size}:groot", policy=policy, preprocessor=preprocessor, postprocessor=postprocessor)


def point_vlm_encoder(preprocessor: Any, qwen_dir: Path, spec: dict[str, Any]) -> None:
    """Make the preprocessor's Qwen3-VL encoding step read the generated directory (LeRobot's
    factory hard-codes nvidia/Cosmos-Reason2-2B) at the size's image geometry."""
    from lerobot.policies.groot.processor_groot import GrootN17VLMEncodeStep

    steps = [s for s in preprocessor.steps if isinstance(s, GrootN17VLMEncodeStep)]
    if len(steps) != 1:
        raise RuntimeError(f"expected one GR00T N1.7 VLM encoding step in the preprocessor, found {len(steps)}")
    steps[0].model_name = str(qwen_dir)
    steps[0].image_target_size = list(spec["image_target_size"])
    steps[0].image_crop_size = list(spec["image_crop_size"])
    steps[0]._proc = None


def _real_policy(config: Any) -> Any:
    """``real:groot`` without writing 3B weights to disk: a ``GrootPolicy`` whose model is built from the
    base directory's config (random weights, seeded by the caller) instead of loaded from it, set up as
    ``GrootPolicy`` sets up a loaded one (the plugin's ``build_model``, shared with ``groot_pruned``)."""
    from lerobot.policies.groot.groot_n1_7 import GR00TN17Config
    from lerobot.policies.groot.modeling_groot import GrootPolicy

    from lerobot_policy_vlaprune.modeling_groot_pruned import build_model

    class ConfigOnlyGrootPolicy(GrootPolicy):
        def _create_groot_model(self) -> Any:
            return build_model(self.config, GR00TN17Config.from_pretrained(self.config.base_model_path))

    return ConfigOnlyGrootPolicy(config)


def base_model_dir(size: Size, *, seed: int = 0) -> Path:
    """The generated GR00T N1.7 base checkpoint for ``size`` (``tiny``: config + seeded weights;
    ``real``: config only), created on first use."""
    import transformers

    spec = _size_spec(size)
    qwen = qwen3vl_dir(size)
    payload = {"format": _FORMAT_VERSION, "transformers": transformers.__version__, "qwen": qwen.name,
               "model": spec["model"], "seed": seed if size == "tiny" else None}
    return generated_dir(f"groot-n17-{size}", payload, marker="config.json",
                         write=lambda tmp: _write_base_model(tmp, size, qwen, spec, seed))


def _model_config(qwen: Path, spec: dict[str, Any]) -> Any:
    from lerobot.policies.groot.groot_n1_7 import GR00TN17Config

    kwargs: dict[str, Any] = {**spec["model"], "model_name": str(qwen), "backbone_model_type": "qwen",
                              "model_dtype": "float32", "dtype": "float32"}
    return GR00TN17Config(**kwargs)


def _write_base_model(path: Path, size: str, qwen: Path, spec: dict[str, Any], seed: int) -> None:
    from lerobot.policies.groot.groot_n1_7 import GR00TN17

    config = _model_config(qwen, spec)
    if size == "real":
        config.save_pretrained(path)
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GR00TN17(config, load_backbone_weights=False)
    spread_linear_weights(model, seed=seed)
    perturb_parameters(model, seed=seed)
    model.save_pretrained(path)


def qwen3vl_dir(size: Size) -> Path:
    """The generated Qwen3-VL directory for ``size`` (config, tokenizer, processors), created on first use."""
    import transformers

    spec = _size_spec(size)
    payload = {"format": _FORMAT_VERSION, "transformers": transformers.__version__, "text": spec["text"],
               "vision": spec["vision"], "vocab": _vocabulary(), "template": _CHAT_TEMPLATE,
               "image": spec["image_target_size"]}
    return generated_dir(f"qwen3vl-{size}", payload, marker="config.json",
                         write=lambda tmp: _write_qwen3vl(tmp, spec))


def _size_spec(size: str) -> dict[str, Any]:
    if size not in _SIZES:
        raise ValueError(f"unknown GR00T size {size!r}; choose one of {', '.join(_SIZES)}")
    return _SIZES[size]


def _vocabulary() -> list[str]:
    return word_vocabulary(_SPECIAL, _CHAT_WORDS)


def _make_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.add_special_tokens(_SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=_UNK, pad_token=_PAD,
                                   eos_token="<|im_end|>", chat_template=_CHAT_TEMPLATE, model_max_length=4096)


def _write_qwen3vl(path: Path, spec: dict[str, Any]) -> None:
    """Save a ``Qwen3VLConfig``, a word-level tokenizer with Qwen's special tokens and Qwen3-VL's
    image / video processors to ``path``."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = _make_tokenizer()
    ids = dict(zip(_SPECIAL, tokenizer.convert_tokens_to_ids(_SPECIAL), strict=True))
    real = spec["text"] is _REAL_TEXT
    text = {**spec["text"], "model_type": "qwen3_vl_text", "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"], "dtype": "float32"}
    if not real:
        assert len(tokenizer) <= text["vocab_size"], "the vocabulary must fit the embedding table"
    config_kwargs: dict[str, Any] = {
        "text_config": text, "vision_config": {**spec["vision"], "model_type": "qwen3_vl", "in_channels": 3},
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": True,
    }
    Qwen3VLConfig(**config_kwargs).save_pretrained(path)
    patch, merge = spec["vision"]["patch_size"], spec["vision"]["spatial_merge_size"]
    h, w = spec["image_target_size"]
    pixels = {"shortest_edge": (patch * merge) ** 2, "longest_edge": h * w}
    image = Qwen2VLImageProcessor(size=pixels, patch_size=patch, merge_size=merge,
                                  temporal_patch_size=spec["vision"]["temporal_patch_size"])
    image.save_pretrained(path)
    video = Qwen3VLVideoProcessor(size=pixels, patch_size=patch, merge_size=merge,
                                  temporal_patch_size=spec["vision"]["temporal_patch_size"])
    video.save_pretrained(path)
    tokenizer.save_pretrained(path)
