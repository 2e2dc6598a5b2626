"""GR00T N1.7 (LeRobot 0.6.1, ``policies/groot``): Qwen3-VL language layers, VL self-attention, AlternateVLDiT.

Rules (docs/families.md):

- ``llm``: the Qwen3-VL text layers kept up to ``select_layer``. Deepstack visual features (one per
  entry of the vision config's ``deepstack_visual_indexes``, three in N1.7) are added to the
  residual stream after text layers 0, 1, 2 *by loop position*: those layers are protected, or a
  feature would silently enter another layer. The action head reads the last kept layer's output.
- ``vl_self_attention``: the action head's self-attention blocks over the VL tokens. No role rule.
- ``vision`` (opt-in): the Qwen3-VL vision blocks, run once over every camera image of a batch as one
  flat sequence of patches. Deepstack merger k reads the output of vision block
  ``deepstack_visual_indexes[k]`` (5, 11, 17 in N1.7) and the patch merger (the connector) the last
  block's: those blocks are protected (``deepstack-vision``, ``vision-merger``). Lifted knowingly, each
  merger reads the last kept block before its tap, which is what the source computes with the removed
  blocks skipped. The depth lives in the Qwen3-VL config, so ``groot_pruned`` records it as a fourth
  stack and remaps ``deepstack_visual_indexes`` to the kept positions.
- ``dit``: the AlternateVLDiT. Odd blocks self-attend (no cross-attention weights: shape-checked),
  even blocks cross-attend, to the text tokens when ``idx % (2·attend_text_every_n_blocks) == 0``
  and to the image tokens otherwise. The text/image choice is made by position at run time and has
  the same weight shapes: a plan that moves a block to a position of the other kind runs and is
  silently wrong, so the planner keeps every role, and the ``groot_pruned`` loader checks it again.

The stacks are not coupled (no shared KV cache), so each is planned on its own. The depths live in
the base model's config, so a pruned GR00T is a ``groot_pruned`` policy (plugin
``lerobot_policy_vlaprune``) that builds the base architecture at the kept depths.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from lerobot_policy_vlaprune import GrootPrunedConfig
from lerobot_policy_vlaprune.groot_rules import GROOT_STACKS, VISION, deepstack_layers, dit_role, vision_taps
from lerobot_policy_vlaprune.pruned import config_as
from vlaprune.core.family import Family, PrefixPass, Protection, RoleRule, StackSpec, check_positions, register_family

_MODEL = "_groot_model"
_LLM = f"{_MODEL}.backbone.model.model.language_model"
_VISUAL = f"{_MODEL}.backbone.model.model.visual"
_VLSA = f"{_MODEL}.action_head.vl_self_attention"
_DIT = f"{_MODEL}.action_head.model"
_DIT_BRANCHES = ("attn1", "ff")  # BasicTransformerBlock: x + attn1(norm1(x)), then x + ff(norm3(x))


class GrootRunner:
    """Backbone → vlln + VL self-attention → DiT per flow timestep, as GR00T's model runs them.

    GR00T's flow time is the reverse of pi0's (``x = (1 − τ)·noise + τ·actions``, τ = 1 the data,
    discretised into ``num_timestep_buckets`` for the timestep embedding, velocity target
    ``actions − noise``); the runner takes vlaprune's convention (t = 1 − τ) and converts. N1.5's
    runner (``groot_n15``) differs only in where the model sits and in the DiT's input tokens.
    """

    def model(self, policy: Any) -> Any:
        return policy._groot_model

    def model_inputs(self, policy: Any, batch: dict[str, Any], *, with_action: bool) -> dict[str, Any]:
        return dict(policy._filter_groot_inputs(batch, include_action=with_action))

    def dit_tokens(self, head: Any, state: Tensor, actions: Tensor) -> Tensor:
        return torch.cat((state, actions), dim=1)

    def prefix(self, policy: Any, batch: dict[str, Any]) -> PrefixPass:
        model = self.model(policy)
        backbone_inputs, action_inputs = model.prepare_input(
            self.model_inputs(policy, batch, with_action="action" in batch))
        backbone_output = model.backbone(backbone_inputs)
        head = model.action_head
        backbone_output = head.process_backbone_output(backbone_output)  # vlln + vl_self_attention
        state = action_inputs.state
        state_features = head.state_encoder(state.reshape(state.shape[0], 1, -1), action_inputs.embodiment_id)
        return PrefixPass(
            pad_mask=backbone_output.backbone_attention_mask,
            cache=None,
            actions=action_inputs["action"] if "action" in action_inputs else torch.empty(0),
            extra={"state": state_features, "embodiment": action_inputs.embodiment_id, "backbone": backbone_output,
                   "action_mask": action_inputs.get("action_mask")},
        )

    def _velocity(self, policy: Any, prefix: PrefixPass, x: Tensor, bucket: Tensor) -> Tensor:
        """The head's prediction for noisy chunk ``x`` at discretised GR00T time ``bucket`` (batch,)."""
        head = self.model(policy).action_head
        emb = prefix.extra["embodiment"]
        backbone = prefix.extra["backbone"]
        action_features = head.action_encoder(x, bucket, emb)
        if head.config.add_pos_embed:
            positions = torch.arange(action_features.shape[1], dtype=torch.long, device=x.device)
            action_features = action_features + head.position_embedding(positions).unsqueeze(0)
        tokens = self.dit_tokens(head, prefix.extra["state"], action_features)
        kwargs: dict[str, Any] = {}
        if getattr(head.config, "use_alternate_vl_dit", False):
            kwargs = {"image_mask": backbone.image_mask, "backbone_attention_mask": backbone.backbone_attention_mask}
        out = head.model(hidden_states=tokens, encoder_hidden_states=backbone.backbone_features, timestep=bucket,
                         **kwargs)
        return head.action_decoder(out, emb)[:, -x.shape[1]:]

    def _bucket(self, policy: Any, t: Tensor) -> Tensor:
        tau = 1.0 - t.float()
        return (tau * self.model(policy).action_head.num_timestep_buckets).long()

    def expert(self, policy: Any, prefix: PrefixPass, x_t: Tensor, t: Tensor) -> Tensor:
        dtype = prefix.extra["backbone"].backbone_features.dtype
        return self._velocity(policy, prefix, x_t.to(dtype), self._bucket(policy, t))

    def action_shape(self, policy: Any, batch: dict[str, Any]) -> tuple[int, int, int]:
        head = self.model(policy).action_head
        return (int(batch["state"].shape[0]), int(head.action_horizon), int(head.action_dim))

    def flow_loss(self, policy: Any, batch: dict[str, Any], noise: Tensor, time: Tensor) -> Tensor:
        """GR00T's masked per-element loss (N1.7's ``action_loss``) at fixed noise and time."""
        prefix = self.prefix(policy, batch)
        actions = prefix.actions
        tau = (1.0 - time.float())[:, None, None].to(actions.dtype)
        x = (1 - tau) * noise + tau * actions
        pred = self._velocity(policy, prefix, x, self._bucket(policy, time))
        return torch.nn.functional.mse_loss(pred, actions - noise, reduction="none") * prefix.extra["action_mask"]

    def chunk(self, policy: Any, batch: dict[str, Any], noise: Tensor) -> Tensor:
        """GR00T's ``get_action`` without RTC, from the given noise: Euler steps at τ = k / N."""
        head = self.model(policy).action_head
        prefix = self.prefix(policy, {k: v for k, v in batch.items() if k not in ("action", "action_mask")})
        actions = noise.to(prefix.extra["backbone"].backbone_features.dtype)
        steps = head.num_inference_timesteps
        for k in range(steps):
            bucket = torch.full((actions.shape[0],), int(k / float(steps) * head.num_timestep_buckets),
                                device=actions.device)
            actions = actions + (1.0 / steps) * self._velocity(policy, prefix, actions, bucket)
        return actions


