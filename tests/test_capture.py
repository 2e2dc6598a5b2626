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
    prefix = [(name, None) for name in family.prefix_stacks]
    assert [(s.stack, s.timestep) for s in seen] == [*prefix, ("expert", 0.8), ("expert", 0.3)]
    cameras = len(bundle.policy.config.image_features)
    for rec in seen:
        assert len(rec.states) == depths[rec.stack] + 1
        # a vision stack runs once per camera image: its states stack every image of the batch
        examples = 3 * cameras if family.stack(rec.stack).per_image else 3
        assert all(s.shape[0] == examples for s in rec.states), rec.stack
        assert (rec.mask is None) == (family.stack(rec.stack).per_image or rec.timestep is not None)
    vlm = next(rec for rec in seen if rec.stack == "vlm")
    assert vlm.mask is not None and vlm.mask.shape == vlm.states[0].shape[:2]
    assert not vlm.mask.all(), "language padding should appear in the prefix mask"


def test_vision_states_are_each_cameras_encoder_stream(tiny):
    """The vision stack's states are, camera by camera, the residual stream of SmolVLA's vision encoder:
    its first state the patch embeddings, its last the encoder output that the final norm turns into
    the tower's output."""
    bundle = tiny("tiny:smolvla")
    policy = bundle.policy
    family = family_for(policy)
    data = _batch(bundle)
    gen = torch.Generator().manual_seed(0)
    vision = next(collect_residuals(policy, family, data, config=CaptureConfig(), generator=gen))
    assert vision.stack == "vision" and vision.mask is None
    images, _ = policy.prepare_images(data)
    tower = policy.model.vlm_with_expert.get_vlm_model().vision_model
    patch = tower.config.patch_size
    with torch.no_grad():
        embedded = torch.cat([tower.embeddings(pixel_values=img, patch_attention_mask=torch.ones(
            img.shape[0], img.shape[2] // patch, img.shape[3] // patch, dtype=torch.bool)) for img in images])
        encoded = torch.cat([tower(pixel_values=img).last_hidden_state for img in images])
        normed = tower.post_layernorm(vision.states[-1])
    torch.testing.assert_close(vision.states[0], embedded)
    torch.testing.assert_close(normed, encoded)


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
    vlm = next(rec for rec in collect_residuals(policy, family_for(policy), batch, config=CaptureConfig(),
                                                generator=gen) if rec.stack == "vlm")
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
