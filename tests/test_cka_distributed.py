"""StreamingCKA.all_reduce over 2 CPU processes (gloo) equals one process seeing every batch."""

from __future__ import annotations

import importlib.util
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlaprune.core.cka import CKAConfig, StreamingCKA

WORLD_SIZE = 2
TIMEOUT_S = 120
CONFIGS = {
    "minibatch_biased": CKAConfig(estimator="minibatch", max_tokens=None),
    "minibatch_debiased": CKAConfig(estimator="minibatch", debiased=True, max_tokens=None),
    "per_sample": CKAConfig.preset("paper"),
}

pytestmark = [pytest.mark.timeout(TIMEOUT_S)] if importlib.util.find_spec("pytest_timeout") else []


def _batches() -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """Six fixed, seeded batches of 4 correlated states (widths differ) with variable-length masks."""
    out = []
    for b in range(6):
        g = torch.Generator().manual_seed(1000 + b)
        x = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
        states = [x]
        for w in (5, 8, 6):
            mix = torch.randn(states[-1].shape[-1], w, generator=g, dtype=torch.float64)
            noise = torch.randn(3, 7, w, generator=g, dtype=torch.float64)
            states.append(torch.tanh(states[-1] @ mix) + 0.3 * noise)
        lengths = torch.randint(4, 8, (3,), generator=g)
        mask = torch.arange(7)[None, :] < lengths[:, None]
        out.append((states, mask))
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        batches = _batches()
        half = len(batches) // WORLD_SIZE
        for name, config in CONFIGS.items():
            acc = StreamingCKA(4, config)
            for states, mask in batches[rank * half : (rank + 1) * half]:
                acc.update(states, mask)
            acc.all_reduce()
            if rank == 0:
                torch.save({"cka": acc.compute(), "num_updates": acc.num_updates,
                            "num_examples": acc.num_examples}, Path(out_dir) / f"{name}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def reduced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the two ranks once for all configs; rank 0's results land in the returned folder."""
    out_dir = tmp_path_factory.mktemp("cka_dist")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S - 10
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S - 10} s")
    return out_dir


@pytest.mark.parametrize("name", list(CONFIGS))
def test_all_reduce_equals_single_process(reduced: Path, name: str) -> None:
    result = torch.load(reduced / f"{name}.pt")
    single = StreamingCKA(4, CONFIGS[name])
    for states, mask in _batches():
        single.update(states, mask)
    expected = single.compute()
    assert torch.allclose(result["cka"], expected, rtol=0, atol=1e-12), (result["cka"] - expected).abs().max()
    assert result["num_updates"] == single.num_updates
    assert result["num_examples"] == single.num_examples


def test_all_reduce_without_process_group_is_a_no_op() -> None:
    acc = StreamingCKA(4, CONFIGS["minibatch_biased"])
    acc.update(*_batches()[0])
    before = acc.compute()
    acc.all_reduce()
    assert torch.equal(acc.compute(), before) and acc.num_updates == 1
