"""``smolvla_pruned``: a SmolVLA whose vision encoder keeps only some of its source's blocks.

SmolVLA's text and expert depth is a config field (``num_vlm_layers``), so a SmolVLA pruned in those
stacks alone stays a stock ``smolvla`` checkpoint. The vision encoder's depth is not: SmolVLA builds
its VLM from the config at ``vlm_model_name`` (``vision_config.num_hidden_layers``). A SmolVLA with a
pruned vision encoder is therefore a type of its own that carries the kept vision blocks; its policy
builds the stock structure and then keeps the first K vision blocks, which loading fills with the
kept blocks renumbered 0..K-1. Every other field is a stock ``SmolVLAConfig`` field, copied from the
source policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.configs import PreTrainedConfig
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

from .checks import check_kept_list


@PreTrainedConfig.register_subclass("smolvla_pruned")
@dataclass
class SmolVLAPrunedConfig(SmolVLAConfig):
    """``SmolVLAConfig`` plus the ORIGINAL indices of the vision-encoder blocks kept and the source's
    vision depth (``vision_config.num_hidden_layers`` of the VLM at ``vlm_model_name``)."""

    vision_kept_layers: list[int] = field(default_factory=list)
    vision_source_num_layers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        self.vision_kept_layers = check_kept_list(f"{name}.vision_kept_layers", self.vision_kept_layers,
                                                  f"{name}.vision_source_num_layers", self.vision_source_num_layers)
        if self.load_vlm_weights:
            raise ValueError(
                f"{name}: load_vlm_weights=True would load the unpruned VLM of {self.vlm_model_name}; a pruned "
                "checkpoint holds every weight itself: set load_vlm_weights=false"
            )
