"""Typed, validated configs of the entry points (parsed from LeRobot-style flags by draccus).

``vlaprune analyze --policy.path=tiny:pi0 --dataset.repo_id=synthetic --out=DIR`` fills
``AnalyzeConfig(policy=PolicyArgs(path="tiny:pi0"), dataset=DatasetArgs(repo_id="synthetic"), out="DIR")``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlaprune.core.capture import DEFAULT_TIMESTEPS, CaptureConfig
from vlaprune.core.cka import PRESETS, CKAConfig
from vlaprune.io.calibration import SYNTHETIC, CalibrationConfig


@dataclass
class PolicyArgs:
    path: str | None = None  # local checkpoint dir, hub id, tiny:/real: built-in, or metaworld:smolvla (trained)
    device: str = "cpu"
    seed: int = 0  # seed of a built-in policy's weights


@dataclass
class DatasetArgs:
    repo_id: str | None = None  # LeRobotDataset repo id, or "synthetic" (built-in policies only)
    root: str | None = None  # local dataset directory


@dataclass
class CalibrationArgs:
    num_samples: int = 32
    batch_size: int = 8
    seed: int = 0
    timesteps: list[float] = field(default_factory=lambda: list(DEFAULT_TIMESTEPS))

    def calibration(self) -> CalibrationConfig:
        return CalibrationConfig(num_samples=self.num_samples, batch_size=self.batch_size, seed=self.seed)

    def capture(self) -> CaptureConfig:
        return CaptureConfig(timesteps=tuple(self.timesteps), seed=self.seed)


@dataclass
class CKAArgs:
    preset: str = "default"  # "default", "paper" or "minibatch"
    estimator: str | None = None  # override the preset: per_sample | minibatch
    debiased: bool | None = None
    tokens: str | None = None  # tokens | mean | last
    max_tokens: int | None = None
    skip_tokens: int | None = None  # the first real tokens of each sample left out (attention sinks)
    token_norm: str | None = None  # none | rms
    feature_norm: str | None = None  # none | standardize (massive activations no longer dominate)

    def config(self) -> CKAConfig:
        pairs = (("estimator", self.estimator), ("debiased", self.debiased), ("tokens", self.tokens),
                 ("max_tokens", self.max_tokens), ("skip_tokens", self.skip_tokens), ("token_norm", self.token_norm),
                 ("feature_norm", self.feature_norm))
        overrides = {k: v for k, v in pairs if v is not None}
        return CKAConfig.preset(self.preset, **overrides)


@dataclass
class AnalyzeConfig:
    policy: PolicyArgs = field(default_factory=PolicyArgs)
    dataset: DatasetArgs = field(default_factory=DatasetArgs)
    calibration: CalibrationArgs = field(default_factory=CalibrationArgs)
    cka: CKAArgs = field(default_factory=CKAArgs)
    out: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        """Check everything that can be checked before loading a model."""
        _require_inputs(self.policy, self.dataset, self.out, "analysis.json and heatmaps")
        if self.cka.preset not in PRESETS:
            raise ValueError(f"--cka.preset={self.cka.preset!r} is unknown; presets: {', '.join(PRESETS)}")
        cka = self.cka.config()
        smallest = min(self.calibration.calibration().batch_sizes)
        self.calibration.capture()
        if cka.debiased and cka.tokens != "tokens" and smallest < 4:
            raise ValueError(
                f"debiased CKA needs at least 4 examples per batch; with --cka.tokens={cka.tokens} a batch "
                f"of {smallest} sample(s) gives {smallest}. Raise --calibration.num_samples / batch_size "
                "or use --cka.debiased=false"
            )


def _require_inputs(policy: PolicyArgs, dataset: DatasetArgs, out: str | None, what: str) -> None:
    if not policy.path:
        raise ValueError("--policy.path is required (a checkpoint dir, a hub id, or e.g. tiny:smolvla)")
    if not dataset.repo_id:
        raise ValueError("--dataset.repo_id is required (a LeRobotDataset, or 'synthetic' for built-ins)")
    if not out:
        raise ValueError(f"--out is required: the directory that receives {what}")


REFINE = ("auto", "off", "damage", "loss")  # --plan.refine: how the pool is measured (planning.refine_signal)


@dataclass
class PlanArgs:
    method: str = "cka-dp"  # cka-dp | cka-run | bi | angular | first-k | random | loss (greedy, measured)
    ratio: float | None = None  # fraction of blocks removed per stack (the paper goes up to 0.5)
    keep: dict[str, int] | None = None  # explicit keep count per stack, e.g. '{vlm: 4, expert: 4}'
    threshold: float | None = None  # the data decides: shallowest plan whose cka-dp cost <= threshold
    kept: dict[str, list[int]] | None = None  # explicit plan: kept ORIGINAL indices per stack
    # the stacks the budget applies to, e.g. '[vision, vlm, expert]'; default: the family's language stacks
    # (every stack but the opt-in vision encoder) and any stack --plan.keep or --plan.kept names
    stacks: list[str] | None = None
    # measure every plan of the pool (the requested one, first-k, the best contiguous window, the loss plan,
    # the similarity plans) and keep the lowest: auto (the chunk damage, the signal that ranked the study's
    # fine-tuned plans best), damage, loss (needs demonstrations) or off
    refine: str = "auto"
    protect: list[int] = field(default_factory=list)  # block indices never removed (in every stack)
    allow: list[str] = field(default_factory=list)  # family protections lifted knowingly, e.g. '[deepstack]'
    run_threshold: float | None = None  # cka-run: similarity that makes blocks twins
    seed: int = 0

    def __post_init__(self) -> None:
        # the command line reads a bare `off` as YAML's false, so --plan.refine=off arrives as "False"
        if self.refine in (False, "False", "false"):
            self.refine = "off"

    def budgets(self) -> list[str]:
        """The budget flags given (exactly one is needed to plan; ``run_threshold`` is cka-run's own)."""
        return [name for name in ("ratio", "keep", "threshold", "kept", "run_threshold")
                if getattr(self, name) is not None]

    def take_ratio(self, ratio: float | None) -> None:
        """Apply the top-level ``--ratio`` shortcut."""
        if ratio is None:
            return
        if self.ratio is not None and self.ratio != ratio:
            raise ValueError(f"--ratio={ratio} and --plan.ratio={self.ratio} disagree; give one")
        self.ratio = ratio


@dataclass
class PruneConfig:
    policy: PolicyArgs = field(default_factory=PolicyArgs)
    dataset: DatasetArgs = field(default_factory=DatasetArgs)
    calibration: CalibrationArgs = field(default_factory=CalibrationArgs)
    cka: CKAArgs = field(default_factory=CKAArgs)
    plan: PlanArgs = field(default_factory=PlanArgs)
    ratio: float | None = None  # shortcut for --plan.ratio
    analysis: str | None = None  # reuse an analysis.json of this policy instead of a calibration pass
    holdout_samples: int = 8  # held-out calibration samples for refine and verify
    tolerance: float = 1e-4  # verify: pruned vs source-with-blocks-skipped, relative to output scale
    out: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        _require_inputs(self.policy, self.dataset, self.out, "the pruned checkpoint")
        self.plan.take_ratio(self.ratio)
        budgets = self.plan.budgets()
        if len(budgets) != 1:
            raise ValueError(
                "give exactly one budget: --ratio (fraction of blocks removed, e.g. 0.5), --plan.keep "
                f"(blocks kept per stack), --plan.threshold (max cka-dp cost), --plan.kept (explicit plan) or "
                f"--plan.run_threshold (with --plan.method=cka-run: its rule decides); got {budgets or 'none'}"
            )
        if self.plan.run_threshold is not None and self.plan.method != "cka-run":
            raise ValueError(f"--plan.run_threshold is the cka-run rule; with --plan.method={self.plan.method} "
                             "give --ratio, --plan.keep or --plan.threshold instead")
        if self.holdout_samples < 1:
            raise ValueError(f"--holdout_samples must be >= 1, got {self.holdout_samples}")
        if self.plan.refine not in REFINE:
            raise ValueError(f"--plan.refine={self.plan.refine!r} is unknown; choose {', '.join(REFINE[:-1])} or "
                             f"{REFINE[-1]}")
        self.cka.config()


@dataclass
class PrunedArgs:
    path: str | None = None  # a pruned checkpoint (with prune_manifest.json) of --policy.path


@dataclass
class BenchConfig:
    policy: PolicyArgs = field(default_factory=PolicyArgs)
    pruned: PrunedArgs = field(default_factory=PrunedArgs)
    dataset: DatasetArgs = field(default_factory=lambda: DatasetArgs(repo_id="synthetic"))
    calibration: CalibrationArgs = field(default_factory=lambda: CalibrationArgs(num_samples=8))
    cka: CKAArgs = field(default_factory=CKAArgs)
    plan: PlanArgs = field(default_factory=lambda: PlanArgs(refine="off"))  # used without --pruned.path
    ratio: float | None = None  # shortcut for --plan.ratio
    batch_size: int = 1  # observations per action chunk
    train_batch_size: int = 2  # samples per training step (0 = no training step)
    rounds: int = 3
    warmup: int = 1
    dtype: str = "float32"  # float32 | bfloat16
    # "default" = the family config's trainable set; "expert" = all but the VLM backbone (LeRobot's
    # train_expert_only); "all" = every parameter
    trainable: str = "default"
    cameras: int | None = None  # synthetic data only: run with this many cameras (copies of the first)
    image_size: int | None = None  # synthetic data only: camera frames of this height and width (pixels)
    out: str | None = None  # also write bench.json here

    def validate(self) -> None:
        if not self.policy.path:
            raise ValueError("--policy.path is required: the full policy")
        self.plan.take_ratio(self.ratio)
        budgets = self.plan.budgets()
        if (self.pruned.path is None) == (not budgets):
            raise ValueError("give either --pruned.path (a pruned checkpoint of --policy.path) or one budget "
                             "(--ratio, --plan.keep, --plan.threshold or --plan.kept) to prune in memory")
        if self.cameras is not None and (self.cameras < 1 or self.dataset.repo_id != SYNTHETIC):
            raise ValueError(f"--cameras={self.cameras}: a positive count, with --dataset.repo_id=synthetic "
                             "(a dataset brings its own cameras)")
        if self.image_size is not None and (self.image_size < 1 or self.dataset.repo_id != SYNTHETIC):
            raise ValueError(f"--image_size={self.image_size}: a positive size in pixels, with "
                             "--dataset.repo_id=synthetic (a dataset brings its own frames)")
        if self.trainable not in ("default", "expert", "all"):
            raise ValueError(f"--trainable={self.trainable!r}: choose default, expert or all")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype={self.dtype!r}: choose float32 or bfloat16")
        if self.rounds < 1 or self.warmup < 0 or self.batch_size < 1 or self.train_batch_size < 0:
            raise ValueError("--rounds and --batch_size must be >= 1, --warmup and --train_batch_size >= 0")
        device = self.policy.device
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--policy.device={device}: no CUDA device is available here; use cpu")
