"""The fused sampled-Q op on a critic module that changes after the op has read it: an activation's
setting changed in place, normalised layers (legacy hook-based and parametrized), a Linear subclass
with its own forward, hooks. Each call gives the module's own forward on the torch path; the Triton
path computes what it models and refuses the rest. Also: the reading cache keeps no critic alive,
second-order gradients, and the precision of the SNIS weights' Q values.

Kernel calls run in the Triton interpreter on CPU: tiny B, K and widths keep the program counts small.
"""
import gc
import math
import types
import warnings
import weakref

import pytest
import torch
from torch import nn

from misa_fast import nets, ops
from misa_fast.agents import MISA
from misa_fast.agents.misa import snis_q_precision
from misa_fast.agents.misa_config import MISAConfig
from misa_fast.ops import CriticArchitectureError, sampled_q_log_mean_exp
from misa_fast.ops.testing import kernel_device

needs_kernels = pytest.mark.skipif(kernel_device() is None, reason="needs CUDA or TRITON_INTERPRET=1")
DEV = kernel_device() or "cpu"
TOL = dict(atol=2e-5, rtol=2e-5)
S, A, B, K, H = 3, 2, 2, 3, 8


class Critic(nn.Module):
    """CORL-style: ``forward(obs, actions)`` runs a Sequential on concat(s, a)."""

    def __init__(self, act=nn.ReLU, linear=nn.Linear, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.network = nn.Sequential(linear(S + A, H), act(), linear(H, H), act(), nn.Linear(H, 1))
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(2.0)

    def forward(self, obs, actions):
        return self.network(torch.cat([obs, actions], -1)).squeeze(-1)


class LoRALinear(nn.Linear):
    """A low-rank adapter whose second factor starts at zero: equal to nn.Linear until it trains."""

    def __init__(self, in_features, out_features, rank=2):
        super().__init__(in_features, out_features)
        self.lora_a = nn.Parameter(torch.randn(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x):
        return super().forward(x) + x @ self.lora_a.t() @ self.lora_b.t()


class InitOnlyLinear(nn.Linear):
    """A subclass that keeps nn.Linear.forward (only its initialisation differs): read as a Linear."""

    def reset_parameters(self):
        super().reset_parameters()
        with torch.no_grad():
            self.bias.fill_(0.1)


def problem(seed=1):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(B, S, generator=g).to(DEV)
    actions = (torch.rand(B, K, A, generator=g) * 2 - 1).to(DEV)
    return obs, actions


def own_forward_lse(critic, obs, actions):
    """log mean_k exp Q(s, a_k) with the module's own forward."""
    o = obs.unsqueeze(1).expand(B, K, S).reshape(B * K, S)
    q = critic(o, actions.reshape(B * K, A)).reshape(B, K)
    return (torch.logsumexp(q, -1) - math.log(K)).unsqueeze(0)


def assert_torch_paths_give_its_forward(critic, obs, actions):
    ref = own_forward_lse(critic, obs, actions)
    for backend in ("torch", "auto"):
        torch.testing.assert_close(sampled_q_log_mean_exp(obs, actions, [critic], backend=backend), ref, **TOL)
    return ref


def legacy(norm, layer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the legacy forms are deprecated: still in use
        return norm(layer)


# ----------------------------------------------------------------------------------------------
# changed after the first call: what the op models runs fused with the change, the rest its forward
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "auto", pytest.param("triton", marks=needs_kernels)])
@pytest.mark.parametrize("change", ["leaky_slope", "elu_alpha", "gelu_approximate"])
def test_an_activation_setting_changed_in_place_is_never_stale(backend, change):
    make, attr, value = {"leaky_slope": (lambda: nn.LeakyReLU(0.2), "negative_slope", 0.6),
                         "elu_alpha": (lambda: nn.ELU(0.5), "alpha", 1.7),
                         "gelu_approximate": (nn.GELU, "approximate", "tanh")}[change]
    critic = Critic(make).to(DEV)
    obs, actions = problem()
    kw = dict(backend=backend, precision="ieee")
    torch.testing.assert_close(sampled_q_log_mean_exp(obs, actions, [critic], **kw),
                               own_forward_lse(critic, obs, actions), **TOL)
    before = own_forward_lse(critic, obs, actions)
    for i in (1, 3):
        setattr(critic.network[i], attr, value)
    after = own_forward_lse(critic, obs, actions)
    assert (after - before).abs().max() > 2e-5  # the setting matters (GELU's approximation barely)
    torch.testing.assert_close(sampled_q_log_mean_exp(obs, actions, [critic], **kw), after, atol=2e-6, rtol=2e-6)


def _legacy_weight_norm(critic):
    legacy(nn.utils.weight_norm, critic.network[2])
    return lambda: critic.network[2].weight_g.data.mul_(1.7)  # a training step: the hook rebuilds weight


def _legacy_spectral_norm(critic):
    legacy(nn.utils.spectral_norm, critic.network[2])
    critic.eval()  # no power iteration: the forward is a function of the parameters alone
    torch.manual_seed(7)
    return lambda: critic.network[2].weight_orig.data.add_(torch.randn(H, H, device=DEV))


def _lora(critic):
    lora = LoRALinear(H, H)
    with torch.no_grad():
        lora.weight.copy_(critic.network[2].weight)
        lora.bias.copy_(critic.network[2].bias)
    critic.network[2] = lora
    return lambda: lora.lora_b.data.normal_(0.0, 1.0)  # the adapter trains away from zero


def _instance_forward(critic):
    layer = critic.network[2]
    return lambda: setattr(layer, "forward", lambda x: nn.Linear.forward(layer, x).clamp(max=0.0))


def _forward_hook(critic):
    hooks = []
    return lambda: hooks.append(critic.network[2].register_forward_hook(lambda m, args, out: 1.5 * out))


def _forward_pre_hook(critic):
    return lambda: critic.register_forward_pre_hook(lambda m, args: (args[0], 0.5 * args[1]))


def _global_forward_hook(critic):
    handles = []

    def add():
        handles.append(nn.modules.module.register_module_forward_hook(
            lambda m, args, out: out + 0.25 if m is critic.network[2] else None))
    return add, handles


UNMODELLED = {
    "legacy_weight_norm": (_legacy_weight_norm, "weight_norm"),
    "legacy_spectral_norm": (_legacy_spectral_norm, "spectral_norm"),
    "lora_subclass": (_lora, "own forward"),
    "instance_forward": (_instance_forward, "own forward"),
    "forward_hook": (_forward_hook, "forward hook"),
    "forward_pre_hook": (_forward_pre_hook, "forward pre-hook"),
    "global_forward_hook": (_global_forward_hook, "global forward hook"),
}


@pytest.mark.parametrize("kind", list(UNMODELLED))
def test_what_the_op_cannot_model_runs_its_own_forward_or_is_refused(kind):
    """The op reads the critic once, then the module changes the way training changes it (the
    normalised weight's parameters, a LoRA adapter leaving zero, a hook added): every later call is
    the module's own forward on the torch path; the Triton path refuses the critic."""
    make, reason = UNMODELLED[kind]
    critic = Critic().to(DEV)
    obs, actions = problem()
    sampled_q_log_mean_exp(obs, actions, [critic], backend="torch")  # read (and cached) before the change
    handles = []
    change = make(critic)
    if isinstance(change, tuple):
        change, handles = change
    try:
        before = own_forward_lse(critic, obs, actions)
        change()
        after = own_forward_lse(critic, obs, actions)
        assert (after - before).abs().max() > 1e-4  # the change matters
        assert_torch_paths_give_its_forward(critic, obs, actions)
        params = list(critic.parameters())
        grads = torch.autograd.grad(sampled_q_log_mean_exp(obs, actions, [critic], backend="torch").sum(), params,
                                    allow_unused=True)
        for got, want in zip(grads, torch.autograd.grad(own_forward_lse(critic, obs, actions).sum(), params,
                                                         allow_unused=True)):
            if want is not None:
                torch.testing.assert_close(got, want, **TOL)
        if kernel_device() is not None:
            with pytest.raises(CriticArchitectureError, match=reason) as info:
                sampled_q_log_mean_exp(obs, actions, [critic], backend="triton")
            assert "Critic" in str(info.value)  # names the critic
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_kernels)])
@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_parametrized_layers_are_read_through_their_parametrization_at_every_call(backend, norm):
    critic = Critic().to(DEV)
    parametrization = getattr(nn.utils.parametrizations, norm)
    parametrization(critic.network[0])
    parametrization(critic.network[2])
    critic.eval()  # spectral_norm: no power iteration, the forward depends on the parameters alone
    obs, actions = problem()
    kw = dict(backend=backend, precision="ieee")
    torch.testing.assert_close(sampled_q_log_mean_exp(obs, actions, [critic], **kw),
                               own_forward_lse(critic, obs, actions), **TOL)
    with torch.no_grad():  # a training step moves the parametrization's parameters
        for p in critic.network[2].parametrizations.weight.parameters():
            p.mul_(-1.5 if p.dim() == 2 else 0.7)
    ref = own_forward_lse(critic, obs, actions)
    out = sampled_q_log_mean_exp(obs, actions, [critic], **kw)
    torch.testing.assert_close(out, ref, **TOL)
    params = list(critic.parameters())  # the parametrizations' originals
    for got, want in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(ref.sum(), params)):
        torch.testing.assert_close(got, want, **TOL)


