"""pi0 and pi0.5 (LeRobot 0.6.1, ``policies/pi0``, ``policies/pi05``): PaliGemma + Gemma expert.

Rules (docs/families.md): the training forward zips both stacks with ``strict=True`` and expert
layer i attends to the KV of VLM layer i (same ``layer_idx`` cache slot), so the same indices leave
both stacks. Depth is not a config field (``get_gemma_config`` fixes 18), so a pruned pi0 needs a
registered type of its own. The joint training path never calls the block modules: capture hooks
the norms, which both the joint and the cached paths call. The SigLIP vision encoder is an opt-in
stack, coupled to nothing (it runs once per camera image; its blocks carry no index).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lerobot_policy_vlaprune import PI0PrunedConfig, PI05PrunedConfig
from lerobot_policy_vlaprune.pi_architecture import EXPERT_MODEL, VLM_MODEL, measure_architecture
from lerobot_policy_vlaprune.pruned import config_as
from vlaprune.core.family import (
    Family,
    ModelForwardRunner,
    PrefixPass,
    StackSpec,
    check_positions,
    family_for,
    register_family,
)
from vlaprune.families.siglip import vision_stack


class PiRunner(ModelForwardRunner):
    """Prefix through PaliGemma with a KV cache, then ``denoise_step`` per flow timestep.

    pi0 embeds the state as a suffix token (``denoise_step(state, ...)``); pi0.5 writes it into the
    language prompt, so its ``denoise_step`` takes no state.
    """

    def __init__(self, state_in_suffix: bool) -> None:
        self.state_in_suffix = state_in_suffix

    def prefix(self, policy: Any, batch: dict[str, Any]) -> PrefixPass:
        import torch
        from lerobot.policies.common.vla_utils import make_att_2d_masks, prepare_attention_masks_4d
        from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

        model = policy.model
        images, img_masks = policy._preprocess_images(batch)
        actions = policy.prepare_action(batch)
        # prefix tokens: image tokens per camera + language tokens (padding marked False)
        embs, pad_mask, att_mask = model.embed_prefix(
            images, img_masks, batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK]
        )
        att_4d = prepare_attention_masks_4d(make_att_2d_masks(pad_mask, att_mask))
        position_ids = torch.cumsum(pad_mask, dim=1) - 1
        vlm = model.paligemma_with_expert.paligemma.model.language_model
        vlm.config._attn_implementation = "eager"  # as LeRobot's sample_actions does
        _, cache = model.paligemma_with_expert.forward(
            attention_mask=att_4d,
            position_ids=position_ids,
            past_key_values=None,
            inputs_embeds=[embs, None],
            use_cache=True,
        )
        extra = {"state": policy.prepare_state(batch)} if self.state_in_suffix else {}
        return PrefixPass(pad_mask=pad_mask, cache=cache, actions=actions, extra=extra)

    def inputs(self, policy: Any, batch: dict[str, Any]) -> tuple[Any, ...]:
        from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

        images, img_masks = policy._preprocess_images(batch)
        lang = (batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK])
        state = (policy.prepare_state(batch),) if self.state_in_suffix else ()
        return (images, img_masks, *lang, *state)

    def expert(self, policy: Any, prefix: PrefixPass, x_t: Tensor, t: Tensor) -> Tensor:
        kwargs = {"state": prefix.extra["state"]} if self.state_in_suffix else {}
        # denoise_step clones the cache, so the prefix cache is reused unchanged across timesteps
        return policy.model.denoise_step(
            prefix_pad_masks=prefix.pad_mask, past_key_values=prefix.cache, x_t=x_t, timestep=t, **kwargs
        )


# PaliGemma's SigLIP tower; the connector (multi_modal_projector) reads its final, post-norm output
_VISION = "model.paligemma_with_expert.paligemma.model.vision_tower.vision_model"


def _pi_family(name: str, state_in_suffix: bool, expert_note: str, policy_types: tuple[str, ...]) -> Family:
    return Family(
        name=name,
        policy_types=policy_types,
        stacks=(
            vision_stack(_VISION, "SigLIP So400m vision-encoder layers, run once per camera image"),
            StackSpec("vlm", f"{VLM_MODEL}.layers", f"{VLM_MODEL}.norm", description="PaliGemma (Gemma 2B) layers"),
            StackSpec("expert", f"{EXPERT_MODEL}.layers", f"{EXPERT_MODEL}.norm", description=expert_note),
        ),
        prefix_stacks=("vision", "vlm"),
        expert_stacks=("expert",),
        lockstep=(("vlm", "expert"),),
        notes=(
            "training forward zips the stacks with strict=True; expert layer i reads VLM KV slot layer_idx=i",
            "depth is not a config field (get_gemma_config fixes 18): pruned checkpoints need their own type",
            "the vision encoder is planned only when named (--plan.stacks); the pruned type records its depth "
            "in architecture['vision']['num_hidden_layers']",
            "renumber self_attn.layer_idx and set num_hidden_layers on both HF configs after pruning",
        ),
        backbone=("model.paligemma_with_expert.paligemma",),
        runner=PiRunner(state_in_suffix=state_in_suffix),
        surgeon=PiSurgeon(),
    )


class PiSurgeon:
    """A pruned pi0 / pi0.5 is a ``pi0_pruned`` / ``pi05_pruned`` policy (plugin ``lerobot_policy_vlaprune``).

    Its config is the source's, every field copied, plus ``kept_layers`` (original indices, the same
    for both stacks), ``source_num_layers`` and the dimensions the source was built with
    (``architecture``, ``vocab_size``, read from its modules; the vision depth there is the number of
    vision blocks kept). Pruning a pruned policy composes: positions in the pruned policy map back to
    indices of the ORIGINAL model (the vision blocks' through the source's manifest).
    """

    def pruned_config(self, policy: Any, kept: Mapping[str, Sequence[int]]) -> Any:
        missing = {"vlm", "expert"} - set(kept)
        if missing:
            raise ValueError(f"pi0 surgery needs kept layers for stacks 'vlm' and 'expert'; missing {sorted(missing)}")
        positions, expert = list(kept["vlm"]), list(kept["expert"])
        if positions != expert:
            raise ValueError(f"pi0 stacks are lockstep: kept vlm {positions} and expert {expert} must be equal")
        family = family_for(policy)
        depths = family.depths(policy)
        if depths["vlm"] != depths["expert"]:
            raise ValueError(f"pi0 stacks of unequal depth {depths}: the training forward zips them strictly")
        depth = depths["vlm"]
        check_positions("kept layers", positions, depth)
        source = policy.config
        if isinstance(source, PI0PrunedConfig | PI05PrunedConfig):
            # positions index the pruned policy's layers; map them to the original model
            original, source_num_layers = [source.kept_layers[i] for i in positions], source.source_num_layers
        else:
            original, source_num_layers = positions, depth
        architecture, vocab_size = measure_architecture(policy)
        vision_depth = architecture["vision"]["num_hidden_layers"]
        vision = list(kept.get("vision", range(vision_depth)))
        check_positions("kept vision layers", vision, vision_depth)
        # vision blocks carry no index: the tower is built with K blocks and takes the kept ones renumbered
        architecture["vision"]["num_hidden_layers"] = len(vision)
        target = PI05PrunedConfig if family.name == "pi05" else PI0PrunedConfig
        return config_as(target, source, kept_layers=original, source_num_layers=source_num_layers,
                             architecture=architecture, vocab_size=vocab_size)

    def build(self, config: Any) -> Any:
        import torch

        from lerobot_policy_vlaprune.modeling_pi0_pruned import PI0PrunedPolicy
        from lerobot_policy_vlaprune.modeling_pi05_pruned import PI05PrunedPolicy

        policy_cls = PI05PrunedPolicy if isinstance(config, PI05PrunedConfig) else PI0PrunedPolicy
        return policy_cls(config).to(dtype=torch.float32)


PI0 = register_family(
    _pi_family("pi0", True, "Gemma 300M action-expert layers", ("pi0", "pi0_pruned"))
)
PI05 = register_family(
    _pi_family("pi05", False, "Gemma 300M action-expert layers with AdaRMS norms", ("pi05", "pi05_pruned"))
)
