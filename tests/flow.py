"""Shared helpers: a preprocessed synthetic batch, and the inputs of LeRobot's flow-matching forward."""

from __future__ import annotations

import torch

from vlaprune.io.calibration import CalibrationConfig, synthetic_batches
from vlaprune.models.builtin.common import ACTION_KEY, CAMERA_KEY, STATE_KEY

TASKS = ["pick up the cube", "open the drawer"]


def batch(bundle, n=3, seed=0):
    raw = next(synthetic_batches(bundle.policy.config, CalibrationConfig(num_samples=n, batch_size=n, seed=seed)))
    return bundle.preprocessor(raw)


def flow_inputs(policy, batch):
    """The positional inputs of the family's ``model.forward`` (LeRobot's joint training path)."""
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

    lang = (batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK])
    if policy.config.type.startswith("smolvla"):
        images, masks = policy.prepare_images(batch)
        return (images, masks, *lang, policy.prepare_state(batch))
    images, masks = policy._preprocess_images(batch)
    if policy.config.type.startswith("pi05"):  # pi0.5 writes the state into the prompt
        return (images, masks, *lang)
    return (images, masks, *lang, policy.prepare_state(batch))



def fixed_noise_time(policy, batch_, t=0.4, seed=7):
    """Padded actions, seeded noise and a constant flow time for ``policy.model.forward``."""
    actions = policy.prepare_action(batch_)
    noise = torch.randn(actions.shape, generator=torch.Generator().manual_seed(seed))
    return actions, noise, torch.full((actions.shape[0],), t)


@torch.no_grad()
def loss_and_chunk(policy, batch_, seed=7):
    """LeRobot's per-element flow-matching loss and a sampled action chunk, both with fixed noise."""
    inputs = flow_inputs(policy, batch_)
    actions, noise, time = fixed_noise_time(policy, batch_, seed=seed)
    loss = policy.model.forward(*inputs, actions, noise, time)
    chunk = policy.model.sample_actions(*inputs, noise=noise)
    return loss, chunk


def raw_batch(chunk_size: int, *, with_action: bool = True, batch: int = 2) -> dict:
    """A raw (unnormalised, untokenised) batch as a LeRobot dataset would give it."""
    gen = torch.Generator().manual_seed(1)
    out = {
        CAMERA_KEY: torch.rand(batch, 3, 96, 96, generator=gen),  # (batch, channels, H, W) in [0, 1]
        STATE_KEY: torch.randn(batch, 6, generator=gen),
        "task": TASKS[:batch],
    }
    if with_action:
        out[ACTION_KEY] = torch.randn(batch, chunk_size, 6, generator=gen)  # (batch, chunk, action)
    return out


def assert_matches_skipped(source, pruned, removed, outputs, data):
    """``pruned``'s (loss, chunk) from ``outputs(policy, data)`` equal the ``source`` policy's with the
    ``removed`` blocks (original indices per stack) skipped; returns the pruned outputs."""
    from vlaprune.core.surgery import skip_blocks
    from vlaprune.families import family_for

    with skip_blocks(source, family_for(source), removed):
        ref_loss, ref_chunk = outputs(source, data)
    loss, chunk = outputs(pruned, data)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunk, ref_chunk, rtol=1e-5, atol=1e-6)
    return loss, chunk


def groot_loss_and_chunk(policy, data, seed=3):
    """GR00T N1.7's masked flow loss at three times and a sampled chunk, both from fixed noise, through the
    family's runner (which reproduces ``GR00TN17``'s own, tests/test_groot.py)."""
    from vlaprune.core.family import action_chunk, flow_loss
    from vlaprune.families import family_for

    family = family_for(policy)
    head = policy._groot_model.action_head
    shape = (data["state"].shape[0], head.action_horizon, head.action_dim)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    time = torch.tensor([0.2, 0.5, 0.8])
    return flow_loss(family, policy, data, noise, time), action_chunk(family, policy, data, noise)
