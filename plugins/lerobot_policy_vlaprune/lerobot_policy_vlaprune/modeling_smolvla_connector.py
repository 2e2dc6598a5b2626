"""``SmolVLAConnectorPolicy``: LeRobot's ``SmolVLAPolicy`` with the VLM's connector trainable.

Construction is the stock one (``train_expert_only=True`` freezes the whole VLM and keeps it in eval
mode), then the connector's parameters are made trainable again. The connector is a linear
projection with no dropout or normalisation, so the VLM's eval mode does not change what it computes.
Loading, training, ``select_action`` and processors are the stock SmolVLA ones.
"""

from __future__ import annotations

from typing import Any

from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

from .configuration_smolvla_connector import SmolVLAConnectorConfig


class SmolVLAConnectorPolicy(SmolVLAPolicy):
    """SmolVLA that trains the VLM's connector together with the action expert."""

    config_class = SmolVLAConnectorConfig
    name = "smolvla_connector"

    def __init__(self, config: SmolVLAConnectorConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.model.vlm_with_expert.get_vlm_model().connector.requires_grad_(True)
