"""Built-in pi0 and pi0.5 policies (``tiny:pi0``, ``tiny:pi05``, ``real:pi0``, ``real:pi05``), built offline.

LeRobot's pi0/pi0.5 hard-code their backbone shapes in code, not in the config: the Gemma widths and
depths come from the module-level ``get_gemma_config(variant)``, and ``PaliGemmaWithExpertModel``
fixes a SigLIP-So400m vision tower, a 2048-d projector and a 257152-token vocabulary. ``real`` keeps
all of that (random weights, the stock architecture). ``tiny`` builds the same classes through
:func:`tiny_architecture`, which swaps three module globals of ``modeling_pi0`` / ``modeling_pi05``
while the policy is constructed and restores them afterwards:

* ``get_gemma_config`` returns small Gemma stacks (8 layers each, 8 heads: the joint attention
  reshape hard-codes 8 heads, and both stacks must share heads/head_dim/KV heads);
* ``PaliGemmaForConditionalGenerationWithPiGemma`` and ``PiGemmaForCausalLM`` are wrapped so that the
  HF config LeRobot just filled in is shrunk *before* any module is allocated (small SigLIP, projector
  to the VLM width, vocabulary = our tokenizer's size). Modules are therefore built from their final
  configs, and ``forward``, ``select_action``, ``state_dict`` and the stored HF configs agree.

The processors are LeRobot's stock ones; their factory hard-codes the gated
``google/paligemma-3b-pt-224`` tokenizer, so the factory runs with ``TokenizerProcessorStep`` pointed
at a word-level tokenizer generated into the cache (PaliGemma's special-token ids, BOS prepended).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
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

Variant = Literal["pi0", "pi05"]
Size = Literal["tiny", "real"]
VARIANTS: tuple[str, ...] = ("pi0", "pi05")
SIZES: tuple[str, ...] = ("tiny", "real")

# Attribute that build() sets on tiny policies ("tiny"); see builtin_architecture().
BUILTIN_ARCHITECTURE_ATTR = "vlaprune_builtin_architecture"

# Bump when the generated tokenizer directory's layout changes, so old caches are not reused.
_FORMAT_VERSION = 1

# PaliGemma (Gemma) special tokens, at Gemma's ids 0..3; "\n" ends pi0's prompt (Pi0NewLineProcessor)
# and separates pi0.5's "State: ...;\nAction:", so it is a token of its own as in Gemma.
_PAD, _EOS, _BOS, _UNK, _NEWLINE = "<pad>", "<eos>", "<bos>", "<unk>", "\n"
_SPECIAL = [_PAD, _EOS, _BOS, _UNK]
# pi0.5 prompt words ("Task: ..., State: 12 200 ...;\nAction: ").
_EXTRA_WORDS = ["task", "state", "action"]

# Tiny Gemma stacks, keyed by the stock variant names (PI0Config accepts only those). Heads, KV heads
# and head_dim are shared: attention is joint over both stacks. 8 x 8 = 64 = VLM width (like
# gemma_2b's 8 x 256 = 2048) and twice the expert width (like gemma_300m's 2048 vs 1024).
_TINY_GEMMA: dict[str, dict[str, int]] = {
    "gemma_2b": {"width": 64, "depth": 8, "mlp_dim": 128, "num_heads": 8, "num_kv_heads": 1, "head_dim": 8},
    "gemma_300m": {"width": 32, "depth": 8, "mlp_dim": 64, "num_heads": 8, "num_kv_heads": 1, "head_dim": 8},
}
# Tiny SigLIP: 64 px images in 16 px patches = 16 image tokens per camera.
_TINY_IMAGE_SIZE = 64
_TINY_VISION = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "patch_size": 16,
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
        setattr(policy, BUILTIN_ARCHITECTURE_ATTR, "tiny")
    policy.eval()

    features = {**config.input_features, **config.output_features}
    tokenizer_dir = paligemma_tokenizer_dir(size)
    processor_module = importlib.import_module(f"lerobot.policies.{variant}.processor_{variant}")
    stock_step = processor_module.TokenizerProcessorStep

    def local_tokenizer_step(**kwargs: Any) -> Any:
        # The factory passes the hub name "google/paligemma-3b-pt-224"; keep every other argument.
        return stock_step(**{**kwargs, "tokenizer_name": str(tokenizer_dir)})

    with _patched(processor_module, TokenizerProcessorStep=local_tokenizer_step):
        preprocessor, postprocessor = make_pre_post_processors(
            config, dataset_stats=synthetic_dataset_stats(features)
        )
    return PolicyBundle(spec=f"{size}:{variant}", policy=policy, preprocessor=preprocessor,
                       postprocessor=postprocessor)


@contextmanager
def tiny_architecture(variant: Variant) -> Iterator[None]:
    """While active, ``PI0Policy``/``PI05Policy`` construct the tiny architecture (see module docstring).

    Needed for every construction of a tiny policy, including ``from_pretrained`` of a saved one.
    The originals are restored on exit, even on error. Not thread-safe: it swaps module globals, so
    no other thread may build a pi0/pi0.5 of the same variant meanwhile.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown pi variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    modeling = importlib.import_module(f"lerobot.policies.{variant}.modeling_{variant}")
    gemma_config_cls = modeling.GemmaConfig  # LeRobot's openpi-style (width, depth, ...) record

    def get_tiny_gemma_config(name: str) -> Any:
        if name not in _TINY_GEMMA:
            raise ValueError(f"Unknown variant: {name}")
        return gemma_config_cls(**_TINY_GEMMA[name])

    with _patched(
        modeling,
        get_gemma_config=get_tiny_gemma_config,
        PaliGemmaForConditionalGenerationWithPiGemma=_shrink_before(
            modeling.PaliGemmaForConditionalGenerationWithPiGemma, _shrink_paligemma_config
        ),
        PiGemmaForCausalLM=_shrink_before(modeling.PiGemmaForCausalLM, _shrink_expert_config),
    ):
        yield


