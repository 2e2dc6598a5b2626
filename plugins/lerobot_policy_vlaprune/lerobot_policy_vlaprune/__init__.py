"""LeRobot policy types ``pi0_pruned``, ``pi05_pruned``, ``groot_pruned`` and ``smolvla_pruned`` for
depth-pruned pi0 / pi0.5 / GR00T N1.7 checkpoints and SmolVLA checkpoints with a pruned vision encoder,
and ``smolvla_connector`` for robot pretraining of a SmolVLA on a pretrained VLM
(the new connector trains, the pretrained layers stay frozen).

Installed as the distribution ``lerobot_policy_vlaprune``, so LeRobot's ``register_third_party_plugins``
(called by ``lerobot-train`` and ``lerobot-eval``) imports it and the config types register
themselves; ``--policy.path=DIR`` then loads a pruned checkpoint with no user code. The policy
classes live in the ``modeling_*`` siblings (LeRobot's naming convention) and load lazily.
"""

from __future__ import annotations

from typing import Any

from .configuration_groot_pruned import GrootPrunedConfig
from .configuration_pi0_pruned import PI0PrunedConfig
from .configuration_pi05_pruned import PI05PrunedConfig
from .configuration_smolvla_connector import SmolVLAConnectorConfig
from .configuration_smolvla_pruned import SmolVLAPrunedConfig

__all__ = [
    "GrootPrunedConfig",
    "GrootPrunedPolicy",
    "PI0PrunedConfig",
    "PI0PrunedPolicy",
    "PI05PrunedConfig",
    "PI05PrunedPolicy",
    "SmolVLAConnectorConfig",
    "SmolVLAConnectorPolicy",
    "SmolVLAPrunedConfig",
    "SmolVLAPrunedPolicy",
]


def __getattr__(name: str) -> Any:
    """The policy classes on first access (they import the model code)."""
    if name == "PI0PrunedPolicy":
        from .modeling_pi0_pruned import PI0PrunedPolicy

        return PI0PrunedPolicy
    if name == "PI05PrunedPolicy":
        from .modeling_pi05_pruned import PI05PrunedPolicy

        return PI05PrunedPolicy
    if name == "SmolVLAConnectorPolicy":
        from .modeling_smolvla_connector import SmolVLAConnectorPolicy

        return SmolVLAConnectorPolicy
    if name == "SmolVLAPrunedPolicy":
        from .modeling_smolvla_pruned import SmolVLAPrunedPolicy

        return SmolVLAPrunedPolicy
    if name == "GrootPrunedPolicy":
        from .modeling_groot_pruned import GrootPrunedPolicy

        return GrootPrunedPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