class GrootSurgeon:
    """A pruned GR00T N1.7 is a ``groot_pruned`` policy (plugin ``lerobot_policy_vlaprune``).

    Its config is the source's, every field copied, plus ``kept_blocks`` (original indices per stack)
    and ``source_depths``. Pruning a pruned policy composes: positions map back to the original model.
    """

    def pruned_config(self, policy: Any, kept: Mapping[str, Sequence[int]]) -> Any:
        depths = GROOT.depths(policy)  # remove_blocks checked that every stack is named
        for name, positions in kept.items():
            check_positions(f"kept {name} blocks", positions, depths[name])
        source = policy.config
        recorded = source.kept_blocks if isinstance(source, GrootPrunedConfig) else {}
        # positions → original indices; a stack the source never pruned is at its original depth
        original = {name: [recorded[name][i] for i in kept[name]] if name in recorded else list(kept[name])
                    for name in depths}
        source_depths = {**depths, **(source.source_depths if recorded else {})}
        if original[VISION] == list(range(source_depths[VISION])):  # the vision tower whole: no record
            del original[VISION], source_depths[VISION]
        deepstack = deepstack_layers(policy._groot_model.backbone.model.config)
        moved = original["llm"][: len(deepstack)] != deepstack  # only a plan allowed to do so gets here
        return config_as(GrootPrunedConfig, source, kept_blocks=original, source_depths=source_depths,
                             deepstack_moved=moved)

    def build(self, config: Any) -> Any:
        from lerobot_policy_vlaprune.modeling_groot_pruned import GrootPrunedPolicy

        return GrootPrunedPolicy(config).to(dtype=torch.float32)


def _deepstack_protected(policy: Any) -> list[int]:
    return deepstack_layers(policy._groot_model.backbone.model.config)


def _vision_taps(policy: Any) -> list[int]:
    return vision_taps(policy._groot_model.backbone.visual.config)  # positions, in a pruned tower too


