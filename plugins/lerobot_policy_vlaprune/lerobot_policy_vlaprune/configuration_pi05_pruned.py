"""``pi05_pruned``: a pi0.5 whose two Gemma stacks keep only some of the source's layers.

pi0.5's depth is not a config field (``get_gemma_config`` fixes 18 layers), and the ``pi05`` type name
is taken, so a depth-pruned pi0.5 is a type of its own that carries the kept layers and the dimensions
the source was built with. Every other field is a stock ``PI05Config`` field, copied from the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi05.configuration_pi05 import PI05Config

from .pruned import validate_pi_fields


@PreTrainedConfig.register_subclass("pi05_pruned")
@dataclass
class PI05PrunedConfig(PI05Config):
    """``PI05Config`` plus the layers kept from the source (the same indices in both stacks: lockstep).

    ``kept_layers`` are ORIGINAL indices in the unpruned source of depth ``source_num_layers``; the
    policy holds them renumbered 0..K-1 in this order. ``architecture`` (VLM and expert Gemma widths,
    SigLIP tower, projector) and ``vocab_size`` are the dimensions the source was built with.
    """

    kept_layers: list[int] = field(default_factory=list)
    source_num_layers: int = 18
    architecture: dict[str, dict[str, int]] = field(default_factory=dict)
    vocab_size: int = 257152

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_pi_fields(self)
