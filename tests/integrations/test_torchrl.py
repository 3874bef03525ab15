"""FusedCQLLoss against TorchRL's own CQLLoss (convention "torchrl") and against plain-torch
formulas of each convention; the Q-value networks it reads, and those it leaves to TorchRL."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchrl")
tensordict = pytest.importorskip("tensordict")

from tensordict import TensorDict  # noqa: E402
from tensordict.nn import NormalParamExtractor, TensorDictModule  # noqa: E402
from torchrl.data import Bounded  # noqa: E402
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator  # noqa: E402
from torchrl.objectives import CQLLoss  # noqa: E402

from misa_fast.integrations import torchrl as fused_torchrl  # noqa: E402
from misa_fast.integrations.torchrl import (  # noqa: E402
    CQL_CONVENTIONS,
    CQLConvention,
    FusedCQLLoss,
    read_qvalue_network,
)
from misa_fast.nets import activation_spec, apply_activation  # noqa: E402

# The losses' target networks are never updated here.
pytestmark = pytest.mark.filterwarnings("ignore:No target network updater")

OBS, ACT, BATCH, NUM_RANDOM = 5, 3, 6, 4


def make_networks(activation_class=nn.Tanh, activation_kwargs=None, seed=0, **mlp_kwargs):
    torch.manual_seed(seed)
    spec = Bounded(-torch.ones(ACT), torch.ones(ACT), (ACT,))
    actor_net = nn.Sequential(MLP(in_features=OBS, out_features=2 * ACT, num_cells=[16, 16]), NormalParamExtractor())
    actor = ProbabilisticActor(TensorDictModule(actor_net, in_keys=["observation"], out_keys=["loc", "scale"]),
                               in_keys=["loc", "scale"], spec=spec, distribution_class=TanhNormal)
    qvalue = ValueOperator(MLP(in_features=OBS + ACT, out_features=1, num_cells=[32, 32],
                               activation_class=activation_class, activation_kwargs=activation_kwargs, **mlp_kwargs),
                           in_keys=["observation", "action"])
    return actor, qvalue


def make_loss(loss_class, networks_seed=0, networks=None, **kwargs):
    actor, qvalue = networks if networks is not None else make_networks(seed=networks_seed)
    kwargs.setdefault("num_random", NUM_RANDOM)
    kwargs.setdefault("temperature", 2.0)
    return loss_class(actor, qvalue, **kwargs)


def make_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return TensorDict({
        "observation": torch.randn(BATCH, OBS, generator=g),
        "action": torch.rand(BATCH, ACT, generator=g) * 2 - 1,
        "next": {"observation": torch.randn(BATCH, OBS, generator=g),
                 "reward": torch.randn(BATCH, 1, generator=g),
                 "done": torch.zeros(BATCH, 1, dtype=torch.bool),
                 "terminated": torch.zeros(BATCH, 1, dtype=torch.bool)},
    }, [BATCH])


def losses_and_critic_grads(loss, batch, seed=2):
    torch.manual_seed(seed)
    out = loss(batch.clone())
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    grads = {k: p.grad.clone() for k, p in loss.qvalue_network_params.items(True, True)}
    return out, grads


def assert_same_losses(expected, actual):
    (out_e, grads_e), (out_a, grads_a) = expected, actual
    assert sorted(out_e.keys()) == sorted(out_a.keys())
    for key in out_e.keys():
        torch.testing.assert_close(out_a[key], out_e[key], rtol=1e-5, atol=1e-5, msg=f"{key}")
    for key in grads_e:
        torch.testing.assert_close(grads_a[key], grads_e[key], rtol=1e-5, atol=1e-6, msg=f"grad {key}")


# --------------------------------------------------------------------------------------------------
# convention "torchrl": CQLLoss's own numbers
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation_class, activation_kwargs, mlp_kwargs, cql_kwargs", [
    (nn.Tanh, None, {}, {}),
    (nn.ReLU, None, {}, {"with_lagrange": True, "lagrange_thresh": 0.5}),
    (nn.LeakyReLU, {"negative_slope": 0.3}, {}, {"min_q_weight": 5.0, "temperature": 0.7}),
    (nn.ELU, None, {}, {"reduction": "sum", "max_q_backup": True}),
    (nn.SiLU, None, {"bias_last_layer": False}, {}),
])
def test_torchrl_convention_equals_cqlloss(activation_class, activation_kwargs, mlp_kwargs, cql_kwargs):
    batch = make_batch()
    expected = losses_and_critic_grads(
        make_loss(CQLLoss, networks=make_networks(activation_class, activation_kwargs, **mlp_kwargs), **cql_kwargs),
        batch)
    fused = make_loss(FusedCQLLoss, networks=make_networks(activation_class, activation_kwargs, **mlp_kwargs),
                      **cql_kwargs)
    actual = losses_and_critic_grads(fused, batch)
    assert fused.fused_refusal is None
    assert_same_losses(expected, actual)


def test_the_fused_op_computes_the_penalty(monkeypatch):
    calls = []
    real_op = fused_torchrl.sampled_q_log_mean_exp

    def counting_op(obs, actions, critics, **kwargs):
        calls.append((tuple(obs.shape), tuple(actions.shape), kwargs["temperature"]))
        return real_op(obs, actions, critics, **kwargs)

    monkeypatch.setattr(fused_torchrl, "sampled_q_log_mean_exp", counting_op)
    losses_and_critic_grads(make_loss(FusedCQLLoss), make_batch())
    rows = BATCH * NUM_RANDOM
    # uniform and policy-at-s samples at s, policy-at-s' samples at s'
    assert calls == [((rows, OBS), (rows, 2, ACT), 2.0), ((rows, OBS), (rows, 1, ACT), 2.0)]


def test_reduction_none_keeps_cqlloss_shapes():
    batch = make_batch()
    expected = make_loss(CQLLoss, reduction="none", scalar_output_mode="exclude")
    fused = make_loss(FusedCQLLoss, reduction="none", scalar_output_mode="exclude")
    outs = []
    for loss in (expected, fused):
        torch.manual_seed(3)
        outs.append(loss(batch.clone()))
    assert outs[1]["loss_cql"].shape == outs[0]["loss_cql"].shape == (BATCH,)
    torch.testing.assert_close(outs[1]["loss_cql"], outs[0]["loss_cql"], rtol=1e-5, atol=1e-5)


def test_a_setting_changed_in_place_is_read():
    batch = make_batch()
    expected, fused = (make_loss(cls, networks=make_networks(nn.LeakyReLU, {"negative_slope": 0.1}))
                       for cls in (CQLLoss, FusedCQLLoss))
    for loss in (expected, fused):
        losses_and_critic_grads(loss, batch)  # one step with the old slope
        for module in loss.qvalue_network.modules():
            if isinstance(module, nn.LeakyReLU):
                module.negative_slope = 0.6
        loss.zero_grad()
    assert_same_losses(losses_and_critic_grads(expected, batch), losses_and_critic_grads(fused, batch))


@pytest.mark.slow
def test_triton_kernel_equals_cqlloss(kernel_device):
    if kernel_device != "cpu":
        pytest.skip("the CPU comparison runs the kernel in the interpreter; on CUDA the suite's own kernel tests "
                    "cover it")
    batch = make_batch()
    expected = losses_and_critic_grads(make_loss(CQLLoss), batch)
    actual = losses_and_critic_grads(make_loss(FusedCQLLoss, backend="triton", precision="ieee"), batch)
    assert_same_losses(expected, actual)


# --------------------------------------------------------------------------------------------------
# every convention against plain torch
# --------------------------------------------------------------------------------------------------
def plain_q(layers, activation, obs, actions):
    """Q (n_nets, ...) of the stacked layers on concat(obs, actions), written out."""
    h = torch.cat([obs, actions], dim=-1)
    out = []
    for c in range(layers[0][0].shape[0]):
        x = h
        for i, (w, b) in enumerate(layers):
            x = F.linear(x, w[c], b[c])
            if i < len(layers) - 1:
                x = apply_activation(x, activation)
        out.append(x.squeeze(-1))
    return torch.stack(out)


def plain_penalty(loss, batch, convention, seed):
    """loss_cql by the formulas of the convention, on the samples CQLLoss draws (same calls, same
    order, same seed)."""
    conv = CQL_CONVENTIONS[convention] if isinstance(convention, str) else convention
    params = loss.qvalue_network_params
    layers = [(params["module", i, "weight"], params["module", i, "bias"]) for i in ("0", "2", "4")]
    activation = activation_spec(loss.qvalue_network.module[1])
    T, N, w = loss.temperature, loss.num_random, loss.min_q_weight
    obs, next_obs, data_actions = batch["observation"], batch["next", "observation"], batch["action"]
    torch.manual_seed(seed)
    random_actions = torch.empty(BATCH * N, ACT).uniform_(-1, 1)
    curr_td, curr_logp = loss._get_policy_actions(batch.copy(), loss.actor_network_params, num_actions=N)
    next_td, next_logp = loss._get_policy_actions(batch["next"].copy(), loss.actor_network_params, num_actions=N)
    obs_rows, next_obs_rows = obs.repeat_interleave(N, 0), next_obs.repeat_interleave(N, 0)
    next_scored_at = obs_rows if conv.next_actions_scored_at == "state" else next_obs_rows
    q = [plain_q(layers, activation, obs_rows, random_actions),
         plain_q(layers, activation, obs_rows, curr_td["action"]),
         plain_q(layers, activation, next_scored_at, next_td["action"])]  # each (2, B * N)
    log_density = [torch.full((BATCH * N,), -ACT * math.log(2.0)), curr_logp.detach(), next_logp.detach()]
    scale = 1.0 / T if conv.log_density_over_temperature else 1.0
    logits = [qi / T - ld * scale for qi, ld in zip(q, log_density)]
    if conv.pooling == "per_sample":
        terms = torch.stack(logits, dim=-1)  # (2, B * N, 3)
    else:
        terms = torch.cat([x.reshape(2, BATCH, N) for x in logits], dim=-1)  # (2, B, 3N)
    lse = T * torch.logsumexp(terms, dim=-1)
    if conv.mean_over_samples:
        lse = lse - T * math.log(terms.shape[-1])
    data_q = plain_q(layers, activation, obs, data_actions)  # (2, B)
    return w * (lse.mean(-1) - data_q.mean(-1)).sum()


@pytest.mark.parametrize("convention", [
    "torchrl", "paper", "reference_code",
    CQLConvention(next_actions_scored_at="next_state", pooling="per_state", log_density_over_temperature=False,
                  mean_over_samples=False),
])
def test_conventions_against_plain_torch(convention):
    batch = make_batch()
    loss = make_loss(FusedCQLLoss, convention=convention, temperature=0.5, min_q_weight=3.0)
    torch.manual_seed(4)
    loss.q_loss(batch)  # writes the data term's Q values
    torch.manual_seed(5)
    fused, _ = loss.cql_loss(batch)
    assert loss.fused_refusal is None
    fused_grads = torch.autograd.grad(fused, list(loss.qvalue_network_params.values(True, True)))
    expected = plain_penalty(loss, batch, convention, seed=5)
    expected_grads = torch.autograd.grad(expected, list(loss.qvalue_network_params.values(True, True)))
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_conventions_differ():
    batch = make_batch()
    values = {}
    for name in CQL_CONVENTIONS:
        loss = make_loss(FusedCQLLoss, convention=name, temperature=0.5)
        torch.manual_seed(4)
        loss.q_loss(batch)
        torch.manual_seed(5)
        values[name] = loss.cql_loss(batch)[0].item()
    assert len({round(v, 4) for v in values.values()}) == len(values), values


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="convention"):
        make_loss(FusedCQLLoss, convention="cql")
    with pytest.raises(ValueError, match="pooling"):
        CQLConvention(next_actions_scored_at="state", pooling="mean", log_density_over_temperature=True,
                      mean_over_samples=False)


# --------------------------------------------------------------------------------------------------
# networks the op cannot read: TorchRL's own computation, never another network
# --------------------------------------------------------------------------------------------------
def test_a_hooked_network_falls_back_to_cqlloss():
    batch = make_batch()
    scale_output = lambda module, args, output: output * 1.5  # noqa: E731
    losses = []
    for loss_class in (CQLLoss, FusedCQLLoss):
        actor, qvalue = make_networks()
        qvalue.module[2].register_forward_hook(scale_output)
        losses.append(make_loss(loss_class, networks=(actor, qvalue)))
    expected, fused = losses_and_critic_grads(losses[0], batch), losses[1]
    with pytest.warns(UserWarning, match="forward hooks"):
        actual = losses_and_critic_grads(fused, batch)
    assert "forward hooks" in fused.fused_refusal
    assert_same_losses(expected, actual)


def test_other_conventions_use_torchrls_forward_for_unreadable_networks():
    """Under "paper", a network the op cannot read is evaluated by its module forward: a hook that
    changes nothing leaves the numbers of the fused path."""
    batch = make_batch()
    values = []
    for hooked in (False, True):
        actor, qvalue = make_networks()
        if hooked:
            qvalue.module[0].register_forward_hook(lambda module, args, output: None)
        loss = make_loss(FusedCQLLoss, networks=(actor, qvalue), convention="paper")
        torch.manual_seed(4)
        loss.q_loss(batch)
        torch.manual_seed(5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            penalty, _ = loss.cql_loss(batch)
        assert (loss.fused_refusal is not None) == hooked
        grads = torch.autograd.grad(penalty, list(loss.qvalue_network_params.values(True, True)))
        values.append((penalty, grads))
    torch.testing.assert_close(values[1][0], values[0][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(values[1][1], values[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class LoRALinear(nn.Linear):
    """A Linear with its own forward (an adapter): its weight alone is not what it computes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.delta = nn.Parameter(torch.zeros(self.out_features))

    def forward(self, x):
        return super().forward(x) + self.delta