@needs_kernels
def test_a_linear_subclass_keeping_linear_forward_runs_fused():
    critic = Critic(linear=InitOnlyLinear).to(DEV)
    obs, actions = problem()
    out = sampled_q_log_mean_exp(obs, actions, [critic], backend="triton", precision="ieee")
    torch.testing.assert_close(out, own_forward_lse(critic, obs, actions), **TOL)


def test_plain_layers_with_their_own_forward_or_a_hook_are_refused_everywhere():
    """A list of layers has no module forward to fall back on."""
    critic = Critic()
    obs, actions = problem()
    layers = [critic.network[0], LoRALinear(H, H), critic.network[4]]
    for backend in ("torch", "auto"):
        with pytest.raises(CriticArchitectureError, match="own forward"):
            sampled_q_log_mean_exp(obs.cpu(), actions.cpu(), [layers], activation="relu", backend=backend)
    handle = critic.network[2].register_forward_pre_hook(lambda m, args: None)
    try:
        with pytest.raises(CriticArchitectureError, match="forward pre-hook"):
            sampled_q_log_mean_exp(obs.cpu(), actions.cpu(), [[critic.network[i] for i in (0, 2, 4)]],
                                   activation="relu", backend="torch")
    finally:
        handle.remove()


def test_a_hook_on_a_stacked_ensemble_runs_its_forward():
    torch.manual_seed(2)
    critic = nets.TwinCritic(S, A, (H, H), activation="relu").to(DEV)
    obs, actions = problem()
    plain = sampled_q_log_mean_exp(obs, actions, critic, backend="torch")
    handle = critic.register_forward_hook(lambda m, args, out: out - 0.5)
    try:
        ref = torch.logsumexp(critic(obs, actions), -1) - math.log(K)
        for backend in ("torch", "auto"):
            torch.testing.assert_close(sampled_q_log_mean_exp(obs, actions, critic, backend=backend), ref, **TOL)
        torch.testing.assert_close(ref, plain - 0.5, **TOL)
        if kernel_device() is not None:
            with pytest.raises(CriticArchitectureError, match="forward hook"):
                sampled_q_log_mean_exp(obs, actions, critic, backend="triton")
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------
# the reading cache
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["read", "opaque", "parametrized", "bound_forward"])
def test_a_dropped_critic_is_freed(kind):
    critic = Critic()
    if kind == "opaque":
        critic.network[1] = nn.Mish()
    elif kind == "parametrized":
        nn.utils.parametrizations.weight_norm(critic.network[2])
    elif kind == "bound_forward":  # a forward assigned to the instance, bound to the critic itself
        critic.forward = types.MethodType(lambda self, obs, actions: Critic.forward(self, obs, actions), critic)
    obs, actions = problem()
    obs, actions = obs.cpu(), actions.cpu()
    out = sampled_q_log_mean_exp(obs, actions, [critic], backend="torch")
    torch.autograd.grad(out.sum(), list(critic.parameters()))
    sampled_q_log_mean_exp(obs, actions, [critic], backend="torch")  # the cached reading used
    alive = weakref.ref(critic)
    layer = weakref.ref(critic.network[2])
    del critic, out
    gc.collect()
    assert alive() is None and layer() is None


