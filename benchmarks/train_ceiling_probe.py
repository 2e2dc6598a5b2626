"""Where does a pruned SmolVLA's training-step gain come from? (open question of the speed benchmark)

Times, on ``real:smolvla`` and its cka-run-like 50% plan [0..6, 11], the forward+backward and the
AdamW step of the full and the pruned policy, and for the full one the time measured inside the
removed blocks (forward between block boundaries, backward between gradient arrivals), median of 3.
If the pruned saving is larger than the removed blocks' time, the ceiling misses depth-proportional
work outside the blocks.

    python benchmarks/train_ceiling_probe.py
"""

from __future__ import annotations

import json
import os
import statistics

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlaprune import load_policy
from vlaprune.bench import _removed_seconds, _timed, train_step
from vlaprune.calibration import CalibrationConfig, synthetic_batches
from vlaprune.families import family_for
from vlaprune.surgery import remove_blocks

KEPT = [0, 1, 2, 3, 4, 5, 6, 11]


def main() -> None:
    bundle = load_policy("real:smolvla")
    full = bundle.policy
    family = family_for(full)
    removed = {name: [i for i in range(16) if i not in KEPT] for name in ("vlm", "expert")}
    pruned = remove_blocks(full, family, {"vlm": KEPT, "expert": KEPT})
    batch = bundle.preprocessor(next(synthetic_batches(full.config, CalibrationConfig(2, 2, 2))))
    device = torch.device("cpu")
    out = {}
    for name, policy in (("full", full), ("pruned", pruned)):
        opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
        train_step(policy, batch, opt)  # warm-up

        def forward_backward(policy=policy) -> None:
            policy.train()
            loss, _ = policy.forward(batch)
            loss.backward()

        def step(opt=opt) -> None:
            opt.step()
            opt.zero_grad(set_to_none=True)

        fb, st, rem = [], [], []
        for _ in range(3):
            if name == "full":
                r, t = _removed_seconds(policy, family, removed, forward_backward, device)
                rem.append(r)
                fb.append(t)
            else:
                fb.append(_timed(forward_backward, device))
            st.append(_timed(step, device))
        out[name] = {"forward_backward_s": statistics.median(fb), "optimizer_s": statistics.median(st),
                     "inside_removed_blocks_s": statistics.median(rem) if rem else None}
    saved = out["full"]["forward_backward_s"] - out["pruned"]["forward_backward_s"]
    print(f"forward+backward saved by pruning: {saved:.2f} s; measured inside the removed blocks of the full "
          f"model: {out['full']['inside_removed_blocks_s']:.2f} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
