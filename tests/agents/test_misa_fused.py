"""The agent on the fused path: with the Triton backend forced, one MISA update computes the same
losses, gradients and parameters as with the torch references, for every HMC mode. The tensors
live on ``kernel_device`` (tests/conftest.py): CUDA where there is one (compiled kernels, at the
precisions the config asks for), else the CPU under the Triton interpreter (fp32 dots)."""
import pytest
import torch

from misa_fast.agents import MISA
from misa_fast.agents.misa_config import preset
from misa_fast.ops import use_backend
from misa_fast.ops.testing import dot_tolerance

B, S, A, HIDDEN, K = 6, 5, 2, 16, 3


def tiny_agent(mode, device, sampled_q_precision, depth=2):
    # The HMC chain runs at fp32 ("ieee"): its accept decisions are compared exactly below.
    cfg = preset("locomotion").replace(obs_dim=S, act_dim=A, policy_hidden=(HIDDEN, HIDDEN),
                                       critic_hidden=(HIDDEN,) * depth, num_samples=K, batch_size=B, hmc_burn_in=1,
                                       hmc_mode=mode, hmc_step_size=0.2, hmc_precision="ieee",
                                       sampled_q_precision=sampled_q_precision, seed=3, device=device)
    return MISA(cfg)


def random_batch(seed, device):
    g = torch.Generator().manual_seed(seed)
    batch = {"observations": torch.randn(B, S, generator=g), "actions": torch.rand(B, A, generator=g) * 2 - 1,
             "rewards": torch.randn(B, generator=g), "next_observations": torch.randn(B, S, generator=g),
             "terminals": (torch.rand(B, generator=g) < 0.3).float()}
    return {key: value.to(device) for key, value in batch.items()}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of the fused kernels, so the test knows the Triton path really ran, and
    records the dot precision code each sampled-Q launch was given."""
    from misa_fast.kernels import hmc_kernels as hmc
    from misa_fast.kernels import sampled_q_kernels as sampled_q

    calls = {"hmc": 0, "sampled_q": 0, "sampled_q_precisions": set()}
    original_hmc, original_sampled_q = hmc.hmc_chains, sampled_q.sampled_q_fwd

    def counted_hmc(*args, **kwargs):
        calls["hmc"] += 1
        return original_hmc(*args, **kwargs)

    def counted_sampled_q(obs, actions, log_weights, spec, norm, precision, *args, **kwargs):
        calls["sampled_q"] += 1
        calls["sampled_q_precisions"].add(precision)
        return original_sampled_q(obs, actions, log_weights, spec, norm, precision, *args, **kwargs)

    monkeypatch.setattr(hmc, "hmc_chains", counted_hmc)
    monkeypatch.setattr(sampled_q, "sampled_q_fwd", counted_sampled_q)
    return calls


# Every mode at fp32 dots; the default tf32 once (on CUDA it really is tf32: the tolerances follow);
# critics of three hidden layers (the antmaze preset's depth) fused too.
CASES = [("faithful", "ieee", 2), ("adaptive", "ieee", 2), ("parallel", "ieee", 2), ("faithful", "tf32", 2),
         ("faithful", "ieee", 3)]


@pytest.mark.parametrize("mode, precision, depth", CASES, ids=[f"{m}-{p}-{d}" for m, p, d in CASES])
def test_fused_backend_update_matches_torch(mode, precision, depth, kernel_device, kernel_calls):
    from misa_fast.kernels.sampled_q_kernels import PRECISIONS

    batch = random_batch(seed=11, device=kernel_device)
    results = {}
    for backend in ("torch", "triton"):
        agent = tiny_agent(mode, kernel_device, precision, depth)
        noise = agent.draw_noise(B)
        with use_backend(backend):
            metrics = agent.update(batch, noise)
        expected = 1 if backend == "triton" else 0
        assert (kernel_calls["hmc"], kernel_calls["sampled_q"]) == (expected, expected * 2), kernel_calls  # per critic
        results[backend] = (metrics, agent)
    # The config's precision is what the kernel was given.
    assert kernel_calls["sampled_q_precisions"] == {PRECISIONS[precision]}

    (m_ref, ref), (m_fused, fused) = results["torch"], results["triton"]
    assert m_ref["hmc_accept_rate"] == m_fused["hmc_accept_rate"]
    # Losses: one forward through the critics (CRITIC_DOTS layers, reductions of HIDDEN terms).
    # Gradients: recomputed forward plus backward (twice the layers); a weight gradient reduces
    # over the B*K samples. Compared relative to each gradient's largest entry (or absolutely below
    # 1, as in tests/ops/test_sampled_q.py). The floors are the
    # tolerances of the interpreter (fp32 everywhere, only the summation order differs).
    loss_tol = dot_tolerance(precision, reduction=HIDDEN, depth=depth + 1, floor=1e-5)
    grad_tol = dot_tolerance(precision, reduction=B * K, depth=2 * (depth + 1), floor=1e-5)
    for key in ("critic_loss", "actor_loss", "lme_gap", "actor_unbiased_term"):
        torch.testing.assert_close(m_fused[key], m_ref[key], **loss_tol)
    fused_params = list(fused.critic.parameters()) + list(fused.policy.parameters())
    ref_params = list(ref.critic.parameters()) + list(ref.policy.parameters())
    for a, b in zip(fused_params, ref_params):
        scale = b.grad.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a.grad / scale, b.grad / scale, **grad_tol)
    if precision == "ieee":
        # Adam's first step moves a parameter by lr * g / (|g| + eps), about +-lr whatever g's
        # small relative error: the parameters then agree to float rounding. (Under tf32 a
        # gradient entry within its error of zero may flip sign: a 2 * lr difference, which says
        # nothing the gradient check above does not.)
        for a, b in zip(fused_params, ref_params):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
