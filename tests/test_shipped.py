"""The shipped trained model (``metaworld:smolvla``) and its calibration set load as they were trained."""

from __future__ import annotations

import json

import pytest
import torch

from vlaprune.io.calibration import CalibrationConfig, calibration_batches
from vlaprune.models import shipped
from vlaprune.models.builtin import smolvla
from vlaprune.models.loading import load_policy

from .flow import loss_and_chunk


@pytest.fixture(scope="module")
def bundle():
    return load_policy(shipped.SPEC)


def test_shipped_model_loads_with_exactly_its_stored_weights(bundle):
    from safetensors.torch import load_file

    stored = load_file(shipped.POLICY_DIR / "model.safetensors")
    state = bundle.policy.state_dict()
    assert stored.keys() == state.keys()
    for key, tensor in stored.items():
        assert torch.equal(state[key], tensor), key
    config = bundle.policy.config
    assert (config.type, config.num_vlm_layers, len(bundle.policy.model.vlm_with_expert.lm_expert.layers)) == (
        "smolvla", 12, 12)
    assert config.vlm_model_name == str(smolvla.smolvlm_dir("small"))
    assert bundle.spec == shipped.SPEC


def test_shipped_model_is_trained(bundle, tmp_path):
    """On demonstrations of a pretraining task, the shipped model's flow-matching loss is far below
    an untrained model's of the same architecture (same frames, same noise, same flow time)."""
    from vlaprune.studies import metaworld as mw

    root = tmp_path / "button"
    mw.generate_demos(mw.DemoConfig(tasks=("button-press-topdown-v3",), episodes_per_task=2,
                                    image_size=shipped.IMAGE_SIZE), root, progress=False)
    untrained = smolvla.build_for_dataset("small", root, "local/metaworld", seed=0)

    def loss(b):
        batch = next(calibration_batches(b.policy, b.preprocessor, repo_id="local/metaworld", root=root,
                                         config=CalibrationConfig(16, 16, 0), allow_synthetic=False))
        return loss_and_chunk(b.policy, batch)[0][..., :4].mean()  # the 4 real action dimensions

    trained_loss, untrained_loss = loss(bundle), loss(untrained)
    assert trained_loss < 0.3 * untrained_loss, (trained_loss, untrained_loss)


def test_checkpoint_dir_is_a_stock_lerobot_checkpoint_and_exports_back(tmp_path):
    directory = shipped.policy_dir()
    assert shipped.policy_dir() == directory  # cached
    config = json.loads((directory / "config.json").read_text())
    assert config["vlm_model_name"] == str(smolvla.smolvlm_dir("small"))
    assert shipped.VLM_PLACEHOLDER not in (directory / "policy_preprocessor.json").read_text()
    shipped.export(directory, tmp_path / "exported")  # what benchmarks/metaworld_pretrain.py --ship stores
    for stored in shipped.POLICY_DIR.iterdir():
        assert (tmp_path / "exported" / stored.name).read_bytes() == stored.read_bytes(), stored.name
    names = sorted(p.name for p in shipped.POLICY_DIR.iterdir())
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == names


def test_export_refuses_other_checkpoints(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"type": "pi0"}))
    with pytest.raises(ValueError, match="not a small SmolVLA"):
        shipped.export(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_calibration_set_holds_the_held_out_tasks():
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from vlaprune.studies import metaworld as mw

    meta = LeRobotDatasetMetadata(shipped.CALIBRATION_REPO_ID, root=shipped.CALIBRATION_ROOT)
    assert sorted(meta.tasks.index) == sorted(mw.instruction(t) for t in shipped.HELD_OUT)
    assert meta.total_episodes == 20 and meta.features[mw.IMAGE_KEY]["shape"][0] == shipped.IMAGE_SIZE
    size = sum(p.stat().st_size for p in shipped.ASSETS.rglob("*") if p.is_file())
    assert size <= 30 * 2**20, f"shipped assets take {size / 2**20:.1f} MB, over the 30 MB budget"
