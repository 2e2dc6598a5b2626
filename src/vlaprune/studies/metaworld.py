"""MetaWorld through LeRobot 0.6.1's own environment, rendered fast on the CPU: scripted
demonstrations into a LeRobotDataset, and closed-loop success of a policy.

Frames come from LeRobot's ``MetaworldEnv`` (camera ``corner2``, flipped upright as LeRobot does,
4-d ``agent_pos``), so a policy trained on these demonstrations sees in evaluation the observation
a LeRobot user's ``lerobot-eval --env.type=metaworld`` gives it, and :func:`evaluate` runs a policy
the way ``lerobot-eval`` does (same observation conversion, task text and processors). Actions of
the demonstrations come from MetaWorld's scripted expert for the task (LeRobot's
``TASK_POLICY_MAPPING``); only successful episodes are kept.
Instructions are LeRobot's ``TASK_DESCRIPTIONS`` (the ``task`` string its evaluation feeds the
policy), e.g. "Open a drawer" for ``drawer-open-v3``.

Rendering: MuJoCo's defaults (480 × 480, shadows, reflections, 4× multisampling) take about 70 ms a
frame on this 2-core CPU. :func:`fast_rendering` renders at the dataset's size with multisampling,
shadows and reflections switched off in the model (``vis.quality``, ``light_castshadow``,
``mat_reflectance``): about 5 ms a frame at 64 px. (Switching them off through the viewer's scene
flags instead breaks every environment created after the first in the same process: they render
black.)

Demonstration seeds start at :data:`DEMO_SEED_BASE` and evaluation seeds at
:data:`EVAL_SEED_BASE`: object positions in evaluation are never those of a demonstration.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vlaprune.io.calibration import video_backend

logger = logging.getLogger(__name__)

MT10 = (
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
    "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
)
DEMO_SEED_BASE = 0
EVAL_SEED_BASE = 1_000_000
FPS = 80  # LeRobot's MetaworldEnv config
IMAGE_KEY = "observation.image"  # LeRobot's preprocess_observation maps "pixels" here
STATE_KEY = "observation.state"  # ... and "agent_pos" here


class RenderingError(RuntimeError):
    """MuJoCo cannot render offscreen here."""


def _lerobot_metaworld() -> Any:
    try:
        from lerobot.envs import metaworld
    except ImportError as err:
        raise ImportError(
            f"MetaWorld is not installed ({err}); install it with: pip install 'vlaprune[metaworld]' "
            "(metaworld 3.0.0 with mujoco 3.3.0: mujoco 4.x fails at the first reset)"
        ) from err
    return metaworld


def task_names() -> list[str]:
    """Every MetaWorld task LeRobot's environment knows."""
    return sorted(_lerobot_metaworld().TASK_DESCRIPTIONS)


def instruction(task: str) -> str:
    """The language instruction LeRobot's evaluation gives the policy for ``task``."""
    check_tasks([task])
    return str(_lerobot_metaworld().TASK_DESCRIPTIONS[task])


def check_tasks(tasks: Sequence[str]) -> None:
    known = set(task_names())
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown MetaWorld task(s) {unknown}; known: {', '.join(sorted(known))} "
                         f"(MT10: {', '.join(MT10)})")


def fast_rendering(env: Any, size: int) -> None:
    """Render ``env`` (LeRobot's ``MetaworldEnv``) at ``size`` × ``size`` without multisampling,
    shadows or reflections. Call before its first frame."""
    env._ensure_env()
    raw = env._env
    model = raw.model
    model.vis.quality.offsamples = 0
    model.vis.quality.shadowsize = 0
    model.light_castshadow[:] = 0
    model.mat_reflectance[:] = 0
    raw.mujoco_renderer.width = raw.mujoco_renderer.height = size


def close_env(env: Any) -> None:
    """Close ``env``, first freeing its renderer's GL objects while its own context is current.

    Left to the garbage collector, a closed env's MuJoCo render context is freed whenever it is
    collected, with whatever GL context is current then: it deletes the framebuffers of a *later*
    env (GL object ids repeat across contexts), whose frames turn black."""
    renderer = env._env.mujoco_renderer if env._env is not None else None
    for viewer in renderer._viewers.values() if renderer is not None else ():
        viewer.make_context_current()
        viewer.con.free()
    env.close()


