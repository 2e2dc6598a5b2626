"""``vlaprune bench``: both policies timed in one process, ratios and the measured ceiling."""

from __future__ import annotations

import pytest

from vlaprune import load_policy
from vlaprune.core.timing import removed_time_share, union_length
from vlaprune.families import family_for
from vlaprune.pipelines.config import BenchConfig, DatasetArgs, PolicyArgs, PrunedArgs
from vlaprune.pipelines.prune import run_prune

from .flow import batch
from .test_prune import _cfg


def test_union_length_merges_overlaps():
    assert union_length([[0, 1], [0.5, 2], [3, 4], [3.2, 3.5]]) == pytest.approx(3.0)
    assert union_length([]) == 0.0


def test_removed_time_share_bounds(tiny):
    bundle = tiny("tiny:smolvla")
    policy = bundle.policy
    family = family_for(policy)
    data = batch(bundle, n=2)
    device = next(policy.parameters()).device

    def run():
        policy.eval()
        policy.reset()
        policy.select_action({k: v for k, v in data.items() if not k.startswith("action")})

    none = removed_time_share(policy, family, {"vlm": [], "expert": []}, run, device)
    some = removed_time_share(policy, family, {"vlm": [1, 2], "expert": [1, 2]}, run, device)
    every = removed_time_share(policy, family, {"vlm": list(range(8)), "expert": list(range(8))}, run, device)
    assert none == 0.0 and 0.0 < some < every <= 1.0


def test_bench_in_memory_plan(tmp_path):
    from vlaprune.io.report import bench_table
    from vlaprune.pipelines.bench import run_bench

    result = run_bench(BenchConfig(policy=PolicyArgs(path="tiny:smolvla"), ratio=0.5, rounds=1))
    for key in ("train_step_ratio", "inference_ratio", "ideal_train_ratio", "ideal_inference_ratio",
                "train_efficiency", "inference_efficiency", "flop_inference_ratio"):
        assert result[key] == result[key], key  # not nan
    assert 0 < result["ideal_inference_ratio"] < 1 and 0 < result["flop_inference_ratio"] < 1
    assert result["pruned"]["parameters"]["total"] < result["full"]["parameters"]["total"]
    assert len(result["full"]["chunk_runs_s"]) == 1
    assert "action chunk (s)" in bench_table(result)


def test_bench_against_a_pruned_checkpoint(tmp_path):
    from vlaprune.pipelines.bench import run_bench

    run_prune(_cfg(tmp_path / "p", "tiny:pi0"))
    result = run_bench(BenchConfig(policy=PolicyArgs(path="tiny:pi0"), pruned=PrunedArgs(path=str(tmp_path / "p")),
                                   rounds=1, train_batch_size=0))
    assert "train_step_ratio" not in result and result["inference_ratio"] > 0
    assert result["kept"]["vlm"] == result["kept"]["expert"] and len(result["kept"]["vlm"]) == 4
    with pytest.raises(ValueError, match="compare a policy with its own pruned checkpoint"):
        run_bench(BenchConfig(policy=PolicyArgs(path="tiny:smolvla"), pruned=PrunedArgs(path=str(tmp_path / "p"))))


def test_bench_input_errors():
    import torch

    with pytest.raises(ValueError, match=r"either --pruned\.path"):
        BenchConfig(policy=PolicyArgs(path="tiny:smolvla")).validate()
    if torch.cuda.is_available():
        return
    with pytest.raises(ValueError, match="no CUDA device"):
        BenchConfig(policy=PolicyArgs(path="tiny:smolvla", device="cuda"), ratio=0.5).validate()


