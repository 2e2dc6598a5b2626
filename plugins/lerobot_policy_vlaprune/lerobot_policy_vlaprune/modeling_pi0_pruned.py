"""``PI0PrunedPolicy``: LeRobot's ``PI0Policy`` with both Gemma stacks cut to the kept layers.

Construction builds the stock structure (under vlaprune's tiny architecture when the config says so)
and cuts both stacks to K layers numbered 0..K-1; ``from_pretrained`` then loads the checkpoint
strictly (see ``_pruned``). Training, ``select_action`` and processors are the stock pi0 ones.
"""

from __future__ import annotations

from lerobot.policies.pi0.modeling_pi0 import PI0Policy

from .configuration_pi0_pruned import PI0PrunedConfig
from .pruned import PrunedPolicyMixin


class PI0PrunedPolicy(PrunedPolicyMixin, PI0Policy):
    """A depth-pruned pi0: ``config.kept_layers`` (original indices) held as layers 0..K-1 of both stacks."""

    config_class = PI0PrunedConfig
    name = "pi0_pruned"
    variant = "pi0"