def _vision_last(policy: Any) -> list[int]:
    return [len(policy._groot_model.backbone.visual.blocks) - 1]


@contextmanager
def deepstack_reference(policy: Any, kept: Mapping[str, Sequence[int]]) -> Iterator[None]:
    """Within the block, the source adds deepstack visual features where a pruned model keeping ``kept``
    adds them: feature k after ORIGINAL language layer ``kept["llm"][k]`` (the layer at loop position
    k of the pruned model), and not at all after the last kept layer, whose output the action head
    reads before the addition. A no-op when the deepstack layers are kept in place and followed by
    another kept layer (the source's own behaviour); otherwise: deepstack layers removed on purpose
    (``--plan.allow='[deepstack]'``), or no more language layers kept than there are features.
    """
    language_model = policy._groot_model.backbone.language_model
    count = len(deepstack_layers(policy._groot_model.backbone.model.config))
    kept_llm = list(kept["llm"])
    if kept_llm[:count] == list(range(count)) and len(kept_llm) > count:
        yield
        return
    visible = [(k, layer) for k, layer in enumerate(kept_llm[:count]) if k < len(kept_llm) - 1]
    captured: dict[str, Any] = {}

    def take_features(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        captured["embeds"], captured["masks"] = kwargs.get("deepstack_visual_embeds"), kwargs.get("visual_pos_masks")
        return args, {**kwargs, "deepstack_visual_embeds": None}  # the stock loop adds nothing now

    def add_after(k: int) -> Any:
        def hook(_module: Any, _args: Any, output: Tensor) -> Tensor | None:
            embeds = captured.get("embeds")
            if embeds is None or k >= len(embeds):
                return None
            return language_model._deepstack_process(output, captured["masks"], embeds[k])

        return hook

    handles = [language_model.register_forward_pre_hook(take_features, with_kwargs=True)]
    handles += [language_model.layers[layer].register_forward_hook(add_after(k)) for k, layer in visible]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


GROOT = register_family(
    Family(
        name="groot",
        policy_types=("groot", "groot_pruned"),
        stacks=(
            StackSpec(VISION, f"{_VISUAL}.blocks", f"{_VISUAL}.merger", input_norm="norm1",
                      residual_branches=("attn.proj", "mlp"), per_image=True, opt_in=True,
                      description="Qwen3-VL vision blocks (deepstack mergers read 5, 11, 17; the patch merger "
                                  "the last)"),
            StackSpec("llm", f"{_LLM}.layers", f"{_LLM}.norm", depth_key=GROOT_STACKS["llm"],
                      description="Qwen3-VL language layers up to select_layer (deepstack features enter 0-2)"),
            StackSpec("vl_self_attention", f"{_VLSA}.transformer_blocks", None, input_norm="norm1",
                      depth_key=GROOT_STACKS["vl_self_attention"],
                      residual_branches=_DIT_BRANCHES, final_output=_VLSA,
                      description="VL self-attention blocks of the action head"),
            StackSpec("dit", f"{_DIT}.transformer_blocks", f"{_DIT}.norm_out", input_norm="norm1",
                      residual_branches=_DIT_BRANCHES, depth_key=GROOT_STACKS["dit"],
                      description="AlternateVLDiT blocks: odd self-attention, even cross-attention to text/image"),
        ),
        prefix_stacks=(VISION, "llm", "vl_self_attention"),
        expert_stacks=("dit",),
        role_rules=(
            RoleRule(
                stack="dit",
                why="odd blocks self-attend; even blocks cross-attend to text (idx % 4 == 0) or image tokens, "
                    "chosen by position at run time and not caught by weight shapes",
                role_of=dit_role,
                config_path=f"{_MODEL}.config",
            ),
        ),
        protections=(
            Protection(name="deepstack", stack="llm", blocks=_deepstack_protected,
                       why="deepstack visual features are added after these language layers by position; "
                           "--plan.allow='[deepstack]' removes them anyway, the features then enter the kept "
                           "layers at those positions"),
            Protection(name="deepstack-vision", stack=VISION, blocks=_vision_taps,
                       why="a deepstack merger reads this vision block's output; --plan.allow='[deepstack-vision]' "
                           "removes it anyway, the merger then reads the last kept block before it"),
            Protection(name="vision-merger", stack=VISION, blocks=_vision_last,
                       why="the patch merger (the connector to the language model) reads the last vision block's "
                           "output; --plan.allow='[vision-merger]' removes it anyway"),
        ),
        notes=(
            "depths live in the base model's config (select_layer, diffusion_model_cfg.num_layers, "
            "vl_self_attention_cfg.num_layers): pruned checkpoints are type groot_pruned",
            "the action head reads the last kept language layer's output, before the final norm",
            "flow time is reversed with respect to pi0 (tau = 1 is the data): the runner converts",
        ),
        backbone=(f"{_MODEL}.backbone",),
        runner=GrootRunner(),
        surgeon=GrootSurgeon(),
        reference=deepstack_reference,
    )
)
