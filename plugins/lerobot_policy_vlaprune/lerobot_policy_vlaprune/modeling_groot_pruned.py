"""``GrootPrunedPolicy``: LeRobot's ``GrootPolicy`` whose model is built at the pruned depths.

``GrootPolicy`` rebuilds its model with ``GR00TN17.from_pretrained(base_model_path)``: the base
model's weights at the base model's depths, which a pruned state dict cannot fit. Here the model is
built from the base model's CONFIG alone, with ``select_layer``, the DiT's and the VL
self-attention's ``num_layers`` set to the kept counts (no base weights are read), and
``from_pretrained`` loads the checkpoint strictly (see ``_pruned``). Before building, the config's
kept blocks are checked against the base model: source depths equal, every kept DiT block keeps its
role (self-attention, cross-attention to text or to image tokens, decided by position and not
caught by shapes), the language layers that receive deepstack visual features kept (unless the
config says they were removed on purpose, ``deepstack_moved``). Training,
``select_action`` and processors are the stock GR00T ones.
"""

from __future__ import annotations

from typing import Any

import torch
from lerobot.policies.groot.modeling_groot import GrootPolicy

from .checks import PrunedCheckpointError, get_path, set_path
from .configuration_groot_pruned import GrootPrunedConfig
from .groot_rules import GROOT_STACKS, check_deepstack, check_dit_roles
from .pruned import StrictLoadMixin


def build_pruned_model(config: GrootPrunedConfig) -> Any:
    """The GR00T N1.7 model of ``config`` at its pruned depths, with untrained weights (to be loaded)."""
    from lerobot.policies.groot.groot_n1_7 import GR00TN17Config

    model_config = GR00TN17Config.from_pretrained(config.base_model_path)
    source = {stack: get_path(model_config, path) for stack, path in GROOT_STACKS.items()}
    if source != config.source_depths:
        raise PrunedCheckpointError(
            f"the base model {config.base_model_path} has depths {source}, but this checkpoint was pruned from "
            f"one with {config.source_depths} (source_depths in config.json): set base_model_path to the base "
            "model it was pruned from"
        )
    check_dit_roles(model_config, config.kept_blocks["dit"])
    for stack, path in GROOT_STACKS.items():
        set_path(model_config, path, len(config.kept_blocks[stack]))
    model = build_model(config, model_config)
    if not config.deepstack_moved:
        check_deepstack(model.backbone.model.config, config.kept_blocks["llm"])
    return model


def build_model(config: Any, model_config: Any) -> Any:
    """``GR00TN17`` of ``model_config`` (untrained, no base weights read), set up as
    ``GrootPolicy._create_groot_model`` and ``GR00TN17.from_pretrained`` set up a loaded one for the
    policy ``config``: its inference knobs, trainable parts, the tied unused LM head, float32 parameters."""
    from lerobot.policies.groot.groot_n1_7 import GR00TN17, _tie_unused_qwen_lm_head

    overrides: dict[str, Any] = {"tune_top_llm_layers": config.tune_top_llm_layers,
                                 "use_flash_attention": config.use_flash_attention}
    if config.num_inference_timesteps is not None:
        overrides["num_inference_timesteps"] = config.num_inference_timesteps
    if config.rtc_ramp_rate is not None:
        overrides["rtc_ramp_rate"] = config.rtc_ramp_rate
    for key, value in overrides.items():
        setattr(model_config, key, value)
    model = GR00TN17(model_config, transformers_loading_kwargs={"trust_remote_code": True},
                     load_backbone_weights=False)
    model.backbone.set_trainable_parameters(tune_visual=config.tune_visual, tune_llm=config.tune_llm,
                                            tune_top_llm_layers=model_config.tune_top_llm_layers)
    model.action_head.set_trainable_parameters(tune_projector=config.tune_projector,
                                               tune_diffusion_model=config.tune_diffusion_model,
                                               tune_vlln=config.tune_vlln)
    _tie_unused_qwen_lm_head(model.backbone.model)
    if config.model_params_fp32:
        for parameter in model.parameters():
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(torch.float32)
    return model


class GrootPrunedPolicy(StrictLoadMixin, GrootPolicy):
    """A depth-pruned GR00T N1.7: ``config.kept_blocks`` (original indices) held as blocks 0..K-1."""

    config_class = GrootPrunedConfig
    name = "groot_pruned"

    def _create_groot_model(self) -> Any:
        return build_pruned_model(self.config)
