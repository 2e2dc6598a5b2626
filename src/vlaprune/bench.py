"""Speed of a full and a pruned policy, measured side by side in one process.

After a warm-up the two policies alternate (A B A B ...) and every figure is a median, so drift of
the machine hits both alike. Measured per policy: one training step (forward, backward, optimizer
step) with the family's default trainable set, one action chunk (``reset`` + ``select_action``:
prefix and every denoising step), peak memory, parameter counts and the linear-layer FLOPs of one
chunk. The ceiling is measured too: in the FULL model, the share of forward time spent inside the
blocks the plan removes (each block timed between its input norm and the next block's, its backward
between the gradients of its output and input arriving, on GPU with synchronisation; the optimizer
step counts in proportion to the trainable parameters the removed blocks hold); ``ideal ratio =
1 − share``. At small token counts time follows weight reads and
per-block overhead more than FLOPs, so efficiency = measured reduction / ideal reduction is judged
against that ceiling, not against the FLOP ratio.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch

from .families.base import Family, resolve
from .flops import chunk_flops_by_part, parameter_counts

logger = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``: pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[list[int]]:
    """Peak memory above the start of the block: CUDA max allocated, or sampled RSS on the CPU."""
    result = [0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        result[0] = torch.cuda.max_memory_allocated(device) - base
        return
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result[0] = max(peak[0], _rss_bytes()) - base


@dataclass
class PolicyTimings:
    train_s: list[float] = field(default_factory=list)
    chunk_s: list[float] = field(default_factory=list)
    train_peak_bytes: int = 0
    chunk_peak_bytes: int = 0


def train_step(policy: Any, batch: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """One LeRobot training step: forward (loss), backward, optimizer step."""
    policy.train()
    loss, _ = policy.forward(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def action_chunk_latency(policy: Any, observation: dict[str, Any]) -> None:
    """``reset`` then ``select_action``: the prefix and every denoising step of one chunk."""
    policy.eval()
    policy.reset()
    policy.select_action(observation)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@contextmanager
def _block_intervals(policy: Any, family: Family, device: torch.device) -> Iterator[dict[str, list[list[float]]]]:
    """Per stack and block, the [start, end] times of each execution of the block, forward and backward.

    Forward: from the block's input norm being called to the next block's (or the final norm).
    Backward: from the gradient of the block's output (the next state) arriving to the gradient of its
    input arriving, via tensor hooks on the residual states that require grad.
    """
    log: dict[str, list[list[float]]] = {}
    handles = []

    def now() -> float:
        _sync(device)
        return time.perf_counter()

    for spec in family.stacks:
        layers = family.layers(policy, spec.name)
        points = spec.stream_points(policy, layers)
        starts: dict[int, float] = {}
        grad_starts: dict[int, float] = {}

        def make(name: str, index: int, count: int, starts: dict[int, float] = starts,
                 grad_starts: dict[int, float] = grad_starts) -> Any:
            def on_grad(grad: torch.Tensor) -> None:
                t = now()
                if index + 1 in grad_starts:  # the backward of block `index` just finished
                    log.setdefault(f"{name}:{index}", []).append([grad_starts.pop(index + 1), t])
                grad_starts[index] = t

            def hook(hidden: Any) -> None:
                t = now()
                if index > 0 and index - 1 in starts:
                    log.setdefault(f"{name}:{index - 1}", []).append([starts.pop(index - 1), t])
                if index < count:
                    starts[index] = t
                if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                    hidden.register_hook(on_grad)

            return hook

        for i, point in enumerate(points):
            handles.append(point.hook(make(spec.name, i, len(layers))))
    try:
        yield log
    finally:
        for handle in handles:
            handle.remove()


def _union_length(intervals: Sequence[Sequence[float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted((float(a), float(b)) for a, b in intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def removed_time_share(
    policy: Any, family: Family, removed: Mapping[str, Sequence[int]], run: Callable[[], None], device: torch.device
) -> float:
    """Share of ``run``'s wall time spent inside the ``removed`` blocks of the full ``policy``.

    Forward and backward intervals count. Intervals of lockstep stacks that run jointly overlap (pi0's
    and SmolVLA's training forward process VLM and expert layer i together), so the union of the
    removed intervals is taken.
    """
    removed_s, total = _removed_seconds(policy, family, removed, run, device)
    return min(1.0, removed_s / total)


def _removed_seconds(
    policy: Any, family: Family, removed: Mapping[str, Sequence[int]], run: Callable[[], None], device: torch.device
) -> tuple[float, float]:
    with _block_intervals(policy, family, device) as log:
        total = _timed(run, device)
    chosen = [iv for name, idx in removed.items() for i in idx for iv in log.get(f"{name}:{i}", [])]
    return _union_length(chosen), total


def train_step_removed_share(
    policy: Any, family: Family, removed: Mapping[str, Sequence[int]], batch: dict[str, Any],
    optimizer: torch.optim.Optimizer, device: torch.device,
) -> float:
    """Share of one training step spent on the ``removed`` blocks: their forward and backward intervals,
    plus the optimizer step's time in proportion to the trainable parameters they hold (AdamW's cost
    is linear in the parameters it updates)."""

    def forward_backward() -> None:
        policy.train()
        loss, _ = policy.forward(batch)
        loss.backward()

    removed_s, fwd_bwd_s = _removed_seconds(policy, family, removed, forward_backward, device)

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    opt_s = _timed(step, device)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    in_removed = sum(
        p.numel() for name, idx in removed.items() for i in idx
        for p in family.layers(policy, name)[i].parameters() if p.requires_grad
    )
    share = trainable and in_removed / trainable
    return min(1.0, (removed_s + opt_s * share) / (fwd_bwd_s + opt_s))


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def compare(
    full: Any,
    pruned: Any,
    family: Family,
    removed: Mapping[str, Sequence[int]],
    train_batch: dict[str, Any] | None,
    observation: dict[str, Any],
    *,
    rounds: int = 3,
    warmup: int = 1,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Time ``full`` and ``pruned`` alternately and return every figure plus ratios and efficiencies."""
    device = next(full.parameters()).device
    policies = {"full": full, "pruned": pruned}
    optimizers = {
        name: torch.optim.AdamW([p for p in pol.parameters() if p.requires_grad], lr=1e-5)
        for name, pol in policies.items()
    } if train_batch is not None else {}
    if optimizers and {id(p) for p in pruned.parameters()} <= {id(p) for p in full.parameters()}:
        # a pruned view holds the full policy's parameter objects: one AdamW state per parameter
        # (each optimizer still steps only its own policy's parameters)
        optimizers["pruned"].state = optimizers["full"].state
    timings = {name: PolicyTimings() for name in policies}
    for _ in range(warmup):
        for name, pol in policies.items():
            action_chunk_latency(pol, observation)
            if train_batch is not None:
                train_step(pol, train_batch, optimizers[name])
    for _ in range(rounds):
        for name, pol in policies.items():  # A B A B: drift hits both alike
            t = timings[name]
            with peak_memory(device) as peak:
                t.chunk_s.append(_timed(partial(action_chunk_latency, pol, observation), device))
            t.chunk_peak_bytes = max(t.chunk_peak_bytes, peak[0])
            if train_batch is not None:
                with peak_memory(device) as peak:
                    t.train_s.append(_timed(partial(train_step, pol, train_batch, optimizers[name]), device))
                t.train_peak_bytes = max(t.train_peak_bytes, peak[0])
            gc.collect()
        if on_round is not None:
            on_round(1)

    chunk_share = statistics.median(
        removed_time_share(full, family, removed, partial(action_chunk_latency, full, observation), device)
        for _ in range(rounds)
    )
    out: dict[str, Any] = {"device": str(device), "rounds": rounds, "warmup": warmup}
    for name, pol in policies.items():
        t = timings[name]
        out[name] = {
            "chunk_s": _median(t.chunk_s), "chunk_runs_s": t.chunk_s, "chunk_peak_mb": t.chunk_peak_bytes / 2**20,
            "train_step_s": _median(t.train_s), "train_runs_s": t.train_s, "train_peak_mb": t.train_peak_bytes / 2**20,
            "parameters": parameter_counts(pol),
            "chunk_linear_flops_by_part": chunk_flops_by_part(family, pol, observation),
        }
        out[name]["chunk_linear_flops"] = sum(out[name]["chunk_linear_flops_by_part"].values())
    out["inference_ratio"] = out["pruned"]["chunk_s"] / out["full"]["chunk_s"]
    out["ideal_inference_ratio"] = 1.0 - chunk_share
    out["flop_inference_ratio"] = out["pruned"]["chunk_linear_flops"] / out["full"]["chunk_linear_flops"]
    out["inference_efficiency"] = _efficiency(out["inference_ratio"], out["ideal_inference_ratio"])
    if train_batch is not None:  # last: this step changes the full policy's weights
        train_share = statistics.median(
            train_step_removed_share(full, family, removed, train_batch, optimizers["full"], device)
            for _ in range(rounds)
        )
        out["train_step_ratio"] = out["pruned"]["train_step_s"] / out["full"]["train_step_s"]
        out["ideal_train_ratio"] = 1.0 - train_share
        out["train_efficiency"] = _efficiency(out["train_step_ratio"], out["ideal_train_ratio"])
    return out


