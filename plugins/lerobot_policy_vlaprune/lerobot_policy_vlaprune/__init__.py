"""LeRobot policy types ``pi0_pruned`` and ``pi05_pruned`` for depth-pruned pi0 / pi0.5 checkpoints.

Installed as the distribution ``lerobot_policy_vlaprune``, so LeRobot's ``register_third_party_plugins``
(called by ``lerobot-train`` and ``lerobot-eval``) imports it and the config types register
themselves; ``--policy.path=DIR`` then loads a pruned checkpoint with no user code. The policy
classes live in the ``modeling_*`` siblings (LeRobot's naming convention) and load lazily.
"""

from __future__ import annotations

from typing import Any

from .configuration_pi0_pruned import PI0PrunedConfig
from .configuration_pi05_pruned import PI05PrunedConfig

__all__ = ["PI0PrunedConfig", "PI0PrunedPolicy", "PI05PrunedConfig", "PI05PrunedPolicy"]


def __getattr__(name: str) -> Any:
    """``PI0PrunedPolicy`` / ``PI05PrunedPolicy`` on first access (they import the pi0 model code)."""
    if name == "PI0PrunedPolicy":
        from .modeling_pi0_pruned import PI0PrunedPolicy

        return PI0PrunedPolicy
    if name == "PI05PrunedPolicy":
        from .modeling_pi05_pruned import PI05PrunedPolicy

        return PI05PrunedPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
