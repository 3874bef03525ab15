"""Does the HMC sample the tilted policy? Known targets with an exact density (issue 14, part 1).

Every target is a tanh-Gaussian policy pi (pre-tanh mean/std given) tilted by a hand-written Q:
p(a) ~ pi(a) exp(Q(a)). In u = atanh(a) the density is N(u; mu, sigma) exp(Q(tanh u)), which a
fine grid integrates exactly enough (1-D: 20001 points, 2-D: 801 x 801); a is a monotone map of u
per dimension, so KS distances and quantile-bin histograms are the same in u and in a.

Chains start at "dataset actions" drawn unlike the target (uniform in the box, or partly clipped
to +-0.999 as in the locomotion datasets). Per sampler and target:
  acc        fraction of accepted transitions (burn-in included)
  KS, p      KS distance and p-value of the last recorded sample of every chain (chains are
             independent, so n = chains); 2-D: the worse marginal (max distance, min p)
  TV         total variation between the histogram of those samples and the exact bin
             probabilities, bins at the exact marginal quantiles (1-D: 20, 2-D: 10 x 10)
  KS/TV pool the same for all K recorded samples of all chains (no p-value: correlated)
  ESS        ESS of each chain's K recorded u values (misa_fast.ops.hmc_reference.effective_sample_size),
             mean over chains and dimensions; per 100 gradient evaluations of the
             (burn_in + K) * L + 1 a chain costs
Rows "iid exact" (samples of p itself) and "iid policy" (samples of pi, no tilt) give the noise
floor of each statistic at this many chains and how far the tilt moves pi.

Samplers, each from the library's default initial step of its space
(``misa_fast.ops.hmc_reference.default_step_size``): faithful (post-tanh, step 1: the official sampler), adaptive
(post-tanh, per-chain step adapted during burn-in), pre_tanh (whitened pre-tanh space, split
integrator, step pi / (2 L): a transition turns the Gaussian part by a quarter period, so that with
Q = 0 the new position is the fresh momentum, independent of the old), pre_tanh-adaptive, and
pre_tanh-step1 (pre-tanh with the official step 1).

Why not step 1 in the pre-tanh space: a transition then turns (z, p) by 2 rad, and a chain that
starts |z| >> 1 policy stds out (small std, dataset action at +-0.999) swings to about -0.4 z, i.e.
to the other saturated end of the box, where Q can be lower by several nats than where it started;
such moves are rejected and the chain stays stuck in the tail (quadratic-narrow, ridge-narrow).

The adaptive samplers start each call at the geometric mean of the previous call's adapted step
sizes, as the agent carries it across updates; ``--warm-calls`` calls on fresh initial actions
precede the measured one.

    OMP_NUM_THREADS=1 python bench/studies/hmc_mixing.py        # ~30 s on one core
    python bench/studies/hmc_mixing.py --chains 4000 --seed 1 --out /tmp/hmc-mixing   # writes /tmp/hmc-mixing.{json,md}

Writes bench/results/hmc-mixing-2026-12-02.{json,md} by default and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import stats

from misa_fast.ops import hmc_reference as hmc

RESULTS = Path(__file__).resolve().parents[1] / "results"
DEFAULT_OUT = RESULTS / "hmc-mixing-2026-12-02"

NUM_SAMPLES, BURN_IN, LEAPFROG = 50, 5, 2
# name -> (space, mode, initial step size; None: misa_fast.ops.hmc_reference.default_step_size of the space)
SAMPLERS: Dict[str, Tuple[str, str, Optional[float]]] = {
    "faithful": ("post_tanh", "faithful", None),
    "adaptive": ("post_tanh", "adaptive", None),
    "pre_tanh": ("pre_tanh", "faithful", None),
    "pre_tanh-adaptive": ("pre_tanh", "adaptive", None),
    # the official step in the pre-tanh space: a 2 rad turn of the Gaussian part per transition
    "pre_tanh-step1": ("pre_tanh", "faithful", 1.0),
}

QFn = Callable[[torch.Tensor], torch.Tensor]  # a (C, A) -> Q (C,), differentiable, any float dtype


# --------------------------------------------------------------------------------------------------
# Hand-written critics
def quadratic(center: Sequence[float], curvature: float, coupling: float = 0.0) -> QFn:
    def q(a):
        c = a.new_tensor(center)
        out = -curvature * ((a - c) ** 2).sum(-1)
        if a.shape[-1] == 2:
            out = out + coupling * a[:, 0] * a[:, 1]
        return out
    return q


def double_well(depth: float, well: float, coupling: float = 0.0) -> QFn:
    """Two modes at a_0 = +-well separated by a barrier of ``depth`` nats at a_0 = 0 (before pi)."""
    def q(a):
        out = -depth * ((a[:, 0] ** 2 - well ** 2) / well ** 2) ** 2
        if a.shape[-1] == 2:
            out = out + coupling * a[:, 0] * a[:, 1]
        return out
    return q


def linear(slope: Sequence[float]) -> QFn:
    """Q = slope . a: pushes mass towards the corner sign(slope) of the box."""
    def q(a):
        return (a * a.new_tensor(slope)).sum(-1)
    return q


def bump(height: float, at: float, width: float) -> QFn:
    def q(a):
        return height * torch.exp(-0.5 * (((a - at) / width) ** 2).sum(-1))
    return q


@dataclass(frozen=True)
class Target:
    name: str
    mean: Tuple[float, ...]  # pre-tanh policy mean per dimension
    std: Tuple[float, ...]
    q: QFn = field(repr=False)
    init: str  # "uniform": U(-1, 1)^A; "clipped": as uniform, but each coordinate +-0.999 w.p. 1/2
    about: str

    @property
    def dim(self) -> int:
        return len(self.mean)


TARGETS: List[Target] = [
    Target("quadratic", (0.5,), (0.3,), quadratic([-0.2], 8.0), "uniform", "Q = -8 (a + 0.2)^2"),
    Target("quadratic-narrow", (0.5,), (0.05,), quadratic([-0.2], 8.0), "uniform",
           "as quadratic, std 0.05"),
    Target("bimodal", (0.2,), (0.6,), double_well(2.5, 0.6), "uniform",
           "Q = -2.5 ((a^2 - 0.36) / 0.36)^2: modes near +-0.6, barrier 2.5 nats"),
    Target("ridge", (1.5,), (0.3,), linear([3.0]), "clipped", "Q = 3 a, mean at the boundary"),
    Target("ridge-narrow", (1.5,), (0.05,), linear([20.0]), "clipped", "Q = 20 a, std 0.05"),
    Target("bump", (1.5,), (0.3,), bump(2.5, 0.95, 0.02), "clipped", "Q = 2.5 N-bump at a = 0.95, width 0.02"),
    Target("quadratic-2d", (0.5, -0.3), (0.3, 0.05), quadratic([-0.2, 0.0], 4.0, 3.0), "uniform",
           "Q = -4 |a - (-0.2, 0)|^2 + 3 a0 a1, stds 0.3 / 0.05"),
    Target("bimodal-2d", (0.2, 0.0), (0.6, 0.4), double_well(2.5, 0.6, 2.0), "uniform",
           "double well in a0 + 2 a0 a1"),
    Target("ridge-2d", (1.5, -1.5), (0.3, 0.3), linear([3.0, -3.0]), "clipped", "Q = 3 a0 - 3 a1, corner means"),
]
TARGETS_BY_NAME = {t.name: t for t in TARGETS}


def q_and_grad(q: QFn) -> hmc.QAndGrad:
    """The sampler's view of a hand-written Q: a (C, A) -> (Q (C,), dQ/da (C, A)) by autograd."""
    def f(a):
        with torch.enable_grad():
            a = a.detach().requires_grad_(True)
            value = q(a)
            (grad,) = torch.autograd.grad(value.sum(), a)
        return value.detach(), grad
    return f


