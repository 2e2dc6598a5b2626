"""Built-in pi0 and pi0.5 policies (``tiny:pi0``, ``tiny:pi05``, ``real:pi0``, ``real:pi05``), built offline.

LeRobot's pi0/pi0.5 hard-code their backbone shapes in code, not in the config: the Gemma widths and
depths come from the module-level ``get_gemma_config(variant)``, and ``PaliGemmaWithExpertModel``
fixes a SigLIP-So400m vision tower, a 2048-d projector and a 257152-token vocabulary. ``real`` keeps
all of that (random weights, the stock architecture). ``tiny`` builds the same classes at small
dimensions (:data:`TINY_ARCHITECTURE`: 8-layer Gemma stacks with 8 heads, since the joint attention
reshape hard-codes 8 heads and both stacks must share heads/head_dim/KV heads; a 2-layer SigLIP; a
projector to the VLM width; our tokenizer's vocabulary) through the plugin's
``build_architecture``, the same mechanism that builds a pruned pi0 from the dimensions its config
records. ``forward``, ``select_action``, ``state_dict`` and the stored HF configs agree.

The processors are LeRobot's stock ones; their factory hard-codes the gated
``google/paligemma-3b-pt-224`` tokenizer, so the factory runs with ``TokenizerProcessorStep`` pointed
at a word-level tokenizer generated into the cache (PaliGemma's special-token ids, BOS prepended).
"""

from __future__ import annotations

import importlib
import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

import torch

from lerobot_policy_vlaprune.pi_architecture import build_architecture, patched
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

Variant = Literal["pi0", "pi05"]
Size = Literal["tiny", "real"]
VARIANTS: tuple[str, ...] = ("pi0", "pi05")
SIZES: tuple[str, ...] = ("tiny", "real")

# Bump when the generated tokenizer directory's layout changes, so old caches are not reused.
_FORMAT_VERSION = 1

# PaliGemma (Gemma) special tokens, at Gemma's ids 0..3; "\n" ends pi0's prompt (Pi0NewLineProcessor)
# and separates pi0.5's "State: ...;\nAction:", so it is a token of its own as in Gemma.
_PAD, _EOS, _BOS, _UNK, _NEWLINE = "<pad>", "<eos>", "<bos>", "<unk>", "\n"
_SPECIAL = [_PAD, _EOS, _BOS, _UNK]
# pi0.5 prompt words ("Task: ..., State: 12 200 ...;\nAction: ").
_EXTRA_WORDS = ["task", "state", "action"]

# Tiny dimensions. Heads, KV heads and head_dim are shared: attention is joint over both stacks.
# 8 x 8 = 64 = VLM width (like gemma_2b's 8 x 256 = 2048) and twice the expert width (like gemma_300m's
# 2048 vs 1024). SigLIP: 64 px images in 16 px patches = 16 image tokens per camera. The vocabulary
# is the generated tokenizer's (see tiny_architecture).
_TINY_IMAGE_SIZE = 64
_TINY_DEPTH = 8
TINY_ARCHITECTURE: dict[str, dict[str, int]] = {
    "vlm": {"width": 64, "mlp_dim": 128, "num_heads": 8, "num_kv_heads": 1, "head_dim": 8},
    "expert": {"width": 32, "mlp_dim": 64, "num_heads": 8, "num_kv_heads": 1, "head_dim": 8},
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "patch_size": 16, "projection_dim": 64},
}

_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "raw_image_hw": 96,
        "policy": {"image_resolution": (_TINY_IMAGE_SIZE, _TINY_IMAGE_SIZE), "chunk_size": 10,
                   "n_action_steps": 10, "num_inference_steps": 4},
        # pi0.5 puts the discretised state in the prompt: ~30 tokens for 6 state values.
        "tokenizer_max_length": {"pi0": 16, "pi05": 48},
    },
    "real": {
        "raw_image_hw": 224,
        "policy": {},  # stock: 224 px, chunk 50, 10 denoising steps
        "tokenizer_max_length": {"pi0": 48, "pi05": 200},
    },
}


