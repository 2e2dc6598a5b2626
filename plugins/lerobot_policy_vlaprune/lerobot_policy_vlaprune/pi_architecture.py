"""The dimensions a pi0 / pi0.5 is built with, recorded in a pruned config and applied when it is built.

LeRobot's pi0 and pi0.5 take their shapes from code, not from their config: ``get_gemma_config(variant)``
gives the Gemma widths and depth (18), and ``PaliGemmaWithExpertModel`` fixes a SigLIP-So400m tower, a
2048-d projector and a 257152-token vocabulary. A pruned checkpoint therefore records every dimension
it was built with (:func:`measure_architecture` reads them from the source policy's HF configs), and
:func:`build_architecture` makes the stock classes build exactly those while a policy is constructed:
``get_gemma_config`` answers with the recorded stacks, and the PaliGemma / expert configs that LeRobot
fills in are set to the recorded vision tower, projector and vocabulary before any module is
allocated. For LeRobot's own architecture the recorded values are the stock ones, so the same classes
build the same model; smaller builds (vlaprune's offline test models) load the same way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import Any

# Dotted paths (from the policy) of the two ``PiGemmaModel``s whose ``layers`` are pruned in lockstep.
VLM_MODEL = "model.paligemma_with_expert.paligemma.model.language_model"
EXPERT_MODEL = "model.paligemma_with_expert.gemma_expert.model"

GEMMA_DIMS = ("width", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")  # LeRobot's GemmaConfig, less depth
VISION_DIMS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
               "projection_dim")
ARCHITECTURE_KEYS = {"vlm": GEMMA_DIMS, "expert": GEMMA_DIMS, "vision": VISION_DIMS}


def measure_architecture(policy: Any) -> tuple[dict[str, dict[str, int]], int]:
    """``(architecture, vocab_size)`` of a built pi0 / pi0.5 (pruned or not), read from the HF configs its
    modules were built from."""
    pwe = policy.model.paligemma_with_expert
    text, vision, expert = pwe.paligemma.config.text_config, pwe.paligemma.config.vision_config, pwe.gemma_expert.config

    def gemma(hf: Any) -> dict[str, int]:
        return {"width": hf.hidden_size, "mlp_dim": hf.intermediate_size, "num_heads": hf.num_attention_heads,
                "num_kv_heads": hf.num_key_value_heads, "head_dim": hf.head_dim}

    architecture = {"vlm": gemma(text), "expert": gemma(expert),
                    "vision": {key: int(getattr(vision, key)) for key in VISION_DIMS}}
    if expert.vocab_size != text.vocab_size:
        raise ValueError(f"pi0 policy with VLM vocabulary {text.vocab_size} and expert vocabulary "
                         f"{expert.vocab_size}: LeRobot builds both with one size")
    return architecture, int(text.vocab_size)


def check_architecture(what: str, architecture: Any, vocab_size: Any) -> None:
    """ValueError naming the field unless ``architecture`` holds every dimension as a positive integer."""
    if not isinstance(architecture, Mapping) or set(architecture) != set(ARCHITECTURE_KEYS):
        raise ValueError(f"{what}.architecture must map {sorted(ARCHITECTURE_KEYS)} to their dimensions "
                         f"(vlaprune's surgery records them); got {architecture!r}")
    for part, keys in ARCHITECTURE_KEYS.items():
        dims = architecture[part]
        if not isinstance(dims, Mapping) or set(dims) != set(keys):
            raise ValueError(f"{what}.architecture[{part!r}] must give exactly {list(keys)}; got {dims!r}")
        bad = {k: v for k, v in dims.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"{what}.architecture[{part!r}] has non-positive or non-integer dimensions {bad}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"{what}.vocab_size={vocab_size!r}: must be a positive integer")


@contextmanager
def build_architecture(
    variant: str, architecture: Mapping[str, Mapping[str, int]], vocab_size: int, depth: int,
    vlm_variant: str, expert_variant: str,
) -> Iterator[None]:
    """While active, LeRobot's ``PI0Policy`` / ``PI05Policy`` (``variant`` "pi0" / "pi05") build ``architecture``
    with ``depth`` layers in both Gemma stacks. ``vlm_variant`` / ``expert_variant`` are the policy config's
    variant names (what LeRobot passes to ``get_gemma_config``).

    The originals are restored on exit, even on error. Not thread-safe: it swaps module globals, so no
    other thread may build a pi0 / pi0.5 of the same variant meanwhile.
    """
    modeling = importlib.import_module(f"lerobot.policies.{variant}.modeling_{variant}")
    gemma_config_cls = modeling.GemmaConfig  # LeRobot's openpi-style (width, depth, ...) record
    stacks = {vlm_variant: dict(architecture["vlm"]), expert_variant: dict(architecture["expert"])}
    if vlm_variant == expert_variant and architecture["vlm"] != architecture["expert"]:
        raise ValueError(f"both stacks are variant {vlm_variant!r}, but their recorded dimensions differ: "
                         f"{dict(architecture['vlm'])} vs {dict(architecture['expert'])}")

    def get_gemma_config(name: str) -> Any:
        if name not in stacks:
            raise ValueError(f"Unknown variant: {name}")
        return gemma_config_cls(depth=depth, **stacks[name])

    def paligemma_config(config: Any) -> None:
        vision = config.vision_config
        for key, value in architecture["vision"].items():
            setattr(vision, key, value)
        if vision.image_size % vision.patch_size:
            raise ValueError(f"image size {vision.image_size} is not a multiple of patch {vision.patch_size}")
        config.projection_dim = vision.projection_dim
        config.hidden_size = config.text_config.hidden_size
        config.text_config.num_image_tokens = (vision.image_size // vision.patch_size) ** 2
        config.vocab_size = config.text_config.vocab_size = vocab_size
        config.image_token_index = vocab_size  # as stock: one past the text vocabulary, never embedded

    def expert_config(config: Any) -> None:
        config.vocab_size = vocab_size  # sizes the expert's unused lm_head

    with patched(
        modeling,
        get_gemma_config=get_gemma_config,
        PaliGemmaForConditionalGenerationWithPiGemma=_edit_config_before(
            modeling.PaliGemmaForConditionalGenerationWithPiGemma, paligemma_config),
        PiGemmaForCausalLM=_edit_config_before(modeling.PiGemmaForCausalLM, expert_config),
    ):
        yield


@contextmanager
def patched(module: ModuleType, **replacements: Any) -> Iterator[None]:
    """Set module attributes for the duration of the block; always restore the originals."""
    originals = {name: getattr(module, name) for name in replacements}
    try:
        for name, value in replacements.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in originals.items():
            setattr(module, name, value)


def _edit_config_before(cls: type, edit: Callable[[Any], None]) -> Callable[..., Any]:
    """A stand-in for ``cls(config=...)`` that edits the config in place, then builds ``cls``."""

    def construct(config: Any, **kwargs: Any) -> Any:
        edit(config)
        return cls(config, **kwargs)

    return construct
