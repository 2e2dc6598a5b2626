"""Which blocks to remove: CKA/cosine scores → kept original indices per stack, under rules and a budget.

A stack of L blocks has L+1 residual states (state i = input of block i, state L = output of the
last block; see :mod:`vlaprune.core.cka`). A plan stores the KEPT ORIGINAL indices of every stack. The
family's rules come as data: lockstep groups (stacks that keep identical indices, planned together
with their costs summed), roles by position (kept block k_j lands at new position j and needs
``roles[j] == roles[k_j]``) and protected blocks (never removed).

The damage proxy of every plan is the cka-dp path cost (:func:`path_cost`): each kept block now
receives the state after the previous kept block instead of its usual input, and that mismatch
costs ``1 - CKA``. cka-dp minimises it exactly; the other methods are baselines or alternatives whose
plans carry the same cost so that they can be compared and, for ``--refine``, measured for real.
``loss`` (:func:`greedy_removal`) plans from a measured score instead, which its caller supplies.
Everything here is numpy and stdlib: no model code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from operator import index
from types import MappingProxyType
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("cka-dp", "cka-run", "bi", "angular", "first-k", "random")  # from the matrices
LOSS = "loss"  # from a measured score: greedy_removal
_INF = math.inf


class PlanError(ValueError):
    """An infeasible request or a plan that breaks a family rule."""


# ----------------------------------------------------------------------------------------- problem
@dataclass(frozen=True)
class StackProblem:
    """One stack: its depth, (L+1)×(L+1) CKA and mean-cosine matrices between residual states, rules."""

    name: str
    num_layers: int
    cka: np.ndarray  # (L+1, L+1)
    cosine: np.ndarray | None = None  # (L+1, L+1); needed by "bi" and "angular"
    roles: tuple[str, ...] | None = None  # role of each original position 0..L-1
    protected: frozenset[int] = frozenset()  # original indices that must be kept
    protected_why: str = ""  # why they must be kept (shown in errors)

    def __post_init__(self) -> None:
        n = self.num_layers
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"stack {self.name!r}: num_layers must be an int >= 1, got {n!r}")
        for attr in ("cka", "cosine"):
            value = getattr(self, attr)
            if value is None:
                continue
            mat = np.array(value, dtype=np.float64)  # a private copy: plans must not change under us
            if mat.shape != (n + 1, n + 1):
                raise ValueError(f"stack {self.name!r}: {attr} must have shape {(n + 1, n + 1)} "
                                 f"(num_layers + 1 states), got {mat.shape}")
            bad = sorted({int(i) for i in np.argwhere(~np.isfinite(mat)).flatten()})
            if bad:
                raise ValueError(f"stack {self.name!r}: {attr} is not finite at states {bad} "
                                 "(constant residual states?); cannot plan on undefined similarities")
            mat.flags.writeable = False
            object.__setattr__(self, attr, mat)
        if self.roles is not None:
            object.__setattr__(self, "roles", tuple(str(r) for r in self.roles))
            if len(self.roles) != n:
                raise ValueError(f"stack {self.name!r}: roles has {len(self.roles)} entries, expected {n}")
        object.__setattr__(self, "protected", frozenset(index(i) for i in self.protected))
        outside = sorted(i for i in self.protected if not 0 <= i < n)
        if outside:
            raise ValueError(f"stack {self.name!r}: protected blocks {outside} are outside 0..{n - 1}")


@dataclass(frozen=True)
class PlanProblem:
    """All stacks of a policy plus the lockstep groups that couple them."""

    stacks: tuple[StackProblem, ...]
    lockstep: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stacks", tuple(self.stacks))
        object.__setattr__(self, "lockstep", tuple(tuple(g) for g in self.lockstep))
        names = [s.name for s in self.stacks]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"stack names must be unique and non-empty, got {names}")
        seen: set[str] = set()
        for group in self.lockstep:
            unknown = [m for m in group if m not in names]
            if unknown:
                raise ValueError(f"lockstep group {group}: unknown stacks {unknown}; stacks are {names}")
            if seen & set(group) or len(set(group)) != len(group):
                raise ValueError(f"lockstep group {group}: a stack may appear in one lockstep group only once")
            seen |= set(group)
            depths = {m: self.stack(m).num_layers for m in group}
            if len(set(depths.values())) != 1:
                raise ValueError(f"lockstep group {group}: members must have equal num_layers, got {depths}")

    def stack(self, name: str) -> StackProblem:
        for s in self.stacks:
            if s.name == name:
                return s
        raise ValueError(f"unknown stack {name!r}; stacks are {[s.name for s in self.stacks]}")


@dataclass(frozen=True)
class Budget:
    """How deep the result is: exactly one of a removal ratio, explicit keep counts, or a cost threshold.

    ``ratio``: fraction of blocks removed per stack, K = L - round(ratio * L) (Python's round).
    ``keep``: keep count per stack; unnamed stacks keep all blocks unless a lockstep partner is named.
    ``threshold``: per planning unit (a lockstep group or a lone stack), the smallest K whose optimal
    cka-dp cost (summed over the group) is <= threshold; other methods then plan at that K.
    """

    ratio: float | None = None
    keep: Mapping[str, int] | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("ratio", "keep", "threshold") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of ratio, keep, threshold; got {given or 'none'}")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ValueError(f"ratio is the fraction of blocks removed, 0 <= ratio < 1; got {self.ratio}")
        if self.threshold is not None and not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"threshold is a cka-dp cost, a finite number >= 0; got {self.threshold}")
        if self.keep is not None:
            bad = {k: v for k, v in self.keep.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
            if bad:
                raise ValueError(f"keep counts must be ints >= 1, got {bad}")
            object.__setattr__(self, "keep", MappingProxyType(dict(self.keep)))


@dataclass(frozen=True)
class Plan:
    """Kept original indices per stack, the method that chose them and their cka-dp cost (all stacks)."""

    method: str
    kept: Mapping[str, tuple[int, ...]]
    cost: float
    details: Mapping[str, Any] = field(default_factory=dict)  # e.g. seed, chosen run threshold, window

    def __post_init__(self) -> None:
        kept = {name: tuple(index(i) for i in orig_idx) for name, orig_idx in self.kept.items()}
        object.__setattr__(self, "kept", MappingProxyType(kept))
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))

    def removed(self, stack: str, num_layers: int) -> tuple[int, ...]:
        kept = set(self.kept[stack])
        return tuple(i for i in range(num_layers) if i not in kept)

    def to_json(self) -> dict:
        return {"method": self.method, "cost": self.cost,
                "kept": {k: list(v) for k, v in self.kept.items()}, "details": dict(self.details)}


# ------------------------------------------------------------------------------------ rules & cost
def path_cost(cka: np.ndarray, kept: Sequence[int]) -> float:
    """cka-dp damage proxy of one stack: Σ_j (1 - CKA[prev_j, k_j]) + (1 - CKA[k_{K-1}+1, L]).

    prev_j = k_{j-1}+1 (state after the previous kept block), or 0 for j = 0. A term whose two states
    are the same (no block skipped there) is 0 by definition, so keeping all blocks costs exactly 0
    even where an estimator's diagonal is not exactly 1.
    """
    mat = np.asarray(cka, dtype=np.float64)
    num_layers = mat.shape[0] - 1
    ks = [index(k) for k in kept]
    if not ks or any(b <= a for a, b in pairwise(ks)) or not 0 <= ks[0] <= ks[-1] < num_layers:
        raise PlanError(f"kept must be non-empty, strictly increasing, within 0..{num_layers - 1}; got {ks}")
    prev, cost = 0, 0.0
    for state in [*ks, num_layers]:  # the state each kept block (then the stack output) should receive
        if prev != state:
            cost += 1.0 - float(mat[prev, state])
        prev = state + 1
    return cost


def validate_kept(problem: PlanProblem, kept: Mapping[str, Sequence[int]]) -> None:
    """Raise PlanError naming the rule and the stack if ``kept`` is not a valid plan of ``problem``."""
    names = [s.name for s in problem.stacks]
    if set(kept) != set(names):
        raise PlanError(f"kept must name every stack exactly: missing {sorted(set(names) - set(kept))}, "
                        f"unknown {sorted(set(kept) - set(names))}")
    for s in problem.stacks:
        ks, n = list(kept[s.name]), s.num_layers
        if not ks:
            raise PlanError(f"stack {s.name!r}: empty kept list; at least one block must be kept")
        if any(isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k < n for k in ks):
            raise PlanError(f"stack {s.name!r}: kept indices out of range 0..{n - 1}: {ks}")
        if len(set(ks)) != len(ks):
            raise PlanError(f"stack {s.name!r}: duplicate kept indices in {ks}")
        if ks != sorted(ks):
            raise PlanError(f"stack {s.name!r}: kept indices must be sorted ascending, got {ks}")
        lost = sorted(s.protected - set(ks))
        if lost:
            why = f" ({s.protected_why})" if s.protected_why else ""
            raise PlanError(f"stack {s.name!r}: protected blocks {lost} are removed; protected blocks must be "
                            f"kept{why}")
        if s.roles is not None:
            for new_idx, orig_idx in enumerate(ks):
                if s.roles[new_idx] != s.roles[orig_idx]:
                    raise PlanError(
                        f"stack {s.name!r}: role rule broken: original block {orig_idx} "
                        f"({s.roles[orig_idx]!r}) would land at new position {new_idx}, whose role is "
                        f"{s.roles[new_idx]!r}; a kept block must keep its role")
    for group in problem.lockstep:
        lists = {m: tuple(kept[m]) for m in group}
        if len(set(lists.values())) != 1:
            raise PlanError(f"lockstep group {group}: members must keep the same indices, got {lists}")


@dataclass(frozen=True)
class _Group:
    """A planning unit (lockstep group or lone stack) with its rules merged."""

    members: tuple[StackProblem, ...]
    num_layers: int
    allowed: np.ndarray  # (L, L) bool: allowed[new_idx, orig_idx], roles of every member agree
    protected: np.ndarray  # (L,) bool, union over members

    @property
    def label(self) -> str:
        return "/".join(m.name for m in self.members)

    def cost_matrix(self) -> np.ndarray:
        """(L+1, L+1) summed 1 - CKA with zero diagonal (see path_cost)."""
        c = sum(1.0 - m.cka for m in self.members)
        assert isinstance(c, np.ndarray)
        np.fill_diagonal(c, 0.0)
        return c

    def rules(self) -> str:
        """The rules in force, for error messages: 'the self/cross roles of expert and protected blocks [0]'."""
        with_roles = [m for m in self.members if m.roles is not None]
        role_names = sorted({r for m in with_roles for r in m.roles or ()})
        prot = np.flatnonzero(self.protected).tolist()
        parts = [f"the {'/'.join(role_names)} roles of {'/'.join(m.name for m in with_roles)}"] if with_roles else []
        whys = "; ".join(m.protected_why for m in self.members if m.protected_why)
        parts += [f"protected blocks {prot}" + (f" ({whys})" if whys else "")] if prot else []
        return " and ".join(parts) or "no rule"


def _groups(problem: PlanProblem) -> list[_Group]:
    grouped = {m for g in problem.lockstep for m in g}
    units = [*problem.lockstep, *((s.name,) for s in problem.stacks if s.name not in grouped)]
    out = []
    for unit in units:
        members = tuple(problem.stack(m) for m in unit)
        n = members[0].num_layers
        allowed = np.ones((n, n), dtype=bool)
        protected = np.zeros(n, dtype=bool)
        for m in members:
            if m.roles is not None:
                r = np.array(m.roles)
                allowed &= r[:, None] == r[None, :]
            protected[sorted(m.protected)] = True
        out.append(_Group(members, n, allowed, protected))
    return out


def _count_table(g: _Group, available: Sequence[int] | None = None) -> list[list[int]]:
    """W[i][c]: number of ways to decide blocks 0..i-1 keeping c of them, every rule respected (exact
    ints); only blocks in ``available`` (default: all) may be kept."""
    n = g.num_layers
    can_keep = np.ones(n, dtype=bool) if available is None else np.isin(np.arange(n), list(available))
    w = [[1] + [0] * n]
    for i in range(n):
        row = [0] * (n + 1)
        for c, ways in enumerate(w[-1]):
            if ways:
                if not g.protected[i]:
                    row[c] += ways  # skip block i
                if c < n and can_keep[i] and g.allowed[c, i]:
                    row[c + 1] += ways  # keep block i at new position c
        w.append(row)
    return w


def _feasible_counts(g: _Group) -> list[int]:
    last = _count_table(g)[-1]
    return [k for k in range(1, g.num_layers + 1) if last[k]]


def feasible_keep_counts(problem: PlanProblem, stack: str) -> list[int]:
    """Keep counts K in 1..L for which a kept set satisfies every rule of ``stack``'s lockstep group."""
    problem.stack(stack)
    return _feasible_counts(next(g for g in _groups(problem) if stack in [m.name for m in g.members]))


def _check_count(g: _Group, k: int) -> None:
    feasible = _feasible_counts(g)
    if k not in feasible:
        raise PlanError(f"keeping {k} of {g.num_layers} {g.label} blocks cannot preserve {g.rules()}; "
                        f"feasible keep counts: {', '.join(map(str, feasible))}")


# ---------------------------------------------------------------------------------------- solvers
def _dp_tables(g: _Group) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cka-dp over (number kept, last kept block): f[j, i] = least cost of keeping j+1 blocks, the last i.

    Returns f (L, L), argmin back-pointers (L, L) and end[i] = cost of going from block i to the output.
    """
    n, c = g.num_layers, g.cost_matrix()
    pc = np.concatenate([[0], np.cumsum(g.protected)])  # pc[x] = protected blocks among 0..x-1
    idx = np.arange(n)
    # T[p, i], p < i: block i receives the state after block p; blocks p+1..i-1 skipped (none protected)
    trans = np.where((idx[:, None] < idx[None, :]) & (pc[idx][None, :] - pc[idx + 1][:, None] == 0),
                     c[idx[:, None] + 1, idx[None, :]], _INF)
    start = np.where(pc[idx] == 0, c[0, idx], _INF)
    end = np.where(pc[n] - pc[idx + 1] == 0, c[idx + 1, n], _INF)
    f = np.full((n, n), _INF)
    back = np.zeros((n, n), dtype=np.int64)
    f[0] = np.where(g.allowed[0], start, _INF)
    for j in range(1, n):
        total = f[j - 1][:, None] + trans  # (last kept p, next kept i)
        back[j] = np.argmin(total, axis=0)
        f[j] = np.where(g.allowed[j], total[back[j], idx], _INF)
    return f, back, end


def _plan_dp(g: _Group, k: int) -> tuple[int, ...]:
    f, back, end = _dp_tables(g)
    last = int(np.argmin(f[k - 1] + end))
    assert math.isfinite(f[k - 1, last] + end[last]), "feasibility is checked before planning"
    kept = [last]
    for j in range(k - 1, 0, -1):
        kept.append(int(back[j, kept[-1]]))
    return tuple(reversed(kept))


def _select(g: _Group, scores: np.ndarray, k: int) -> tuple[int, ...]:
    """Constrained selection: the feasible kept set of size k minimising Σ scores of removed blocks.

    DP over positions with state c = blocks kept so far (roles make a keep depend on c).
    """
    n = g.num_layers
    v = np.full(k + 1, _INF)
    v[0] = 0.0
    keep_choice = np.zeros((n, k + 1), dtype=bool)
    for i in range(n):
        keep_vals = np.full(k + 1, _INF)
        keep_vals[1:] = np.where(g.allowed[:k, i], v[:k], _INF)
        skip_vals = np.full(k + 1, _INF) if g.protected[i] else v + scores[i]
        keep_choice[i] = keep_vals <= skip_vals
        v = np.minimum(keep_vals, skip_vals)
    assert math.isfinite(v[k]), "feasibility is checked before planning"
    kept, c = [], k
    for i in range(n - 1, -1, -1):
        if keep_choice[i, c]:
            kept.append(i)
            c -= 1
    return tuple(reversed(kept))


def _random(g: _Group, k: int, rng: np.random.Generator) -> tuple[int, ...]:
    """A uniformly random feasible kept set: sample backwards through the exact count table."""
    w, kept, c = _count_table(g), [], k
    for i in range(g.num_layers - 1, -1, -1):
        ways_keep = w[i][c - 1] if c > 0 and g.allowed[c - 1, i] else 0
        ways_skip = 0 if g.protected[i] else w[i][c]
        if rng.random() * (ways_keep + ways_skip) < ways_keep:
            kept.append(i)
            c -= 1
    return tuple(reversed(kept))


def _cosine(m: StackProblem, method: str) -> np.ndarray:
    if m.cosine is None:
        raise PlanError(f"method {method!r} needs the cosine matrix of stack {m.name!r}")
    return m.cosine


def _plan_bi(g: _Group, k: int) -> tuple[int, ...]:
    # ShortGPT (Men et al. 2024): block influence BI_i = 1 - E_t cos(h_i, h_{i+1}); lowest BI removed first
    bi = sum(1.0 - np.diagonal(_cosine(m, "bi"), offset=1) for m in g.members)
    return _select(g, np.asarray(bi), k)


def _plan_angular(g: _Group, k: int) -> tuple[tuple[int, ...], dict[str, Any]]:
    """Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers": drop the contiguous
    window [l, l+n) minimising the angular distance arccos(cos(h_l, h_{l+n})) / π (summed over the group)."""
    n_layers, n = g.num_layers, g.num_layers - k
    if n == 0:
        return tuple(range(n_layers)), {"window": None}
    cos = [_cosine(m, "angular") for m in g.members]

    def blocked(start: int, width: int) -> str | None:
        if g.protected[start:start + width].any():
            return "protected blocks"
        if not all(g.allowed[i - width, i] for i in range(start + width, n_layers)):
            return "roles"  # every block after the window shifts `width` positions down
        return None

    best: tuple[float, int] | None = None
    for start in range(n_layers - n + 1):
        if blocked(start, n) is None:
            dist = sum(math.acos(float(np.clip(c[start, start + n], -1.0, 1.0))) / math.pi for c in cos)
            if best is None or dist < best[0]:
                best = (dist, start)
    if best is None:
        rules = sorted({r for s in range(n_layers - n + 1) if (r := blocked(s, n))})
        ok = [w for w in range(1, n_layers) if any(blocked(s, w) is None for s in range(n_layers - w + 1))]
        raise PlanError(f"angular: no contiguous window of {n} {g.label} blocks can be removed without breaking "
                        f"the {' and '.join(rules)} rule{'s' * (len(rules) > 1)}; window lengths that work: {ok}")
    start = best[1]
    return tuple(i for i in range(n_layers) if not start <= i < start + n), {"window": [start, start + n]}


def _plan_first_k(g: _Group, k: int) -> tuple[int, ...]:
    beyond = np.flatnonzero(g.protected[k:]) + k
    if beyond.size:
        raise PlanError(f"first-k: keeping blocks 0..{k - 1} of {g.label} removes protected blocks "
                        f"{beyond.tolist()} ({g.rules()})")
    return tuple(range(k))


def _run_scores(g: _Group, theta: float) -> tuple[np.ndarray, int, float]:
    """Removal scores for the run rule at threshold θ: (scores, #candidates of every member, penalty).

    CLP (arXiv 2606.20246): greedily from the left, a run headed by block a takes in blocks b while
    CKA[a+1, b+1] >= θ (b's output is similar to a's output); the non-head blocks are candidates, most
    similar first. A lockstep group's candidates are those of every member. A non-candidate scores
    1 - CKA[b, b+1] plus a penalty larger than all other scores together, so it goes only if it must.
    """
    n = g.num_layers
    sec, not_cand = np.zeros(n), np.zeros(n)
    for m in g.members:
        a = 0
        while a < n:
            sec[a] += 1.0 - m.cka[a, a + 1]
            not_cand[a] += 1
            b = a + 1
            while b < n and m.cka[a + 1, b + 1] >= theta:
                sec[b] += 1.0 - m.cka[a + 1, b + 1]
                b += 1
            a = b
    penalty = 1.0 + float(np.abs(sec).sum())
    return sec + penalty * not_cand, int((not_cand == 0).sum()), penalty


def _plan_run(g: _Group, k: int | None, theta: float | None) -> tuple[tuple[int, ...], dict[str, Any]]:
    n = g.num_layers
    if theta is not None:  # the rule decides the depth: remove the candidates, repaired to a feasible K
        scores, n_cand, _ = _run_scores(g, theta)
        target = n - n_cand
        k = min(_feasible_counts(g), key=lambda x: (abs(x - target), -x))
        if k != target:
            logger.info("cka-run: %d candidates in %s at θ=%.4g; %s forces keeping %d blocks, not %d",
                        n_cand, g.label, theta, g.rules(), k, target)
        return _select(g, scores, k), {"run_threshold": theta}
    assert k is not None
    if k == n:
        return tuple(range(n)), {"run_threshold": None}
    values = sorted({float(m.cka[a + 1, b + 1]) for m in g.members for a in range(n) for b in range(a + 1, n)},
                    reverse=True)
    for theta in values:  # highest θ whose candidates can make up the removal under the rules
        scores, n_cand, penalty = _run_scores(g, theta)
        if n_cand >= n - k:
            kept = _select(g, scores, k)
            if sum(scores[i] for i in range(n) if i not in kept) < penalty:
                return kept, {"run_threshold": theta}
    logger.info("cka-run: no run threshold gives %d removable candidates in %s; removing heads too", n - k, g.label)
    return _select(g, _run_scores(g, values[-1])[0], k), {"run_threshold": values[-1]}


# ------------------------------------------------------------------------------------------ public
def _keep_counts(problem: PlanProblem, groups: list[_Group], budget: Budget) -> list[int]:
    counts = []
    for g in groups:
        n, names = g.num_layers, [m.name for m in g.members]
        if budget.ratio is not None:
            k = n - round(budget.ratio * n)
        elif budget.keep is not None:
            unknown = sorted(set(budget.keep) - {s.name for s in problem.stacks})
            if unknown:
                raise ValueError(f"budget.keep names unknown stacks {unknown}; stacks are "
                                 f"{[s.name for s in problem.stacks]}")
            named = {m: budget.keep[m] for m in names if m in budget.keep}
            if len(set(named.values())) > 1:
                raise ValueError(f"budget.keep: lockstep group {tuple(names)} must share one keep count, got {named}")
            k = next(iter(named.values()), n)
            if k > n:
                raise PlanError(f"budget.keep: cannot keep {k} of {n} {g.label} blocks")
        else:
            assert budget.threshold is not None
            f, _, end = _dp_tables(g)
            best = (f + end[None, :]).min(axis=1)  # [K-1] = optimal cost of keeping K blocks
            k = 1 + next(j for j in range(n) if best[j] <= budget.threshold)
        if k < 1:
            raise PlanError(f"budget removes all {n} {g.label} blocks; at least one must be kept")
        _check_count(g, k)
        counts.append(k)
    return counts


def _plan_group(g: _Group, method: str, k: int | None, rng: np.random.Generator,
                run_threshold: float | None) -> tuple[tuple[int, ...], dict[str, Any]]:
    if method == "cka-run":
        return _plan_run(g, k, run_threshold)
    assert k is not None
    if method == "angular":
        return _plan_angular(g, k)
    planners = {"cka-dp": _plan_dp, "bi": _plan_bi, "first-k": _plan_first_k}
    return (planners[method](g, k) if method in planners else _random(g, k, rng)), {}


def plan_removal(problem: PlanProblem, budget: Budget | None, method: str = "cka-dp", *, seed: int = 0,
                 run_threshold: float | None = None) -> Plan:
    """Kept original indices per stack chosen by ``method`` under ``budget`` and every family rule.

    ``run_threshold`` (cka-run only) lets the run rule decide the depth; then ``budget`` must be None.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if run_threshold is not None and (method != "cka-run" or budget is not None):
        raise ValueError("run_threshold decides the depth by the cka-run rule: use it with method='cka-run' "
                         "and budget=None")
    if budget is None and run_threshold is None:
        raise ValueError("a budget is required (or method='cka-run' with run_threshold)")
    groups = _groups(problem)
    counts = [None] * len(groups) if budget is None else _keep_counts(problem, groups, budget)
    rng = np.random.default_rng(seed)
    kept: dict[str, tuple[int, ...]] = {}
    details: dict[str, Any] = {"seed": seed} if method == "random" else {}
    for g, k in zip(groups, counts, strict=True):
        sel, extra = _plan_group(g, method, k, rng, run_threshold)
        for key, value in extra.items():
            details.setdefault(key, {})[g.label] = value
        kept.update({m.name: sel for m in g.members})
    validate_kept(problem, kept)  # every method, every time: a plan that breaks a rule never leaves here
    cost = sum(path_cost(s.cka, kept[s.name]) for s in problem.stacks)
    return Plan(method, kept, cost, details)


Score = Callable[[Mapping[str, tuple[int, ...]]], float]


def greedy_removal(problem: PlanProblem, budget: Budget, score: Score, *, method: str = LOSS) -> Plan:
    """Remove one block at a time, each time the one whose removal gives the lowest ``score(kept)``,
    re-scored after every removal (SLEB, Song et al. 2024), until every planning unit reaches its keep
    count under ``budget``.

    Every family rule holds: a lockstep group removes a block from all its members at once, protected
    blocks stay, and a removal is tried only if a kept set of the target size that keeps every role
    still exists inside what remains (an intermediate set may break roles on the way, e.g. one
    removal of an alternating self/cross stack on the way to removing a pair). ``score`` costs a
    forward pass; :func:`greedy_evaluations` bounds the number of calls, and each removal is logged.
    Ties go to the lowest block.
    """
    groups = _groups(problem)
    counts = _keep_counts(problem, groups, budget)
    kept = [list(range(g.num_layers)) for g in groups]

    def plan_of(sets: list[list[int]]) -> dict[str, tuple[int, ...]]:
        return {m.name: tuple(sel) for g, sel in zip(groups, sets, strict=True) for m in g.members}

    evaluations, order = 0, []
    while any(len(sel) > k for sel, k in zip(kept, counts, strict=True)):
        best: tuple[float, int, int] | None = None
        for gi, (g, k) in enumerate(zip(groups, counts, strict=True)):
            if len(kept[gi]) == k:
                continue
            for block in kept[gi]:
                trial = [b for b in kept[gi] if b != block]
                if g.protected[block] or not _count_table(g, trial)[-1][k]:
                    continue
                value = float(score(plan_of([*kept[:gi], trial, *kept[gi + 1:]])))
                evaluations += 1
                if not math.isfinite(value):
                    raise ValueError(f"{method}: the score of removing {g.label} block {block} is {value}")
                if best is None or value < best[0]:
                    best = (value, gi, block)
        assert best is not None, "feasibility is checked before planning"
        value, gi, block = best
        kept[gi].remove(block)
        order.append({"stack": groups[gi].label, "removed": block, "score": value})
        logger.info("%s: removed %s block %d (score %.6g), %d evaluations so far", method, groups[gi].label, block,
                    value, evaluations)
    plan = plan_of(kept)
    validate_kept(problem, plan)
    cost = sum(path_cost(s.cka, plan[s.name]) for s in problem.stacks)
    return Plan(method, plan, cost, {"evaluations": evaluations, "order": order})


def greedy_evaluations(problem: PlanProblem, budget: Budget) -> int:
    """At most how many times :func:`greedy_removal` calls its score under ``budget``: removal t tries
    at most the N - t blocks still kept (N blocks in all units), over T removals."""
    groups = _groups(problem)
    counts = _keep_counts(problem, groups, budget)
    total = sum(g.num_layers for g in groups)
    removals = sum(g.num_layers - k for g, k in zip(groups, counts, strict=True))
    return sum(total - t for t in range(removals))


# the refinement pool: the trivial baselines first (keep a prefix, drop the best contiguous window), then
# the similarity plans; random plans are a baseline to compare against, not candidates
POOL = ("first-k", "angular", "cka-dp", "cka-run", "bi")


def candidate_plans(problem: PlanProblem, budget: Budget) -> list[Plan]:
    """The distinct plans of every method in :data:`POOL` that can serve ``budget``, in that order.

    For ``--plan.refine``: no proxy decides alone which plan fine-tunes best, so a measured signal picks
    among these. A method that cannot serve the budget under the family's rules is dropped (logged);
    if none can, the error of the first is raised.
    """
    plans: list[Plan] = []
    errors: list[PlanError] = []
    for method in POOL:
        try:
            plans.append(plan_removal(problem, budget, method))
        except PlanError as err:
            logger.info("refine pool: %s dropped: %s", method, err)
            errors.append(err)
    if not plans:
        raise errors[0]
    return distinct_plans(plans)


def distinct_plans(plans: Sequence[Plan]) -> list[Plan]:
    """``plans`` without repeats of a kept set, in order; the first of each set records the methods
    that found it too (``details["also"]``), so a pool shows e.g. that cka-dp's plan is first-k's."""
    out: list[Plan] = []
    for plan in plans:
        same = next((i for i, p in enumerate(out) if dict(p.kept) == dict(plan.kept)), None)
        if same is None:
            out.append(plan)
        else:
            first = out[same]
            also = list(first.details.get("also", []))
            for method in (plan.method, *plan.details.get("also", [])):
                if method != first.method and method not in also:
                    also.append(method)
            if also:
                out[same] = replace(first, details={**first.details, "also": also})
    return out
