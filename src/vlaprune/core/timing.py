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
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from vlaprune.core.family import Family
from vlaprune.core.flops import chunk_flops_by_part, parameter_counts

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


def timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@contextmanager
def block_intervals(policy: Any, family: Family, device: torch.device) -> Iterator[dict[str, list[list[float]]]]:
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


def union_length(intervals: Sequence[Sequence[float]]) -> float:
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
    with block_intervals(policy, family, device) as log:
        total = timed(run, device)
    chosen = [iv for name, idx in removed.items() for i in idx for iv in log.get(f"{name}:{i}", [])]
    return union_length(chosen), total


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

    opt_s = timed(step, device)
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
                t.chunk_s.append(timed(partial(action_chunk_latency, pol, observation), device))
            t.chunk_peak_bytes = max(t.chunk_peak_bytes, peak[0])
            if train_batch is not None:
                with peak_memory(device) as peak:
                    t.train_s.append(timed(partial(train_step, pol, train_batch, optimizers[name]), device))
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


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError naming it)."""
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err))
