"""Fixtures of the training tests."""
import pytest


@pytest.fixture
def non_finite_at_update(monkeypatch):
    """``non_finite_at_update(n)``: every agent ``train`` builds from then on raises
    NonFiniteLossError("critic_loss") at its n-th update, as a diverging loss would."""
    from misa_fast.agents import NonFiniteLossError
    from misa_fast.agents import algorithms as algos

    real_make_agent = algos.make_agent

    def at(n: int) -> None:
        def make_failing_agent(cfg):
            agent = real_make_agent(cfg)
            update, calls = agent.update, {"n": 0}

            def failing_update(batch):
                calls["n"] += 1
                if calls["n"] == n:
                    raise NonFiniteLossError("critic_loss", n)
                return update(batch)

            agent.update = failing_update
            return agent

        monkeypatch.setattr(algos, "make_agent", make_failing_agent)

    return at