# ----------------------------------------------------------------------------------------------
# second-order gradients
# ----------------------------------------------------------------------------------------------
def test_double_backward_on_the_torch_path_is_the_plain_torch_one():
    critic = Critic(nn.Tanh)
    obs, actions = problem()
    obs, actions = obs.cpu(), actions.cpu()
    log_w = torch.randn(B, K, requires_grad=True)
    params = list(critic.parameters()) + [log_w]

    def second(out):
        grads = torch.autograd.grad(out.sum(), params, create_graph=True)
        return torch.autograd.grad(sum((g ** 2).sum() for g in grads), params)

    o = obs.unsqueeze(1).expand(B, K, S).reshape(B * K, S)
    q = critic(o, actions.reshape(B * K, A)).reshape(B, K)
    want = second(torch.logsumexp(q + log_w, -1) - math.log(K))
    got = second(sampled_q_log_mean_exp(obs, actions, [critic], log_w, backend="torch"))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("wrt", ["weights", "log_weights"])
def test_double_backward_through_the_kernel_raises(wrt):
    """The kernel's backward is first-order only: differentiating it again raises instead of
    dropping the terms it holds constant."""
    critic = Critic(nn.Tanh).to(DEV)
    obs, actions = problem()
    log_w = torch.randn(B, K, device=DEV, requires_grad=True)
    inputs = list(critic.parameters()) if wrt == "weights" else [log_w]
    out = sampled_q_log_mean_exp(obs, actions, [critic], log_w, backend="triton", precision="ieee")
    grads = torch.autograd.grad(out.sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order|no autograd formula"):
        torch.autograd.grad(sum((g ** 2).sum() for g in grads), inputs)


# ----------------------------------------------------------------------------------------------
# the SNIS weights' Q values
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hmc, sampled_q, expected", [("tf32x3", "tf32", "ieee"), ("ieee", "bf16", "ieee"),
                                                      ("tf32", "bf16", "tf32"), ("bf16", "ieee", "ieee")])
