"""``load_policy``: built-ins, local checkpoints reloaded exactly, mismatched weights refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlaprune import load_policy
from vlaprune.io.calibration import CalibrationConfig, synthetic_batches


def _save(bundle, directory):
    bundle.policy.save_pretrained(directory)
    bundle.preprocessor.save_pretrained(directory)
    bundle.postprocessor.save_pretrained(directory)


def _loss(bundle, seed=0):
    raw = next(synthetic_batches(bundle.policy.config, CalibrationConfig(num_samples=2, batch_size=2, seed=seed)))
    batch = bundle.preprocessor(raw)
    actions = bundle.policy.prepare_action(batch)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(actions.shape, generator=gen)
    time = torch.full((actions.shape[0],), 0.5)
    with torch.no_grad():
        return bundle.policy.forward(batch, noise=noise, time=time)[0]


def test_unknown_builtin_lists_choices():
    with pytest.raises(ValueError, match="built-in policies: tiny:smolvla"):
        load_policy("tiny:act")


def test_missing_directory_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_policy(str(tmp_path / "nope"))


def test_local_checkpoint_reloads_to_identical_outputs(tmp_path):
    source = load_policy("tiny:smolvla")
    _save(source, tmp_path / "ckpt")
    loaded = load_policy(str(tmp_path / "ckpt"))
    for key, value in source.policy.state_dict().items():
        assert torch.equal(value, loaded.policy.state_dict()[key]), key
    assert torch.equal(_loss(source), _loss(loaded))


def test_checkpoint_with_missing_weights_is_refused(tmp_path):
    source = load_policy("tiny:smolvla")
    directory = tmp_path / "ckpt"
    _save(source, directory)
    weights = load_file(directory / "model.safetensors")
    dropped = [k for k in weights if ".lm_expert.layers.7." in k]
    assert dropped
    save_file({k: v for k, v in weights.items() if k not in dropped}, directory / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing .*Loading it would leave random weights"):
        load_policy(str(directory))


def test_unsupported_policy_type_lists_supported(tmp_path):
    from lerobot.policies.act.configuration_act import ACTConfig

    directory = tmp_path / "act"
    ACTConfig().save_pretrained(directory)
    with pytest.raises(ValueError, match=r"supported types: .*smolvla"):
        load_policy(str(directory))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(tmp_path, bad):
    from vlaprune.pipelines.config import DatasetArgs, PolicyArgs, PruneConfig
    from vlaprune.pipelines.prune import run_prune

    source = load_policy("tiny:smolvla")
    directory = tmp_path / "ckpt"
    _save(source, directory)
    weights = load_file(directory / "model.safetensors")
    key = next(k for k in weights if k.endswith("lm_expert.layers.3.mlp.down_proj.weight"))
    weights[key][0, 0] = bad
    save_file(weights, directory / "model.safetensors")
    with pytest.raises(ValueError, match=rf"tensor '{key}' holds 1 NaN or Inf value"):
        load_policy(str(directory))
    cfg = PruneConfig(policy=PolicyArgs(path=str(directory)), dataset=DatasetArgs(repo_id="local/x"), ratio=0.5,
                      out=str(tmp_path / "p"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        run_prune(cfg)
    assert not (tmp_path / "p").exists()