def _efficiency(measured_ratio: float, ideal_ratio: float) -> float:
    ideal_reduction = 1.0 - ideal_ratio
    return (1.0 - measured_ratio) / ideal_reduction if ideal_reduction > 0 else float("nan")


def bench_table(result: Mapping[str, Any]) -> str:
    """A readable table of one comparison."""
    full, pruned = result["full"], result["pruned"]
    width = max(28, *(len(f"  chunk linear GFLOP, {part}") + 1 for part in full["chunk_linear_flops_by_part"]))
    lines = [f"{'':<{width}}{'full':>12}{'pruned':>12}{'ratio':>8}{'ideal':>8}{'effic.':>8}"]

    def row(label: str, a: float, b: float, ratio: float | None = None, ideal: float | None = None,
            eff: float | None = None, fmt: str = "{:>12.3f}") -> None:
        cells = [fmt.format(a), fmt.format(b)]
        extra = "".join(f"{v:>8.3f}" if v is not None else f"{'':>8}" for v in (ratio, ideal, eff))
        lines.append(f"{label:<{width}}{cells[0]}{cells[1]}{extra}")

    row("action chunk (s)", full["chunk_s"], pruned["chunk_s"], result["inference_ratio"],
        result["ideal_inference_ratio"], result["inference_efficiency"])
    if "train_step_ratio" in result:
        row("training step (s)", full["train_step_s"], pruned["train_step_s"], result["train_step_ratio"],
            result["ideal_train_ratio"], result["train_efficiency"])
        row("train peak mem. (+MB)", full["train_peak_mb"], pruned["train_peak_mb"], fmt="{:>12.0f}")
    row("chunk peak mem. (+MB)", full["chunk_peak_mb"], pruned["chunk_peak_mb"], fmt="{:>12.0f}")
    row("parameters (M)", full["parameters"]["total"] / 1e6, pruned["parameters"]["total"] / 1e6, fmt="{:>12.1f}")
    row("trainable parameters (M)", full["parameters"]["trainable"] / 1e6,
        pruned["parameters"]["trainable"] / 1e6, fmt="{:>12.1f}")
    for part in full["chunk_linear_flops_by_part"]:
        a, b = full["chunk_linear_flops_by_part"][part], pruned["chunk_linear_flops_by_part"][part]
        row(f"  chunk linear GFLOP, {part}", a / 1e9, b / 1e9, b / a if a else None, fmt="{:>12.2f}")
    row("chunk linear GFLOP, total", full["chunk_linear_flops"] / 1e9, pruned["chunk_linear_flops"] / 1e9,
        result["flop_inference_ratio"], fmt="{:>12.2f}")
    return "\n".join(lines)


