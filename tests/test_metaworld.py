"""MetaWorld demonstrations: LeRobot's env, its frames and instructions, clean restarts, clear errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from vlaprune.studies import metaworld as mw
from vlaprune.studies.train import lerobot_train


def _small(**kw):
    return mw.DemoConfig(**{"tasks": ("reach-v3",), "episodes_per_task": 2, "image_size": 32, "max_steps": 150, **kw})


def test_demonstrations_are_lerobot_env_frames(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    summary = mw.generate_demos(_small(), tmp_path / "demos", progress=False)
    assert summary.episodes == {"reach-v3": 2} and summary.attempts["reach-v3"] >= 2
    ds = LeRobotDataset("local/metaworld", root=tmp_path / "demos")
    assert ds.num_episodes == 2 and len(ds) == summary.frames
    first = ds[0]
    assert first["task"] == mw.instruction("reach-v3") == "Reach a goal position"
    assert tuple(first[mw.IMAGE_KEY].shape) == (3, 32, 32)
    assert first["action"].abs().max() <= 1.0

    # the first frame is what LeRobot's env shows after reset with the episode's seed (upright corner2)
    env = mw.make_env("reach-v3", 32)
    try:
        obs, _ = env.reset(seed=mw.DEMO_SEED_BASE)
    finally:
        mw.close_env(env)
    stored = (first[mw.IMAGE_KEY].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(stored, obs["pixels"])
    np.testing.assert_allclose(first[mw.STATE_KEY].numpy(), obs["agent_pos"].astype(np.float32))


@pytest.mark.slow
def test_video_demonstrations_are_the_same_episodes_smaller(tmp_path):
    """``video=True`` records the same episodes (same seeds, states, actions) with frames as AV1 video:
    lossy but close, and much smaller than PNG frames."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from vlaprune.io.calibration import video_backend

    config = _small(episodes_per_task=1, image_size=64)
    mw.generate_demos(config, tmp_path / "png", progress=False)
    mw.generate_demos(replace(config, video=True), tmp_path / "video", progress=False)
    png = LeRobotDataset("local/metaworld", root=tmp_path / "png")
    video = LeRobotDataset("local/metaworld", root=tmp_path / "video", video_backend=video_backend())
    assert len(png) == len(video) and video.meta.features[mw.IMAGE_KEY]["dtype"] == "video"
    for i in (0, len(png) // 2, len(png) - 1):
        a, b = png[i], video[i]
        assert torch.equal(a["action"], b["action"]) and torch.equal(a[mw.STATE_KEY], b[mw.STATE_KEY])
        assert (a[mw.IMAGE_KEY] - b[mw.IMAGE_KEY]).abs().mean() < 0.03  # of a [0, 1] range

    def size(root):
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "meta" not in p.parts)

    assert size(tmp_path / "video") * 5 < size(tmp_path / "png")


def test_interrupted_run_restarts_cleanly(tmp_path):
    partial = tmp_path / "demos.partial"
    partial.mkdir()
    (partial / "stale.txt").write_text("left by a killed run")
    mw.generate_demos(_small(episodes_per_task=1), tmp_path / "demos", progress=False)
    assert not partial.exists() and not (tmp_path / "demos" / "stale.txt").exists()
    with pytest.raises(FileExistsError, match="overwrite"):
        mw.generate_demos(_small(episodes_per_task=1), tmp_path / "demos", progress=False)


