"""``smolvla_connector``: robot pretraining on a pretrained VLM trains the new connector with the
expert, never a pretrained text or vision layer; its checkpoints become stock ``smolvla`` ones."""

from __future__ import annotations

import json

import pytest
import torch

from vlaprune import load_policy
from vlaprune.studies.train import as_stock_smolvla, lerobot_train

from .flow import batch
from .lerobot_data import make_dataset


def _connector_policy(bundle):
    from lerobot_policy_vlaprune import SmolVLAConnectorConfig, SmolVLAConnectorPolicy
    from lerobot_policy_vlaprune.pruned import config_as

    config = config_as(SmolVLAConnectorConfig, bundle.policy.config)
    policy = SmolVLAConnectorPolicy(config)
    policy.load_state_dict(bundle.policy.state_dict())
    return policy


def _groups(policy):
    vlm = policy.model.vlm_with_expert.get_vlm_model()
    connector = {id(p) for p in vlm.connector.parameters()}
    pretrained = [p for p in vlm.parameters() if id(p) not in connector]
    return list(vlm.connector.parameters()), pretrained, list(policy.model.vlm_with_expert.lm_expert.parameters())


def test_only_the_connector_of_the_vlm_trains(tiny):
    source = tiny("tiny:smolvla")
    policy = _connector_policy(source)
    connector, pretrained, expert = _groups(policy)
    assert connector and all(p.requires_grad for p in connector)
    assert pretrained and not any(p.requires_grad for p in pretrained)
    assert all(p.requires_grad for p in expert)
    before = {name: t.clone() for name, t in policy.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    policy.train()
    loss, _ = policy.forward(batch(source))
    loss.backward()
    optimizer.step()
    after = policy.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(".connector." in name for name in changed)
    assert any("lm_expert" in name for name in changed)
    assert not [n for n in changed if ".text_model." in n or ".vision_model." in n]


def test_the_type_refuses_a_trainable_vlm():
    from lerobot_policy_vlaprune import SmolVLAConnectorConfig

    with pytest.raises(ValueError, match=r"train_expert_only=False .* use the stock smolvla type"):
        SmolVLAConnectorConfig(train_expert_only=False, device="cpu")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stock_lerobot_train_trains_it_and_the_checkpoint_becomes_stock_smolvla(tiny, tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, episodes=3, frames=15)
    source = tiny("tiny:smolvla")
    start = tmp_path / "start"
    policy = _connector_policy(source)
    policy.save_pretrained(start)
    source.preprocessor.save_pretrained(start)
    source.postprocessor.save_pretrained(start)
    assert json.loads((start / "config.json").read_text())["type"] == "smolvla_connector"
    run = lerobot_train(start, repo_id="local/calib", root=root, out=tmp_path / "train", steps=2, batch_size=2,
                        num_workers=0, lr=1e-2)
    assert json.loads((run.checkpoint / "config.json").read_text())["type"] == "smolvla_connector"
    trained = load_policy(str(as_stock_smolvla(run.checkpoint))).policy
    assert type(trained).__name__ == "SmolVLAPolicy"
    before, after = source.policy.state_dict(), trained.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(".connector." in n for n in changed) and any("lm_expert" in n for n in changed)
    assert not [n for n in changed if ".text_model." in n or ".vision_model." in n]
