"""The fused ops compute the critic they are given, or refuse it: architectures read from modules and
activation arguments, every activation at depths 1-4 on both paths, a CQL(H) critic loss written
independently from the CQL paper, opaque modules, float64, the temperature and the precision default.

Kernel calls run in the Triton interpreter on CPU: tiny B and K keep the program counts small.
"""
import math

import pytest
import torch
from torch import nn

from misa_fast import nets
from misa_fast.ops import (
    CriticArchitectureError,
    SampledQLogMeanExp,
    resolve_precision,
    sampled_q_log_mean_exp,
    use_backend,
)
from misa_fast.ops.testing import kernel_device

needs_kernels = pytest.mark.skipif(kernel_device() is None, reason="needs CUDA or TRITON_INTERPRET=1")
DEV = kernel_device() or "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=needs_kernels)]
TOL = dict(atol=2e-5, rtol=2e-5)

ACTIVATIONS = {
    "relu": nn.ReLU,
    "elu": lambda: nn.ELU(alpha=0.7),
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}


def mlp(in_dim, hidden, make_act, seed=0, scale=1.5):
    """nn.Sequential Linear / activation / ... / Linear(., 1), weights scaled up so that the
    activations' nonlinear regions are all visited."""
    torch.manual_seed(seed)
    dims = [in_dim, *hidden, 1]
    mods = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.mul_(scale)
            lin.bias.uniform_(-0.5, 0.5)
        mods.append(lin)
        if i < len(dims) - 2:
            mods.append(make_act())
    return nn.Sequential(*mods).to(DEV)


class ConcatCritic(nn.Module):
    """A critic as other agents write it: ``forward(obs, actions)`` concatenates and runs a
    Sequential (CORL's FullyConnectedQFunction, d3rlpy's encoder-with-action + head)."""

    def __init__(self, obs_dim, act_dim, hidden, make_act=nn.ReLU, seed=0):
        super().__init__()
        self.network = mlp(obs_dim + act_dim, hidden, make_act, seed)

    def forward(self, obs, actions):
        return self.network(torch.cat([obs, actions], dim=-1)).squeeze(-1)


def textbook_lse(obs, actions, critics, log_w=None, temperature=1.0, norm=0.0):
    """T * logsumexp_k(Q(s, a_k) / T + log_w_k) - norm with each critic's own forward on concat(s, a)."""
    B, K, A = actions.shape
    o = obs.unsqueeze(1).expand(B, K, obs.shape[1]).reshape(B * K, -1)
    a = actions.reshape(B * K, A)
    outs = []
    for c in critics:
        q = (c(o, a) if isinstance(c, ConcatCritic) else c(torch.cat([o, a], -1))).reshape(B, K)
        v = q / temperature + (0.0 if log_w is None else log_w)
        outs.append(temperature * torch.logsumexp(v, dim=-1) - norm)
    return torch.stack(outs)


def assert_grads_match(out, ref, params, tol=TOL):
    g = torch.randn_like(ref)
    ga = torch.autograd.grad((out * g).sum(), params, allow_unused=True)
    gb = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    for i, (a, b) in enumerate(zip(ga, gb)):
        assert a is not None and b is not None, i
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b / scale, **tol, msg=f"gradient {i} {tuple(b.shape)}")


# ----------------------------------------------------------------------------------------------
# CQL(H), written from the CQL paper (Kumar et al. 2020, eq. 4 and appendix F), in plain torch
# ----------------------------------------------------------------------------------------------
def cql_h_critic_loss(critic, target_q, obs, actions, rewards, next_obs, dones, proposals, gamma, alpha, temp,
                      lse_fn=None):
    """alpha * E_s[ T log sum_a exp(Q(s, a) / T) - E_{a ~ D} Q(s, a) ] + 1/2 E[(Q(s, a) - y)^2].

    The integral over actions is estimated by importance sampling with three proposals (uniform on
    [-1, 1]^A, the policy at s and the policy at s'), each sample weighted by 1 / q(a):
    T log sum_a exp(Q/T) ~ T log sum_i exp(Q(s, a_i) / T - log q(a_i)).
    ``lse_fn(obs, actions (B, 3N, A), log_w (B, 3N))`` replaces the log-sum-exp (the op under test)."""
    (a_unif, logq_unif), (a_pi, logp_pi), (a_next, logp_next) = proposals
    q_data = critic(obs, actions)
    y = rewards + gamma * (1.0 - dones) * target_q
    td = 0.5 * ((q_data - y) ** 2).mean()
    all_a = torch.cat([a_unif, a_pi, a_next], dim=1)
    log_w = torch.cat([-logq_unif, -logp_pi, -logp_next], dim=1)
    if lse_fn is None:
        B, K, A = all_a.shape
        q_samples = critic(obs.unsqueeze(1).expand(B, K, obs.shape[1]).reshape(B * K, -1),
                           all_a.reshape(B * K, A)).reshape(B, K)
        lse = temp * torch.logsumexp(q_samples / temp + log_w, dim=1)
    else:
        lse = lse_fn(obs, all_a, log_w)
    penalty = alpha * (lse - q_data).mean()
    return td + penalty, penalty


