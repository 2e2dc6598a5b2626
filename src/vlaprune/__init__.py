"""vlaprune: training-free, CKA-guided depth pruning of Vision-Language-Action policies."""

from .policies import load_policy

__all__ = ["load_policy"]
__version__ = "0.1.0"
