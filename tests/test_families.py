"""Family data: registry, role rules by position, structure description."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vlaprune.core.family import Family, RoleRule, StackSpec, register_family, resolve
from vlaprune.families import family_for, supported_types
from vlaprune.families.smolvla import SMOLVLA

from .conftest import TINY_SPECS


def test_supported_types_and_unknown_type_lists_them():
    assert {"smolvla", "pi0", "pi05"} <= set(supported_types())
    with pytest.raises(ValueError, match=r"supported types: .*pi0.*smolvla"):
        family_for("act")


def test_duplicate_registration_raises():
    fam = Family(name="dup", policy_types=("smolvla",), stacks=(StackSpec("a", "x", "y"),),
                 prefix_stacks=("a",), expert_stacks=(), runner=SMOLVLA.runner, surgeon=SMOLVLA.surgeon)
    with pytest.raises(ValueError, match="already handled"):
        register_family(fam)


def test_family_rejects_unknown_stack_names():
    with pytest.raises(ValueError, match="unknown stacks"):
        Family(name="bad", policy_types=("x",), stacks=(StackSpec("a", "x", "y"),),
               prefix_stacks=("a",), expert_stacks=("b",), runner=SMOLVLA.runner, surgeon=SMOLVLA.surgeon)


def test_role_rule_by_residue_and_config_predicate():
    rule = RoleRule(stack="expert", period="every", residue_roles=((0, "self"),), default="cross",
                    why="test", when=lambda cfg: cfg.mode == "cross")
    assert rule.roles(SimpleNamespace(every=2, mode="cross"), 5) == ["self", "cross", "self", "cross", "self"]
    assert rule.roles(SimpleNamespace(every=3, mode="cross"), 4) == ["self", "cross", "cross", "self"]
    assert rule.roles(SimpleNamespace(every=2, mode="self"), 4) is None
    assert rule.roles(SimpleNamespace(every=-1, mode="cross"), 4) is None


def test_resolve_names_the_missing_attribute():
    with pytest.raises(AttributeError, match="'nope'"):
        resolve(SimpleNamespace(a=SimpleNamespace()), "a.nope.b")


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_tiny_structure(tiny, spec):
    policy = tiny(spec).policy
    family = family_for(policy)
    depths = family.depths(policy)
    assert depths["vlm"] == depths["expert"] >= 8
    desc = family.describe(policy)
    assert desc["lockstep"] == [["vlm", "expert"]]
    if spec == "tiny:smolvla":
        roles = desc["roles"]["expert"]
        assert roles[:4] == ["self", "cross", "self", "cross"]
        # the roles are in the weights: cross-attention k_proj reads the VLM width
        layers = family.layers(policy, "expert")
        assert layers[0].self_attn.k_proj.in_features != layers[1].self_attn.k_proj.in_features