def test_bench_everything_trainable():
    from vlaprune.pipelines.bench import run_bench

    result = run_bench(BenchConfig(policy=PolicyArgs(path="tiny:smolvla"), ratio=0.25, rounds=1, warmup=0,
                                   trainable="all"))
    for name in ("full", "pruned"):
        params = result[name]["parameters"]
        assert params["trainable"] == params["total"]
    assert result["trainable_set"] == "all"
    parts = result["full"]["chunk_linear_flops_by_part"]
    assert set(parts) == {"vision", "vlm", "expert", "other"} and all(v > 0 for v in parts.values())
    assert result["pruned"]["chunk_linear_flops_by_part"]["other"] == parts["other"]  # only stacks shrink


def test_out_of_memory_names_the_batch_size_that_fits(monkeypatch):
    import torch

    import vlaprune.pipelines.bench as bench

    real_step = bench.train_step

    def step(policy, batch, optimizer):
        if len(batch["task"]) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        real_step(policy, batch, optimizer)

    monkeypatch.setattr(bench, "train_step", step)
    with pytest.raises(ValueError, match=r"--train_batch_size=8 does not fit in memory; --train_batch_size=2 fits"):
        bench.run_bench(BenchConfig(policy=PolicyArgs(path="tiny:smolvla"), ratio=0.5, rounds=1,
                                    train_batch_size=8))
    assert bench.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ..."))
    assert not bench.is_out_of_memory(RuntimeError("shape mismatch"))


def test_bench_with_three_cameras():
    from vlaprune.pipelines.bench import run_bench

    one = run_bench(BenchConfig(policy=PolicyArgs(path="tiny:pi0"), ratio=0.5, rounds=1, warmup=0,
                                train_batch_size=0))
    three = run_bench(BenchConfig(policy=PolicyArgs(path="tiny:pi0"), ratio=0.5, rounds=1, warmup=0,
                                  train_batch_size=0, cameras=3))
    assert one["cameras"] == 1 and three["cameras"] == 3
    # the vision encoder runs once per camera: its FLOPs triple
    vision = [r["full"]["chunk_linear_flops_by_part"]["vision"] for r in (one, three)]
    assert vision[1] == 3 * vision[0]
    with pytest.raises(ValueError, match="--cameras=2"):
        BenchConfig(policy=PolicyArgs(path="x"), ratio=0.5, cameras=2, dataset=DatasetArgs(repo_id="a/b")).validate()


def test_bench_expert_only_training_and_frame_size():
    from vlaprune.pipelines.bench import run_bench

    result = run_bench(BenchConfig(policy=PolicyArgs(path="tiny:pi0"), ratio=0.5, rounds=1, warmup=0,
                                   trainable="expert", image_size=40))
    assert result["trainable_set"] == "expert" and result["shared_weights"]
    assert result["image_size"] == [[40, 40]]
    for name in ("full", "pruned"):
        params = result[name]["parameters"]
        assert 0 < params["trainable"] < params["total"]
    # only the action head trains: pruning removes trainable expert blocks, and frozen VLM blocks
    full, pruned = result["full"]["parameters"], result["pruned"]["parameters"]
    assert pruned["trainable"] < full["trainable"]
    assert full["total"] - full["trainable"] > pruned["total"] - pruned["trainable"]
    with pytest.raises(ValueError, match="--image_size=64"):
        BenchConfig(policy=PolicyArgs(path="x"), ratio=0.5, image_size=64,
                    dataset=DatasetArgs(repo_id="a/b")).validate()
    with pytest.raises(ValueError, match="choose default, expert or all"):
        BenchConfig(policy=PolicyArgs(path="x"), ratio=0.5, trainable="vlm").validate()


def test_set_trainable_expert_freezes_the_backbone_only():
    from vlaprune.core.family import resolve
    from vlaprune.pipelines.bench import set_trainable

    bundle = load_policy("tiny:pi0")
    policy, family = bundle.policy, family_for(bundle.policy)
    set_trainable(policy, family, "expert")
    backbone = {id(p) for path in family.backbone for p in resolve(policy, path).parameters()}
    assert backbone
    for p in policy.parameters():
        assert p.requires_grad == (id(p) not in backbone)
