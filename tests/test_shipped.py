"""The shipped trained models load as they were trained: ``metaworld:smolvla-small`` (stored whole) and
``metaworld:smolvla`` (stored as what training changed from the packages' weights)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from vlaprune.io.calibration import CalibrationConfig, calibration_batches
from vlaprune.models import shipped
from vlaprune.models.builtin import smolvla
from vlaprune.models.loading import load_policy

from .flow import loss_and_chunk

SMALL = shipped.get(shipped.SMALL)


@pytest.fixture(scope="module")
def bundle():
    return load_policy(SMALL.spec)


def test_shipped_model_loads_with_exactly_its_stored_weights(bundle):
    from safetensors.torch import load_file

    stored = load_file(SMALL.stored / "model.safetensors")
    state = bundle.policy.state_dict()
    assert stored.keys() == state.keys()
    for key, tensor in stored.items():
        assert torch.equal(state[key], tensor), key
    config = bundle.policy.config
    assert (config.type, config.num_vlm_layers, len(bundle.policy.model.vlm_with_expert.lm_expert.layers)) == (
        "smolvla", 12, 12)
    assert config.vlm_model_name == str(smolvla.smolvlm_dir("small"))
    assert bundle.spec == SMALL.spec


def test_shipped_model_is_trained(bundle, tmp_path):
    """On demonstrations of a pretraining task, the shipped model's flow-matching loss is far below
    an untrained model's of the same architecture (same frames, same noise, same flow time)."""
    from vlaprune.studies import metaworld as mw

    root = tmp_path / "button"
    mw.generate_demos(mw.DemoConfig(tasks=("button-press-topdown-v3",), episodes_per_task=2,
                                    image_size=SMALL.image_size), root, progress=False)
    untrained = smolvla.build_for_dataset("small", root, "local/metaworld", seed=0)

    def loss(b):
        batch = next(calibration_batches(b.policy, b.preprocessor, repo_id="local/metaworld", root=root,
                                         config=CalibrationConfig(16, 16, 0), allow_synthetic=False))
        return loss_and_chunk(b.policy, batch)[0][..., :4].mean()  # the 4 real action dimensions

    trained_loss, untrained_loss = loss(bundle), loss(untrained)
    assert trained_loss < 0.3 * untrained_loss, (trained_loss, untrained_loss)


def test_checkpoint_dir_is_a_stock_lerobot_checkpoint_and_exports_back(tmp_path, monkeypatch):
    directory = shipped.policy_dir(SMALL.spec)
    assert shipped.policy_dir(SMALL.spec) == directory  # cached
    config = json.loads((directory / "config.json").read_text())
    assert config["vlm_model_name"] == str(smolvla.smolvlm_dir("small"))
    assert SMALL.placeholder not in (directory / "policy_preprocessor.json").read_text()
    stored = {p.name: p.read_bytes() for p in SMALL.stored.iterdir()}
    monkeypatch.setattr(shipped, "ASSETS_ROOT", tmp_path)  # export writes under the assets root
    shipped.export(directory, SMALL.spec)  # what benchmarks/metaworld_pretrain.py --ship stores
    assert {p.name: p.read_bytes() for p in SMALL.stored.iterdir()} == stored


def test_export_refuses_other_checkpoints(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"type": "pi0"}))
    monkeypatch.setattr(shipped, "ASSETS_ROOT", tmp_path / "assets")
    with pytest.raises(ValueError, match="not a small SmolVLA"):
        shipped.export(tmp_path / "ckpt", SMALL.spec)
    assert not (tmp_path / "assets").exists()
    with pytest.raises(ValueError, match="not a shipped model; shipped: metaworld:smolvla, metaworld:smolvla-small"):
        shipped.get("metaworld:pi0")


@pytest.mark.parametrize(("spec", "episodes"), [(shipped.SPEC, 160), (shipped.SMALL, 20)])
def test_calibration_set_holds_the_kept_out_tasks(spec, episodes):
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from vlaprune.studies import metaworld as mw

    model = shipped.get(spec)
    meta = LeRobotDatasetMetadata(shipped.CALIBRATION_REPO_ID, root=model.calibration_root)
    assert sorted(meta.tasks.index) == sorted(mw.instruction(t) for t in model.kept_out)
    assert set(model.held_out) <= set(model.kept_out) and len(model.held_out) >= (4 if spec == shipped.SPEC else 2)
    assert meta.total_episodes == episodes and meta.features[mw.IMAGE_KEY]["shape"][0] == model.image_size
    mw.check_tasks(model.held_out)
    # every frame's file is in the package, not only the metadata (a data/ ignore rule once kept the
    # frames of metaworld:smolvla out of the repository)
    frames = pq.read_table(sorted((model.calibration_root / "data").rglob("*.parquet"))).num_rows
    assert frames == meta.total_frames
    for key in meta.video_keys:
        assert list((model.calibration_root / "videos" / key).rglob("*.mp4")), f"{spec}: no video of {key}"


