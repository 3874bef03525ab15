"""The sampled-Q kernels with member-stacked weights (several seeds in one launch, a grid axis for
the member): the stacked launch equals one launch per member bitwise, forward and gradients.

Interpreter sizes: M = 2 members, E = 2 critics, B = 3 states, K = 4 samples.
"""
import math

import pytest
import torch

from misa_fast.ops.testing import kernel_device

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
              pytest.mark.skipif(kernel_device() is None, reason="needs CUDA or TRITON_INTERPRET=1")]
DEV = kernel_device() or "cpu"
M, E, B, K, S, A = 2, 2, 3, 4, 3, 2


def stacked_problem(hidden, bias, log_weights, seed=0):
    g = torch.Generator().manual_seed(seed)
    dims = [S + A, *hidden, 1]
    layers = [((torch.randn(M, E, o, i, generator=g) / math.sqrt(i)).to(DEV),
               (0.1 * torch.randn(M, E, o, generator=g)).to(DEV) if bias else None)
              for i, o in zip(dims[:-1], dims[1:])]
    obs = torch.randn(M, B, S, generator=g).to(DEV)
    actions = (torch.rand(M, B, K, A, generator=g) * 2 - 1).to(DEV)
    logw = torch.randn(M, B, K, generator=g).to(DEV) if log_weights else None
    g_out = torch.randn(M, E, B, generator=g).to(DEV)
    return layers, obs, actions, logw, g_out


def member_layers(layers, m, c):
    """Critic c's layers: of member m, or of every member (m None)."""
    pick = (lambda t: t[:, c]) if m is None else (lambda t: t[m, c])
    return [(pick(w), None if b is None else pick(b)) for w, b in layers]


@pytest.mark.parametrize("hidden,bias,log_weights", [((8, 8), True, True), ((8,), False, False),
                                                     ((8, 16, 8), True, False)])
def test_stacked_launch_equals_one_launch_per_member(hidden, bias, log_weights):
    from misa_fast.kernels import sampled_q_kernels as k

    layers, obs, actions, logw, g_out = stacked_problem(hidden, bias, log_weights)
    options = dict(activation=(k.ACTIVATIONS["elu"], 1.0), temperature=0.7)
    precision = k.PRECISIONS["ieee"]

    def forward(m):
        lead = (M,) if m is None else ()
        q = torch.empty(*lead, E, B, K, device=DEV)
        lse, out = torch.empty(*lead, E, B, device=DEV), torch.empty(*lead, E, B, device=DEV)
        pick = (lambda t: t) if m is None else (lambda t: None if t is None else t[m])
        for c in range(E):
            critic = (lambda t: t[:, c]) if m is None else (lambda t: t[c])
            k.sampled_q_fwd(pick(obs), pick(actions), pick(logw), k.critic_spec(member_layers(layers, m, c)), 0.3,
                            precision, critic(q), critic(lse), critic(out), **options)
        return q, lse, out

    def backward(m, q, lse):
        pick = (lambda t: t) if m is None else (lambda t: None if t is None else t[m])
        dobs, dact = torch.empty_like(pick(obs)), torch.empty_like(pick(actions))
        specs = [k.critic_spec(member_layers(layers, m, c)) for c in range(E)]
        grads = k.sampled_q_bwd(pick(obs), pick(actions), pick(logw), specs, q, lse, pick(g_out), precision,
                                dobs=dobs, dact=dact, **options)
        return [dobs, dact, *grads]

    q, lse, out = forward(None)
    stacked_grads = backward(None, q, lse)
    for m in range(M):
        q_m, lse_m, out_m = forward(m)
        for got, want in ((q[m], q_m), (lse[m], lse_m), (out[m], out_m)):
            assert torch.equal(got, want)
        for got, want in zip(stacked_grads, backward(m, q_m, lse_m)):
            assert torch.equal(got[m], want)


def test_one_member_launch_is_the_single_run_launch():
    """A member dimension of 1 launches with member strides 0: the single run's configuration."""
    from misa_fast.kernels import sampled_q_kernels as k

    layers, obs, actions, logw, _ = stacked_problem((8, 8), True, True)
    spec = k.critic_spec([(w[:1, 0], b[:1, 0]) for w, b in layers])
    _, _, _, member_strides = k._layer_args(spec)
    assert set(member_strides) == {0}
    assert k._member_stride(obs[:1], 2) == 0 and k._member_stride(obs, 2) == obs.stride(0)


def test_misa_group_on_the_fused_path_launches_every_member_at_once(monkeypatch):
    """Two MISA seeds trained together (misa-fast train --seeds) with the Triton backend: the
    log-partition runs the kernel for both members in each launch (not the torch reference), and
    each member's first update is its single run's (to fp32 rounding, as the torch path)."""
    from misa_fast.agents import MISA, members
    from misa_fast.agents.misa_config import preset
    from misa_fast.kernels import sampled_q_kernels as k
    from misa_fast.ops import use_backend

    batch, obs_dim, act_dim, hidden = 4, 3, 2, 8
    cfg = preset("locomotion").replace(obs_dim=obs_dim, act_dim=act_dim, policy_hidden=(hidden, hidden),
                                       critic_hidden=(hidden, hidden), num_samples=2, batch_size=batch,
                                       hmc_burn_in=1, hmc_step_size=0.2, hmc_precision="ieee",
                                       sampled_q_precision="ieee", device=DEV)
    seeds = (3, 4)
    singles = [MISA(cfg.replace(seed=s)) for s in seeds]
    stacked = members.stack_agents([MISA(cfg.replace(seed=s)) for s in seeds])
    g = torch.Generator().manual_seed(0)
    batches = [{"observations": torch.randn(batch, obs_dim, generator=g).to(DEV),
                "actions": (torch.rand(batch, act_dim, generator=g) * 2 - 1).to(DEV),
                "rewards": torch.randn(batch, generator=g).to(DEV),
                "next_observations": torch.randn(batch, obs_dim, generator=g).to(DEV),
                "terminals": torch.zeros(batch, device=DEV)} for _ in seeds]
    launches = []
    real = k.sampled_q_fwd
    monkeypatch.setattr(k, "sampled_q_fwd", lambda *a, **kw: launches.append(tuple(a[0].shape)) or real(*a, **kw))
    with use_backend("triton"):
        group_metrics = stacked.update(members.stack_tree(batches))
        assert launches and all(shape == (len(seeds), batch, obs_dim) for shape in launches), launches
        single_metrics = [agent.update(b) for agent, b in zip(singles, batches)]
    for m, metrics in enumerate(single_metrics):
        for name, value in metrics.items():
            torch.testing.assert_close(group_metrics[name][m], value, rtol=1e-5, atol=1e-6, equal_nan=True,
                                       msg=name)
