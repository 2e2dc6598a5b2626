"""Where does a pruned SmolVLA's training-step gain come from? (open question of the speed benchmark)

On ``real:smolvla`` and the 50% plan [0..6, 11] (kept in both stacks), per policy, median of 3,
alternating full and pruned:

* forward+backward and the AdamW step, without any hooks (the saving to explain);
* with the block timers of ``vlaprune bench``: the time inside all blocks, inside the blocks the
  plan keeps, inside the blocks it removes (full model only), and outside every block.

If the saving exceeds the full model's time inside the removed blocks, this says whether the rest
comes from the kept blocks running faster in the shallower model or from work outside the blocks.

    python benchmarks/train_ceiling_probe.py
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlaprune import load_policy
from vlaprune.core.surgery import remove_blocks
from vlaprune.core.timing import block_intervals, timed, train_step, union_length
from vlaprune.families import family_for
from vlaprune.io.calibration import CalibrationConfig, synthetic_batches

KEPT = [0, 1, 2, 3, 4, 5, 6, 11]
DEPTH = 16


def main() -> None:
    bundle = load_policy("real:smolvla")
    full = bundle.policy
    family = family_for(full)
    pruned = remove_blocks(full, family, {"vlm": KEPT, "expert": KEPT}, share_weights=True)
    batch = bundle.preprocessor(next(synthetic_batches(full.config, CalibrationConfig(2, 2, 2))))
    device = torch.device("cpu")
    # block indices of each policy that correspond to the kept / removed original blocks
    groups = {
        "full": {"kept": KEPT, "removed": [i for i in range(DEPTH) if i not in KEPT]},
        "pruned": {"kept": list(range(len(KEPT))), "removed": []},
    }
    policies = {"full": full, "pruned": pruned}
    optimizers = {n: torch.optim.AdamW([p for p in pol.parameters() if p.requires_grad], lr=1e-5)
                  for n, pol in policies.items()}
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in policies}

    def forward_backward(policy: Any) -> None:
        policy.train()
        loss, _ = policy.forward(batch)
        loss.backward()

    for name, policy in policies.items():
        train_step(policy, batch, optimizers[name])  # warm-up
    for _ in range(3):
        for name, policy in policies.items():
            rec = samples[name]
            rec.setdefault("forward_backward_s", []).append(timed(lambda p=policy: forward_backward(p), device))
            optimizer = optimizers[name]
            rec.setdefault("optimizer_s", []).append(timed(lambda o=optimizer: (o.step(), o.zero_grad()), device))
            with block_intervals(policy, family, device) as log:
                total = timed(lambda p=policy: forward_backward(p), device)
            optimizer.zero_grad(set_to_none=True)

            def inside(indices: list[int], log: dict[str, list[list[float]]] = log) -> float:
                return union_length([iv for stack in ("vlm", "expert") for i in indices
                                      for iv in log.get(f"{stack}:{i}", [])])

            every = inside(list(range(len(family.layers(policy, "vlm")))))
            rec.setdefault("hooked_total_s", []).append(total)
            rec.setdefault("inside_all_blocks_s", []).append(every)
            rec.setdefault("inside_kept_blocks_s", []).append(inside(groups[name]["kept"]))
            rec.setdefault("inside_removed_blocks_s", []).append(inside(groups[name]["removed"]))
            rec.setdefault("outside_blocks_s", []).append(total - every)
    out = {n: {k: statistics.median(v) for k, v in rec.items()} for n, rec in samples.items()}
    f, p = out["full"], out["pruned"]
    saved = f["forward_backward_s"] - p["forward_backward_s"]
    print(f"forward+backward saved by pruning: {saved:.2f} s (no hooks)")
    print(f"  full model, inside the removed blocks: {f['inside_removed_blocks_s']:.2f} s")
    print(f"  kept blocks, full → pruned model: {f['inside_kept_blocks_s']:.2f} → {p['inside_kept_blocks_s']:.2f} s")
    print(f"  outside every block, full → pruned: {f['outside_blocks_s']:.2f} → {p['outside_blocks_s']:.2f} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