def initial_actions(target: Target, chains: int, generator: torch.Generator) -> torch.Tensor:
    a = torch.rand(chains, target.dim, generator=generator) * 2.0 - 1.0
    if target.init == "clipped":
        clip = torch.rand(chains, target.dim, generator=generator) < 0.5
        a = torch.where(clip, 0.999 * torch.sign(a), a)
    return a


# --------------------------------------------------------------------------------------------------
# The exact tilted density on a grid in u
class Exact:
    """p(u) ~ N(u; mu, sigma) exp(Q(tanh u)) on a tensor grid: marginal CDFs, exact probabilities of
    quantile bins, and i.i.d. samples (for the noise floor)."""

    def __init__(self, target: Target, points: Optional[int] = None, tilt: bool = True):
        dim = target.dim
        points = points or (20001 if dim == 1 else 801)
        mu, sigma = np.asarray(target.mean), np.asarray(target.std)
        # wide enough for the tilt too: |dQ/du| <= max |dQ/da| moves the Gaussian by at most that * sigma^2
        self.axes = [np.linspace(m - 14.0 * s, m + 14.0 * s, points) for m, s in zip(mu, sigma)]
        grids = np.meshgrid(*self.axes, indexing="ij")
        u = np.stack([g.ravel() for g in grids], axis=-1)
        log_p = (-0.5 * ((u - mu) / sigma) ** 2).sum(-1)
        if tilt:
            with torch.no_grad():
                log_p = log_p + target.q(torch.tanh(torch.from_numpy(u))).numpy()
        log_p = log_p.reshape(grids[0].shape)
        edge = max(np.moveaxis(log_p, d, 0)[[0, -1]].max() for d in range(dim))
        if edge > log_p.max() - 40.0:
            raise ValueError(f"{target.name}: the grid cuts off mass (edge log density {edge - log_p.max():.1f})")
        w = np.exp(log_p - log_p.max())
        self.weights = w / w.sum()  # cell probabilities (uniform spacing)
        self.dim = dim
        self.marginals = [self.weights.sum(axis=tuple(j for j in range(dim) if j != d)) for d in range(dim)]
        self.cdfs = [np.cumsum(m) - 0.5 * m for m in self.marginals]  # midpoint rule: CDF at each grid point
        self.bins_per_dim = 20 if dim == 1 else 10
        qs = np.linspace(0.0, 1.0, self.bins_per_dim + 1)[1:-1]
        self.edges = [np.interp(qs, cdf, axis) for cdf, axis in zip(self.cdfs, self.axes)]
        cell = [np.searchsorted(e, axis) for e, axis in zip(self.edges, self.axes)]
        index = np.ravel_multi_index(np.meshgrid(*cell, indexing="ij"), (self.bins_per_dim,) * dim)
        self.bin_probs = np.bincount(index.ravel(), weights=self.weights.ravel(), minlength=self.bins_per_dim ** dim)

    def cdf(self, d: int) -> Callable[[np.ndarray], np.ndarray]:
        axis, cdf = self.axes[d], self.cdfs[d]
        return lambda x: np.interp(x, axis, cdf, left=0.0, right=1.0)

    def ks(self, u: np.ndarray) -> Tuple[float, float]:
        """(max over dimensions of the KS distance, min of the p-values) of samples u (n, A)."""
        results = [stats.kstest(u[:, d], self.cdf(d)) for d in range(self.dim)]
        return max(r.statistic for r in results), min(r.pvalue for r in results)

    def tv(self, u: np.ndarray) -> float:
        cell = [np.searchsorted(self.edges[d], u[:, d]) for d in range(self.dim)]
        index = np.ravel_multi_index(cell, (self.bins_per_dim,) * self.dim)
        hist = np.bincount(index, minlength=self.bin_probs.size) / len(u)
        return 0.5 * float(np.abs(hist - self.bin_probs).sum())

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        flat = rng.choice(self.weights.size, size=n, p=self.weights.ravel())
        cells = np.unravel_index(flat, self.weights.shape)
        spacing = [axis[1] - axis[0] for axis in self.axes]
        return np.stack([axis[c] + (rng.random(n) - 0.5) * h for axis, c, h in zip(self.axes, cells, spacing)], -1)

    def mean_a(self) -> List[float]:
        return [float((m * np.tanh(axis)).sum()) for m, axis in zip(self.marginals, self.axes)]


