"""Fused-op micro-benchmarks: each op against its torch reference (eager and torch.compile).

MISA sizes: B=256 states, K=50 action samples, twin critics 256-256 ELU, hopper (S=11, A=3) and
halfcheetah (S=17, A=6) dims. CQL at CORL's sizes (``test_cql_corl_*``): B=256, twin CORL-style
critic modules (3x256 ReLU, forward concatenating (s, a)) passed as they are, 3 x 10 proposals with
importance weights, ``T * logsumexp(Q / T + log_w)``, forward + backward: the fused op against the
plain-torch loop a CQL agent runs (one critic call per proposal).

    pytest bench/bench_ops.py --benchmark-columns=median,iqr,ops --benchmark-sort=name
    pytest bench/bench_ops.py --benchmark-disable          # smoke run (CI, CPU: seconds)
    OMP_NUM_THREADS=1 python bench/bench_ops.py corl-cpu 41  # the CPU CQL case, both side by side

The last form times the op's CPU torch path and the plain loop alternately, call after call, in one
process (a shared or throttled machine then slows both alike) and prints each one's median and the
median of the per-pair ratios.

The CUDA cases are marked ``gpu`` (skipped without a device). Each timed call runs the op
``INNER`` times and synchronises once, so the per-call figure includes the host-side launch cost
(what an eager training step pays) but not one sync per call. ``extra_info`` carries ms per op
call and achieved GB/s (log_mean_exp, compulsory traffic) or TFLOP/s (sampled-Q, the FLOPs of the
plain MLP on concat(s, a): 2*B*K*(H*(S+A) + H*H + H) per critic forward, counted x3 for
forward+backward). The small CPU cases only exercise the torch references so that the file runs
everywhere; their numbers are not GPU figures.

Target (issue 5, H100): the fused sampled-Q log-mean-exp at least 2x faster than the eager MLP +
logsumexp (``naive-eager``).

HMC (``test_hmc_cuda``): the fused chain (one launch, ``misa_fast.ops.hmc_sample``) against the torch
reference sampler ``misa_fast.ops.hmc_reference.hmc_sample`` in eager mode, with its log-density closure compiled
(``reference-compile``: the per-evaluation graph, what one would compile in practice) and fully
compiled (``reference-compile-full``: the whole unrolled chain; minutes of compilation in the
warm-up), paper-faithful (256 chains x 55 transitions x 2 leapfrog steps = 110 sequential gradient
evaluations) and parallel (12,800 chains x 6 transitions). The noise is supplied (drawn once, as the
agent does) except for ``fused-tf32-rng`` (in-kernel Philox). ``extra_info``: ms per call and
gradient evaluations per chain per ms. Target (issue 5, H100/H200): fused paper-faithful chain at
least 10x faster than ``reference-eager``.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from misa_fast.nets import StackedLayers
from misa_fast.ops import hmc_reference as hmc_lib
from misa_fast.ops import (
    hmc_sample,
    log_mean_exp,
    log_mean_exp_reference,
    sampled_q_log_mean_exp,
    sampled_q_log_mean_exp_reference,
)

B, K, H = 256, 50, 256
DIMS = {"hopper": (11, 3), "halfcheetah": (17, 6)}
INNER = 20
CUDA = torch.cuda.is_available()


def _run(benchmark, fn, inner, cuda, rounds):
    def timed():
        for _ in range(inner):
            fn()
        if cuda:
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up (compilation, autotuning, allocator)
        timed()
    benchmark.pedantic(timed, rounds=rounds, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        return benchmark.stats.stats.median / inner
    return None


# ----------------------------------------------------------------------------------------------
# problems
# ----------------------------------------------------------------------------------------------
def make_critics(S, A, hidden, device, n=2):
    crits = []
    for _ in range(n):
        dims = [S + A, *hidden, 1]
        layers = []
        for i, o in zip(dims[:-1], dims[1:]):
            lin = torch.nn.Linear(i, o, device=device)
            layers.append((lin.weight, lin.bias))
        crits.append(layers)
    return crits


def naive_sampled_q_lme(obs, actions, critics):
    """What a plain-torch critic loss does: concat(s, a) for every sample, MLP, logsumexp - log K."""
    b, k, _ = actions.shape
    x = torch.cat([obs.unsqueeze(1).expand(b, k, obs.shape[1]), actions], -1)
    outs = []
    for layers in critics:
        h = x
        for w, bb in layers[:-1]:
            h = F.elu(F.linear(h, w, bb))
        q = F.linear(h, *layers[-1]).squeeze(-1)
        outs.append(torch.logsumexp(q, -1) - math.log(k))
    return torch.stack(outs)


def sampled_q_flops(S, A, b=B, k=K, h=H, n_critics=2):
    return 2.0 * b * k * (h * (S + A) + h * h + h) * n_critics


# ----------------------------------------------------------------------------------------------
# sampled-Q log-mean-exp
# ----------------------------------------------------------------------------------------------
SQ_IMPLS = ["fused-tf32", "fused-bf16", "fused-tf32-stacked", "naive-eager", "reference-eager", "reference-compile"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", SQ_IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("env", list(DIMS))
def test_sampled_q_cuda(benchmark, env, mode, impl):
    S, A = DIMS[env]
    torch.manual_seed(0)
    obs = torch.randn(B, S, device="cuda")
    actions = torch.rand(B, K, A, device="cuda") * 2 - 1
    critics = make_critics(S, A, (H, H), "cuda")
    params = [t for c in critics for wb in c for t in wb]
    if impl == "fused-tf32-stacked":  # the ensemble layout of misa_fast.nets (weights (E, out, in))
        stacked = [(torch.stack([c[j][0] for c in critics]).detach().requires_grad_(),
                    torch.stack([c[j][1] for c in critics]).detach().requires_grad_()) for j in range(3)]
        params = [t for wb in stacked for t in wb]

        def op():
            return sampled_q_log_mean_exp(obs, actions, stacked, precision="tf32", backend="triton", activation="elu")
    elif impl.startswith("fused"):
        prec = impl.split("-")[1]

        def op():
            return sampled_q_log_mean_exp(obs, actions, critics, precision=prec, backend="triton", activation="elu")
    elif impl == "naive-eager":
        def op():
            return naive_sampled_q_lme(obs, actions, critics)
    elif impl == "reference-eager":
        def op():
            return sampled_q_log_mean_exp_reference(obs, actions, critics, activation="elu")
    else:
        compiled = torch.compile(sampled_q_log_mean_exp_reference)

        def op():
            return compiled(obs, actions, critics, activation="elu")

    if mode == "fwd":
        def fn():
            with torch.no_grad():
                op()
    else:
        def fn():
            torch.autograd.grad(op().sum(), params)

    benchmark.group = f"sampled_q-{env}-{mode}"
    per_call = _run(benchmark, fn, INNER, True, rounds=30)
    if per_call:
        flops = sampled_q_flops(S, A) * (1 if mode == "fwd" else 3)
        benchmark.extra_info.update(ms=per_call * 1e3, tflops=flops / per_call / 1e12)


@pytest.mark.parametrize("impl", ["naive-eager", "reference-eager"])
def test_sampled_q_cpu_reference(benchmark, impl):
    """Small CPU case (B=16) so that the file runs without a GPU; torch references only."""
    S, A = DIMS["hopper"]
    torch.manual_seed(0)
    b = 16
    obs = torch.randn(b, S)
    actions = torch.rand(b, K, A) * 2 - 1
    critics = make_critics(S, A, (H, H), "cpu")
    params = [t for c in critics for wb in c for t in wb]
    if impl == "naive-eager":
        f = naive_sampled_q_lme
    else:
        def f(o, a, c):
            return sampled_q_log_mean_exp_reference(o, a, c, activation="elu")

    def fn():
        torch.autograd.grad(f(obs, actions, critics).sum(), params)

    benchmark.group = "sampled_q-cpu-B16-fwd+bwd"
    per_call = _run(benchmark, fn, 1, False, rounds=5)
    if per_call:
        benchmark.extra_info.update(ms=per_call * 1e3, tflops=3 * sampled_q_flops(S, A, b=b) / per_call / 1e12)


# ----------------------------------------------------------------------------------------------
# CQL(H) at CORL's sizes: another agent's critics passed as they are
# ----------------------------------------------------------------------------------------------
CORL_B, CORL_N, CORL_HIDDEN, CORL_TEMP = 256, 10, (256, 256, 256), 1.0  # CORL's cql defaults, 3 x N proposals


class CorlCritic(torch.nn.Module):
    """CORL-style Q network: ``forward(obs, actions)`` runs Linear/ReLU x3 + Linear on concat(s, a)."""

    def __init__(self, S, A, hidden=CORL_HIDDEN):
        super().__init__()
        dims = [S + A, *hidden]
        mods = []
        for i, o in zip(dims[:-1], dims[1:]):
            mods += [torch.nn.Linear(i, o), torch.nn.ReLU()]
        self.network = torch.nn.Sequential(*mods, torch.nn.Linear(dims[-1], 1))

    def forward(self, obs, actions):
        return self.network(torch.cat([obs, actions], dim=-1)).squeeze(-1)


def corl_problem(S, A, device, b=CORL_B, n=CORL_N, seed=0):
    """Two CorlCritics, B states, 3 N proposals (uniform, policy at s, policy at s') and their
    importance log-weights -log q(a)."""
    torch.manual_seed(seed)
    critics = [CorlCritic(S, A).to(device) for _ in range(2)]
    obs = torch.randn(b, S, device=device)
    actions = torch.rand(b, 3 * n, A, device=device) * 2 - 1
    log_w = torch.cat([torch.full((b, n), A * math.log(2.0), device=device),
                       torch.randn(b, 2 * n, device=device) - A], dim=1)
    return critics, obs, actions, log_w


def corl_plain_penalty_lse(critics, obs, actions, log_w, temp=CORL_TEMP):
    """What a plain-torch CQL agent computes: each critic on every (s, a_k) row per proposal, the
    concatenated importance-weighted values, temp * logsumexp(. / temp)."""
    b, k, a_dim = actions.shape
    n = k // 3
    outs = []
    for critic in critics:
        qs = []
        for j in range(3):  # one call per proposal, as the agents do
            a = actions[:, j * n:(j + 1) * n].reshape(b * n, a_dim)
            qs.append(critic(obs.repeat_interleave(n, dim=0), a).reshape(b, n))
        outs.append(temp * torch.logsumexp(torch.cat(qs, 1) / temp + log_w, dim=1))
    return torch.stack(outs)


def _corl_case(benchmark, device, impl, inner, rounds):
    S, A = DIMS["halfcheetah"]
    critics, obs, actions, log_w = corl_problem(S, A, device)
    params = [p for c in critics for p in c.parameters()]
    if impl == "plain-loop":
        def op():
            return corl_plain_penalty_lse(critics, obs, actions, log_w)
    else:  # "fused-<precision>": the Triton kernels; "op-torch-path": the op's torch path
        backend = "triton" if impl.startswith("fused") else "torch"
        prec = impl.split("-")[1] if backend == "triton" else None

        def op():
            return sampled_q_log_mean_exp(obs, actions, critics, log_w, "none", temperature=CORL_TEMP,
                                          backend=backend, precision=prec)

    def fn():
        torch.autograd.grad(op().sum(), params)

    per_call = _run(benchmark, fn, inner, device == "cuda", rounds=rounds)
    if per_call:
        h = CORL_HIDDEN[0]
        flops = 3 * 2.0 * 2 * CORL_B * 3 * CORL_N * (h * (S + A) + 2 * h * h + h)
        benchmark.extra_info.update(ms=per_call * 1e3, tflops=flops / per_call / 1e12)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused-tf32", "fused-ieee", "plain-loop"])
def test_cql_corl_cuda(benchmark, impl):
    """B = 256, twin 3x256 ReLU critics, 3 x 10 proposals, T * logsumexp, forward + backward."""
    benchmark.group = "cql-corl-B256-3x256relu-K30-fwd+bwd"
    _corl_case(benchmark, "cuda", impl, INNER, 30)


@pytest.mark.parametrize("impl", ["op-torch-path", "plain-loop"])
def test_cql_corl_cpu(benchmark, impl):
    """The same problem on the CPU: the op's torch path (it reads the modules' Linear and ReLU
    layers, shares the first layer's state half across the 30 samples and runs the MLP on blocks of
    states whose activations stay in cache) against the plain loop. Not a GPU figure; for the two
    side by side in one process: ``python bench/bench_ops.py corl-cpu``."""
    benchmark.group = "cql-corl-cpu-B256-3x256relu-K30-fwd+bwd"
    _corl_case(benchmark, "cpu", impl, 1, 5)


# ----------------------------------------------------------------------------------------------
# log_mean_exp
# ----------------------------------------------------------------------------------------------
LME_SHAPES = {"misa-B256-K50": (B, K), "rows4096-K1024": (4096, 1024)}
LME_IMPLS = ["triton", "logsumexp-eager", "reference-eager", "reference-compile"]


def _lme_op(impl):
    if impl == "triton":
        return lambda x: log_mean_exp(x, -1, backend="triton")
    if impl == "logsumexp-eager":
        return lambda x: torch.logsumexp(x.float(), -1).to(x.dtype) - math.log(x.shape[-1])
    if impl == "reference-eager":
        return lambda x: log_mean_exp_reference(x, -1)
    return torch.compile(lambda x: log_mean_exp_reference(x, -1))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", LME_IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(LME_SHAPES))
def test_log_mean_exp_cuda(benchmark, shape, dtype, mode, impl):
    M, k = LME_SHAPES[shape]
    dt = torch.float32 if dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    x = (torch.randn(M, k, device="cuda") * 3).to(dt).requires_grad_(mode != "fwd")
    op = _lme_op(impl)
    g = torch.ones(M, device="cuda", dtype=dt)

    if mode == "fwd":
        def fn():
            with torch.no_grad():
                op(x)
    else:
        def fn():
            torch.autograd.grad(op(x), x, g)

    benchmark.group = f"log_mean_exp-{shape}-{dtype}-{mode}"
    per_call = _run(benchmark, fn, INNER, True, rounds=30)
    if per_call:
        elem = x.element_size()
        nbytes = M * k * elem + M * elem  # read x, write out
        if mode != "fwd":
            nbytes += 2 * M * k * elem + M * elem  # read x again, write dx, read g
        benchmark.extra_info.update(ms=per_call * 1e3, gbps=nbytes / per_call / 1e9)


@pytest.mark.parametrize("impl", ["logsumexp-eager", "reference-eager"])
def test_log_mean_exp_cpu_reference(benchmark, impl):
    torch.manual_seed(0)
    x = torch.randn(B, K, requires_grad=True)
    op = _lme_op(impl)

    def fn():
        torch.autograd.grad(op(x).sum(), x)

    benchmark.group = "log_mean_exp-cpu-B256-K50-fwd+bwd"
    per_call = _run(benchmark, fn, 1, False, rounds=20)
    if per_call:
        benchmark.extra_info.update(ms=per_call * 1e3, gbps=(3 * B * K * 4 + 2 * B * 4) / per_call / 1e9)


# ----------------------------------------------------------------------------------------------
# HMC chain
# ----------------------------------------------------------------------------------------------
HMC_IMPLS = ["fused-tf32", "fused-tf32-rng", "fused-tf32x3", "fused-bf16", "fused-ieee", "reference-eager",
             "reference-compile", "reference-compile-full"]
BURN_IN, LEAPFROG = 5, 2


def hmc_problem(S, A, device, b=B, hidden=H, seed=0):
    """Per-state policy mean/std, twin stacked critics (256-256 ELU, weights scaled so that Q varies
    by O(1) over the action box; the layers carry their activation), their layer-1 state halves and
    dataset actions."""
    g = torch.Generator().manual_seed(seed)
    dims = [S + A, hidden, hidden, 1]
    layers = []
    for i, o in zip(dims[:-1], dims[1:]):
        w = torch.randn(2, o, i, generator=g) * (1.0 / math.sqrt(i))
        layers.append((w.to(device), (torch.randn(2, o, generator=g) * 0.1).to(device)))
    obs = torch.randn(b, S, generator=g).to(device)
    w0, b0 = layers[0]
    state_half = torch.matmul(obs, w0[:, :, :S].transpose(1, 2)) + b0.unsqueeze(1)
    mean = (torch.randn(b, A, generator=g) * 0.5).to(device)
    std = torch.exp(torch.rand(b, A, generator=g) - 1.5).to(device)
    init = (torch.rand(b, A, generator=g) * 1.6 - 0.8).to(device)
    return mean, std, StackedLayers(layers, "elu"), state_half, init


def _reference_compiled_density(mean, std, layers, state_half, init, mode, num_samples, step, noise):
    """hmc_lib.hmc_sample with the per-evaluation closure compiled (built once, reused by calls)."""
    repeats = num_samples if mode == "parallel" else 1
    m, s = mean, std
    if repeats > 1:
        m, s = (t.repeat_interleave(repeats, dim=0) for t in (mean, std))
    density = torch.compile(hmc_lib.policy_q_log_density(m, s, layers, state_half, repeats))
    x0 = init.clamp(-0.999, 0.999)
    if repeats > 1:
        x0 = x0.repeat_interleave(repeats, dim=0)

    def op():
        with torch.no_grad():
            return hmc_lib.run_chains(density, x0, noise, leapfrog_steps=LEAPFROG, step_size=step, record_from=BURN_IN)

    return op


@pytest.mark.gpu
@pytest.mark.parametrize("impl", HMC_IMPLS)
@pytest.mark.parametrize("mode", ["faithful", "parallel"])
@pytest.mark.parametrize("env", list(DIMS))
def test_hmc_cuda(benchmark, env, mode, impl):
    S, A = DIMS[env]
    mean, std, layers, state_half, init = hmc_problem(S, A, "cuda")
    step = 0.3
    noise = hmc_lib.draw_noise(mode, B, K, BURN_IN, A, torch.Generator(device="cuda").manual_seed(0), "cuda")
    kw = dict(mode=mode, num_samples=K, burn_in=BURN_IN, leapfrog_steps=LEAPFROG, step_size=step)
    args = (mean, std, layers, state_half, init)
    if impl.startswith("fused"):
        prec = impl.split("-")[1]
        gen = torch.Generator(device="cuda").manual_seed(0)

        def op():
            if impl.endswith("rng"):
                return hmc_sample(*args, precision=prec, backend="triton", generator=gen, activation="elu", **kw)
            return hmc_sample(*args, noise=noise, precision=prec, backend="triton", activation="elu", **kw)
    elif impl == "reference-eager":
        def op():
            return hmc_lib.hmc_sample(*args, noise=noise, **kw)
    elif impl == "reference-compile":
        op = _reference_compiled_density(*args, mode, K, step, noise)
    else:
        compiled = torch.compile(hmc_lib.hmc_sample)

        def op():
            return compiled(*args, noise=noise, **kw)

    benchmark.group = f"hmc-{env}-{mode}"
    per_call = _run(benchmark, op, 3, True, rounds=10)
    if per_call:
        chains, transitions = hmc_lib.layout(mode, B, K, BURN_IN)
        benchmark.extra_info.update(ms=per_call * 1e3, evals_per_ms=transitions * LEAPFROG / (per_call * 1e3),
                                    chains=chains, transitions=transitions)


@pytest.mark.parametrize("mode", ["faithful", "parallel"])
def test_hmc_cpu_reference(benchmark, mode):
    """Small CPU case (B=8, K=10, hidden 64) of the reference sampler only, so that the file runs
    without a GPU; not a GPU figure."""
    S, A = DIMS["hopper"]
    b, k = 8, 10
    mean, std, layers, state_half, init = hmc_problem(S, A, "cpu", b=b, hidden=64)
    noise = hmc_lib.draw_noise(mode, b, k, BURN_IN, A, torch.Generator().manual_seed(0))

    def op():
        return hmc_lib.hmc_sample(mean, std, layers, state_half, init, mode=mode, num_samples=k, burn_in=BURN_IN,
                                  leapfrog_steps=LEAPFROG, step_size=0.3, noise=noise)

    benchmark.group = f"hmc-cpu-B8-K10-{mode}"
    per_call = _run(benchmark, op, 1, False, rounds=5)
    if per_call:
        benchmark.extra_info.update(ms=per_call * 1e3)


# ----------------------------------------------------------------------------------------------
# side by side (python bench/bench_ops.py corl-cpu [pairs])
# ----------------------------------------------------------------------------------------------
def corl_cpu_side_by_side(pairs: int = 41) -> dict:
    """Median ms of the CPU CQL case (forward + backward) for the op's torch path and the plain loop,
    timed alternately (the order flips every pair), and the median of the per-pair ratios."""
    import statistics
    import time

    S, A = DIMS["halfcheetah"]
    critics, obs, actions, log_w = corl_problem(S, A, "cpu")
    params = [p for c in critics for p in c.parameters()]
    impls = {
        "op-torch-path": lambda: sampled_q_log_mean_exp(obs, actions, critics, log_w, "none", temperature=CORL_TEMP,
                                                        backend="torch"),
        "plain-loop": lambda: corl_plain_penalty_lse(critics, obs, actions, log_w),
    }

    def seconds(fn):
        start = time.perf_counter()
        torch.autograd.grad(fn().sum(), params)
        return time.perf_counter() - start

    for fn in impls.values():  # warm-up (the critic reading, the allocator)
        for _ in range(3):
            seconds(fn)
    times = {name: [] for name in impls}
    for i in range(pairs):
        for name in (list(impls) if i % 2 == 0 else list(impls)[::-1]):
            times[name].append(seconds(impls[name]))
    ratios = [a / b for a, b in zip(times["op-torch-path"], times["plain-loop"])]
    return {**{f"{name}_ms": statistics.median(t) * 1e3 for name, t in times.items()},
            "op_over_plain": statistics.median(ratios), "pairs": pairs,
            "threads": torch.get_num_threads()}


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2 or sys.argv[1] != "corl-cpu":
        sys.exit("usage: python bench/bench_ops.py corl-cpu [pairs]   (the pytest cases: pytest bench/bench_ops.py)")
    print(corl_cpu_side_by_side(int(sys.argv[2]) if len(sys.argv) > 2 else 41))
