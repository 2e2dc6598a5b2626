"""``GrootPrunedPolicy``: LeRobot's ``GrootPolicy`` whose model is built at the pruned depths.

``GrootPolicy`` rebuilds its model with ``GR00TN17.from_pretrained(base_model_path)``: the base
model's weights at the base model's depths, which a pruned state dict cannot fit. Here the model is
built from the base model's CONFIG alone, with ``select_layer``, the DiT's and the VL
self-attention's ``num_layers`` set to the kept counts (no base weights are read), and
``from_pretrained`` loads the checkpoint strictly (see ``_pruned``). Before building, the config's
kept blocks are checked against the base model: source depths equal, every kept DiT block keeps its
role (self-attention, cross-attention to text or to image tokens, decided by position and not
caught by shapes), the language layers that receive deepstack visual features kept (unless the
config says they were removed on purpose, ``deepstack_moved``). A pruned vision tower (the ``vision``
stack) keeps its first K blocks, and its deepstack mergers read where the kept blocks put their
inputs. Training,
``select_action`` and processors are the stock GR00T ones.
"""

from __future__ import annotations

from typing import Any

import torch
from lerobot.policies.groot.modeling_groot import GrootPolicy

from .checks import PrunedCheckpointError, get_path, set_path
from .configuration_groot_pruned import GrootPrunedConfig
from .groot_rules import GROOT_STACKS, VISION, check_deepstack, check_dit_roles, remap_vision_taps, vision_taps
from .pruned import StrictLoadMixin


def build_pruned_model(config: GrootPrunedConfig) -> Any:
    """The GR00T N1.7 model of ``config`` at its pruned depths, with untrained weights (to be loaded)."""
    from lerobot.policies.groot.groot_n1_7 import GR00TN17Config

    model_config = GR00TN17Config.from_pretrained(config.base_model_path)
    source = {stack: get_path(model_config, path) for stack, path in GROOT_STACKS.items()}
    recorded = {stack: config.source_depths[stack] for stack in GROOT_STACKS}  # the vision depth: below
    if source != recorded:
        raise PrunedCheckpointError(
            f"the base model {config.base_model_path} has depths {source}, but this checkpoint was pruned from "
            f"one with {recorded} (source_depths in config.json): set base_model_path to the base "
            "model it was pruned from"
        )
    check_dit_roles(model_config, config.kept_blocks["dit"])
    for stack, path in GROOT_STACKS.items():
        set_path(model_config, path, len(config.kept_blocks[stack]))
    model = build_model(config, model_config)
    if not config.deepstack_moved:
        check_deepstack(model.backbone.model.config, config.kept_blocks["llm"])
    if VISION in config.kept_blocks:
        prune_vision_tower(model.backbone.visual, config.kept_blocks[VISION], config.source_depths[VISION],
                           model_config.model_name)
    return model


def prune_vision_tower(visual: Any, kept: list[int], source_depth: int, model_name: str) -> None:
    """Keep ``len(kept)`` blocks of a Qwen3-VL vision tower (the checkpoint fills them) and point each
    deepstack merger at the kept block that now carries its input (``remap_vision_taps``)."""
    built = len(visual.blocks)
    if built != source_depth:
        raise PrunedCheckpointError(
            f"the backbone {model_name} has {built} vision blocks, but this checkpoint was pruned from one with "
            f"{source_depth} (source_depths['vision'] in config.json): set model_name to the backbone it was "
            "pruned from"
        )
    taps = remap_vision_taps(vision_taps(visual.config), kept)
    del visual.blocks[len(kept):]
    visual.deepstack_visual_indexes = taps
    visual.config.depth = len(kept)
    visual.config.deepstack_visual_indexes = taps


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
