"""``SmolVLAPrunedPolicy``: LeRobot's ``SmolVLAPolicy`` with a shallower vision encoder.

Construction is the stock one (the VLM built from the config at ``vlm_model_name``, with as many
vision blocks as that config names), then the vision encoder keeps its first
``K = len(config.vision_kept_layers)`` blocks and its config says K. Vision blocks carry no index of
their own (the encoder runs its list in order), so nothing else needs renumbering. ``from_pretrained``
loads strictly (``pruned.StrictLoadMixin``). Training, ``select_action`` and processors are the
stock SmolVLA ones.
"""

from __future__ import annotations

from typing import Any

from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

from .checks import PrunedCheckpointError
from .configuration_smolvla_pruned import SmolVLAPrunedConfig
from .pruned import StrictLoadMixin


class SmolVLAPrunedPolicy(StrictLoadMixin, SmolVLAPolicy):
    """A SmolVLA holding the vision blocks ``config.vision_kept_layers`` (original indices) as blocks 0..K-1."""

    config_class = SmolVLAPrunedConfig
    name = "smolvla_pruned"

    def __init__(self, config: SmolVLAPrunedConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        vision = self.model.vlm_with_expert.get_vlm_model().vision_model
        built = len(vision.encoder.layers)
        if built != config.vision_source_num_layers:
            raise PrunedCheckpointError(
                f"the VLM at {config.vlm_model_name} has {built} vision blocks, but this checkpoint was pruned from "
                f"one with {config.vision_source_num_layers} (vision_source_num_layers in config.json): set "
                "vlm_model_name to the VLM it was pruned from"
            )
        keep = len(config.vision_kept_layers)
        del vision.encoder.layers[keep:]
        vision.config.num_hidden_layers = keep