# --------------------------------------------------------------------------------------------------
def gradient_evaluations(num_samples: int = NUM_SAMPLES, burn_in: int = BURN_IN, leapfrog: int = LEAPFROG) -> int:
    """Per chain and call: one at the start, L per transition."""
    return (burn_in + num_samples) * leapfrog + 1


def run_sampler(target: Target, sampler: str, chains: int, seed: int, *, num_samples: int = NUM_SAMPLES,
                burn_in: int = BURN_IN, leapfrog: int = LEAPFROG, step_size: Optional[float] = None,
                warm_calls: int = 10) -> Tuple[hmc.HMCResult, torch.Tensor, float]:
    """One measured call of ``sampler`` on ``target``: (result, recorded pre-tanh u (C, K, A) in
    float64, the step size the call started from). ``step_size``: the first call's, instead of the
    sampler's."""
    space, mode, sampler_step = SAMPLERS[sampler]
    if step_size is None:
        step_size = sampler_step if sampler_step is not None else hmc.default_step_size(space, leapfrog)
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(target.mean, dtype=torch.float32).expand(chains, target.dim)
    std = torch.tensor(target.std, dtype=torch.float32).expand(chains, target.dim)
    qg = q_and_grad(target.q)
    step = step_size
    calls = warm_calls + 1 if mode == "adaptive" else 1
    for _ in range(calls):
        init = initial_actions(target, chains, g)
        result = hmc.sample_tilted(mean, std, qg, init, space=space, mode=mode, num_samples=num_samples,
                                   burn_in=burn_in, leapfrog_steps=leapfrog, step_size=step, generator=g)
        used, step = step, float(result.step_size.log().mean().exp())
    if result.pre_tanh is not None:
        u = result.pre_tanh.double()
    else:  # inside the open box by construction (proposals that leave it are rejected)
        u = torch.atanh(result.samples.double())
    return result, u, used