def test_the_small_models_assets_fit_their_budget():
    size = sum(p.stat().st_size for p in SMALL.assets.rglob("*") if p.is_file())
    assert size <= 30 * 2**20, f"shipped assets take {size / 2**20:.1f} MB, over the 30 MB budget"


def test_the_pretrained_based_model_stores_only_what_training_changed_within_budget():
    """``metaworld:smolvla`` in the repository: under 60 MB, no file over 50 MB, and none of the
    packages' text or vision tensors among its stored ones."""
    from vlaprune.io.quantized import load_quantized

    model = shipped.get(shipped.SPEC)
    files = [p for p in model.assets.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 60 * 2**20
    assert all(p.stat().st_size <= 50 * 2**20 for p in files), [p.name for p in files if p.stat().st_size > 50 * 2**20]
    stored, metadata = load_quantized(model.stored / shipped.TRAINED_WEIGHTS)
    assert metadata["start"] == "pretrained:smolvla"
    assert not any(".text_model." in k or ".vision_model." in k for k in stored)
    expert = [k for k in stored if ".lm_expert.layers." in k]
    assert expert and any(".connector." in k for k in stored)
    config = json.loads((model.stored / "config.json").read_text())
    assert config["type"] == "smolvla" and config["vlm_model_name"] == model.placeholder


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_pretrained_based_model_ships_as_what_training_changed(tmp_path, monkeypatch):
    """``metaworld:smolvla``'s storage, on a stand-in for robot pretraining (the trained tensors
    perturbed): only those are stored, and the shipped checkpoint is the packages' weights plus them."""
    from safetensors.torch import load_file

    from vlaprune.io.quantized import load_quantized
    from vlaprune.studies.train import as_stock_smolvla

    start = smolvla.build_for_dataset("pretrained", SMALL.calibration_root, shipped.CALIBRATION_REPO_ID, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in start.policy.parameters():
            if p.requires_grad:  # what robot pretraining trains: connector, projections, expert
                p.add_(torch.randn(p.shape, generator=g) * p.std().clamp_min(1e-3) * 0.1)
    checkpoint = tmp_path / "trained"
    for part in (start.policy, start.preprocessor, start.postprocessor):
        part.save_pretrained(checkpoint)
    as_stock_smolvla(checkpoint)
    trained = load_file(str(checkpoint / "model.safetensors"))

    monkeypatch.setattr(shipped, "ASSETS_ROOT", tmp_path / "assets")
    shipped.export(checkpoint, shipped.SPEC, seed=0)
    model = shipped.get(shipped.SPEC)
    stored, metadata = load_quantized(model.stored / shipped.TRAINED_WEIGHTS)
    trainable = {n for n, p in start.policy.named_parameters() if p.requires_grad}
    assert stored.keys() == trainable and metadata["seed"] == "0"
    assert not any(".text_model." in k or ".vision_model." in k for k in stored)
    assert "model.safetensors" not in {p.name for p in model.stored.iterdir()}

    loaded = load_policy(shipped.SPEC)
    state = loaded.policy.state_dict()
    assert state.keys() == trained.keys()
    for key, tensor in trained.items():
        if key in stored:
            assert torch.equal(state[key], stored[key]), key
            step = tensor.abs().amax(dim=-1, keepdim=True) / 127 if tensor.ndim == 2 else 0.0
            assert ((state[key] - tensor).abs() <= step * 0.502 + 1e-7).all(), key
        else:  # the packages' text and vision weights, the seeded rest: exactly as trained
            assert torch.equal(state[key], tensor), key

    # a checkpoint that trained a text layer cannot be stored this way: refused, nothing written
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in checkpoint.iterdir():
        (bad / path.name).write_bytes(path.read_bytes())
    key = "model.vlm_with_expert.vlm.model.text_model.layers.3.mlp.up_proj.weight"
    from safetensors.torch import save_file

    save_file({**trained, key: trained[key] + 1e-3}, str(bad / "model.safetensors"))
    before = {p.name: p.read_bytes() for p in model.stored.iterdir()}
    with pytest.raises(ValueError, match=r"changed 1 tensors the packages give \(e.g. " + key.replace(".", r"\.")):
        shipped.export(bad, shipped.SPEC)
    assert {p.name: p.read_bytes() for p in model.stored.iterdir()} == before
    assert not (model.stored.parent / "policy.partial").exists()
