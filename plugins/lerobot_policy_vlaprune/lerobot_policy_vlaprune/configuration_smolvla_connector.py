"""``smolvla_connector``: SmolVLA for robot pretraining on a pretrained VLM, training the connector too.

A SmolVLA built on a pretrained VLM whose connector (the projection from vision features to the text
width) is new must train that connector with the action expert while every pretrained text and
vision layer stays as it is. Stock SmolVLA cannot say so: ``train_expert_only=True`` freezes the whole
VLM, the connector with it, and ``train_expert_only=False`` trains every text layer but the last
(LeRobot 0.6.1, ``SmolVLMWithExpertModel.set_requires_grad``). This type is SmolVLA with the VLM
frozen as ``train_expert_only=True`` freezes it, except for the connector. Its fields are exactly
``SmolVLAConfig``'s, so a checkpoint it writes becomes a stock ``smolvla`` checkpoint by changing
``type`` in ``config.json`` (the weights are the same tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

from lerobot.configs import PreTrainedConfig
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig


@PreTrainedConfig.register_subclass("smolvla_connector")
@dataclass
class SmolVLAConnectorConfig(SmolVLAConfig):
    """``SmolVLAConfig`` whose policy trains the VLM's connector with the expert; text and vision frozen."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.train_expert_only and self.freeze_vision_encoder):
            raise ValueError(
                f"{type(self).__name__}: train_expert_only={self.train_expert_only} and freeze_vision_encoder="
                f"{self.freeze_vision_encoder}: this type keeps every pretrained VLM layer frozen and trains only "
                "the connector with the expert; set both to true, or use the stock smolvla type"
            )
