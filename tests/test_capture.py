"""Capture records the real residual stream: checked against LeRobot's own joint training forward."""

from __future__ import annotations

import pytest
import torch

from vlaprune.core.capture import CaptureConfig, CaptureError, collect_residuals
from vlaprune.core.family import resolve
from vlaprune.families import family_for

from .conftest import TINY_SPECS
from .flow import batch as _batch
from .flow import flow_inputs as _flow_inputs


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_capture_shapes_and_phases(tiny, spec):
    bundle = tiny(spec)
    family = family_for(bundle.policy)
    depths = family.depths(bundle.policy)
    cfg = CaptureConfig(timesteps=(0.8, 0.3))
    gen = torch.Generator().manual_seed(0)
    seen = list(collect_residuals(bundle.policy, family, _batch(bundle), config=cfg, generator=gen))
    assert [(s.stack, s.timestep) for s in seen] == [("vlm", None), ("expert", 0.8), ("expert", 0.3)]
    for rec in seen:
        assert len(rec.states) == depths[rec.stack] + 1
        assert all(s.shape[0] == 3 for s in rec.states)
    vlm = seen[0]
    assert vlm.mask is not None and vlm.mask.shape == vlm.states[0].shape[:2]
    assert not vlm.mask.all(), "language padding should appear in the prefix mask"


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_captured_expert_output_reproduces_lerobot_training_loss(tiny, spec):
    """The captured output of the last expert block, through the final norm and action head, gives
    the same flow-matching loss as LeRobot's joint forward (pi0: the path that never calls blocks)."""
    bundle = tiny(spec)
    policy = bundle.policy
    family = family_for(policy)
    batch = _batch(bundle)
    t = 0.4
    gen = torch.Generator().manual_seed(7)
    recs = list(collect_residuals(policy, family, batch, config=CaptureConfig(timesteps=(t,), seed=7), generator=gen))
    expert_out = recs[-1].states[-1]  # (batch, suffix tokens, width): output of the last expert block

    actions = policy.prepare_action(batch)
    noise = torch.randn(actions.shape, generator=torch.Generator().manual_seed(7))
    time = torch.full((actions.shape[0],), t)
    with torch.no_grad():
        reference = policy.model.forward(*_flow_inputs(policy, batch), actions, noise, time)
        norm = resolve(policy, family.stack("expert").final_norm)
        kwargs = {}
        if spec == "tiny:pi05":  # AdaRMS final norm is conditioned on the time embedding
            kwargs["cond"] = policy.model.embed_suffix(t * noise + (1 - t) * actions, time)[3]
        normed = norm(expert_out, **kwargs)
        normed = normed[0] if isinstance(normed, tuple) else normed
        v_t = policy.model.action_out_proj(normed[:, -policy.config.chunk_size :].float())
        ours = torch.nn.functional.mse_loss(noise - actions, v_t, reduction="none")
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_first_state_is_stack_input(tiny, spec):
    bundle = tiny(spec)
    policy = bundle.policy
    batch = _batch(bundle)
    gen = torch.Generator().manual_seed(0)
    vlm = next(collect_residuals(policy, family_for(policy), batch, config=CaptureConfig(), generator=gen))
    inputs = _flow_inputs(policy, batch)
    with torch.no_grad():
        if spec == "tiny:smolvla":
            embs = policy.model.embed_prefix(*inputs[:4], state=inputs[4])[0]
        else:
            embs = policy.model.embed_prefix(*inputs[:4])[0]
    torch.testing.assert_close(vlm.states[0], embs.to(vlm.states[0].dtype))


def test_nan_activation_names_stack_and_block():
    from vlaprune import load_policy

    bundle = load_policy("tiny:smolvla")
    family = family_for(bundle.policy)
    with torch.no_grad():
        family.layers(bundle.policy, "vlm")[3].mlp.down_proj.weight.fill_(float("nan"))
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(CaptureError, match=r"stack 'vlm': input of block 4 contains NaN"):
        list(collect_residuals(bundle.policy, family, _batch(bundle), config=CaptureConfig(), generator=gen))


def test_capture_config_validation():
    with pytest.raises(ValueError, match="empty"):
        CaptureConfig(timesteps=())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CaptureConfig(timesteps=(1.5,))


def test_hooks_removed_after_capture(tiny):
    bundle = tiny("tiny:smolvla")
    policy = bundle.policy
    family = family_for(policy)
    norms = [blk.input_layernorm for blk in family.layers(policy, "vlm")]
    gen = torch.Generator().manual_seed(0)
    list(collect_residuals(policy, family, _batch(bundle), config=CaptureConfig(), generator=gen))
    assert all(not n._forward_pre_hooks for n in norms)