class TwoInputCritic(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(OBS + ACT, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, obs, action):
        return self.net(torch.cat([obs, action], -1))


def test_read_qvalue_network():
    reading = read_qvalue_network(make_networks(nn.ReLU)[1])
    assert reading.observation_key == "observation"
    assert reading.linear_names == ("module.0", "module.2", "module.4")
    assert reading.activation == activation_spec(nn.ReLU())

    refused = {
        "TwoInputCritic, not a torchrl.modules.MLP": ValueOperator(TwoInputCritic(), in_keys=["observation", "action"]),
        "LayerNorm": make_networks(norm_class=nn.LayerNorm, norm_kwargs={"normalized_shape": 32})[1],
        "LoRALinear": make_networks(layer_class=LoRALinear)[1],
        "ends with an activation": make_networks(activate_last_layer=True)[1],
        "not \\(observation": ValueOperator(MLP(in_features=OBS + ACT, out_features=1, num_cells=[8]),
                                           in_keys=["action", "observation"]),
    }
    parametrized = make_networks()[1]
    torch.nn.utils.parametrizations.weight_norm(parametrized.module[0])
    refused["parametrized"] = parametrized
    for why, qvalue in refused.items():
        with pytest.raises(ValueError, match=why):
            read_qvalue_network(qvalue)
