"""Model families: one module each; importing this package registers them all."""

from vlaprune.core.family import Family, RoleRule, StackSpec, family_for, register_family, supported_types
from vlaprune.families import groot, groot_n15, pi0, smolvla  # noqa: F401  (registration side effect)

__all__ = ["Family", "RoleRule", "StackSpec", "family_for", "register_family", "supported_types"]
