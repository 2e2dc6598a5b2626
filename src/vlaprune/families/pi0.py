"""pi0 and pi0.5 (LeRobot 0.6.1, ``policies/pi0``, ``policies/pi05``): PaliGemma + Gemma expert.

Rules (LEROBOT_FACTS.md): the training forward zips both stacks with ``strict=True`` and expert
layer i attends to the KV of VLM layer i (same ``layer_idx`` cache slot), so the same indices leave
both stacks. Depth is not a config field (``get_gemma_config`` fixes 18), so a pruned pi0 needs a
registered type of its own. The joint training path never calls the block modules: capture hooks
the norms, which both the joint and the cached paths call.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import Family, PrefixPass, StackSpec, register_family

_VLM = "model.paligemma_with_expert.paligemma.model.language_model"
_EXPERT = "model.paligemma_with_expert.gemma_expert.model"


class PiRunner:
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

    def expert(self, policy: Any, prefix: PrefixPass, x_t: Tensor, t: Tensor) -> Tensor:
        kwargs = {"state": prefix.extra["state"]} if self.state_in_suffix else {}
        # denoise_step clones the cache, so the prefix cache is reused unchanged across timesteps
        return policy.model.denoise_step(
            prefix_pad_masks=prefix.pad_mask, past_key_values=prefix.cache, x_t=x_t, timestep=t, **kwargs
        )


def _pi_family(name: str, state_in_suffix: bool, expert_note: str) -> Family:
    return Family(
        name=name,
        policy_types=(name,),
        stacks=(
            StackSpec("vlm", f"{_VLM}.layers", f"{_VLM}.norm", description="PaliGemma (Gemma 2B) layers"),
            StackSpec("expert", f"{_EXPERT}.layers", f"{_EXPERT}.norm", description=expert_note),
        ),
        prefix_stacks=("vlm",),
        expert_stacks=("expert",),
        lockstep=(("vlm", "expert"),),
        notes=(
            "training forward zips the stacks with strict=True; expert layer i reads VLM KV slot layer_idx=i",
            "depth is not a config field (get_gemma_config fixes 18): pruned checkpoints need their own type",
            "renumber self_attn.layer_idx and set num_hidden_layers on both HF configs after pruning",
        ),
        runner=PiRunner(state_in_suffix=state_in_suffix),
    )


PI0 = register_family(_pi_family("pi0", True, "Gemma 300M action-expert layers"))
PI05 = register_family(_pi_family("pi05", False, "Gemma 300M action-expert layers with AdaRMS norms"))
