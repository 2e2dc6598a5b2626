"""``PI05PrunedPolicy``: LeRobot's ``PI05Policy`` with both Gemma stacks cut to the kept layers.

Construction builds the stock structure (under vlaprune's tiny architecture when the config says so)
and cuts both stacks to K layers numbered 0..K-1; ``from_pretrained`` then loads the checkpoint
strictly (see ``_pruned``). Training, ``select_action`` and processors are the stock pi0.5 ones.
"""

from __future__ import annotations

from lerobot.policies.pi05.modeling_pi05 import PI05Policy

from .configuration_pi05_pruned import PI05PrunedConfig
from .pruned import PrunedPolicyMixin


class PI05PrunedPolicy(PrunedPolicyMixin, PI05Policy):
    """A depth-pruned pi0.5: ``config.kept_layers`` (original indices) held as layers 0..K-1 of both stacks."""

    config_class = PI05PrunedConfig
    name = "pi05_pruned"
    variant = "pi05"
