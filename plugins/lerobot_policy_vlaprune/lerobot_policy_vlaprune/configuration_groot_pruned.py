"""``groot_pruned``: a GR00T N1.7 whose stacks keep only some of the source's blocks.

GR00T's depths live in the base model's config (``select_layer``, ``diffusion_model_cfg.num_layers``,
``vl_self_attention_cfg.num_layers``), not in LeRobot's ``GrootConfig``, and ``GrootPolicy`` always
rebuilds its model from ``base_model_path``. A depth-pruned GR00T is therefore a type of its own that
carries the kept blocks; its policy builds the base model's architecture at the pruned depths from
the base config alone (no base weights are read) and loads the checkpoint strictly. Every other field
is a stock ``GrootConfig`` field, copied from the source policy. The vision tower's depth lives in the
Qwen3-VL config (the base model's ``model_name``), so a pruned vision tower is recorded here as the fourth stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.configs import PreTrainedConfig
from lerobot.policies.groot.configuration_groot import GrootConfig

from .checks import check_kept_list
from .groot_rules import GROOT_STACKS, VISION


@PreTrainedConfig.register_subclass("groot_pruned")
@dataclass
class GrootPrunedConfig(GrootConfig):
    """``GrootConfig`` plus, per stack, the ORIGINAL indices of the blocks kept and the source depth.

    Stacks: ``llm`` (Qwen3-VL language layers up to ``select_layer``), ``vl_self_attention`` (the VL
    self-attention blocks of the action head), ``dit`` (the AlternateVLDiT blocks), and ``vision`` (the
    Qwen3-VL vision blocks) only where the vision tower was pruned. The policy holds the kept blocks
    renumbered 0..K-1 in this order; ``source_depths`` must equal the base model's.
    """

    kept_blocks: dict[str, list[int]] = field(default_factory=dict)
    source_depths: dict[str, int] = field(default_factory=dict)
    # true when language layers that received deepstack visual features were removed on purpose
    # (vlaprune's --plan.allow='[deepstack]'): the features then enter the kept layers at positions 0-2
    deepstack_moved: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        stacks = [*GROOT_STACKS, VISION] if VISION in self.kept_blocks else list(GROOT_STACKS)
        for attr in ("kept_blocks", "source_depths"):
            keys = set(getattr(self, attr))
            if keys != set(stacks):
                raise ValueError(f"{name}.{attr} must name the stacks {sorted(GROOT_STACKS)}, and {VISION!r} in "
                                 f"both or neither; got kept_blocks {sorted(self.kept_blocks)}, source_depths "
                                 f"{sorted(self.source_depths)}")
        self.kept_blocks = {
            stack: check_kept_list(f"{name}.kept_blocks[{stack!r}]", self.kept_blocks[stack],
                                   f"{name}.source_depths[{stack!r}]", self.source_depths[stack])
            for stack in stacks
        }