def test_per_task_demonstrations_resume_and_record_failures(tmp_path, monkeypatch):
    """One dataset per task, each recorded as it ends; a rerun redoes only what is not recorded, a task
    whose expert fails is recorded with its error, other settings under the same root are refused."""
    import json

    config = _small(tasks=("reach-v3", "button-press-topdown-v3"), episodes_per_task=1)
    first = mw.generate_task_demos(config, tmp_path, progress=False)
    assert {t: r["episodes"] for t, r in first.items()} == {"reach-v3": 1, "button-press-topdown-v3": 1}
    assert (tmp_path / "reach-v3" / "meta" / "info.json").is_file()
    lines = (tmp_path / "tasks.jsonl").read_text().splitlines()
    (tmp_path / "tasks.jsonl").write_text(lines[0] + "\n" + lines[1][:10])  # the second record torn
    calls = []
    real = mw.generate_demos
    monkeypatch.setattr(mw, "generate_demos", lambda c, *a, **k: calls.append(c.tasks) or real(c, *a, **k))
    again = mw.generate_task_demos(config, tmp_path, progress=False)
    assert calls == [("button-press-topdown-v3",)]  # reach-v3 was recorded: not redone
    assert again["button-press-topdown-v3"]["episodes"] == 1
    # seeds as in one run over both tasks: the second task is task index 1
    assert json.loads((tmp_path / "tasks.jsonl").read_text().splitlines()[-1])["settings"]["first_task_index"] == 0
    with pytest.raises(ValueError, match="use another root"):
        mw.generate_task_demos(_small(tasks=("reach-v3",), episodes_per_task=2), tmp_path, progress=False)
    failing = mw.generate_task_demos(_small(tasks=("reach-v3",), max_steps=1, max_attempts_per_task=2),
                                     tmp_path / "f", progress=False)
    assert "raise max_steps" in failing["reach-v3"]["error"] and not (tmp_path / "f" / "reach-v3").exists()

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    combined = mw.combine_task_demos(tmp_path, config.tasks, tmp_path / "both")
    dataset = LeRobotDataset("local/metaworld", root=combined)
    assert dataset.num_episodes == 2 and len(dataset.meta.tasks) == 2
    with pytest.raises(FileNotFoundError, match=r"no demonstrations of \['push-v3'\]"):
        mw.combine_task_demos(tmp_path, ["push-v3"], tmp_path / "none")


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown MetaWorld task\(s\) \['open-the-fridge'\].*reach-v3"):
        mw.generate_demos(_small(tasks=("open-the-fridge",)), tmp_path / "x", progress=False)
    with pytest.raises(RuntimeError, match="raise max_steps"):
        mw.generate_demos(_small(max_steps=1, max_attempts_per_task=2), tmp_path / "y", progress=False)
    assert not (tmp_path / "y").exists() and not (tmp_path / "y.partial").exists()


@pytest.mark.slow  # 15 s; test_demo trains the shipped SmolVLA on MetaWorld data with lerobot-train too
def test_small_smolvla_for_the_demonstrations_trains_with_lerobot_train(tmp_path):
    """The start of the quality study: an untrained small SmolVLA (12 + 12 layers) built for the
    MetaWorld dataset's features and statistics, saved, and trained by stock ``lerobot-train``."""
    from vlaprune.families import family_for
    from vlaprune.models.builtin import smolvla

    root = tmp_path / "demos"
    mw.generate_demos(_small(episodes_per_task=1, image_size=64), root, progress=False)
    bundle = smolvla.build_for_dataset("small", root, "local/metaworld", seed=0)
    depths = family_for(bundle.policy).depths(bundle.policy)
    assert (depths["vlm"], depths["expert"]) == (12, 12)
    assert set(bundle.policy.config.input_features) == {mw.IMAGE_KEY, mw.STATE_KEY}
    assert all(p.requires_grad for p in bundle.policy.parameters())  # from scratch: the VLM trains too
    start = tmp_path / "start"
    bundle.policy.save_pretrained(start)
    bundle.preprocessor.save_pretrained(start)
    bundle.postprocessor.save_pretrained(start)

    trained = lerobot_train(start, repo_id="local/metaworld", root=root, out=tmp_path / "train", steps=2, batch_size=2,
                            num_workers=0).checkpoint
    assert (trained / "model.safetensors").is_file()
    from safetensors.torch import load_file

    before, after = bundle.policy.state_dict(), load_file(trained / "model.safetensors")
    vlm_key = next(k for k in after if ".text_model.layers.0.mlp.up_proj.weight" in k)
    assert not torch.equal(before[vlm_key], after[vlm_key]), "lerobot-train left the VLM frozen"


def test_rollout_counts_the_experts_successes():
    env = mw.make_env("reach-v3", 32)
    try:
        def expert(_obs, raw_obs, env):
            return env.expert_policy.get_action(raw_obs)

        def idle(_obs, _raw_obs, _env):
            return np.zeros(4, dtype=np.float32)

        ok, steps = mw.rollout(env, expert, mw.EVAL_SEED_BASE, 150)
        assert ok and 0 < steps < 150
        assert mw.rollout(env, idle, mw.EVAL_SEED_BASE, 20) == (False, 20)
    finally:
        mw.close_env(env)


def _recording(env, log):
    """Record every action ``env`` steps with, under the seed of its last reset."""
    reset, step = env.reset, env._env.step
    current = {}

    def recorded_reset(*, seed):
        current["seed"] = seed
        log[seed] = []
        return reset(seed=seed)

    def recorded_step(action):
        log[current["seed"]].append(np.array(action))
        return step(action)

    env.reset, env._env.step = recorded_reset, recorded_step
    return env