def builtin_architecture(policy: Any) -> str | None:
    """``"tiny"`` if ``policy`` (a pi0/pi0.5, pruned or not) has the tiny architecture, None if LeRobot's stock one.

    Measured from the HF configs the modules were built from (VLM, expert and SigLIP widths), so it
    holds for any copy of the policy; the mark :func:`build` leaves on tiny policies is cross-checked.
    Pruned policies (``pi0_pruned``/``pi05_pruned``) can also answer from
    ``config.builtin_architecture``. Call it outside :func:`tiny_architecture` (it reads the stock
    ``get_gemma_config``).
    """
    from transformers import CONFIG_MAPPING

    config = policy.config
    modeling = importlib.import_module(f"lerobot.policies.{_variant_of(config)}.modeling_{_variant_of(config)}")
    pwe = policy.model.paligemma_with_expert
    text, vision = pwe.paligemma.config.text_config, pwe.paligemma.config.vision_config
    expert = pwe.gemma_expert.config
    measured = (text.hidden_size, text.intermediate_size, expert.hidden_size, expert.intermediate_size,
                vision.hidden_size)
    vlm_name, expert_name = config.paligemma_variant, config.action_expert_variant
    tiny = (_TINY_GEMMA[vlm_name]["width"], _TINY_GEMMA[vlm_name]["mlp_dim"], _TINY_GEMMA[expert_name]["width"],
            _TINY_GEMMA[expert_name]["mlp_dim"], _TINY_VISION["hidden_size"])
    stock_vlm, stock_expert = modeling.get_gemma_config(vlm_name), modeling.get_gemma_config(expert_name)
    stock = (stock_vlm.width, stock_vlm.mlp_dim, stock_expert.width, stock_expert.mlp_dim,
             CONFIG_MAPPING["paligemma"]().vision_config.hidden_size)
    if measured == tiny:
        found: str | None = "tiny"
    elif measured == stock:
        found = None
    else:
        raise ValueError(
            f"{config.type} policy with (VLM width, VLM mlp, expert width, expert mlp, SigLIP width) = {measured}: "
            f"neither LeRobot's stock architecture {stock} nor vlaprune's tiny one {tiny}"
        )
    marked = getattr(policy, BUILTIN_ARCHITECTURE_ATTR, found)
    if marked != found:
        raise ValueError(f"policy marked as built with the {marked!r} architecture has the shapes of {found!r}")
    return found


def _variant_of(config: Any) -> str:
    """``"pi0"`` or ``"pi05"`` for a pi0/pi0.5 config (pruned types included)."""
    from lerobot.policies.pi05.configuration_pi05 import PI05Config

    return "pi05" if isinstance(config, PI05Config) else "pi0"


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


def _shrink_paligemma_config(config: Any) -> None:
    """Shrink the ``PaliGemmaConfig`` filled in by LeRobot: tiny SigLIP, projector and vocabulary.

    The language-model shapes already come from the tiny ``get_gemma_config``; ``image_size`` from
    ``config.image_resolution``.
    """
    vision = config.vision_config
    for key, value in _TINY_VISION.items():
        setattr(vision, key, value)
    if vision.image_size % vision.patch_size:
        raise ValueError(f"image size {vision.image_size} is not a multiple of patch {vision.patch_size}")
    width = config.text_config.hidden_size
    config.projection_dim = vision.projection_dim = width  # projector: (vision hidden) -> (VLM width)
    config.hidden_size = width
    config.text_config.num_image_tokens = (vision.image_size // vision.patch_size) ** 2
    vocab_size = len(vocabulary())
    config.vocab_size = config.text_config.vocab_size = vocab_size
    config.image_token_index = vocab_size  # as stock: one past the text vocabulary, never embedded


def _shrink_expert_config(config: Any) -> None:
    """Shrink the expert's ``GemmaConfig`` vocabulary (its unused ``lm_head`` is sized by it)."""
    config.vocab_size = len(vocabulary())


def _shrink_before(cls: type, shrink: Callable[[Any], None]) -> Callable[..., Any]:
    """A stand-in for ``cls(config=...)`` that edits the config in place, then builds ``cls``."""

    def construct(config: Any, **kwargs: Any) -> Any:
        shrink(config)
        return cls(config, **kwargs)

    return construct


@contextmanager
def _patched(module: ModuleType, **replacements: Any) -> Iterator[None]:
    """Set module attributes for the duration of the block; always restore the originals."""
    originals = {name: getattr(module, name) for name in replacements}
    try:
        for name, value in replacements.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in originals.items():
            setattr(module, name, value)


def _lerobot_classes(variant: str) -> tuple[Any, Any]:
    """LeRobot's ``(PI0Config, PI0Policy)`` or ``(PI05Config, PI05Policy)``."""
    prefix = variant.upper()
    config_module = importlib.import_module(f"lerobot.policies.{variant}.configuration_{variant}")
    modeling = importlib.import_module(f"lerobot.policies.{variant}.modeling_{variant}")
    return getattr(config_module, f"{prefix}Config"), getattr(modeling, f"{prefix}Policy")