def build(variant: Variant, size: Size, *, seed: int = 0) -> PolicyBundle:
    """Build ``<size>:<variant>``: a ``PI0Policy``/``PI05Policy`` (eval, float32, CPU) and its processors.

    Deterministic for a given ``seed``; the global torch RNG state is left as it was. ``tiny`` weights
    are perturbed away from their init values; ``real`` keeps the init. ``real:pi0`` has 4.03B
    parameters (16 GB in float32; LeRobot leaves PaliGemma's ``lm_head`` untied from the embeddings
    and keeps the expert's 257152-row ``lm_head``), peaks at ~18 GB RSS and takes ~3 min on 2 CPUs.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown pi variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if size not in _SIZES:
        raise ValueError(f"unknown pi0 size {size!r}; choose one of {', '.join(SIZES)}")
    from lerobot.configs import FeatureType, PolicyFeature
    from lerobot.policies.factory import make_pre_post_processors

    spec = _SIZES[size]
    config_cls, policy_cls = _lerobot_classes(variant)
    hw = spec["raw_image_hw"]
    config = config_cls(
        paligemma_variant="gemma_2b",
        action_expert_variant="gemma_300m",
        dtype="float32",
        device="cpu",
        push_to_hub=False,
        tokenizer_max_length=spec["tokenizer_max_length"][variant],
        input_features={
            CAMERA_KEY: PolicyFeature(type=FeatureType.VISUAL, shape=(3, hw, hw)),
            STATE_KEY: PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,)),
        },
        output_features={ACTION_KEY: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
        **spec["policy"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if size == "tiny":
            with tiny_architecture(variant):
                policy = policy_cls(config)
        else:
            policy = policy_cls(config)
    policy.to(device="cpu", dtype=torch.float32)
    if size == "tiny":
        spread_linear_weights(policy, seed=seed)
        perturb_parameters(policy, seed=seed)
    policy.eval()

    features = {**config.input_features, **config.output_features}
    tokenizer_dir = paligemma_tokenizer_dir(size)
    processor_module = importlib.import_module(f"lerobot.policies.{variant}.processor_{variant}")
    stock_step = processor_module.TokenizerProcessorStep

    def local_tokenizer_step(**kwargs: Any) -> Any:
        # The factory passes the hub name "google/paligemma-3b-pt-224"; keep every other argument.
        return stock_step(**{**kwargs, "tokenizer_name": str(tokenizer_dir)})

    with patched(processor_module, TokenizerProcessorStep=local_tokenizer_step):
        preprocessor, postprocessor = make_pre_post_processors(
            config, dataset_stats=synthetic_dataset_stats(features)
        )
    return PolicyBundle(spec=f"{size}:{variant}", policy=policy, preprocessor=preprocessor,
                       postprocessor=postprocessor)


def tiny_architecture(variant: Variant) -> AbstractContextManager[None]:
    """While active, ``PI0Policy``/``PI05Policy`` construct the tiny architecture (see module docstring).

    Needed for every construction of a tiny unpruned policy, including ``from_pretrained`` of a saved
    one (a pruned one records its dimensions and needs nothing). The originals are restored on exit,
    even on error. Not thread-safe: it swaps module globals.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown pi variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return build_architecture(variant, TINY_ARCHITECTURE, len(vocabulary()), _TINY_DEPTH,
                              vlm_variant="gemma_2b", expert_variant="gemma_300m")


def paligemma_tokenizer_dir(size: Size) -> Path:
    """The generated PaliGemma-style tokenizer directory for ``size``, created on first use.

    Generated atomically (see :func:`generated_dir`).
    """
    import tokenizers
    import transformers

    max_length = max(_SIZES[size]["tokenizer_max_length"].values())
    payload = {"format": _FORMAT_VERSION, "transformers": transformers.__version__,
               "tokenizers": tokenizers.__version__, "vocab": vocabulary(), "max_length": max_length}
    return generated_dir(f"paligemma-tokenizer-{size}", payload, marker="tokenizer.json",
                         write=lambda tmp: _make_tokenizer(max_length).save_pretrained(tmp))


def vocabulary() -> list[str]:
    """Token strings in id order: PaliGemma's special tokens, newline, words, digits, punctuation.

    Its length is the tiny model's vocabulary size (embedding rows = tokenizer size).
    """
    return word_vocabulary([*_SPECIAL, _NEWLINE], _EXTRA_WORDS)


def _make_tokenizer(max_length: int) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary` that prepends BOS like PaliGemma's."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_UNK))
    backend.normalizer = normalizers.Lowercase()
    # Whitespace-separated words; every punctuation mark and digit its own token.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    backend.add_special_tokens(_SPECIAL)
    # Matched on the raw text before pre-tokenisation (which would drop it as whitespace).
    backend.add_tokens([AddedToken(_NEWLINE, normalized=False, special=False)])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A", pair=f"{_BOS} $A $B", special_tokens=[(_BOS, vocab[_BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=_PAD, eos_token=_EOS, bos_token=_BOS, unk_token=_UNK,
        model_max_length=max_length,
    )


def _lerobot_classes(variant: str) -> tuple[Any, Any]:
    """LeRobot's ``(PI0Config, PI0Policy)`` or ``(PI05Config, PI05Policy)``."""
    prefix = variant.upper()
    config_module = importlib.import_module(f"lerobot.policies.{variant}.configuration_{variant}")
    modeling = importlib.import_module(f"lerobot.policies.{variant}.modeling_{variant}")
    return getattr(config_module, f"{prefix}Config"), getattr(modeling, f"{prefix}Policy")