def make_env(task: str, image_size: int) -> Any:
    """LeRobot's ``MetaworldEnv`` for ``task`` (``pixels_agent_pos``), rendering ``image_size`` px fast.

    ``MUJOCO_GL`` defaults to ``egl`` (headless). A missing GL library raises :class:`RenderingError`
    saying what to install.
    """
    check_tasks([task])
    os.environ.setdefault("MUJOCO_GL", "egl")
    module = _lerobot_metaworld()
    env = module.MetaworldEnv(task=task, obs_type="pixels_agent_pos")
    try:
        fast_rendering(env, image_size)
        frame = env.render()
    except Exception as err:  # GL import or context failures surface as many types
        if isinstance(err, ValueError | KeyError):
            raise
        raise RenderingError(
            f"MuJoCo cannot render offscreen with MUJOCO_GL={os.environ['MUJOCO_GL']} ({type(err).__name__}: "
            f"{err}). Install EGL (Debian: apt-get install -y libegl1 libegl-mesa0 libgl1-mesa-dri), or set "
            "MUJOCO_GL=osmesa with libosmesa6"
        ) from err
    if frame.shape != (image_size, image_size, 3) or not frame.any():
        raise RenderingError(f"MuJoCo rendered a {frame.shape} frame that is all zeros or of the wrong size for "
                             f"{task}: the GL context is broken (MUJOCO_GL={os.environ['MUJOCO_GL']})")
    return env


@dataclass
class DemoConfig:
    tasks: tuple[str, ...] = MT10
    episodes_per_task: int = 10
    image_size: int = 64
    max_steps: int = 200  # an episode that has not succeeded by then is dropped
    seed: int = 0  # demonstration seeds: DEMO_SEED_BASE + seed * 100_000 + task index * 1000 + attempt
    max_attempts_per_task: int | None = None  # default: 3 × episodes_per_task + 5
    first_task_index: int = 0  # task index of tasks[0] in the seeds (a task of a larger set recorded alone)
    video: bool = False  # frames as LeRobot's AV1 video (about 50x smaller, lossy) instead of PNG images

    def validate(self) -> None:
        check_tasks(self.tasks)
        if self.episodes_per_task < 1 or self.image_size < 8 or self.max_steps < 1:
            raise ValueError("episodes_per_task and max_steps must be >= 1, image_size >= 8")
        if not 0 <= self.seed < 9 or self.first_task_index < 0 or self.first_task_index + len(self.tasks) > 100:
            raise ValueError("seed must be in 0..8 and task indices below 100 (demonstration seeds stay below "
                             f"EVAL_SEED_BASE={EVAL_SEED_BASE})")


@dataclass
class DemoSummary:
    root: str
    repo_id: str
    episodes: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    frames: int = 0
    config: dict[str, Any] = field(default_factory=dict)


def _features(size: int, video: bool) -> dict[str, Any]:
    return {
        IMAGE_KEY: {"dtype": "video" if video else "image", "shape": (size, size, 3),
                    "names": ["height", "width", "channels"]},
        STATE_KEY: {"dtype": "float32", "shape": (4,), "names": ["hand_x", "hand_y", "hand_z", "gripper"]},
        "action": {"dtype": "float32", "shape": (4,), "names": ["dx", "dy", "dz", "grip"]},
    }


# (LeRobot observation, raw 39-d MetaWorld observation, env) -> action (4,)
Act = Callable[[dict[str, Any], np.ndarray, Any], np.ndarray]


def rollout(env: Any, act: Act, seed: int, max_steps: int) -> tuple[bool, int]:
    """One closed-loop episode of LeRobot's ``MetaworldEnv`` from ``reset(seed)``: (success, steps).

    Steps the underlying MetaWorld env (LeRobot's ``step`` resets it on success) and formats each
    observation with LeRobot's own ``_format_raw_obs`` (render, flip upright).
    """
    obs, _ = env.reset(seed=seed)
    raw_obs = env._env._get_obs()
    for step in range(1, max_steps + 1):
        raw_obs, _, _, truncated, info = env._env.step(np.asarray(act(obs, raw_obs, env), dtype=np.float32))
        if info.get("success"):
            return True, step
        if truncated:
            return False, step
        obs = env._format_raw_obs(raw_obs)
    return False, max_steps


