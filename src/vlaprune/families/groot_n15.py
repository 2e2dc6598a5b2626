"""GR00T N1.5 (NVIDIA Isaac-GR00T layout; LeRobot's port up to 0.5.1): Eagle (Qwen3) LM, VL self-attention, DiT.

The policy is :class:`vlaprune.families.isaac_n15.N15Policy`, a thin wrapper whose ``.model`` is the
``GR00TN15`` model, so the module paths are Isaac-GR00T's with a ``model.`` prefix. Rules:

- ``llm``: the Eagle 2.5 VL language model's Qwen3 layers, truncated at ``backbone_cfg.select_layer``
  (12); the action head reads the final norm of the last kept layer's output. No deepstack.
- ``vl_self_attention``: ``action_head.vl_self_attention`` (4 blocks). No role rule.
- ``dit``: ``action_head.model`` (16 blocks): odd blocks self-attend, even blocks cross-attend to
  the VL tokens, decided by position at build (shapes) and at run time. No text/image alternation.
- ``vision`` (opt-in): Eagle's SigLIP tower (27 layers in N1.5), run once per camera image; Eagle reads
  its output (``select_layer`` −1) through ``post_layernorm``, so any layer may go.

Depths live in the checkpoint's ``config.json``; a pruned checkpoint is the same layout with
``select_layer``, ``diffusion_model_cfg.num_layers`` and ``vl_self_attention_cfg.num_layers`` set to
the kept counts, which Isaac-GR00T's loader (``GR00TN15.from_pretrained``) builds and fills. The
vision depth lives in the Eagle config directory the backbone reads: a pruned vision encoder gets its
own copy of it, which the checkpoint carries (:mod:`vlaprune.families.isaac_n15`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lerobot_policy_vlaprune.checks import set_path
from vlaprune.core.family import Family, RoleRule, StackSpec, register_family, resolve
from vlaprune.families.groot import GrootRunner
from vlaprune.families.siglip import vision_stack

_LLM = "model.backbone.eagle_model.language_model.model"
_VLSA = "model.action_head.vl_self_attention"
_DIT = "model.action_head.model"
_VISION = "model.backbone.eagle_model.vision_model.vision_model"
_BRANCHES = ("attn1", "ff")

# The CLP authors' hand-picked kept blocks for GR00T-N1.5 (their code, not saved in their checkpoints)
PAPER_PLAN = {"llm": [0, 1, 2, 10, 11], "vl_self_attention": [0, 1, 3], "dit": [0, 3, 8, 9, 12, 13, 14, 15]}


# the vision depth lives in the Eagle config directory (no depth_key); the others in config.json, dotted
_VISION_STACK = vision_stack(_VISION, "Eagle's SigLIP vision-encoder layers, run once per camera image")
_STACKS = (
    _VISION_STACK,
    StackSpec("llm", f"{_LLM}.layers", f"{_LLM}.norm", depth_key="backbone_cfg.select_layer",
              description="Eagle 2.5 VL (Qwen3) language layers up to select_layer"),
    StackSpec("vl_self_attention", f"{_VLSA}.transformer_blocks", None, input_norm="norm1",
              residual_branches=_BRANCHES, final_output=_VLSA,
              depth_key="action_head_cfg.vl_self_attention_cfg.num_layers",
              description="VL self-attention blocks of the action head"),
    StackSpec("dit", f"{_DIT}.transformer_blocks", f"{_DIT}.norm_out", input_norm="norm1",
              residual_branches=_BRANCHES, depth_key="action_head_cfg.diffusion_model_cfg.num_layers",
              description="DiT blocks: odd self-attention, even cross-attention"),
)


class GrootN15Runner(GrootRunner):
    """N1.5's model is the policy's ``.model``; its DiT reads [state, future tokens, actions]."""

    def model(self, policy: Any) -> Any:
        return policy.model

    def model_inputs(self, policy: Any, batch: dict[str, Any], *, with_action: bool) -> dict[str, Any]:
        from vlaprune.families.isaac_n15 import model_inputs

        return model_inputs(batch, with_action=with_action)

    def dit_tokens(self, head: Any, state: Tensor, actions: Tensor) -> Tensor:
        future = head.future_tokens.weight.unsqueeze(0).expand(state.shape[0], -1, -1)
        return torch.cat((state, future, actions), dim=1)


class GrootN15Surgeon:
    """A pruned N1.5 is a ``GR00TN15`` of the same config with the stacks' depths set to the kept counts;
    a pruned vision encoder reads its own Eagle directory, where the vision depth lives."""

    def pruned_config(self, policy: Any, kept: Mapping[str, Sequence[int]]) -> Any:
        from vlaprune.families.isaac_n15 import vision_pruned_eagle

        config = copy.deepcopy(policy.config)
        for spec in _STACKS:
            if spec.depth_key is not None:
                set_path(config, spec.depth_key, len(kept[spec.name]))
        vision = len(kept[_VISION_STACK.name])
        if vision != len(resolve(policy, _VISION_STACK.layers)):
            config.backbone_cfg = {**config.backbone_cfg,
                                   "tokenizer_assets_repo": str(vision_pruned_eagle(policy.config, vision))}
        return config

    def build(self, config: Any) -> Any:
        from vlaprune.families.isaac_n15 import N15Policy, load

        return N15Policy(load().GR00TN15(config, local_model_path=""))


GROOT_N15 = register_family(
    Family(
        name="groot_n15",
        policy_types=("gr00t_n1_5",),
        stacks=_STACKS,
        prefix_stacks=("vision", "llm", "vl_self_attention"),
        expert_stacks=("dit",),
        role_rules=(
            RoleRule(stack="dit", period=2, residue_roles=((1, "self"),), default="cross",
                     why="odd DiT blocks self-attend, even ones cross-attend to the VL tokens (built and run by "
                         "position)"),
        ),
        notes=(
            "Isaac-GR00T layout: depths in config.json (backbone_cfg.select_layer, action_head_cfg."
            "diffusion_model_cfg.num_layers, action_head_cfg.vl_self_attention_cfg.num_layers)",
            "the action head reads the final norm of the last kept language layer",
            "the vision encoder is planned only when named (--plan.stacks); its depth lives in the Eagle config "
            "directory, so a pruned one is saved with the checkpoint as eagle/",
        ),
        backbone=("model.backbone",),
        load_hint="Isaac-GR00T N1.5 layout, not a LeRobot policy directory: GR00T_N1_5.from_pretrained('{path}')",
        runner=GrootN15Runner(),
        surgeon=GrootN15Surgeon(),
    )
)