def set_cameras(policies: Sequence[Any], count: int | None = None, size: int | None = None) -> None:
    """Give the policies ``count`` cameras (the first camera's feature, copied under new keys) and
    frames of ``size`` × ``size`` pixels; ``None`` leaves that as it is.

    The vision encoder is shared across cameras in SmolVLA and pi0, so this scales the prefix the way
    a real multi-camera robot does; synthetic frames then carry every camera. The policies resize
    frames to their own input resolution (SmolVLA: 512 × 512 with padding, pi0: 224 × 224), so the
    frame size changes the resize and preprocessing cost, not the token count.
    """
    import copy

    for policy in policies:
        features = dict(policy.config.input_features)
        cams = [k for k in features if k.startswith("observation.images.")]
        if not cams:
            raise ValueError(f"{policy.config.type} has no camera feature to copy")
        if count is not None:
            for key in cams[count:]:
                del features[key]
            for i in range(len(cams), count):
                features[f"observation.images.extra{i}"] = copy.deepcopy(features[cams[0]])
        if size is not None:
            for key in [k for k in features if k.startswith("observation.images.")]:
                channels = features[key].shape[0]
                features[key] = replace(features[key], shape=(channels, size, size))
        policy.config.input_features = features


def set_trainable(policy: Any, family: Family, which: str) -> None:
    """``default``: as the policy's config built it; ``expert``: everything but the family's VLM
    backbone (LeRobot's ``train_expert_only``); ``all``: every parameter."""
    if which == "default":
        return
    if which not in ("expert", "all"):
        raise ValueError(f"trainable set {which!r}: choose default, expert or all")
    policy.requires_grad_(True)
    if which == "expert":
        if not family.backbone:
            raise ValueError(f"family {family.name} names no backbone: cannot train its expert only")
        for path in family.backbone:
            resolve(policy, path).requires_grad_(False)


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError naming it)."""
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err))


def check_fits(
    policy: Any, observation: dict[str, Any], train_batch: dict[str, Any] | None,
    make_batch: Callable[[int], dict[str, Any]],
) -> None:
    """Run one chunk and one training step of the full policy; on out-of-memory, find by halving the
    training batch size that fits and say so, instead of failing with an allocator trace."""
    try:
        action_chunk_latency(policy, observation)
    except Exception as err:
        if is_out_of_memory(err):
            raise ValueError(f"one action chunk at --batch_size={len(observation['task'])} does not fit in "
                             "memory; use --batch_size=1 or --dtype=bfloat16") from err
        raise
    if train_batch is None:
        return
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    size = len(train_batch["task"])
    batch = train_batch
    while True:
        try:
            train_step(policy, batch, optimizer)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if size == 1:
                raise ValueError("a training step does not fit in memory even at batch 1; try --dtype=bfloat16 "
                                 "or --train_batch_size=0 (inference only)") from err
            size //= 2
            batch = make_batch(size)
            continue
        if size != len(train_batch["task"]):
            raise ValueError(f"a training step at --train_batch_size={len(train_batch['task'])} does not fit in "
                             f"memory; --train_batch_size={size} fits")
        return


def run_bench(cfg: Any, *, on_round: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The ``vlaprune bench`` entry point (``cfg`` is a :class:`vlaprune.config.BenchConfig`)."""
    from pathlib import Path

    from .analyze import compute_stack_cka, library_versions, machine_description
    from .calibration import CalibrationConfig, calibration_batches
    from .checkpoint import read_manifest
    from .families import family_for
    from .policies import is_builtin, load_policy
    from .prune import build_problem, choose_plan
    from .surgery import remove_blocks, removed_blocks

    cfg.validate()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    bundle = load_policy(cfg.policy.path, seed=cfg.policy.seed, device=cfg.policy.device)
    full = bundle.policy
    family = family_for(full)

    def batches(num: int, seed: int) -> list[dict[str, Any]]:
        return list(calibration_batches(full, bundle.preprocessor, repo_id=cfg.dataset.repo_id,
                                        root=cfg.dataset.root, config=CalibrationConfig(num, num, seed),
                                        allow_synthetic=is_builtin(cfg.policy.path),
                                        synthetic=bundle.synthetic))

    if cfg.pruned.path:
        manifest = read_manifest(Path(cfg.pruned.path))
        if manifest is None:
            raise ValueError(f"{cfg.pruned.path} has no prune_manifest.json: cannot tell which blocks it removed")
        pruned = load_policy(cfg.pruned.path, device=cfg.policy.device).policy
        if family_for(pruned) is not family:
            raise ValueError(f"{cfg.pruned.path} is a {family_for(pruned).name} policy, {cfg.policy.path} a "
                             f"{family.name} one: compare a policy with its own pruned checkpoint")
        depths = family.depths(full)
        for name, stack in manifest["stacks"].items():
            if stack["source_num_layers"] != depths[name]:
                raise ValueError(f"{cfg.pruned.path} was pruned from a {stack['source_num_layers']}-block {name} "
                                 f"stack; {cfg.policy.path} has {depths[name]}")
        kept = {name: stack["kept"] for name, stack in manifest["stacks"].items()}
        method = manifest["method"]
    else:
        stacks = compute_stack_cka(full, batches(cfg.calibration.num_samples, cfg.calibration.seed),
                                   family=family, cka=cfg.cka.config(), capture=cfg.calibration.capture())
        problem = build_problem(family, full, stacks, cfg.plan.protect, cfg.plan.allow)
        # timing needs the requested method's plan as is: no refine
        plan, _ = choose_plan(replace(cfg.plan, refine=0), problem, lambda p: float("nan"))
        kept = {name: list(idx) for name, idx in plan.kept.items()}
        method = plan.method
    full.to(dtype=dtype)
    if cfg.pruned.path:
        pruned.to(dtype=dtype)
    else:  # a view on the full policy's weights: one copy in memory (real pi0: 16 GB in float32)
        pruned = remove_blocks(full, family, kept, share_weights=True)
    for pol in (full, pruned):
        set_trainable(pol, family, cfg.trainable)
    if cfg.cameras is not None or cfg.image_size is not None:
        set_cameras([full, pruned], cfg.cameras, cfg.image_size)
    observation = {k: v for k, v in batches(cfg.batch_size, 1)[0].items() if not k.startswith("action")}
    train_batch = batches(cfg.train_batch_size, 2)[0] if cfg.train_batch_size else None
    check_fits(full, observation, train_batch, lambda n: batches(n, 2)[0])
    cameras = getattr(full.config, "image_features", {})  # GR00T N1.5's inputs are not LeRobot features
    result = compare(full, pruned, family, removed_blocks(family, full, kept), train_batch, observation,
                     rounds=cfg.rounds, warmup=cfg.warmup, on_round=on_round)
    result.update({
        "policy": cfg.policy.path, "pruned_path": cfg.pruned.path, "method": method, "kept": kept,
        "dtype": cfg.dtype, "batch_size": cfg.batch_size, "cameras": len(cameras),
        "image_size": [list(f.shape)[1:] for f in cameras.values()],
        "shared_weights": not cfg.pruned.path,
        "train_batch_size": cfg.train_batch_size,
        "trainable_set": cfg.trainable,
        "machine": machine_description(result["device"]),
        "versions": library_versions(),
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
    })
    return result
