"""TorchRL's ``CQLLoss`` with its log-sum-exp computed by the fused sampled-Q op.

:class:`FusedCQLLoss` takes ``CQLLoss``'s arguments and returns its loss keys; only the CQL penalty
(``loss_cql``) is computed differently: by :func:`misa_fast.ops.sampled_q_log_mean_exp` on the
weights TorchRL itself trains (``loss.qvalue_network_params``), read through the structure of
TorchRL's Q-value network. The proposals are drawn by ``CQLLoss``'s own calls in ``CQLLoss``'s
order, so under one seed both losses score the same actions.

The fused op runs when the Q-value network is a ``ValueOperator`` / ``TensorDictModule`` reading
``(observation, action)`` into a ``torchrl.modules.MLP`` made only of ``nn.Linear`` layers and one
activation module the op knows (ReLU, ELU, LeakyReLU, SiLU, Tanh, GELU), with no hooks and no
parametrizations, on a batch with one batch dimension. It is read at every call, so a setting
changed in place (a LeakyReLU's slope, a layer swapped) is never missed. Any other network is never
computed as some other network: under the ``"torchrl"`` convention TorchRL's own ``cql_loss`` runs,
under the others Q comes from TorchRL's own module forward (they take one batch dimension);
:attr:`FusedCQLLoss.fused_refusal` says why, and a warning says it once per reason.

Conventions (:class:`CQLConvention`): TorchRL's CQL penalty differs from the CQL paper's estimator
in which actions are pooled in a log-sum-exp, at which state the policy's samples at the next state
are scored, and how the temperature meets the importance weights. ``convention="torchrl"`` (the
default) reproduces ``CQLLoss``; ``"paper"`` is the paper's importance-sampled estimator;
``"reference_code"`` is what the CQL authors' released code (and CORL) computes.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from tensordict import TensorDictBase, unravel_key
from tensordict.nn import TensorDictModule
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.nn.utils import parametrize
from torchrl.modules import MLP, ValueOperator
from torchrl.objectives import CQLLoss

from misa_fast.nets import Activation, activation_spec
from misa_fast.ops import sampled_q_log_mean_exp

__all__ = ["CQLConvention", "CQL_CONVENTIONS", "FusedCQLLoss", "read_qvalue_network"]

Layer = Tuple[torch.Tensor, Optional[torch.Tensor]]


@dataclass(frozen=True)
class CQLConvention:
    """How CQL(H)'s log-sum-exp over sampled actions is estimated.

    Each state ``s`` of the batch gets ``N = num_random`` actions from each of three proposals:
    uniform on [-1, 1]^A, the policy at ``s``, and the policy at the next state ``s'``. Each sample's
    log-weight is minus its proposal's log-density.

    Attributes:
        next_actions_scored_at: ``"state"``: the policy's samples at ``s'`` are scored by Q(s, .),
            a third proposal for the integral over actions at ``s``; ``"next_state"``: they are
            scored by Q(s', .).
        pooling: ``"per_state"``: one log-sum-exp over all 3N samples of a state;
            ``"per_sample"``: for each n, one log-sum-exp over the three proposals' n-th samples,
            then the mean over n (taken together with the data term, as TorchRL writes it).
        log_density_over_temperature: ``True``: ``T * logsumexp((Q - log q) / T)``; ``False``:
            ``T * logsumexp(Q / T - log q)``, the importance-sampled estimate of
            ``T * log of the integral of exp(Q(s, a) / T) over a``.
        mean_over_samples: subtract ``T * log(number of samples pooled)``, the 1/(3N) of the
            estimator. A constant: the gradients stay, the penalty's value (which the Lagrange
            variant compares with its threshold) moves.
    """

    next_actions_scored_at: str
    pooling: str
    log_density_over_temperature: bool
    mean_over_samples: bool

    def __post_init__(self):
        if self.next_actions_scored_at not in ("state", "next_state"):
            raise ValueError(f"next_actions_scored_at must be 'state' or 'next_state', got "
                             f"{self.next_actions_scored_at!r}")
        if self.pooling not in ("per_state", "per_sample"):
            raise ValueError(f"pooling must be 'per_state' or 'per_sample', got {self.pooling!r}")


CQL_CONVENTIONS = {
    # torchrl.objectives.CQLLoss (0.14).
    "torchrl": CQLConvention(next_actions_scored_at="next_state", pooling="per_sample",
                             log_density_over_temperature=True, mean_over_samples=False),
    # The paper's importance-sampled log-sum-exp (its appendix on CQL(H)), with the temperature
    # applied to Q only.
    "paper": CQLConvention(next_actions_scored_at="state", pooling="per_state",
                           log_density_over_temperature=False, mean_over_samples=True),
    # The CQL authors' released code, which CORL follows.
    "reference_code": CQLConvention(next_actions_scored_at="state", pooling="per_state",
                                    log_density_over_temperature=True, mean_over_samples=False),
}


def _convention(convention: Union[str, CQLConvention]) -> CQLConvention:
    if isinstance(convention, CQLConvention):
        return convention
    try:
        return CQL_CONVENTIONS[convention]
    except (KeyError, TypeError):
        raise ValueError(f"convention must be one of {sorted(CQL_CONVENTIONS)} or a CQLConvention, "
                         f"got {convention!r}") from None


@dataclass(frozen=True)
class QValueNetworkReading:
    """What :func:`read_qvalue_network` found: the observation key the network reads before the
    action, the names of its Linear layers (first first) and the one activation between them."""

    observation_key: object
    linear_names: Tuple[str, ...]
    activation: Activation


class _Unreadable(Exception):
    """The Q-value network is not an MLP the fused op computes exactly as TorchRL does."""


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def read_qvalue_network(qvalue_network: nn.Module, action_key="action",
                        value_key="state_action_value") -> QValueNetworkReading:
    """Read a TorchRL Q-value network as an MLP on ``concat(observation, action)``.

    Raises ``ValueError`` naming what does not fit: anything whose output another computation
    could not reproduce from its Linear weights and activation (a forward of its own, a hook, a
    parametrization, a normalisation layer, several activations, ...).
    """
    try:
        return _read(qvalue_network, unravel_key(action_key), unravel_key(value_key))
    except _Unreadable as why:
        raise ValueError(str(why)) from None


def _read(qnet: nn.Module, action_key, value_key) -> QValueNetworkReading:
    # Exact types: a subclass may compute its own forward.
    if type(qnet) not in (ValueOperator, TensorDictModule):
        raise _Unreadable(f"the Q-value network is a {type(qnet).__name__}, not a ValueOperator/TensorDictModule")
    if qnet._kwargs is not None or qnet.method is not None or qnet.method_kwargs:
        raise _Unreadable("the Q-value network calls its module with keyword arguments or another method")
    in_keys = [unravel_key(k) for k in qnet.in_keys]
    if len(in_keys) != 2 or in_keys[1] != action_key:
        raise _Unreadable(f"the Q-value network reads {in_keys}, not (observation, {action_key!r})")
    if [unravel_key(k) for k in qnet.out_keys] != [value_key]:
        raise _Unreadable(f"the Q-value network writes {list(qnet.out_keys)}, not [{value_key!r}]")
    mlp = qnet.module
    if type(mlp) is not MLP:
        raise _Unreadable(f"the Q-value network's module is a {type(mlp).__name__}, not a torchrl.modules.MLP")
    if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
        raise _Unreadable("global module forward hooks are registered")
    for name, sub in qnet.named_modules():
        if _hooked(sub):
            raise _Unreadable(f"{name or 'the Q-value network'} has forward hooks")
        if parametrize.is_parametrized(sub):
            raise _Unreadable(f"{name} is parametrized")
    linear_names: List[str] = []
    activations: List[Activation] = []
    expect_linear = True
    for name, child in mlp.named_children():
        if type(child) is nn.Identity or (type(child) is nn.Dropout and (child.p == 0 or not child.training)):
            continue
        if type(child) is nn.Linear:
            if not expect_linear:
                raise _Unreadable(f"module.{name}: two Linear layers without an activation between them")
            linear_names.append(f"module.{name}")
            expect_linear = False
            continue
        spec = activation_spec(child)
        if spec is None:
            raise _Unreadable(f"module.{name} ({type(child).__name__}) is neither an exact nn.Linear nor an "
                              "activation the fused op computes")
        if expect_linear:
            raise _Unreadable(f"module.{name}: an activation that does not follow a Linear layer")
        activations.append(spec)
        expect_linear = True
    if expect_linear:
        raise _Unreadable("the MLP ends with an activation")
    if len(linear_names) < 2:
        raise _Unreadable("the MLP has no hidden layer")
    if len(set(activations)) != 1:
        raise _Unreadable(f"the MLP mixes activations ({', '.join(map(str, activations))})")
    last = mlp.get_submodule(linear_names[-1][len("module."):])
    if last.out_features != 1:
        raise _Unreadable(f"the last Linear layer has {last.out_features} outputs, not 1")
    return QValueNetworkReading(in_keys[0], tuple(linear_names), activations[0])


@dataclass
class _FusedCritic:
    observation_key: object
    layers: List[Layer]  # stacked over the loss's Q-value networks: weight (E, out, in), bias (E, out)
    activation: Activation


class FusedCQLLoss(CQLLoss):
    """``torchrl.objectives.CQLLoss`` whose CQL penalty's log-sum-exp runs in
    :func:`misa_fast.ops.sampled_q_log_mean_exp` (the Triton kernel on CUDA, its torch reference
    elsewhere).

    Args:
        actor_network, qvalue_network: as ``CQLLoss``.
        convention: ``"torchrl"`` (default: ``CQLLoss``'s own numbers), ``"paper"``,
            ``"reference_code"`` or a :class:`CQLConvention` (see ``CQL_CONVENTIONS``).
        precision: the op's ``precision`` (``None`` follows ``torch.get_float32_matmul_precision()``).
        backend: the op's ``backend`` (``"auto"``, ``"triton"``, ``"torch"``).
        **kwargs: every keyword of ``CQLLoss`` (``num_random``, ``temperature``, ``min_q_weight``,
            ``with_lagrange``, ...).

    Attributes:
        fused_refusal: why the last penalty was not computed by the fused op (None when it was).
    """

    def __init__(self, actor_network, qvalue_network, *, convention: Union[str, CQLConvention] = "torchrl",
                 precision: Optional[str] = None, backend: Optional[str] = None, **kwargs):
        super().__init__(actor_network, qvalue_network, **kwargs)
        self.convention = _convention(convention)
        self.precision = precision
        self.backend = backend
        self.fused_refusal: Optional[str] = None
        self._warned_refusals = set()

    # ------------------------------------------------------------------------------------------
    def _fused_critic(self, tensordict: TensorDictBase) -> _FusedCritic:
        """The loss's Q-value networks as stacked layers for the op; raises :class:`_Unreadable`.
        Read at every call: reading is a walk over a few modules, and a cached reading could miss
        a setting changed in place."""
        reading = _read(self.qvalue_network, unravel_key(self.tensor_keys.action),
                        unravel_key(self.tensor_keys.state_action_value))
        if tensordict.batch_dims != 1:
            raise _Unreadable(f"the batch has {tensordict.batch_dims} batch dimensions (the fused path takes one)")
        if reading.observation_key not in [unravel_key(k) for k in self.actor_network.in_keys]:
            raise _Unreadable(f"the actor does not read {reading.observation_key!r}")
        layers: List[Layer] = []
        for name in reading.linear_names:
            prefix = tuple(name.split("."))
            weight = self.qvalue_network_params.get((*prefix, "weight"), None)
            bias = self.qvalue_network_params.get((*prefix, "bias"), None)
            if weight is None:
                raise _Unreadable(f"no stacked weight for {name} among the loss's Q-value parameters")
            layers.append((weight, bias))
        obs = tensordict.get(reading.observation_key)
        action = tensordict.get(self.tensor_keys.action)
        if obs.dim() != 2 or not obs.is_floating_point():
            raise _Unreadable(f"the observation is not a (batch, features) float tensor: {tuple(obs.shape)}")
        if layers[0][0].shape[-1] != obs.shape[-1] + action.shape[-1]:
            raise _Unreadable("the first layer's input width is not observation + action")
        return _FusedCritic(reading.observation_key, layers, reading.activation)

    def _refuse(self, why: str) -> None:
        self.fused_refusal = why
        if why not in self._warned_refusals:
            self._warned_refusals.add(why)
            fallback = ("TorchRL's own cql_loss runs" if self.convention == CQL_CONVENTIONS["torchrl"]
                        else "Q comes from TorchRL's own module forward")
            warnings.warn(f"FusedCQLLoss: the fused op does not run ({why}); {fallback}", stacklevel=3)

    # ------------------------------------------------------------------------------------------
    def cql_loss(self, tensordict: TensorDictBase):
        try:
            critic: Optional[_FusedCritic] = self._fused_critic(tensordict)
            self.fused_refusal = None
        except _Unreadable as why:
            self._refuse(str(why))
            if self.convention == CQL_CONVENTIONS["torchrl"]:
                return super().cql_loss(tensordict)
            if tensordict.batch_dims != 1:
                raise ValueError("FusedCQLLoss: conventions other than 'torchrl' take a batch with one batch "
                                 "dimension") from None
            critic = None

        pred_q = [tensordict.get(self.tensor_keys.pred_q1, None), tensordict.get(self.tensor_keys.pred_q2, None)]
        if any(p is None for p in pred_q):
            raise KeyError("no pred_q1/pred_q2 in the tensordict: call q_loss before cql_loss")
        B, N = tensordict.shape[0], self.num_random
        A = tensordict.get(self.tensor_keys.action).shape[-1]
        # The same draws as CQLLoss.cql_loss, in its order: uniform actions, the policy at s, the
        # policy at s' (each state's N samples adjacent, row b * N + n).
        random_actions = pred_q[0].new_empty((B * N, A)).uniform_(-1, 1)
        curr_td, curr_log_pis = self._get_policy_actions(tensordict.copy(), self.actor_network_params,
                                                         num_actions=N)
        next_td, next_log_pis = self._get_policy_actions(tensordict.get("next").copy(), self.actor_network_params,
                                                         num_actions=N)
        samples = [(random_actions, random_actions.new_full((B * N,), A * math.log(2.0)), "state"),
                   (curr_td.get(self.tensor_keys.action), -curr_log_pis.detach().reshape(B * N), "state"),
                   (next_td.get(self.tensor_keys.action), -next_log_pis.detach().reshape(B * N),
                    self.convention.next_actions_scored_at)]
        log_partition = self._log_partition(tensordict, critic, samples, B, N)  # (2, rows)

        w = self.min_q_weight
        if self.convention.pooling == "per_sample":
            # TorchRL's shapes: the (B * N,) penalties minus the (B, 1) data term broadcast to
            # (B, B * N), averaged over the last dim (what CQLLoss returns, with reduction "none" too).
            cql_q = [log_partition[c] * w - pred_q[c] * w for c in range(2)]
            cql_q_loss = (cql_q[0] + cql_q[1]).mean(-1)
        else:
            cql_q = [log_partition[c] * w - pred_q[c].squeeze(-1) * w for c in range(2)]
            cql_q_loss = cql_q[0] + cql_q[1]
        # alpha_prime_loss (with_lagrange) reads these.
        tensordict.set(self.tensor_keys.cql_q1_loss, cql_q[0])
        tensordict.set(self.tensor_keys.cql_q2_loss, cql_q[1])
        cql_q_loss = self._reduce_loss(cql_q_loss, tensordict=tensordict)
        self._clear_weakrefs(tensordict, "actor_network_params", "qvalue_network_params",
                             "target_actor_network_params", "target_qvalue_network_params")
        return cql_q_loss, {}

    def _log_partition(self, tensordict, critic, samples, B: int, N: int) -> torch.Tensor:
        """T * logsumexp over the pooled samples of Q / T + log-weight, per Q-value network and row
        (rows: states for "per_state" pooling, (state, n) pairs for "per_sample")."""
        conv, T = self.convention, float(self.temperature)
        weight_scale = 1.0 / T if conv.log_density_over_temperature else 1.0
        per_sample = conv.pooling == "per_sample"
        parts, pooled = [], 0
        for where, states in (("state", tensordict), ("next_state", tensordict.get("next"))):
            group = [(a, lw * weight_scale) for a, lw, at in samples if at == where]
            if not group:
                continue
            if per_sample:  # (B * N, k, A): the proposals' n-th samples of one state side by side
                actions = torch.stack([a for a, _ in group], dim=1)
                log_w = torch.stack([lw for _, lw in group], dim=1)
            else:  # (B, k * N, A): all samples of one state
                actions = torch.cat([a.reshape(B, N, -1) for a, _ in group], dim=1)
                log_w = torch.cat([lw.reshape(B, N) for _, lw in group], dim=1)
            pooled += actions.shape[1]
            parts.append(self._q_log_sum_exp(states, critic, actions, log_w, N if per_sample else 1))
        # The two states' sums meet in log space: T * log(exp(l_s / T) + exp(l_s' / T)).
        out = parts[0] if len(parts) == 1 else T * torch.logaddexp(parts[0] / T, parts[1] / T)
        return out - T * math.log(pooled) if conv.mean_over_samples else out

    def _q_log_sum_exp(self, states: TensorDictBase, critic: Optional[_FusedCritic], actions: torch.Tensor,
                       log_w: torch.Tensor, rows_per_state: int) -> torch.Tensor:
        T = float(self.temperature)
        if critic is not None:
            obs = states.get(critic.observation_key)
            if rows_per_state > 1:
                obs = obs.repeat_interleave(rows_per_state, dim=0)
            return sampled_q_log_mean_exp(obs, actions, critic.layers, log_weights=log_w, normalizer="none",
                                          temperature=T, activation=critic.activation, precision=self.precision,
                                          backend=self.backend)
        q = self._module_q(states, actions, rows_per_state)
        return T * torch.logsumexp(q / T + log_w, dim=-1)

    def _module_q(self, states: TensorDictBase, actions: torch.Tensor, rows_per_state: int) -> torch.Tensor:
        """Q (n_nets, rows, K) from TorchRL's own module forward, for networks the op cannot read."""
        action_key = unravel_key(self.tensor_keys.action)
        keys = [k for k in self.qvalue_network.in_keys if unravel_key(k) != action_key]
        R, K, A = actions.shape
        repeats = rows_per_state * K  # each state once per (row, sample)
        q_td = states.select(*keys).apply(lambda x: x.repeat_interleave(repeats, dim=0), batch_size=[R * K])
        q_td.set(action_key, actions.reshape(R * K, A))
        q = self._vmap_qvalue_networkN0(q_td, self.qvalue_network_params).get(self.tensor_keys.state_action_value)
        return q.reshape(q.shape[0], R, K)