def expert_episode(env: Any, seed: int, max_steps: int) -> tuple[list[dict[str, np.ndarray]], bool]:
    """One episode of the task's scripted expert from ``reset(seed)``: frames (image, state, action)
    up to and including the step that succeeds, and whether it did."""
    frames: list[dict[str, np.ndarray]] = []

    def act(obs: dict[str, Any], raw_obs: np.ndarray, env: Any) -> np.ndarray:
        action = np.clip(env.expert_policy.get_action(raw_obs), -1.0, 1.0).astype(np.float32)
        frames.append({IMAGE_KEY: np.ascontiguousarray(obs["pixels"]),
                       STATE_KEY: np.asarray(obs["agent_pos"], dtype=np.float32), "action": action})
        return action

    success, _ = rollout(env, act, seed, max_steps)
    return frames, success


def generate_demos(config: DemoConfig, root: Path, repo_id: str = "local/metaworld",
                   *, overwrite: bool = False, progress: bool = True) -> DemoSummary:
    """Scripted demonstrations of ``config.tasks`` into a LeRobotDataset at ``root``.

    Written into ``<root>.partial`` and renamed at the end: a failure removes the partial directory,
    and one left by a killed run is removed by the next run, which starts over.
    """
    config.validate()
    root = Path(root)
    if root.exists():
        if not overwrite:
            raise FileExistsError(f"{root} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(root)
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        logger.info("removing %s left by an interrupted run", partial)
        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        summary = _record(config, partial, repo_id, progress)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written is left behind
        raise
    partial.rename(root)
    summary.root = str(root)
    return summary


def generate_task_demos(config: DemoConfig, root: Path, *, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Demonstrations of each task of ``config`` into its own LeRobotDataset ``root/<task>``
    (repo id ``local/<task>``), one task at a time: resumable, each finished task recorded in
    ``root/tasks.jsonl`` as it ends (episodes, attempts, frames, seconds, or the error of a task whose
    scripted expert does not succeed often enough). A rerun skips recorded tasks and redoes any task
    left unrecorded by an interruption; a rerun with other settings under the same ``root`` is refused.
    Returns the records by task. Seeds are those of one run over all of ``config.tasks``."""
    config.validate()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(config).items() if k != "tasks"}
    log = root / "tasks.jsonl"
    records: dict[str, dict[str, Any]] = {}
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            done = json.loads(line)
        except json.JSONDecodeError:  # a line torn by an interruption: that task is redone
            continue
        if done["settings"] != settings:
            raise ValueError(f"{log} was recorded with {done['settings']}, not {settings}: use another root")
        records[done["task"]] = done
    for index, task in enumerate(config.tasks):
        if task in records and ((root / task).is_dir() or "error" in records[task]):
            continue
        one = replace(config, tasks=(task,), first_task_index=config.first_task_index + index)
        start = time.perf_counter()
        record: dict[str, Any] = {"task": task, "settings": settings}
        try:
            summary = generate_demos(one, root / task, f"local/{task}", overwrite=True, progress=progress)
            record.update(episodes=summary.episodes[task], attempts=summary.attempts[task], frames=summary.frames)
        except RuntimeError as err:  # the scripted expert rarely succeeds on this task: recorded, not fatal
            record["error"] = str(err)
        record["seconds"] = round(time.perf_counter() - start, 1)
        torn = log.is_file() and log.stat().st_size and not log.read_text().endswith("\n")
        with log.open("a") as f:
            f.write(("\n" if torn else "") + json.dumps(record) + "\n")
        records[task] = record
        logger.info("%s: %s", task, record.get("error") or f"{record['episodes']} episodes in {record['seconds']} s")
    return {task: records[task] for task in config.tasks}


def combine_task_demos(root: Path, tasks: Sequence[str], dest: Path, repo_id: str = "local/metaworld") -> Path:
    """One LeRobotDataset at ``dest`` holding the per-task datasets ``root/<task>`` of ``tasks``
    (written by :func:`generate_task_demos`), in that order, with LeRobot's own aggregation; written
    into ``<dest>.partial`` and renamed at the end, so an interrupted run leaves nothing at ``dest``."""
    from lerobot.datasets.aggregate import aggregate_datasets

    missing = [task for task in tasks if not (Path(root) / task / "meta" / "info.json").is_file()]
    if missing:
        raise FileNotFoundError(f"no demonstrations of {missing} under {root}: run generate_task_demos for them")
    if dest.exists():
        raise FileExistsError(f"{dest} exists: remove it or choose another destination")
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        aggregate_datasets([f"local/{task}" for task in tasks], repo_id,
                           roots=[Path(root) / task for task in tasks], aggr_root=partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(dest)
    return dest


def _record(config: DemoConfig, root: Path, repo_id: str, progress: bool) -> DemoSummary:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from tqdm import tqdm

    dataset = LeRobotDataset.create(repo_id, fps=FPS, features=_features(config.image_size, config.video), root=root,
                                    use_videos=config.video, video_backend=video_backend())
    summary = DemoSummary(root=str(root), repo_id=repo_id, config=asdict(config))
    attempts_cap = config.max_attempts_per_task or 3 * config.episodes_per_task + 5
    bar = tqdm(total=len(config.tasks) * config.episodes_per_task, desc="demonstrations", disable=not progress)
    for t, task in enumerate(config.tasks):
        env = make_env(task, config.image_size)
        text = instruction(task)
        kept = attempts = 0
        try:
            while kept < config.episodes_per_task:
                if attempts >= attempts_cap:
                    raise RuntimeError(f"{task}: the scripted expert succeeded in only {kept} of {attempts} "
                                       f"episodes within {config.max_steps} steps; raise max_steps")
                seed = DEMO_SEED_BASE + config.seed * 100_000 + (config.first_task_index + t) * 1000 + attempts
                attempts += 1
                frames, success = expert_episode(env, seed, config.max_steps)
                if not success:
                    continue
                for frame in frames:
                    dataset.add_frame({**frame, "task": text})
                dataset.save_episode()
                kept += 1
                summary.frames += len(frames)
                bar.update(1)
        finally:
            close_env(env)
        summary.episodes[task], summary.attempts[task] = kept, attempts
    bar.close()
    dataset.finalize()
    return summary


ChunkActor = Callable[[Sequence[dict[str, Any]], Sequence[Any], Any], np.ndarray]


def chunk_actor(policy: Any, preprocessor: Any, postprocessor: Any) -> ChunkActor:
    """Act as ``lerobot-eval`` does, for several envs at once: LeRobot's ``preprocess_observation``,
    each env's task description, the policy's processors, one action chunk per env from
    ``predict_action_chunk`` with the given flow noise, unnormalised. Returns the first
    ``n_action_steps`` actions of each chunk, (envs, n_action_steps, action_dim): what ``select_action``
    would queue. The policy's queues are reset first: each chunk is computed afresh, for the envs given."""
    import torch
    from lerobot.envs.utils import preprocess_observation

    steps = policy.config.n_action_steps

    def act(observations: Sequence[dict[str, Any]], envs: Sequence[Any], noise: Any) -> np.ndarray:
        observation = preprocess_observation({"pixels": np.stack([o["pixels"] for o in observations]),
                                              "agent_pos": np.stack([o["agent_pos"] for o in observations])})
        observation["task"] = [env.task_description for env in envs]
        policy.reset()
        with torch.inference_mode():
            chunk = policy.predict_action_chunk(preprocessor(observation), noise=noise)
            return np.asarray(postprocessor(chunk[:, :steps]).to("cpu").numpy())

    return act


def flow_noise_shape(policy: Any) -> tuple[int, int]:
    """(chunk_size, max_action_dim): the flow-matching noise of one action chunk of a SmolVLA or pi0."""
    config = policy.config
    if not (hasattr(config, "chunk_size") and hasattr(config, "max_action_dim")):
        raise TypeError(f"{type(policy).__name__}: evaluation draws flow-matching noise of shape (chunk_size, "
                        "max_action_dim); this policy's config has no such fields")
    return config.chunk_size, config.max_action_dim


def evaluate(policy: Any, preprocessor: Any, postprocessor: Any, tasks: Sequence[str], *,
             episodes_per_task: int = 20, image_size: int = 64, max_steps: int = 200, seed: int = 0,
             batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """Closed-loop success of ``policy`` on ``tasks``, from evaluation seeds (``EVAL_SEED_BASE`` +
    ``seed`` · 100,000 + task index · 1000 + episode) that no demonstration uses.

    Up to ``batch_size`` episodes of a task run side by side, one env each, their action chunks
    computed in one batch; an episode leaves the batch when it succeeds. Each episode draws its flow
    noise from its own generator seeded with its evaluation seed, the stream ``select_action`` draws
    from torch's global generator seeded so: an episode replays exactly, whatever runs beside it, and
    equals ``lerobot-eval``'s one-env loop (``tests/test_metaworld.py`` checks it action by action).
    """
    from tqdm import tqdm

    check_tasks(tasks)
    if episodes_per_task < 1 or max_steps < 1 or batch_size < 1:
        raise ValueError("episodes_per_task, max_steps and batch_size must be >= 1")
    policy.eval()
    act = chunk_actor(policy, preprocessor, postprocessor)
    noise_shape = (1, *flow_noise_shape(policy))
    per_task: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(tasks) * episodes_per_task, desc="evaluation episodes", disable=not progress)
    start = time.perf_counter()
    for t, task in enumerate(tasks):
        envs = [make_env(task, image_size) for _ in range(min(batch_size, episodes_per_task))]
        results: list[tuple[bool, int]] = []
        try:
            for first in range(0, episodes_per_task, len(envs)):
                seeds = [EVAL_SEED_BASE + seed * 100_000 + t * 1000 + k
                         for k in range(first, min(first + len(envs), episodes_per_task))]
                results += _episodes(envs[: len(seeds)], seeds, act, noise_shape, max_steps)
                bar.update(len(seeds))
        finally:
            for env in envs:
                close_env(env)
        per_task[task] = {"episodes": len(results), "successes": sum(ok for ok, _ in results),
                          "success_rate": sum(ok for ok, _ in results) / len(results),
                          "steps": [n for _, n in results]}
    bar.close()
    rates = [r["success_rate"] for r in per_task.values()]
    return {"success_rate": sum(rates) / len(rates), "tasks": per_task, "seed": seed,
            "max_steps": max_steps, "image_size": image_size, "seconds": time.perf_counter() - start}


def _episodes(envs: Sequence[Any], seeds: Sequence[int], act: ChunkActor, noise_shape: tuple[int, ...],
              max_steps: int) -> list[tuple[bool, int]]:
    """Episodes side by side, one per env and seed, as :func:`rollout` steps one: (success, steps) each."""
    import torch

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    observations = [env.reset(seed=s)[0] for env, s in zip(envs, seeds, strict=True)]
    outcome: list[tuple[bool, int] | None] = [None] * len(envs)
    queued: dict[int, list[np.ndarray]] = {}
    for step in range(1, max_steps + 1):
        active = [i for i, o in enumerate(outcome) if o is None]
        if not active:
            break
        empty = [i for i in active if not queued.get(i)]
        if empty:
            noise = torch.cat([torch.normal(0.0, 1.0, noise_shape, generator=generators[i]) for i in empty])
            chunks = act([observations[i] for i in empty], [envs[i] for i in empty], noise)
            for i, chunk in zip(empty, chunks, strict=True):
                queued[i] = list(chunk)
        for i in active:
            raw_obs, _, _, truncated, info = envs[i]._env.step(np.asarray(queued[i].pop(0), dtype=np.float32))
            if info.get("success"):
                outcome[i] = (True, step)
            elif truncated:
                outcome[i] = (False, step)
            else:
                observations[i] = envs[i]._format_raw_obs(raw_obs)
    return [o if o is not None else (False, max_steps) for o in outcome]