def cql_batch(B=3, N=2, S=4, A=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(B, S, generator=g)
    next_obs = torch.randn(B, S, generator=g)
    actions = torch.rand(B, A, generator=g) * 2 - 1
    rewards = torch.randn(B, generator=g)
    dones = (torch.rand(B, generator=g) < 0.3).float()
    target_q = torch.randn(B, generator=g)
    a_unif = torch.rand(B, N, A, generator=g) * 2 - 1
    logq_unif = torch.full((B, N), -A * math.log(2.0))  # log U(a) on [-1, 1]^A

    def policy():  # a tanh-Gaussian policy sample and its log density
        mean = torch.randn(B, 1, A, generator=g) * 0.3
        std = torch.rand(B, 1, A, generator=g) * 0.5 + 0.2
        noise = torch.randn(B, N, A, generator=g)
        a, logp = nets.tanh_gaussian_sample(mean.expand(B, N, A), std.expand(B, N, A), noise)
        return a, logp

    props = [(a_unif, logq_unif), policy(), policy()]
    to = lambda t: t.to(DEV)  # noqa: E731
    return (to(obs), to(actions), to(rewards), to(next_obs), to(dones), to(target_q),
            [(to(a), to(lp)) for a, lp in props])


@pytest.mark.parametrize("backend", BACKENDS)
def test_cql_h_relu_three_hidden_layers_matches_its_own_loss(backend):
    """A CORL-style twin critic (3 hidden ReLU layers, forward concatenating (s, a)), 3 proposals with
    importance weights, T = 0.5: the fused op gives the independent penalty and every parameter's
    gradient of the whole critic loss."""
    S, A, H, T, alpha = 4, 2, 16, 0.5, 5.0
    critics = [ConcatCritic(S, A, (H, H, H), seed=s) for s in (1, 2)]
    obs, actions, rewards, next_obs, dones, target_q, props = cql_batch(S=S, A=A)
    for i, critic in enumerate(critics):
        def fused(o, a, lw, critic=critic):
            return sampled_q_log_mean_exp(o, a, [critic], lw, normalizer="none", temperature=T,
                                          backend=backend, precision="ieee")[0]
        args = (critic, target_q, obs, actions, rewards, next_obs, dones, props, 0.99, alpha, T)
        loss_ref, pen_ref = cql_h_critic_loss(*args)
        loss_op, pen_op = cql_h_critic_loss(*args, lse_fn=fused)
        torch.testing.assert_close(pen_op, pen_ref, **TOL)
        params = list(critic.parameters())
        for a, b in zip(torch.autograd.grad(loss_op, params), torch.autograd.grad(loss_ref, params)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # both critics in one call, the way an agent replaces its logsumexp
    all_a = torch.cat([p[0] for p in props], 1)
    log_w = torch.cat([-p[1] for p in props], 1)
    out, q = sampled_q_log_mean_exp(obs, all_a, critics, log_w, "none", temperature=T, return_q=True,
                                    backend=backend, precision="ieee")
    torch.testing.assert_close(out, textbook_lse(obs, all_a, critics, log_w, T), **TOL)
    B, K = all_a.shape[:2]
    q_ref = torch.stack([c(obs.unsqueeze(1).expand(B, K, S).reshape(B * K, S), all_a.reshape(B * K, A)).reshape(B, K)
                         for c in critics])
    torch.testing.assert_close(q, q_ref.detach(), **TOL)  # return_q: Q itself, not Q / T


# ----------------------------------------------------------------------------------------------
# every activation at every depth
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_activation_and_depth(backend, act, depth):
    S, A, B, K = 3, 2, 2, 3
    hidden = (16, 24, 20, 16)[:depth]
    crit = mlp(S + A, hidden, ACTIVATIONS[act], seed=depth)
    obs = torch.randn(B, S, device=DEV, requires_grad=True)
    actions = (torch.rand(B, K, A, device=DEV) * 2 - 1).requires_grad_()
    lw = torch.randn(B, K, device=DEV)
    out = sampled_q_log_mean_exp(obs, actions, [crit], lw, "k", temperature=1.3, backend=backend, precision="ieee")
    ref = textbook_lse(obs, actions, [crit], lw, 1.3, math.log(K))
    torch.testing.assert_close(out, ref, **TOL)
    assert_grads_match(out, ref, list(crit.parameters()) + [obs, actions])


@needs_kernels
def test_stacked_layers_with_explicit_activation_at_depth_four():
    """Stacked plain tensors with activation= (no module to read): ensemble of 3, 4 hidden layers."""
    S, A, B, K, E = 3, 2, 2, 5, 3
    per = [mlp(S + A, (16, 16, 16, 16), nn.SiLU, seed=e) for e in range(E)]
    lins = [[m for m in c if isinstance(m, nn.Linear)] for c in per]
    stacked = [(torch.stack([lin[j].weight for lin in lins]).detach().requires_grad_(),
                torch.stack([lin[j].bias for lin in lins]).detach().requires_grad_()) for j in range(5)]
    obs, actions = torch.randn(B, S, device=DEV), torch.rand(B, K, A, device=DEV) * 2 - 1
    out = sampled_q_log_mean_exp(obs, actions, stacked, activation="silu", backend="triton", precision="ieee")
    ref = sampled_q_log_mean_exp(obs, actions, stacked, activation=nn.SiLU(), backend="torch")
    torch.testing.assert_close(out, textbook_lse(obs, actions, per, norm=math.log(K)), **TOL)
    assert_grads_match(out, ref, [t for wb in stacked for t in wb])


# ----------------------------------------------------------------------------------------------
# the project's own critics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden", [(16, 16), (16, 24, 16)])
def test_relu_twin_critic_is_computed_with_relu(backend, hidden):
    torch.manual_seed(3)
    critic = nets.TwinCritic(4, 2, hidden, activation="relu").to(DEV)
    with torch.no_grad():
        for w in critic.weights:
            w.mul_(2.0)
    obs, actions = torch.randn(2, 4, device=DEV), torch.rand(2, 5, 2, device=DEV) * 2 - 1
    out = sampled_q_log_mean_exp(obs, actions, critic, backend=backend, precision="ieee")
    ref = torch.logsumexp(critic(obs, actions), -1) - math.log(5)
    torch.testing.assert_close(out, ref, **TOL)
    assert_grads_match(out, ref, list(critic.parameters()))
    # the same through its stacked layers (they carry the activation), and ELU would differ
    torch.testing.assert_close(sampled_q_log_mean_exp(obs, actions, critic.stacked_layers(), backend=backend,
                                                      precision="ieee"), ref, **TOL)
    with pytest.raises(CriticArchitectureError, match="carry relu"):  # the layers know their network
        sampled_q_log_mean_exp(obs, actions, critic.stacked_layers(), activation="elu", backend=backend)
    plain = [(w, b) for w, b in critic.stacked_layers()]
    elu = sampled_q_log_mean_exp(obs, actions, plain, activation="elu", backend=backend, precision="ieee")
    assert (elu - ref).abs().max() > 1e-3  # the activation matters at these weights


# ----------------------------------------------------------------------------------------------
# what cannot be modelled is never computed as something else
# ----------------------------------------------------------------------------------------------
class LayerNormCritic(nn.Module):
    def __init__(self, S, A, H=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(S + A, H), nn.LayerNorm(H), nn.ReLU(), nn.Linear(H, 1))

    def forward(self, obs, actions):
        return self.net(torch.cat([obs, actions], -1))


class ResidualCritic(nn.Module):
    def __init__(self, S, A, H=16):
        super().__init__()
        # registered in MLP order: only its forward tells the residual apart
        self.inp, self.act1, self.mid, self.act2, self.out = (nn.Linear(S + A, H), nn.ReLU(), nn.Linear(H, H),
                                                              nn.ReLU(), nn.Linear(H, 1))

    def forward(self, obs, actions):
        h = self.act1(self.inp(torch.cat([obs, actions], -1)))
        return self.out(h + self.act2(self.mid(h)))


class FunctionalReluCritic(nn.Module):
    """CleanRL-style: the activation is applied in forward, no activation module to read."""

    def __init__(self, S, A, H=16):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(S + A, H), nn.Linear(H, H), nn.Linear(H, 1)

    def forward(self, obs, actions):
        x = torch.relu(self.fc1(torch.cat([obs, actions], -1)))
        return self.fc3(torch.relu(self.fc2(x)))


class SwappedConcatCritic(ConcatCritic):
    def forward(self, obs, actions):  # cat(a, s): not MLP(concat(s, a)) of its layers
        return self.network(torch.cat([actions, obs], dim=-1)).squeeze(-1)


class ClampedCritic(ConcatCritic):
    def forward(self, obs, actions):
        return super().forward(obs, actions).clamp(max=0.0)


OPAQUE = {
    "layernorm": (lambda S, A: LayerNormCritic(S, A), "LayerNorm"),
    "residual": (lambda S, A: ResidualCritic(S, A), "does not compute"),
    "functional": (lambda S, A: FunctionalReluCritic(S, A), "activation="),
    "swapped": (lambda S, A: SwappedConcatCritic(A, S, (16, 16)), "does not compute"),
    "clamped": (lambda S, A: ClampedCritic(S, A, (16, 16)), "does not compute"),
    "mish": (lambda S, A: nn.Sequential(nn.Linear(S + A, 16), nn.Mish(), nn.Linear(16, 1)), "Mish"),
    "dropout": (lambda S, A: nn.Sequential(nn.Linear(S + A, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1)),
                "Dropout"),
}


@pytest.mark.parametrize("kind", list(OPAQUE))
def test_a_module_the_op_cannot_model_gives_the_error_or_its_own_forward(kind):
    S, A, B, K = 3, 2, 2, 4
    torch.manual_seed(5)
    make, reason = OPAQUE[kind]
    crit = make(S, A).to(DEV)
    obs, actions = torch.randn(B, S, device=DEV), torch.rand(B, K, A, device=DEV) * 2 - 1
    if kind != "dropout":
        with pytest.raises(CriticArchitectureError, match=reason) as info:
            sampled_q_log_mean_exp(obs, actions, [crit], backend="triton")
        assert type(crit).__name__ in str(info.value)  # names the module
    if kind in ("swapped",):
        return  # obs and action dims swapped: the op's own concat(s, a) call would be wrong-shaped anyway
    if kind == "dropout":  # random in training mode: refused on the kernel path, its forward on the torch path
        with pytest.raises(CriticArchitectureError, match=reason):
            sampled_q_log_mean_exp(obs, actions, [crit], backend="triton")
        crit.eval()  # eval mode: Dropout is the identity, the MLP is read and runs fused
        out = sampled_q_log_mean_exp(obs, actions, [crit], backend="triton" if kernel_device() else "torch",
                                     precision="ieee")
        torch.testing.assert_close(out, textbook_lse(obs, actions, [crit], norm=math.log(K)), **TOL)
        return
    # the torch path (and "auto" on CPU) evaluates the module's own forward: right values, right gradients
    B_, K_ = actions.shape[:2]
    o = obs.unsqueeze(1).expand(B_, K_, S).reshape(B_ * K_, S)
    a = actions.reshape(B_ * K_, A)
    ref = torch.logsumexp(crit(o, a).reshape(B_, K_), -1) - math.log(K_) if not isinstance(crit, nn.Sequential) \
        else torch.logsumexp(crit(torch.cat([o, a], -1)).reshape(B_, K_), -1) - math.log(K_)
    for backend in ("torch", "auto"):
        out = sampled_q_log_mean_exp(obs, actions, [crit], backend=backend)
        torch.testing.assert_close(out, ref.unsqueeze(0), **TOL)
    assert_grads_match(sampled_q_log_mean_exp(obs, actions, [crit], backend="torch"), ref.unsqueeze(0),
                       list(crit.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_activation_module_with_activation_argument(backend):
    """The activation applied in forward named with activation=: read, checked against the forward,
    fused. A wrong name is caught by that check rather than computed."""
    S, A = 3, 2
    torch.manual_seed(6)
    crit = FunctionalReluCritic(S, A).to(DEV)
    with torch.no_grad():
        for p in crit.parameters():
            p.mul_(2.0)
    obs, actions = torch.randn(2, S, device=DEV), torch.rand(2, 4, A, device=DEV) * 2 - 1
    out = sampled_q_log_mean_exp(obs, actions, [crit], activation="relu", backend=backend, precision="ieee")
    B, K = actions.shape[:2]
    q = crit(obs.unsqueeze(1).expand(B, K, S).reshape(-1, S), actions.reshape(-1, A)).reshape(B, K)
    torch.testing.assert_close(out, (torch.logsumexp(q, -1) - math.log(K)).unsqueeze(0), **TOL)
    if backend == "triton":
        with pytest.raises(CriticArchitectureError, match="does not compute"):
            sampled_q_log_mean_exp(obs, actions, [crit], activation="tanh", backend="triton")
    else:  # the torch path falls back to the module's own forward: still the right numbers
        out = sampled_q_log_mean_exp(obs, actions, [crit], activation="tanh", backend="torch")
        torch.testing.assert_close(out, (torch.logsumexp(q, -1) - math.log(K)).unsqueeze(0), **TOL)


@pytest.mark.parametrize("backend", ["torch", "auto", pytest.param("triton", marks=needs_kernels)])
def test_plain_tensors_need_an_activation(backend):
    crit = mlp(5, (16, 16), nn.ReLU)
    layers = [(m.weight, m.bias) for m in crit if isinstance(m, nn.Linear)]
    obs, actions = torch.randn(2, 3, device=DEV), torch.rand(2, 4, 2, device=DEV)
    with pytest.raises(CriticArchitectureError, match="activation="):
        sampled_q_log_mean_exp(obs, actions, [layers], backend=backend)
    stacked = [(w.unsqueeze(0), b.unsqueeze(0)) for w, b in layers]
    with pytest.raises(CriticArchitectureError, match="activation="):
        sampled_q_log_mean_exp(obs, actions, stacked, backend=backend)
    with pytest.raises(CriticArchitectureError, match="applies relu"):  # contradicts the module
        sampled_q_log_mean_exp(obs, actions, [crit], activation="elu", backend=backend)
    with pytest.raises(ValueError, match="unknown activation"):
        sampled_q_log_mean_exp(obs, actions, [layers], activation="swishy", backend=backend)
    out = sampled_q_log_mean_exp(obs, actions, [layers], activation="relu", backend=backend, precision="ieee")
    torch.testing.assert_close(out, textbook_lse(obs, actions, [crit], norm=math.log(4)), **TOL)


class CountingCritic(ConcatCritic):
    """Counts its forward calls (a hook would make the module opaque: the op cannot run hooks)."""

    calls = 0

    def forward(self, obs, actions):
        self.calls += 1
        return super().forward(obs, actions)


def test_module_check_runs_once_and_again_after_a_change():
    crit = CountingCritic(3, 2, (16, 16))
    obs, actions = torch.randn(2, 3), torch.rand(2, 4, 2)
    for _ in range(3):
        sampled_q_log_mean_exp(obs, actions, [crit], backend="torch")
    assert crit.calls == 1  # one check, then the read architecture
    crit.network[1] = nn.Tanh()  # another activation module: read and checked again
    out = sampled_q_log_mean_exp(obs, actions, [crit], backend="torch")
    assert crit.calls == 2
    torch.testing.assert_close(out, textbook_lse(obs, actions, [crit], norm=math.log(4)), **TOL)


# ----------------------------------------------------------------------------------------------
# float64, precision, temperature
# ----------------------------------------------------------------------------------------------
def test_float64_stays_float64_on_the_torch_path_and_is_refused_by_the_kernel():
    crit = ConcatCritic(3, 2, (16, 16, 16)).double()
    obs = torch.randn(2, 3, dtype=torch.float64)
    actions = torch.rand(2, 4, 2, dtype=torch.float64)
    out = sampled_q_log_mean_exp(obs, actions, [crit], backend="auto")
    assert out.dtype == torch.float64
    ref = textbook_lse(obs, actions, [crit], norm=math.log(4))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    if kernel_device() is not None:
        with pytest.raises(ValueError, match="float64"):
            sampled_q_log_mean_exp(obs.to(DEV), actions.to(DEV), [crit.to(DEV)], backend="triton")


def test_precision_default_follows_torch():
    before = torch.get_float32_matmul_precision()
    try:
        for setting, expected in (("highest", "ieee"), ("high", "tf32"), ("medium", "bf16")):
            torch.set_float32_matmul_precision(setting)
            assert resolve_precision(None) == expected
        assert resolve_precision("tf32") == "tf32"
        with pytest.raises(ValueError, match="precision"):
            resolve_precision("fp8")
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_module_form_and_return_q(backend):
    crit = ConcatCritic(3, 2, (16, 16))
    crit.to(DEV)
    obs, actions = torch.randn(2, 3, device=DEV), torch.rand(2, 5, 2, device=DEV) * 2 - 1
    lw = torch.randn(2, 5, device=DEV)
    op = SampledQLogMeanExp(normalizer="none", temperature=0.25, backend=backend, precision="ieee")
    assert "temperature=0.25" in repr(op)
    out, q = op(obs, actions, [crit], lw, return_q=True)
    torch.testing.assert_close(out, textbook_lse(obs, actions, [crit], lw, 0.25), **TOL)
    _, q1 = sampled_q_log_mean_exp(obs, actions, [crit], lw, "none", return_q=True, backend=backend, precision="ieee")
    torch.testing.assert_close(q, q1, **TOL)  # Q itself whatever T
    assert q.shape == (1, 2, 5)
    with pytest.raises(ValueError, match="temperature"):
        sampled_q_log_mean_exp(obs, actions, [crit], temperature=0.0)
    # the gradient w.r.t. the log-weights carries the factor T
    lw = lw.clone().requires_grad_()
    out = sampled_q_log_mean_exp(obs, actions, [crit], lw, "none", temperature=0.25, backend=backend, precision="ieee")
    ref = textbook_lse(obs, actions, [crit], lw, 0.25)
    assert_grads_match(out, ref, [lw])


def test_auto_backend_falls_back_for_what_the_kernel_lacks(monkeypatch):
    """Under "auto" a call the kernels cannot take runs the reference (on CPU it always does); under
    "triton" it raises with the reason."""
    if kernel_device() is None:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    deep = mlp(5, (16,) * 5, nn.ReLU)  # five hidden layers
    obs, actions = torch.randn(2, 3, device=DEV), torch.rand(2, 3, 2, device=DEV)
    with pytest.raises(ValueError, match="hidden layers"):
        sampled_q_log_mean_exp(obs, actions, [deep], backend="triton")
    with use_backend("auto"):
        out = sampled_q_log_mean_exp(obs, actions, [deep])
    torch.testing.assert_close(out, textbook_lse(obs, actions, [deep], norm=math.log(3)), **TOL)
    mixed = [mlp(5, (16, 16), nn.ReLU), mlp(5, (16, 16), nn.Tanh)]
    with pytest.raises(ValueError, match="one activation"):
        sampled_q_log_mean_exp(obs, actions, mixed, backend="triton")
    out = sampled_q_log_mean_exp(obs, actions, mixed, backend="torch")
    torch.testing.assert_close(out, textbook_lse(obs, actions, mixed, norm=math.log(3)), **TOL)


@needs_kernels
@pytest.mark.parametrize("hidden", [(48, 40, 36), (40, 72, 50, 24)])
def test_deep_stacked_critic_over_several_k_blocks_and_state_groups(hidden):
    """Middle layers' scratch tiles reused across K blocks (K = 37) and states (5 states in 2
    groups), widths that are not powers of two, an ensemble's stacked gradients."""
    torch.manual_seed(len(hidden))
    critic = nets.TwinCritic(4, 3, hidden, activation="relu").to(DEV)
    with torch.no_grad():
        for w in critic.weights:
            w.mul_(3.0)
    obs = torch.randn(5, 4, device=DEV, requires_grad=True)
    actions = (torch.rand(5, 37, 3, device=DEV) * 2 - 1).requires_grad_()
    out = sampled_q_log_mean_exp(obs, actions, critic, backend="triton", precision="ieee", groups=2)
    ref = torch.logsumexp(critic(obs, actions), -1) - math.log(37)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert_grads_match(out, ref, list(critic.parameters()) + [obs, actions], tol=dict(atol=1e-5, rtol=1e-5))
