"""Built-in SmolVLA policies (``tiny:smolvla``, ``real:smolvla``), built with no download.

SmolVLA always reads a SmolVLM config and processor from ``config.vlm_model_name``, even with
``load_vlm_weights=False``, and LeRobot's preprocessor loads its tokenizer from the same name. So we
generate a local SmolVLM "model directory" (config, image/video processors, a word-level tokenizer
with SmolVLM's special tokens) once into the content-addressed cache, point ``vlm_model_name`` at it
and let LeRobot build everything else with its own code.

``real`` has the shapes of SmolVLM2-500M-Video-Instruct (the stock SmolVLA backbone) with random
weights; ``tiny`` is a few-MB model with the same structure (alternating self/cross-attention
expert layers, a VLM cut to ``num_vlm_layers``) whose weights are perturbed away from init.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch

from vlaprune.io.cache import generated_dir
from vlaprune.models.builtin import dinov2, smollm2
from vlaprune.models.builtin.common import (
    ACTION_DIM,
    ACTION_KEY,
    CAMERA_KEY,
    STATE_DIM,
    STATE_KEY,
    PolicyBundle,
    check_tensors,
    perturb_parameters,
    spread_linear_weights,
    synthetic_dataset_stats,
    word_vocabulary,
)

logger = logging.getLogger(__name__)

Size = Literal["tiny", "small", "real", "pretrained"]

# Bump when the generated directory's layout changes, so old caches are not reused.
_FORMAT_VERSION = 1

# Special tokens: SmolVLM2's names (SmolVLA reads `fake_image_token_id` and `global_image_token_id`).
_UNK, _BOS, _EOS, _PAD = "<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<|im_end|>"
_MODEL_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": _EOS,
}
_SPECIAL = [_UNK, _BOS, _EOS, _PAD, "<fake_token_around_image>", "<image>", "<global-img>", "<video>"]
# Lowercase words of robot task instructions (covers every MetaWorld task description), digits and
# punctuation. Anything else maps to the unknown token.


# SmolVLM2-500M-Video-Instruct text model (a SmolLM2-360M Llama) and vision tower (SigLIP
# base-patch16-512), as published in the model's config.json.
_REAL_TEXT = {
    "model_type": "llama", "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
    "num_attention_heads": 15, "num_key_value_heads": 5, "head_dim": 64, "vocab_size": 49280,
    "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "tie_word_embeddings": False,
}
_REAL_VISION = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "image_size": 512, "patch_size": 16,
}
# Tiny: same family, small widths; 12 text layers of which SmolVLA keeps the first 8.
_TINY_TEXT = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 12,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 384,
    "max_position_embeddings": 512, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "tie_word_embeddings": False,
}
# 64 px / 8 px patches = 8x8 patches; pixel shuffle by 2 leaves 16 image tokens per camera.
_TINY_VISION = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "image_size": 64, "patch_size": 8,
}

# Small: trainable from scratch on a CPU (MetaWorld quality study): 16 text layers of which SmolVLA
# keeps 12, 12 expert layers; 64 px frames, 16 image tokens.
_SMALL_TEXT = {**_TINY_TEXT, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 16,
               "head_dim": 32}
_SMALL_VISION = {**_TINY_VISION, "hidden_size": 128, "intermediate_size": 256}

# Pretrained: a SmolVLM-256M-shaped VLM carrying real weights from registry packages (SmolLM2-135M as
# the text model, DINOv2-S/14 as the vision tower, see smollm2 / dinov2); 112 px frames are 8x8 patches,
# pixel shuffle by 2 leaves 16 image tokens. SmolVLA keeps the first 16 of the 30 text layers.
_PRETRAINED_IMAGE_SIZE = 112

_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "text": _TINY_TEXT, "vision": _TINY_VISION, "scale_factor": 2, "raw_image_hw": 96,
        "policy": {"num_vlm_layers": 8, "chunk_size": 10, "n_action_steps": 10, "num_steps": 4,
                   "tokenizer_max_length": 16},
    },
    "small": {
        "text": _SMALL_TEXT, "vision": _SMALL_VISION, "scale_factor": 2, "raw_image_hw": 64,
        "policy": {"num_vlm_layers": 12, "chunk_size": 20, "n_action_steps": 10, "num_steps": 10,
                   "tokenizer_max_length": 16},
    },
    "pretrained": {
        "text": smollm2.TEXT_CONFIG, "vision": dinov2.vision_config(_PRETRAINED_IMAGE_SIZE), "scale_factor": 2,
        "raw_image_hw": _PRETRAINED_IMAGE_SIZE,
        "policy": {"num_vlm_layers": 16, "chunk_size": 20, "n_action_steps": 10, "num_steps": 10,
                   "tokenizer_max_length": 48},
    },
    "real": {
        "text": _REAL_TEXT, "vision": _REAL_VISION, "scale_factor": 4, "raw_image_hw": 512,
        "policy": {"num_vlm_layers": 16, "chunk_size": 50, "n_action_steps": 50, "num_steps": 10,
                   "tokenizer_max_length": 48},
    },
}


def build(size: Size, *, seed: int = 0, features: tuple[dict[str, Any], dict[str, Any]] | None = None,
          dataset_stats: dict[str, dict[str, Any]] | None = None) -> PolicyBundle:
    """Build ``<size>:smolvla``: a ``SmolVLAPolicy`` (eval, float32, CPU) and LeRobot's stock processors.

    Deterministic for a given ``seed``; the global torch RNG state is left as it was. Only the
    generated SmolVLM directory is cached (on disk); weights are always freshly seeded. ``features``
    (input, output ``PolicyFeature`` dicts) and ``dataset_stats`` default to the built-ins' synthetic
    camera, 6-d state and action (see :func:`build_for_dataset`).
    """
    spec = _size_spec(size)
    from lerobot.configs import FeatureType, PolicyFeature
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

    vlm_dir = smolvlm_dir(size)
    image_size = spec["vision"]["image_size"]
    hw = spec["raw_image_hw"]
    inputs, outputs = features or (
        {CAMERA_KEY: PolicyFeature(type=FeatureType.VISUAL, shape=(3, hw, hw)),
         STATE_KEY: PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))},
        {ACTION_KEY: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
    )
    config = SmolVLAConfig(
        vlm_model_name=str(vlm_dir),
        load_vlm_weights=False,
        device="cpu",
        push_to_hub=False,
        resize_imgs_with_padding=(image_size, image_size),  # must equal the vision tower's size
        num_expert_layers=-1,  # same count as the VLM: the stock pairing (docs/families.md)
        attention_mode="cross_attn",
        self_attn_every_n_layers=2,
        expert_width_multiplier=0.75,
        input_features=inputs,
        output_features=outputs,
        **spec["policy"],
    )
    policy = _seeded_policy(config, seed)
    if size == "tiny":
        spread_linear_weights(policy, seed=seed)
        perturb_parameters(policy, seed=seed)
    if size == "pretrained":
        load_pretrained_vlm(policy, vlm_dir)
    policy.eval()
    stats = dataset_stats or synthetic_dataset_stats({**config.input_features, **config.output_features})
    preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=stats)
    return PolicyBundle(spec=f"{size}:smolvla", policy=policy, preprocessor=preprocessor,
                       postprocessor=postprocessor)


def _seeded_policy(config: Any, seed: int) -> Any:
    """``SmolVLAPolicy(config)`` (float32, CPU) with weights drawn from ``seed``; the global RNG state is kept."""
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = SmolVLAPolicy(config)
    return policy.to(device="cpu", dtype=torch.float32)


def rebuild_pretrained(checkpoint: Path, *, seed: int) -> Any:
    """The untrained start of a checkpoint trained from ``pretrained:smolvla`` (eval, float32, CPU): the
    policy :func:`build` makes for the checkpoint's config with ``seed``, the packages' text and vision
    weights in its VLM, every other tensor as seeded. What training changed is the difference."""
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

    config = SmolVLAConfig.from_pretrained(checkpoint)
    vlm_dir = smolvlm_dir("pretrained")
    if config.vlm_model_name != str(vlm_dir):
        raise ValueError(f"{checkpoint}: vlm_model_name {config.vlm_model_name!r} is not this machine's "
                         f"pretrained SmolVLM directory {str(vlm_dir)!r}")
    policy = _seeded_policy(config, seed)
    load_pretrained_vlm(policy, vlm_dir)
    return policy.eval()


def build_for_dataset(size: Size, root: Path, repo_id: str, *, seed: int = 0) -> PolicyBundle:
    """An untrained ``<size>:smolvla`` with the cameras, state and action of the LeRobotDataset at
    ``root``, processors normalising with its statistics and every parameter trainable (``pretrained``:
    everything but the pretrained text and vision layers, as type ``smolvla_connector``): the starting
    point of robot pretraining (``policy.save_pretrained`` + the processors' ``save_pretrained`` into one directory,
    then ``lerobot-train --policy.path=DIR``)."""
    from lerobot.configs import FeatureType
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.utils.feature_utils import dataset_to_policy_features

    meta = LeRobotDatasetMetadata(repo_id, root=root)
    policy_features = dataset_to_policy_features(meta.features)
    outputs = {k: f for k, f in policy_features.items() if f.type is FeatureType.ACTION}
    inputs = {k: f for k, f in policy_features.items() if k not in outputs}
    if not outputs or not any(f.type is FeatureType.VISUAL for f in inputs.values()):
        raise ValueError(f"{root}: a SmolVLA policy needs an action feature and at least one camera; the dataset "
                         f"has {sorted(policy_features)}")
    bundle = build(size, seed=seed, features=(inputs, outputs), dataset_stats=meta.stats)
    if size == "pretrained":
        # the pretrained text and vision layers stay frozen and the new connector trains with the
        # expert: the plugin's training-time type smolvla_connector (its checkpoints become stock
        # smolvla ones with studies.train.as_stock_smolvla)
        from lerobot_policy_vlaprune import SmolVLAConnectorConfig
        from lerobot_policy_vlaprune.pruned import config_as

        bundle.policy.config = config_as(SmolVLAConnectorConfig, bundle.policy.config)
        bundle.policy.model.vlm_with_expert.get_vlm_model().connector.requires_grad_(True)
        return bundle
    # from scratch, the VLM must learn too: SmolVLA's defaults freeze it (train_expert_only,
    # freeze_vision_encoder); the saved config makes lerobot-train build it trainable as well
    bundle.policy.config.train_expert_only = False
    bundle.policy.config.freeze_vision_encoder = False
    bundle.policy.requires_grad_(True)
    return bundle


def smolvlm_dir(size: Size) -> Path:
    """The generated SmolVLM directory for ``size`` (config + processor), created on first use.

    Generated atomically (see :func:`generated_dir`).
    """
    import transformers

    spec = _size_spec(size)
    payload: dict[str, Any] = {
        "format": _FORMAT_VERSION, "transformers": transformers.__version__, "text": spec["text"],
        "vision": spec["vision"], "scale_factor": spec["scale_factor"], "model_tokens": _MODEL_TOKENS,
    }
    if size != "pretrained":
        payload["vocab"] = _vocabulary()
        max_length = spec["text"]["max_position_embeddings"]
        return generated_dir(f"smolvlm-{size}", payload, marker="config.json",  # tokenizer built only when written
                             write=lambda tmp: _write_smolvlm(tmp, spec, _make_tokenizer(max_length)))
    # the converted weights come from the packages: their versions key the cache
    payload["packages"] = {smollm2.PACKAGE: smollm2.VERSION, dinov2.PACKAGE: dinov2.VERSION}
    return generated_dir(f"smolvlm-{size}", payload, marker="config.json",
                         write=lambda tmp: _write_pretrained_smolvlm(tmp, spec))


def _size_spec(size: str) -> dict[str, Any]:
    if size not in _SIZES:
        raise ValueError(f"unknown SmolVLA size {size!r}; choose one of {', '.join(_SIZES)}")
    return _SIZES[size]


def _vocabulary() -> list[str]:
    """Token strings in id order: special tokens first, then words, digits and punctuation."""
    return word_vocabulary(_SPECIAL)


def _make_tokenizer(max_length: int) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over :func:`_vocabulary` with SmolVLM's special tokens.

    The image tokens are passed as named model tokens, so the tokenizer exposes
    ``fake_image_token_id`` / ``global_image_token_id`` / ``image_token_id`` like SmolVLM's.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_UNK))
    backend.normalizer = normalizers.Lowercase()
    # Words and punctuation runs split apart, each digit its own token.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.add_special_tokens(_SPECIAL)  # matched before normalisation, never split
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=_UNK, bos_token=_BOS, eos_token=_EOS, pad_token=_PAD,
        model_max_length=max_length, **_MODEL_TOKENS,
    )


def _write_smolvlm(path: Path, spec: dict[str, Any], tokenizer: Any) -> None:
    """Save a ``SmolVLMConfig`` and a ``SmolVLMProcessor`` (image/video processors, ``tokenizer``) to ``path``."""
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    if len(tokenizer) > spec["text"]["vocab_size"]:
        raise ValueError(f"a tokenizer of {len(tokenizer)} tokens does not fit {spec['text']['vocab_size']} rows")
    bos, eos, pad = tokenizer.convert_tokens_to_ids([_BOS, _EOS, _PAD])
    text = {**spec["text"], "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    # Passed as a dict: mypy misreads huggingface_hub's @strict config dataclasses.
    config_kwargs: dict[str, Any] = {
        "text_config": text, "vision_config": dict(spec["vision"]), "scale_factor": spec["scale_factor"],
        "image_token_id": tokenizer.convert_tokens_to_ids("<image>"), "pad_token_id": pad,
    }
    config = SmolVLMConfig(**config_kwargs)
    config.save_pretrained(path)
    image_size = spec["vision"]["image_size"]
    # One image of image_size px, no tiling: what SmolVLA feeds the vision tower itself.
    edge = {"longest_edge": image_size}
    media_kwargs = {"do_resize": True, "size": edge, "max_image_size": edge, "image_mean": [0.5] * 3,
                    "image_std": [0.5] * 3}
    n_patches = (image_size // spec["vision"]["patch_size"]) ** 2
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(do_image_splitting=False, **media_kwargs),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(**media_kwargs),
        image_seq_len=n_patches // spec["scale_factor"] ** 2,
    )
    processor.save_pretrained(path)


PRETRAINED_WEIGHTS = "pretrained_vlm.safetensors"  # in the generated SmolVLM directory
PRETRAINED_PARTS = ("text_model", "vision_model")  # the VLM modules whose every tensor comes from the packages


def _write_pretrained_smolvlm(path: Path, spec: dict[str, Any]) -> None:
    """The SmolVLM directory of ``pretrained``: config, processor with SmolLM2's tokenizer and SmolVLM's
    special tokens, and the converted text and vision weights (:data:`PRETRAINED_WEIGHTS`)."""
    from safetensors.torch import save_file

    logger.info("converting SmolLM2-135M (%s) and DINOv2-S (%s) once into %s", smollm2.PACKAGE, dinov2.PACKAGE,
                path.parent)
    model, gguf_tokenizer = smollm2.load_gguf()
    text = smollm2.text_state_dict(model)
    vision = dinov2.vision_tower_state_dict(dinov2.read_dinov2(), spec["vision"]["image_size"])
    weights = {**{f"text_model.{k}": v for k, v in text.items()}, **{f"vision_model.{k}": v for k, v in vision.items()}}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / PRETRAINED_WEIGHTS))
    _write_smolvlm(path, spec, _pretrained_tokenizer(gguf_tokenizer, spec["text"]["max_position_embeddings"]))


def _pretrained_tokenizer(gguf_tokenizer: Any, max_length: int) -> Any:
    """SmolLM2's BPE tokenizer (read from the GGUF) with SmolVLM's image and special tokens added."""
    import copy

    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(gguf_tokenizer.backend_tokenizer)
    backend.add_special_tokens(_SPECIAL)  # those SmolLM2 already has keep their ids
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=_UNK, bos_token=_BOS, eos_token=_EOS, pad_token=_PAD,
        model_max_length=max_length, **_MODEL_TOKENS,
    )


def load_pretrained_vlm(policy: Any, vlm_dir: Path) -> None:
    """Give ``policy``'s VLM the converted text and vision weights of ``vlm_dir``: the embedding, the
    first ``num_vlm_layers`` text layers and the final norm, and the whole vision tower; the connector
    keeps its seeded initial weights (it is trained). Every kept tensor must be covered exactly."""
    from safetensors.torch import load_file

    weights = load_file(str(vlm_dir / PRETRAINED_WEIGHTS))
    vlm = policy.model.vlm_with_expert.get_vlm_model()
    for part in PRETRAINED_PARTS:
        module = getattr(vlm, part)
        prefix = f"{part}."
        state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        wanted = module.state_dict()
        state = {k: v for k, v in state.items() if k in wanted or not k.startswith("layers.")}  # layers SmolVLA cut
        check_tensors(f"{vlm_dir / PRETRAINED_WEIGHTS} ({part})", state,
                      {k: tuple(v.shape) for k, v in wanted.items()})
        module.load_state_dict(state, strict=True)
