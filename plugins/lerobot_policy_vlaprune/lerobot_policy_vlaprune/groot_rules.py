"""GR00T N1.7's structural rules by position, as its model code applies them (LeRobot 0.6.1,
``policies/groot``). vlaprune's planner and the ``groot_pruned`` loader both use these, so a plan the
planner accepts is exactly one the loader builds.

- Depths live in the base model's config, under the keys of :data:`GROOT_STACKS`.
- DiT blocks: odd = self-attention (no cross-attention weights: caught by shapes); even =
  cross-attention, to the text tokens when ``idx % (2 · attend_text_every_n_blocks) == 0`` and to the
  image tokens otherwise. Text and image blocks have the same weight shapes: a block moved to a
  position of the other kind runs and is silently wrong.
- Deepstack visual features (one per entry of the vision config's ``deepstack_visual_indexes``) are
  added to the residual stream after language layers 0, 1, 2, ... by loop position.
- The vision tower (Qwen3-VL's ``visual.blocks``, optional stack ``vision``): deepstack merger k reads
  the output of vision block ``deepstack_visual_indexes[k]`` (a loop position, matched by equality),
  and the patch merger (the connector) the output of the last block. Its depth lives in the Qwen3-VL
  config that ``model_name`` names, not in GR00T's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# vlaprune's stack names → the base-model config entry (dotted into nested dicts) that holds its depth;
# every groot_pruned checkpoint names these, and optionally VISION
GROOT_STACKS: dict[str, str] = {
    "llm": "select_layer",
    "vl_self_attention": "vl_self_attention_cfg.num_layers",
    "dit": "diffusion_model_cfg.num_layers",
}
VISION = "vision"  # Qwen3-VL's vision blocks: depth in the backbone's vision config (``depth``)


def dit_role(model_config: Any, index: int) -> str:
    """Role of DiT block ``index`` of a GR00T N1.7 base-model config: how the model runs that position."""
    dit = model_config.diffusion_model_cfg
    if dit.get("interleave_self_attention", False) and index % 2 == 1:
        return "self"
    if not model_config.use_alternate_vl_dit:
        return "cross"
    return "cross-text" if index % (2 * model_config.attend_text_every_n_blocks) == 0 else "cross-image"


def check_dit_roles(model_config: Any, kept: Sequence[int]) -> None:
    """Raise ValueError unless every kept DiT block (original index) lands on a position of its role."""
    for new, orig in enumerate(kept):
        if dit_role(model_config, new) != dit_role(model_config, orig):
            raise ValueError(
                f"DiT role rule: original block {orig} ({dit_role(model_config, orig)}) would run at position {new} "
                f"as {dit_role(model_config, new)}. GR00T decides self-attention / cross-attention to text / to "
                "image by position (text/image is not caught by weight shapes): kept DiT blocks must keep their "
                f"roles, e.g. whole groups of {2 * model_config.attend_text_every_n_blocks} consecutive blocks"
            )


def deepstack_layers(qwen_config: Any) -> list[int]:
    """The text layers (loop positions) that receive deepstack visual features in a Qwen3-VL config."""
    return list(range(len(qwen_config.vision_config.deepstack_visual_indexes or [])))


def check_deepstack(qwen_config: Any, kept_llm: Sequence[int]) -> None:
    """Raise ValueError unless the language layers that receive deepstack features are kept in place."""
    needed = deepstack_layers(qwen_config)
    if list(kept_llm[: len(needed)]) != needed:
        raise ValueError(
            f"deepstack rule: language layers {needed} receive the deepstack visual features by position and "
            f"must be kept; kept language layers {list(kept_llm)}. To remove them knowingly (the features then "
            "enter the kept layers at those positions): vlaprune prune --plan.allow='[deepstack]', which writes "
            "deepstack_moved: true into the groot_pruned config"
        )


def vision_taps(vision_config: Any) -> list[int]:
    """The vision blocks whose outputs the deepstack mergers read, in a Qwen3-VL vision config."""
    return list(vision_config.deepstack_visual_indexes or [])


def remap_vision_taps(taps: Sequence[int], kept: Sequence[int]) -> list[int]:
    """Where deepstack merger k reads in a vision tower keeping ``kept`` (original indices): the position
    of the last kept block at or before ``taps[k]``, which is what the source computes there with the
    removed blocks skipped (a kept tap block keeps its own output). Raise ValueError when a merger would
    read no block, or two the same one."""
    positions = []
    for tap in taps:
        before = [pos for pos, original in enumerate(kept) if original <= tap]
        if not before:
            raise ValueError(f"deepstack vision rule: merger of vision block {tap} reads no kept block (kept vision "
                             f"blocks {list(kept)}): keep a block at or before {tap}")
        positions.append(before[-1])
    if len(set(positions)) != len(positions):
        raise ValueError(f"deepstack vision rule: the mergers of vision blocks {list(taps)} would read the same "
                         f"kept blocks (positions {positions} of kept {list(kept)}): keep a block between each pair "
                         "of tapped blocks")
    return positions