def test_batched_evaluation_replays_lerobot_evals_one_env_loop(tmp_path, monkeypatch):
    """Episodes evaluated side by side take, action by action, the actions of lerobot-eval's loop: one
    env, ``select_action`` (a new chunk when its queue is empty), torch's generator seeded per episode."""
    from lerobot.envs.utils import preprocess_observation

    from vlaprune.models.builtin import smolvla

    root = tmp_path / "demos"
    mw.generate_demos(_small(episodes_per_task=1, image_size=32), root, progress=False)
    bundle = smolvla.build_for_dataset("small", root, "local/metaworld", seed=0)
    policy, pre, post = bundle.policy, bundle.preprocessor, bundle.postprocessor
    policy.eval()
    episodes, max_steps = 3, 23  # 2 chunks and a part of a third (n_action_steps 10)

    def select_action(obs, _raw_obs, env):
        observation = preprocess_observation({"pixels": obs["pixels"][None], "agent_pos": obs["agent_pos"][None]})
        observation["task"] = [env.task_description]
        with torch.inference_mode():
            return post(policy.select_action(pre(observation))).numpy()[0]

    reference: dict[int, list[np.ndarray]] = {}
    env = _recording(mw.make_env("reach-v3", 32), reference)
    try:
        for k in range(episodes):
            seed = mw.EVAL_SEED_BASE + k
            policy.reset()
            torch.manual_seed(seed)
            mw.rollout(env, select_action, seed, max_steps)
    finally:
        mw.close_env(env)

    batched: dict[int, list[np.ndarray]] = {}
    make_env = mw.make_env
    monkeypatch.setattr(mw, "make_env", lambda task, size: _recording(make_env(task, size), batched))
    result = mw.evaluate(policy, pre, post, ["reach-v3"], episodes_per_task=episodes, image_size=32,
                         max_steps=max_steps, batch_size=2, progress=False)
    assert sorted(batched) == sorted(reference) == [mw.EVAL_SEED_BASE + k for k in range(episodes)]
    for seed, actions in reference.items():
        assert len(batched[seed]) == len(actions) == max_steps
        np.testing.assert_allclose(np.stack(batched[seed]), np.stack(actions), rtol=0, atol=1e-5)
    assert len(set(map(lambda a: a[0].tobytes(), reference.values()))) == episodes  # the seeds matter
    task = result["tasks"]["reach-v3"]
    assert task["episodes"] == episodes and task["steps"] == [max_steps] * episodes
    assert result["success_rate"] == task["success_rate"] == task["successes"] / episodes


def test_an_episode_leaves_the_batch_when_it_succeeds():
    class Env:
        task_description = "t"

        def __init__(self, succeed_at):
            self.succeed_at, self.steps = succeed_at, 0
            self._env = self

        def reset(self, *, seed):
            return {"pixels": 0, "agent_pos": 0}, {}

        def step(self, action):
            self.steps += 1
            return None, 0.0, False, False, {"success": self.steps == self.succeed_at}

        def _format_raw_obs(self, raw):
            return {"pixels": 0, "agent_pos": 0}

    asked = []

    def act(observations, envs, noise):
        asked.append(len(envs))
        return np.zeros((len(envs), 4, 4))

    envs = [Env(3), Env(6), Env(100)]
    results = mw._episodes(envs, [1, 2, 3], act, (1, 5, 2), 9)
    assert results == [(True, 3), (True, 6), (False, 9)]
    assert asked == [3, 2, 1]  # chunks at steps 1, 5, 9: the finished episodes no longer asked
    assert [e.steps for e in envs] == [3, 6, 9]


def test_frames_stay_rendered_after_another_env_is_freed():
    """Freeing an env's renderer (close, or the garbage collector) releases the thread's EGL context;
    frames of an env created before that would then be silently black (it happened to every task
    after the first one of a process)."""
    import gc

    first = mw.make_env("reach-v3", 32)
    mw.close_env(first)
    second = mw.make_env("reach-v3", 32)
    del first
    gc.collect()
    frames: list[np.ndarray] = []

    def idle(obs, _raw, _env):
        frames.append(obs["pixels"])
        return np.zeros(4, dtype=np.float32)

    try:
        mw.rollout(second, idle, seed=0, max_steps=3)
    finally:
        mw.close_env(second)
    assert len(frames) == 3 and all(f.any() for f in frames)


def test_every_task_of_a_run_has_real_frames(tmp_path):
    """Each task's episodes are rendered, not only the first task's (see the test above)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    mw.generate_demos(_small(tasks=("reach-v3", "button-press-topdown-v3"), episodes_per_task=1), tmp_path / "d",
                      progress=False)
    ds = LeRobotDataset("local/metaworld", root=tmp_path / "d")
    last = {int(ds[i]["episode_index"]): ds[i][mw.IMAGE_KEY] for i in range(len(ds))}
    assert sorted(last) == [0, 1] and all(frame.mean() > 0.1 for frame in last.values())
