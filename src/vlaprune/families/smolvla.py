"""SmolVLA (LeRobot 0.6.1, ``policies/smolvla``): SmolVLM text layers + action-expert layers, and the
SigLIP vision encoder when the user plans it.

Rules (docs/families.md): the expert reads the VLM's KV cache layer by layer, so both stacks lose
the same indices (lockstep); with cross-attention, an expert block is self-attention when
``layer_idx % self_attn_every_n_layers == 0`` and cross-attention otherwise, and that role is baked
into its k/v projection shapes. The vision encoder runs once per camera image before the text
layers and is coupled to nothing; the connector reads its final (post-norm) output, so any block may go.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lerobot_policy_vlaprune import SmolVLAPrunedConfig
from lerobot_policy_vlaprune.pruned import config_as
from vlaprune.core.family import (
    Family,
    ModelForwardRunner,
    PrefixPass,
    RoleRule,
    StackSpec,
    check_positions,
    register_family,
    resolve,
)
from vlaprune.families.siglip import vision_stack

_VLM = "model.vlm_with_expert.vlm.model.text_model"
_VISION = "model.vlm_with_expert.vlm.model.vision_model"
_EXPERT = "model.vlm_with_expert.lm_expert"


_VLM_STACK = StackSpec("vlm", f"{_VLM}.layers", f"{_VLM}.norm", depth_key="num_vlm_layers",
                       description="SmolVLM text decoder layers")
_VISION_STACK = vision_stack(_VISION, "vision-encoder layers (SigLIP), run once per camera image")
_EXPERT_STACK = StackSpec("expert", f"{_EXPERT}.layers", f"{_EXPERT}.norm", depth_key="num_expert_layers",
                          description="action-expert layers (self/cross-attention to the VLM's KV)")


class SmolVLARunner(ModelForwardRunner):
    """Prefix through the VLM with a KV cache, then ``denoise_step`` per flow timestep."""

    def prefix(self, policy: Any, batch: dict[str, Any]) -> PrefixPass:
        from lerobot.policies.common.vla_utils import make_att_2d_masks
        from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

        if not policy.config.use_cache:
            raise ValueError("SmolVLA capture needs config.use_cache=True (the expert reads the VLM's KV cache)")
        if policy.config.adapt_to_pi_aloha:
            raise ValueError("SmolVLA with adapt_to_pi_aloha=True is not supported by capture yet")
        model = policy.model
        images, img_masks = policy.prepare_images(batch)
        state = policy.prepare_state(batch)
        actions = policy.prepare_action(batch)
        # prefix tokens: [image specials + image tokens]*cameras + language + state, padded to prefix_length
        embs, pad_mask, att_mask = model.embed_prefix(
            images, img_masks, batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK], state=state
        )
        att_2d = make_att_2d_masks(pad_mask, att_mask)
        position_ids = torch.cumsum(pad_mask, dim=1) - 1
        _, cache = model.vlm_with_expert.forward(
            attention_mask=att_2d,
            position_ids=position_ids,
            past_key_values=None,
            inputs_embeds=[embs, None],
            use_cache=True,
        )
        return PrefixPass(pad_mask=pad_mask, cache=cache, actions=actions)

    def inputs(self, policy: Any, batch: dict[str, Any]) -> tuple[Any, ...]:
        from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

        images, img_masks = policy.prepare_images(batch)
        lang = (batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK])
        return (images, img_masks, *lang, policy.prepare_state(batch))

    def expert(self, policy: Any, prefix: PrefixPass, x_t: Tensor, t: Tensor) -> Tensor:
        # (batch, chunk, max_action_dim) velocity; denoise_step crops the cache back to the prefix
        return policy.model.denoise_step(
            prefix_pad_masks=prefix.pad_mask, past_key_values=prefix.cache, x_t=x_t, timestep=t
        )


class SmolVLASurgeon:
    """A SmolVLA pruned in its text and expert stacks is a stock ``smolvla`` config with
    ``num_vlm_layers = K``; one with a pruned vision encoder is a ``smolvla_pruned`` config (plugin
    ``lerobot_policy_vlaprune``) that also records the kept vision blocks and the source's vision depth.

    SmolVLA builds the first ``num_vlm_layers`` text layers and as many expert layers, assigning
    self/cross-attention by position; surgery then loads the kept blocks renumbered 0..K-1. The
    planner guarantees each kept block's role at its new position, so shapes and semantics agree.
    Pruning a ``smolvla_pruned`` policy composes: vision positions map back to the ORIGINAL blocks.
    """

    def pruned_config(self, policy: Any, kept: Mapping[str, Sequence[int]]) -> Any:
        vlm, expert = list(kept["vlm"]), list(kept["expert"])
        if vlm != expert:
            raise ValueError(f"SmolVLA stacks are lockstep: kept vlm {vlm} and expert {expert} must be equal")
        source = policy.config
        depth = len(policy.model.vlm_with_expert.get_vlm_model().text_model.layers)
        experts = len(policy.model.vlm_with_expert.lm_expert.layers)
        if experts != depth:
            raise ValueError(
                f"SmolVLA with {experts} expert layers for {depth} VLM layers (num_expert_layers="
                f"{source.num_expert_layers}) cannot be pruned: only equal depths are supported"
            )
        config = copy.deepcopy(source)
        for spec, depth in ((_VLM_STACK, len(vlm)), (_EXPERT_STACK, -1)):  # -1: as many expert as VLM layers
            assert spec.depth_key is not None
            setattr(config, spec.depth_key, depth)
        config.load_vlm_weights = False  # every weight comes from the pruned state dict
        vision_depth = len(resolve(policy, _VISION_STACK.layers))
        vision = list(kept.get("vision", range(vision_depth)))
        check_positions("kept vision layers", vision, vision_depth)
        if isinstance(source, SmolVLAPrunedConfig):  # positions of the pruned policy → the original model
            original = [source.vision_kept_layers[i] for i in vision]
            return config_as(SmolVLAPrunedConfig, config, vision_kept_layers=original,
                             vision_source_num_layers=source.vision_source_num_layers)
        if vision == list(range(vision_depth)):
            return config  # every vision block kept: a stock smolvla config
        return config_as(SmolVLAPrunedConfig, config, vision_kept_layers=vision, vision_source_num_layers=vision_depth)

    def build(self, config: Any) -> Any:
        from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

        from lerobot_policy_vlaprune.modeling_smolvla_pruned import SmolVLAPrunedPolicy

        policy_cls = SmolVLAPrunedPolicy if isinstance(config, SmolVLAPrunedConfig) else SmolVLAPolicy
        return policy_cls(config).to(dtype=torch.float32)


SMOLVLA = register_family(
    Family(
        name="smolvla",
        policy_types=("smolvla", "smolvla_pruned"),
        stacks=(_VISION_STACK, _VLM_STACK, _EXPERT_STACK),
        prefix_stacks=("vision", "vlm"),
        expert_stacks=("expert",),
        lockstep=(("vlm", "expert"),),
        role_rules=(
            RoleRule(
                stack="expert",
                period="self_attn_every_n_layers",
                residue_roles=((0, "self"),),
                default="cross",
                why="cross-attention k/v projections take the VLM's width: the role is in the weight shapes",
                when=lambda cfg: "cross" in cfg.attention_mode,
            ),
        ),
        notes=(
            "expert layer i reads VLM layer i's KV cache: both stacks keep the same indices",
            "the vision encoder is planned only when named (--plan.stacks); its depth is not a SmolVLA config "
            "field, so a pruned one makes a smolvla_pruned checkpoint",
            "LeRobot 0.6.1 builds cross-attention expert layers by expert index but runs them by VLM index: "
            "num_expert_layers < num_vlm_layers with cross-attention fails on shapes in stock LeRobot",
        ),
        backbone=("model.vlm_with_expert.vlm",),
        runner=SmolVLARunner(),
        surgeon=SmolVLASurgeon(),
    )
)
