"""The agent on the fused path: with the Triton backend forced (the interpreter on CPU), one MISA
update computes the same losses, gradients and parameters as with the torch references, for every
HMC mode. On CUDA the same code runs the real kernels (the dispatch picks them automatically)."""
import pytest
import torch

from misa_fast.agents import MISA
from misa_fast.config import preset
from misa_fast.ops import use_backend

B, S, A = 6, 5, 2


def tiny_agent(mode):
    cfg = preset("locomotion").replace(obs_dim=S, act_dim=A, policy_hidden=(16, 16), critic_hidden=(16, 16),
                                       num_samples=3, batch_size=B, hmc_burn_in=1, hmc_mode=mode,
                                       hmc_step_size=0.2, hmc_precision="ieee", seed=3)
    return MISA(cfg)


def random_batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"observations": torch.randn(B, S, generator=g), "actions": torch.rand(B, A, generator=g) * 2 - 1,
            "rewards": torch.randn(B, generator=g), "next_observations": torch.randn(B, S, generator=g),
            "terminals": (torch.rand(B, generator=g) < 0.3).float()}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of the fused kernels, so the test knows the Triton path really ran."""
    from misa_fast.kernels import hmc, sampled_q

    calls = {"hmc": 0, "sampled_q": 0}
    for module, fn, key in ((hmc, "hmc_chains", "hmc"), (sampled_q, "sampled_q_fwd", "sampled_q")):
        original = getattr(module, fn)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, fn, counted)
    return calls


@pytest.mark.parametrize("mode", ["faithful", "adaptive", "parallel"])
def test_fused_backend_update_matches_torch(mode, kernel_calls):
    batch = random_batch(seed=11)
    results = {}
    for backend in ("torch", "triton"):
        agent = tiny_agent(mode)
        noise = agent.draw_noise(B)
        with use_backend(backend):
            metrics = agent.update(batch, noise)
        expected = 1 if backend == "triton" else 0
        assert kernel_calls == {"hmc": expected, "sampled_q": expected * 2}, kernel_calls  # one launch per critic
        results[backend] = (metrics, [p.detach().clone() for p in agent.critic.parameters()],
                            [p.detach().clone() for p in agent.policy.parameters()])
    (m_ref, critic_ref, policy_ref), (m_fused, critic_fused, policy_fused) = results["torch"], results["triton"]
    assert m_ref["hmc_accept_rate"] == m_fused["hmc_accept_rate"]
    for key in ("critic_loss", "actor_loss", "lme_gap", "actor_unbiased_term"):
        torch.testing.assert_close(m_fused[key], m_ref[key], rtol=1e-5, atol=1e-5)
    for a, b in zip(critic_fused + policy_fused, critic_ref + policy_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
