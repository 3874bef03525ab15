"""Do the HMC samplers sample the tilted policy of a trained agent, and is eq. 15's gradient right?
(issue 14, parts 2 and 3)

At ``--states`` dataset states s of the checkpoint's dataset, every sampler's K samples of
p(a|s) ~ pi(a|s) exp(min_i Q_i(s, a)) (the agent's own target: its policy, online critics and the
sampler settings of its config, chains started at the dataset actions) are compared with a
self-normalised importance-sampling reference: N = ``--is-samples`` policy samples a_j ~ pi(.|s)
per state with weights w_j ~ exp(min_i Q_i(s, a_j)).

Part 2, per sampler: E_p[log pi(a|s)] (what eq. 15 differentiates) estimated from the K samples
minus the reference, per state; reported as the mean over states of its average over the seeds
(the systematic bias, with its standard error over states) and the RMS over states and seeds of
one call's error (bias and the K-sample noise together).
Acceptance and the chains' ESS (misa_fast.ops.hmc_reference.chain_diagnostics: ESS of the K recorded samples'
whitened pre-tanh mean) come with it, and the reference's own Kish ESS 1 / sum_j w_j^2 per state.

Part 3: g = grad_theta mean_s mean_k log pi_theta(a_k|s) over the policy parameters, samples held
fixed, against g_ref = grad_theta mean_s sum_j w_j log pi_theta(a_j|s) (weights and samples
detached): cosine similarity and ||g - g_ref|| / ||g_ref||, over ``--seeds`` sampler seeds.

Context rows: "dataset action" (a_k = a_D, what a chain that never moves gives: official MISA),
"policy" (K samples of pi, no tilt), "iid p" (K samples resampled from a second, independent IS
set: the best any K-sample estimator can do), "IS reference 2" (the second IS set itself: the
reference's own noise) and "SNIS, K policy samples" (self-normalised IS with a budget of K critic
evaluations, the cheap alternative to a chain). Samplers as in bench/studies/hmc_mixing.py: each starts
from the library's default step of its space (1 post-tanh, pi / (2 L) pre-tanh); pre_tanh-step1 is
the pre-tanh chain at the official step 1. The adaptive samplers start each call from the geometric mean of the
previous call's adapted step sizes (as the agent carries it), after ``--warm-calls`` calls.

    OMP_NUM_THREADS=1 python bench/studies/hmc_accuracy.py --checkpoint runs/hopper-k10/checkpoint.pt
    python bench/studies/hmc_accuracy.py --checkpoint CKPT --states 256 --is-samples 10000 --seed 0 --out /tmp/acc

Writes bench/results/hmc-accuracy-2026-12-02.{json,md} by default and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from misa_fast import nets
from misa_fast.agents import algorithms as algos
from misa_fast.agents import losses
from misa_fast.agents.learner import as_batch
from misa_fast.agents.misa import MISANetworks, draw_update_noise, misa_losses
from misa_fast.data import DataInfo, prepare
from misa_fast.data.registry import DEFAULT_DATASET
from misa_fast.ops import hmc_reference as hmc
from misa_fast.training import checkpoint

RESULTS = Path(__file__).resolve().parents[1] / "results"
DEFAULT_OUT = RESULTS / "hmc-accuracy-2026-12-02"
DEFAULT_CHECKPOINT = "runs/hopper-k10/checkpoint.pt"  # where the docs' training command writes it
# name -> (space, mode, initial step; None: misa_fast.ops.hmc_reference.default_step_size of the space)
SAMPLERS = {
    "faithful": ("post_tanh", "faithful", None),
    "adaptive": ("post_tanh", "adaptive", None),
    "pre_tanh": ("pre_tanh", "faithful", None),
    "pre_tanh-adaptive": ("pre_tanh", "adaptive", None),
    "pre_tanh-step1": ("pre_tanh", "faithful", 1.0),
}


class Problem:
    """The agent's HMC target at a fixed set of states."""

    def __init__(self, state: dict, dataset: Optional[str], states: int, seed: int):
        self.agent = algos.agent_from_checkpoint(state)
        self.agent.policy.eval()
        self.cfg = self.agent.config
        info = DataInfo.from_dict(state["data_info"])
        path = dataset or state["run"]["dataset"] or DEFAULT_DATASET  # None: trained on the embedded dataset
        # raw observations, then the checkpoint's own normalisation (what the agent trained on)
        data, _ = prepare(path, obs_norm="none", action_clip=info.action_clip)
        rng = np.random.default_rng(seed)
        rows = rng.choice(len(data["actions"]), size=states, replace=False)
        self.obs = torch.as_tensor(info.normalize(data["observations"][rows]), dtype=torch.float32)
        self.actions = torch.as_tensor(data["actions"][rows], dtype=torch.float32)
        energy = self.agent.critic if self.agent.energy is None else self.agent.energy
        with torch.no_grad():
            self.layers = energy.stacked_layers(detach=True)
            self.state_half = energy.first_layer_state_half(self.obs, detach=True)
            self.mean, self.std = (t.detach() for t in self.agent.policy.dist_params(self.obs))
        self.info, self.dataset = info, str(path)

    def policy_params(self):
        """(mean, std) with the graph to the policy parameters."""
        return self.agent.policy.dist_params(self.obs)

    def min_q(self, actions: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """min_i Q_i(s, a) for actions (B, N, A), a few states at a time (the hidden layer of N
        actions per state is the memory)."""
        out = []
        with torch.no_grad():
            for start in range(0, actions.shape[0], chunk):
                sl = slice(start, start + chunk)
                q = nets.ensemble_q(self.layers, self.state_half[:, sl], actions[sl])  # (E, b, N)
                out.append(q.min(dim=0).values)
        return torch.cat(out)


class Reference:
    """Self-normalised importance sampling with the policy as proposal: pre-tanh u (B, N, A),
    normalised weights (B, N)."""

    def __init__(self, problem: Problem, samples: int, generator: torch.Generator):
        eps = torch.randn(problem.mean.shape[0], samples, problem.mean.shape[1], generator=generator)
        self.u = problem.mean.unsqueeze(1) + problem.std.unsqueeze(1) * eps
        log_w = problem.min_q(torch.tanh(self.u))
        self.w = torch.softmax(log_w.double(), dim=1).float()
        self.kish = 1.0 / (self.w.double() ** 2).sum(1)
        # weighted pre-tanh moments: all that the Gaussian part of log pi_theta needs
        self.m1 = (self.w.unsqueeze(-1) * self.u).sum(1)
        self.m2 = (self.w.unsqueeze(-1) * self.u * self.u).sum(1)
        log_pi = nets.tanh_gaussian_log_prob_pre_tanh(problem.mean.unsqueeze(1), problem.std.unsqueeze(1), self.u)
        self.log_pi = (self.w * log_pi).sum(1)  # E_p[log pi(a|s)] per state
        self.policy_log_pi = log_pi.mean(1)

    def objective(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """mean_s sum_j w_j log pi_theta(a_j|s) up to terms free of theta (the tanh Jacobian)."""
        sq = self.m2 - 2.0 * mean * self.m1 + mean * mean  # sum_j w_j (u_j - mean)^2
        return (-0.5 * sq / (std * std) - torch.log(std)).sum(-1).mean()

    def resample(self, k: int, generator: torch.Generator) -> torch.Tensor:
        index = torch.multinomial(self.w, k, replacement=True, generator=generator)  # (B, K)
        return self.u.gather(1, index.unsqueeze(-1).expand(-1, -1, self.u.shape[-1]))


def flat_grad(value: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def snis_agent_term(problem: Problem, seed: int):
    """The eq. 15 term of ``unbiased_estimator=snis`` through MISA's own loss function at
    the problem's states (and dataset actions), on the problem agent's parameters (the policy's
    gradient lands on ``problem.agent.policy``): returns (term / w_u with its graph, the per-state
    estimate sum_k w_k log pi(a_k|s) (B,), the mean Kish ESS of the weights)."""
    agent = problem.agent
    captured = {}
    original = losses.actor_loss

    def spy(*args, **kwargs):
        loss, terms = original(*args, **kwargs)
        captured["term"] = terms["actor_unbiased_term"]
        log_pi, weights = args[5], args[7]
        captured["per_state"] = (weights * log_pi.detach()).sum(-1)
        return loss, terms

    n = problem.obs.shape[0]
    batch = {"observations": problem.obs, "actions": problem.actions, "rewards": torch.zeros(n),
             "next_observations": problem.obs, "terminals": torch.zeros(n)}
    # The SNIS configuration's loss function on the problem agent's own tensors.
    cfg = problem.cfg.replace(unbiased_estimator="snis", use_hmc=True, batch_size=n,
                              obs_dim=agent.config.obs_dim, act_dim=agent.config.act_dim)
    snis_losses = misa_losses(MISANetworks(cfg, agent.device))
    noise = draw_update_noise(cfg, torch.Generator().manual_seed(seed), n)
    losses.actor_loss = spy
    try:
        out = snis_losses(agent.state_tensors(), as_batch(batch, agent.device), noise)
    finally:
        losses.actor_loss = original
    w_u = problem.cfg.unbiased_weight
    return captured["term"] / w_u, captured["per_state"], float(out.metrics["snis_ess"])


def sampler_call(problem: Problem, sampler: str, generator: torch.Generator, warm_calls: int) -> hmc.HMCResult:
    space, mode, step = SAMPLERS[sampler]
    cfg = problem.cfg
    if step is None:
        step = hmc.default_step_size(space, cfg.hmc_leapfrog_steps)
    for _ in range(warm_calls + 1 if mode == "adaptive" else 1):
        result = hmc.hmc_sample(problem.mean, problem.std, problem.layers, problem.state_half, problem.actions,
                                mode=mode, space=space, num_samples=cfg.num_samples, burn_in=cfg.hmc_burn_in,
                                leapfrog_steps=cfg.hmc_leapfrog_steps, step_size=step,
                                target_accept=cfg.hmc_target_accept, adapt_rate=cfg.hmc_adapt_rate,
                                generator=generator)
        step = float(result.step_size.log().mean().exp())
    return result


def evaluate(problem: Problem, is_samples: int, seeds: Sequence[int], warm_calls: int) -> Dict:
    cfg = problem.cfg
    k = cfg.num_samples
    params = [p for p in problem.agent.policy.parameters() if p.requires_grad]
    base = seeds[0]
    t0 = time.perf_counter()
    ref = Reference(problem, is_samples, torch.Generator().manual_seed(10_000 + base))
    ref2 = Reference(problem, is_samples, torch.Generator().manual_seed(20_000 + base))
    is_seconds = time.perf_counter() - t0
    mean, std = problem.policy_params()
    g_ref = flat_grad(ref.objective(mean, std), params)

    def compare(g: torch.Tensor) -> Dict[str, float]:
        return {"cosine": float(torch.nn.functional.cosine_similarity(g, g_ref, dim=0)),
                "rel_error": float((g - g_ref).norm() / g_ref.norm())}

    def sample_grad(u: torch.Tensor) -> torch.Tensor:
        """g of the K-sample eq. 15 estimator for pre-tanh samples u (B, K, A)."""
        m, s = problem.policy_params()
        log_pi = nets.tanh_gaussian_log_prob_pre_tanh(m.unsqueeze(1), s.unsqueeze(1), u.detach())
        return flat_grad(log_pi.mean(), params)

    def bias(log_pi) -> Dict[str, float]:
        """log_pi: one (B,) estimate per seed. The mean and its standard error from the per-state
        average over seeds (seeds are independent draws at the same states); the RMS is one call's."""
        d = torch.stack(log_pi if isinstance(log_pi, list) else [log_pi]).double() - ref.log_pi.double()
        per_state = d.mean(0)
        return {"bias_mean": float(per_state.mean()), "bias_se": float(per_state.std() / math.sqrt(len(per_state))),
                "bias_rms": float(d.pow(2).mean().sqrt())}

    rows: List[Dict] = []
    # IS reference 2: the reference's own noise, full weights
    g2 = flat_grad(ref2.objective(*problem.policy_params()), params)
    rows.append({"sampler": "IS reference 2", **bias(ref2.log_pi), **{f"{key}": [v] for key, v in compare(g2).items()}})
    contexts = {
        "dataset action": lambda g: torch.atanh(
            problem.actions.clamp(-nets.ATANH_LIMIT, nets.ATANH_LIMIT)).unsqueeze(1),
        "policy": lambda g: problem.mean.unsqueeze(1) + problem.std.unsqueeze(1) * torch.randn(
            problem.mean.shape[0], k, problem.mean.shape[1], generator=g),
        "iid p": lambda g: ref2.resample(k, g),
    }
    for name, draw in contexts.items():
        stats = {"cosine": [], "rel_error": [], "log_pi": []}
        for seed in seeds:
            u = draw(torch.Generator().manual_seed(seed))
            lp = nets.tanh_gaussian_log_prob_pre_tanh(problem.mean.unsqueeze(1), problem.std.unsqueeze(1), u).mean(1)
            stats["log_pi"].append(lp)
            for key, v in compare(sample_grad(u)).items():
                stats[key].append(v)
        rows.append({"sampler": name, **bias(stats["log_pi"]), "cosine": stats["cosine"],
                     "rel_error": stats["rel_error"]})
    # Self-normalised IS with the sampler's K as the budget: K policy samples, weights softmax(min Q)
    # (K critic evaluations against the chains' (burn_in + K) L + 1 gradient evaluations).
    stats = {"cosine": [], "rel_error": [], "log_pi": []}
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        u = problem.mean.unsqueeze(1) + problem.std.unsqueeze(1) * torch.randn(
            problem.mean.shape[0], k, problem.mean.shape[1], generator=g)
        w = torch.softmax(problem.min_q(torch.tanh(u)), dim=1)
        m, s = problem.policy_params()
        log_pi = nets.tanh_gaussian_log_prob_pre_tanh(m.unsqueeze(1), s.unsqueeze(1), u)
        stats["log_pi"].append((w * log_pi.detach()).sum(1))
        for key, v in compare(flat_grad((w * log_pi).sum(1).mean(), params)).items():
            stats[key].append(v)
    rows.append({"sampler": f"SNIS, {k} policy samples", **bias(stats["log_pi"]), "cosine": stats["cosine"],
                 "rel_error": stats["rel_error"]})
    # The same estimator as the learner computes it (unbiased_estimator=snis): the agent's own update
    # code at these states, its K samples and the log-partition's Q values, its eq. 15 term's gradient.
    stats = {"cosine": [], "rel_error": [], "log_pi": [], "ess": [], "seconds": []}
    for seed in seeds:
        start = time.perf_counter()
        term, per_state, ess = snis_agent_term(problem, seed)
        stats["seconds"].append(time.perf_counter() - start)
        stats["log_pi"].append(per_state)
        stats["ess"].append(ess)
        for key, v in compare(flat_grad(term, params)).items():
            stats[key].append(v)
    rows.append({"sampler": "snis (agent)", **bias(stats["log_pi"]), **{key: stats[key] for key in
                                                                         ("cosine", "rel_error", "ess", "seconds")}})
    for i, sampler in enumerate(SAMPLERS):
        stats = {"cosine": [], "rel_error": [], "accept": [], "ess": [], "dist_u": [], "step": [], "seconds": []}
        log_pis = []
        for seed in seeds:
            start = time.perf_counter()
            result = sampler_call(problem, sampler, torch.Generator().manual_seed(seed * 100 + i), warm_calls)
            stats["seconds"].append(time.perf_counter() - start)
            if result.pre_tanh is not None:
                u = result.pre_tanh
            else:  # as the agent evaluates log pi of post-tanh samples
                u = torch.atanh(result.samples.clamp(-nets.ATANH_LIMIT, nets.ATANH_LIMIT))
            diag = hmc.chain_diagnostics(result, problem.mean, problem.std, problem.actions)
            stats["accept"].append(float(result.accept_rate))
            stats["ess"].append(float(diag["hmc_ess"]))
            stats["dist_u"].append(float(diag["hmc_dist_u"]))
            stats["step"].append(float(result.step_size.log().mean().exp()))
            for key, v in compare(sample_grad(u)).items():
                stats[key].append(v)
            log_pis.append(
                nets.tanh_gaussian_log_prob_pre_tanh(problem.mean.unsqueeze(1), problem.std.unsqueeze(1), u).mean(1))
        rows.append({"sampler": sampler, **bias(log_pis), **stats})
    kish = ref.kish
    return {
        "rows": rows,
        "reference": {
            "is_samples": is_samples, "seconds": is_seconds,
            "kish_mean": float(kish.mean()), "kish_median": float(kish.median()),
            "kish_p05": float(kish.quantile(0.05)), "kish_min": float(kish.min()),
            "kish_below_100": int((kish < 100).sum()),
            "log_pi_mean": float(ref.log_pi.mean()), "policy_log_pi_mean": float(ref.policy_log_pi.mean()),
            "g_ref_norm": float(g_ref.norm()),
        },
        "policy_std": {"median": float(problem.std.median()), "p05": float(problem.std.quantile(0.05)),
                       "p95": float(problem.std.quantile(0.95))},
        "dataset_actions_at_clip": float((problem.actions.abs() >= problem.info.action_clip - 1e-6).float().mean()),
    }


def _ms(values) -> str:
    if not isinstance(values, list) or not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def markdown(result: Dict, args, meta: Dict) -> str:
    ref = result["reference"]
    lines = [
        f"# HMC on a trained critic: {meta['checkpoint']} (step {meta['step']}, {meta['dataset']})",
        "",
        f"Command: `python bench/studies/hmc_accuracy.py --checkpoint {args.checkpoint} --states {args.states} "
        f"--is-samples {args.is_samples} --seed {args.seed} --seeds {args.seeds}`",
        "",
        f"{args.states} dataset states; sampler settings from the agent config: K={meta['num_samples']}, "
        f"burn-in {meta['burn_in']}, {meta['leapfrog']} leapfrog steps ({meta['grads']} gradient evaluations "
        f"per chain); initial step 1 post-tanh, pi/(2L) pre-tanh unless named. Policy std (pre-tanh) median "
        f"{result['policy_std']['median']:.3f} (5-95%: {result['policy_std']['p05']:.3f}-"
        f"{result['policy_std']['p95']:.3f}); {100 * result['dataset_actions_at_clip']:.1f}% of the "
        f"dataset action coordinates sit at the clip ±{meta['action_clip']}.",
        "",
        f"IS reference: {ref['is_samples']} policy samples per state; Kish ESS per state mean "
        f"{ref['kish_mean']:.0f}, median {ref['kish_median']:.0f}, 5th percentile {ref['kish_p05']:.0f}, min "
        f"{ref['kish_min']:.0f} ({ref['kish_below_100']} states below 100). E_p[log pi] = {ref['log_pi_mean']:.3f} "
        f"(E_pi[log pi] = {ref['policy_log_pi_mean']:.3f}).",
        "",
        "bias: E_p[log pi(a|s)] from the K samples minus the IS reference (mean over states of the "
        "seed-averaged error ± standard error; RMS: one call's error over states and seeds). "
        "ESS of K: the chains' ESS for the HMC rows, the Kish ESS of the K weights for snis (agent), the "
        "learner's unbiased_estimator=snis term computed by its own update code. "
        "cos / rel. err.: eq. 15 gradient against the IS reference gradient "
        f"(mean ± sd over {args.seeds} seeds).",
        "",
        "| samples | acc | step (end) | ESS of K | dist. from a_D (u) | bias E_p[log pi] | RMS | cos(g, g_ref) | "
        "‖g − g_ref‖ / ‖g_ref‖ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['sampler']} | {_ms(r.get('accept'))} | {_ms(r.get('step'))} | {_ms(r.get('ess'))} "
            f"| {_ms(r.get('dist_u'))} | {r['bias_mean']:+.3f} ± {r['bias_se']:.3f} | {r['bias_rms']:.3f} "
            f"| {_ms(r.get('cosine'))} | {_ms(r.get('rel_error'))} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--dataset", default=None, help="default: the one the checkpoint was trained on")
    parser.add_argument("--states", type=int, default=256)
    parser.add_argument("--is-samples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0, help="states, reference and first sampler seed")
    parser.add_argument("--seeds", type=int, default=5, help="sampler seeds (gradient statistics)")
    parser.add_argument("--warm-calls", type=int, default=10)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output path without suffix (.json and .md)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    state = checkpoint.load(args.checkpoint)
    problem = Problem(state, args.dataset, args.states, args.seed)
    cfg = problem.cfg
    meta = {"checkpoint": str(args.checkpoint), "step": int(state["step"]), "dataset": problem.dataset,
            "num_samples": cfg.num_samples, "burn_in": cfg.hmc_burn_in, "leapfrog": cfg.hmc_leapfrog_steps,
            "trained_with": {"hmc_mode": cfg.hmc_mode, "hmc_space": getattr(cfg, "hmc_space", "post_tanh"),
                             "hmc_step_size": cfg.hmc_step_size},
            "grads": (cfg.hmc_burn_in + cfg.num_samples) * cfg.hmc_leapfrog_steps + 1,
            "action_clip": problem.info.action_clip}
    result = evaluate(problem, args.is_samples, [args.seed + i for i in range(args.seeds)], args.warm_calls)
    text = markdown(result, args, meta)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({**meta, "args": vars(args), **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