def test_snis_weights_take_the_hmc_precision_or_a_finer_one(hmc, sampled_q, expected):
    assert snis_q_precision(MISAConfig(hmc_precision=hmc, sampled_q_precision=sampled_q)) == expected


@pytest.mark.parametrize("use_hmc, expected", [(True, "ieee"), (False, "tf32")])
def test_the_log_partition_precision_the_agent_passes(monkeypatch, use_hmc, expected):
    """Under unbiased_estimator="snis" the fused call whose Q values weight the samples runs at fp32
    dots (hmc_precision tf32x3); without the term (MISA-biased) at sampled_q_precision (tf32)."""
    seen = []

    def spy(obs, actions, layers, log_weights=None, normalizer="k", *, return_q=False, precision=None, **options):
        seen.append(precision)
        return ops.sampled_q_log_mean_exp_reference(obs, actions, layers, log_weights, normalizer, return_q)

    monkeypatch.setattr(ops, "resolve_backend", lambda *args, **kwargs: "triton")
    monkeypatch.setattr(ops, "sampled_q_log_mean_exp", spy)
    g = torch.Generator().manual_seed(0)
    batch = {"observations": torch.randn(4, S, generator=g), "actions": torch.rand(4, A, generator=g) * 1.8 - 0.9,
             "rewards": torch.randn(4, generator=g), "next_observations": torch.randn(4, S, generator=g),
             "terminals": torch.zeros(4)}
    agent = MISA(MISAConfig(obs_dim=S, act_dim=A, policy_hidden=(4, 4), critic_hidden=(4, 4), num_samples=K,
                            batch_size=4, seed=0, unbiased_estimator="snis", use_hmc=use_hmc, hmc_precision="tf32x3",
                            sampled_q_precision="tf32"))
    agent.compute_losses(batch, agent.draw_noise(4))
    assert seen == [expected]


def _cql_penalty(critics, obs, actions, data_actions):
    lse = sampled_q_log_mean_exp(obs, actions, critics, normalizer="k", backend="torch")
    q_data = torch.stack([c(torch.cat([obs, data_actions], -1)).squeeze(-1) for c in critics])
    return (lse - q_data).mean()


def _fresh_critics():
    return [nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
            for _ in range(2)]


@pytest.mark.parametrize("first_use", ["compile", "export", "vmap"])
def test_a_critic_first_seen_inside_compile_export_or_vmap_gives_the_eager_numbers(first_use):
    """The op's one-time check compares numbers, which a traced or vmapped call does not have: the
    module's own forward runs there, and the eager numbers come out."""
    torch.manual_seed(3)
    critics = _fresh_critics()
    obs, actions, data_actions = torch.randn(6, 3), torch.rand(6, 4, 2) * 2 - 1, torch.rand(6, 2) * 2 - 1
    if first_use == "compile":
        got = torch.compile(_cql_penalty, fullgraph=True, backend="eager")(critics, obs, actions, data_actions)
    elif first_use == "export":
        class Penalty(nn.Module):
            def __init__(self):
                super().__init__()
                self.critics = nn.ModuleList(critics)

            def forward(self, o, a, d):
                return _cql_penalty(list(self.critics), o, a, d)

        got = torch.export.export(Penalty(), (obs, actions, data_actions)).module()(obs, actions, data_actions)
    else:
        batched = torch.stack([obs, obs + 0.5])
        got = torch.func.vmap(lambda o: _cql_penalty(critics, o, actions, data_actions))(batched)[0]
    want = _cql_penalty(critics, obs, actions, data_actions)  # eager: checked and fused from here on
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