def evaluate(target: Target, chains: int, seed: int, samplers: Sequence[str] = tuple(SAMPLERS),
             exact: Optional[Exact] = None, warm_calls: int = 10) -> List[dict]:
    exact = exact or Exact(target)
    rows = []
    rng = np.random.default_rng(seed)
    grads = gradient_evaluations()
    # noise floor and the untilted policy, at the same n
    policy = np.asarray(target.mean) + np.asarray(target.std) * rng.standard_normal((chains, target.dim))
    for name, u in (("iid exact", exact.sample(chains, rng)), ("iid policy", policy)):
        ks, p = exact.ks(u)
        rows.append({"target": target.name, "sampler": name, "ks": ks, "ks_p": p, "tv": exact.tv(u)})
    for i, sampler in enumerate(samplers):
        start = time.perf_counter()
        result, u, step = run_sampler(target, sampler, chains, seed * 1000 + i, warm_calls=warm_calls)
        seconds = time.perf_counter() - start
        last = u[:, -1].numpy()
        pooled = u.reshape(-1, target.dim).numpy()
        ks, p = exact.ks(last)
        ess = torch.stack([hmc.effective_sample_size(u[:, :, d]) for d in range(target.dim)]).mean()
        rows.append({
            "target": target.name, "sampler": sampler, "accept": float(result.accept_rate),
            "step_start": step, "step_end": float(result.step_size.log().mean().exp()),
            "ks": ks, "ks_p": p, "tv": exact.tv(last),
            "ks_pooled": exact.ks(pooled)[0], "tv_pooled": exact.tv(pooled),
            "ess": float(ess), "ess_per_100_grads": 100.0 * float(ess) / grads, "seconds": seconds,
        })
    return rows


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def markdown(rows: List[dict], chains: int) -> str:
    head = ("| target | sampler | acc | step (start → end) | KS | KS p | TV | KS pooled | TV pooled | ESS / chain "
            "| ESS / 100 grads |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        step = "—" if "step_start" not in r else f"{r['step_start']:.3g} → {r['step_end']:.3g}"
        lines.append(
            f"| {r['target']} | {r['sampler']} | {_fmt(r.get('accept'), '.3f')} | {step} | {r['ks']:.3f} "
            f"| {r['ks_p']:.2g} | {r['tv']:.3f} | {_fmt(r.get('ks_pooled'), '.3f')} "
            f"| {_fmt(r.get('tv_pooled'), '.3f')} "
            f"| {_fmt(r.get('ess'), '.1f')} | {_fmt(r.get('ess_per_100_grads'), '.2f')} |")
    return head + "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chains", type=int, default=2000, help="independent chains per sampler and target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-calls", type=int, default=10,
                        help="calls of the adaptive samplers before the measured one (step size carried over)")
    parser.add_argument("--targets", nargs="*", default=[t.name for t in TARGETS], choices=[t.name for t in TARGETS])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output path without suffix (.json and .md)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rows, about = [], []
    for target in (TARGETS_BY_NAME[n] for n in args.targets):
        exact = Exact(target)
        pi_mean = Exact(target, tilt=False).mean_a()
        about.append(f"- **{target.name}**: pre-tanh mean {target.mean}, std {target.std}; {target.about}; "
                     f"init {target.init}; E_pi[a] = {', '.join(f'{m:.3f}' for m in pi_mean)}, "
                     f"E_p[a] = {', '.join(f'{m:.3f}' for m in exact.mean_a())}")
        rows += evaluate(target, args.chains, args.seed, exact=exact, warm_calls=args.warm_calls)
    table = markdown(rows, args.chains)
    text = (f"# HMC on known targets ({args.chains} chains, K={NUM_SAMPLES}, burn-in {BURN_IN}, "
            f"{LEAPFROG} leapfrog steps, {gradient_evaluations()} gradient evaluations per chain; seed {args.seed})\n\n"
            f"Command: `python bench/studies/hmc_mixing.py --chains {args.chains} --seed {args.seed}`\n\n"
            + "\n".join(about) + "\n\n" + table)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({
        "chains": args.chains, "seed": args.seed, "num_samples": NUM_SAMPLES, "burn_in": BURN_IN,
        "leapfrog_steps": LEAPFROG, "warm_calls": args.warm_calls,
        "samplers": {name: {"space": space, "mode": mode, "step_size": step or hmc.default_step_size(space, LEAPFROG)}
                     for name, (space, mode, step) in SAMPLERS.items()},
        "gradient_evaluations_per_chain": gradient_evaluations(),
        "targets": {t.name: {"mean": t.mean, "std": t.std, "q": t.about, "init": t.init} for t in TARGETS
                    if t.name in args.targets},
        "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
