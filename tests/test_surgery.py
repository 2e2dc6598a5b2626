"""Surgery equals the source with the removed blocks skipped; the source is never modified."""

from __future__ import annotations

import pytest
import torch

from vlaprune import load_policy
from vlaprune.core.surgery import remove_blocks, renumber_state_dict, skip_blocks
from vlaprune.families import family_for
from vlaprune.io.calibration import CalibrationConfig

from .conftest import TINY_SPECS
from .flow import batch, loss_and_chunk

# roles of tiny:smolvla's expert alternate self/cross: each kept block keeps its role at its new position
KEPT = [0, 3, 4, 7]


def test_renumber_state_dict_moves_and_drops_keys(tiny):
    policy = tiny("tiny:smolvla").policy
    family = family_for(policy)
    state = renumber_state_dict(policy.state_dict(), family, {"vlm": KEPT, "expert": KEPT})
    prefix = family.stack("expert").layers
    old = policy.state_dict()
    assert torch.equal(state[f"{prefix}.1.mlp.up_proj.weight"], old[f"{prefix}.3.mlp.up_proj.weight"])
    assert f"{prefix}.4.mlp.up_proj.weight" not in state
    assert torch.equal(state["model.action_out_proj.weight"], old["model.action_out_proj.weight"])


def test_smolvla_pruned_equals_source_with_blocks_skipped():
    bundle = load_policy("tiny:smolvla")
    source = bundle.policy
    family = family_for(source)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    pruned = remove_blocks(source, family, {"vlm": KEPT, "expert": KEPT})

    assert family.depths(pruned) == {"vision": 2, "vlm": 4, "expert": 4}  # vision not in the plan: all kept
    assert pruned.config.num_vlm_layers == 4 and source.config.num_vlm_layers == 8
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items()), "source was modified"

    data = batch(bundle)
    removed = [i for i in range(8) if i not in KEPT]
    with skip_blocks(source, family, {"vlm": removed, "expert": removed}):
        ref_loss, ref_chunk = loss_and_chunk(source, data)
    loss, chunk = loss_and_chunk(pruned, data)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunk, ref_chunk, rtol=1e-5, atol=1e-6)

    full_loss, _ = loss_and_chunk(source, data)  # the skipped blocks mattered: not a vacuous test
    assert (full_loss - loss).abs().max() > 1e-3


def test_skip_blocks_hooks_are_removed(tiny):
    bundle = tiny("tiny:smolvla")
    family = family_for(bundle.policy)
    data = batch(bundle)
    full, _ = loss_and_chunk(bundle.policy, data)
    with skip_blocks(bundle.policy, family, {"vlm": [1], "expert": [1]}):
        skipped, _ = loss_and_chunk(bundle.policy, data)
    again, _ = loss_and_chunk(bundle.policy, data)
    assert torch.equal(full, again) and not torch.equal(full, skipped)


def test_role_breaking_plan_fails_on_shapes(tiny):
    policy = tiny("tiny:smolvla").policy
    bad = [0, 2, 3, 5]  # block 2 (self-attention) would land at position 1 (cross-attention)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        remove_blocks(policy, family_for(policy), {"vlm": bad, "expert": bad})


def test_lockstep_mismatch_is_refused(tiny):
    policy = tiny("tiny:smolvla").policy
    with pytest.raises(ValueError, match="lockstep"):
        remove_blocks(policy, family_for(policy), {"vlm": KEPT, "expert": [0, 1, 2, 3]})


@pytest.mark.parametrize("spec", ["tiny:smolvla", "tiny:pi0"])
def test_shared_weights_view_equals_copy_and_shares_storage(tiny, spec):
    bundle = tiny(spec)
    source = bundle.policy
    family = family_for(source)
    kept = {"vlm": KEPT, "expert": KEPT}
    copy = remove_blocks(source, family, kept)
    view = remove_blocks(source, family, kept, share_weights=True)

    tensors = [*view.parameters(), *view.buffers()]
    assert tensors and not any(t.is_meta for t in tensors)
    source_ptrs = {t.data_ptr() for t in [*source.parameters(), *source.buffers()]}
    assert {id(p) for p in view.parameters()} <= {id(p) for p in source.parameters()}, "the view copied weights"
    assert not any(p.data_ptr() in source_ptrs for p in copy.parameters()), "the copy shares weights"
    assert [p.requires_grad for p in view.parameters()] == [p.requires_grad for p in copy.parameters()]

    data = batch(bundle)
    for a, b in zip(loss_and_chunk(view, data), loss_and_chunk(copy, data), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", [*TINY_SPECS, "tiny:groot", "tiny:groot_n15"])
def test_a_plan_keeping_every_block_equals_the_source_exactly(tiny, spec):
    """Surgery that removes nothing changes nothing: the same loss and action chunk, bit for bit."""
    from vlaprune.core.family import action_chunk, flow_loss, noise_shape

    bundle = tiny(spec)
    source = bundle.policy
    family = family_for(source)
    kept = {name: list(range(depth)) for name, depth in family.depths(source).items()}
    pruned = remove_blocks(source, family, kept)
    data = batch(bundle) if bundle.synthetic is None else next(bundle.synthetic(CalibrationConfig(3, 3, 0)))
    shape = noise_shape(family, source, data)
    gen = torch.Generator().manual_seed(3)
    noise, time = torch.randn(shape, generator=gen), torch.rand(shape[0], generator=gen) * 0.9 + 0.05
    assert torch.equal(flow_loss(family, pruned, data, noise, time), flow_loss(family, source, data, noise, time))
    assert torch.equal(action_chunk(family, pruned, data, noise), action_chunk(family, source, data, noise))
