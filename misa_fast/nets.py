"""Networks of the MISA learner: the tanh-Gaussian policy and the ensemble of critics.

Initialisation follows the official flax code: hidden layers use flax's default ``lecun_normal``
(truncated normal, variance 1/fan_in) with zero bias, and the output layer of *both* networks uses
``variance_scaling(1e-2, "fan_in", "uniform")`` with zero bias. So a fresh policy has mean ~0 and
log-std ~ c = -1, and fresh critics output ~0.

The critics of an ensemble are stored stacked, ``weight[l]`` of shape (E, out, in) in nn.Linear
layout, so one batched matmul serves all of them (half the kernel launches of two Linear stacks).
The functional forward ``ensemble_q`` takes the layer list as plain tensors, which is what the HMC
sampler, the fused ops and the actor (with detached weights) use.

An ensemble may normalise its hidden layers (``layer_norm=True``, ReBRAC's critics: LayerNorm after
each hidden activation). Its layers then carry their norms (:class:`StackedLayers`); only
``ensemble_q`` and the critic's own forward compute them, and every reader that models a plain MLP
(the explicit backward of the HMC sampler, the fused ops) refuses such layers or falls back to the
module's forward, so none ever computes another network than the one given.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MEAN_MIN, MEAN_MAX = -9.0, 9.0
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
_LOG2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
# Largest float32 below 1: clamping to it only moves actions of exactly +-1 inside the open interval.
ATANH_LIMIT = 1.0 - 2.0**-24

Layers = List[Tuple[Tensor, Tensor]]  # [(weight (E, out, in), bias (E, out)), ...]
# Hidden activations of the critics; both backward passes use only their result, so in place is safe.
_ACTIVATIONS = {"elu": F.elu, "relu": F.relu}
# LayerNorm epsilon of the normalised networks: flax's default, as in the ReBRAC reference code
# (torch's nn.LayerNorm default is 1e-5).
LAYER_NORM_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# Critic activations as data: what the functional forwards, the HMC sampler and the fused ops apply
# between Linear layers. An activation is a name plus its one parameter (ELU's alpha, LeakyReLU's
# negative slope); :func:`activation_spec` reads it from a string, an activation module or a
# torch.nn.functional function, and returns None for anything it does not know exactly.
class Activation(NamedTuple):
    name: str  # one of ACTIVATION_NAMES
    param: float = 0.0  # ELU alpha / LeakyReLU negative slope; unused by the others

    def __str__(self) -> str:
        if self.name == "elu" and self.param != 1.0:
            return f"elu(alpha={self.param:g})"
        if self.name == "leaky_relu":
            return f"leaky_relu(negative_slope={self.param:g})"
        return self.name


ACTIVATION_NAMES = ("relu", "elu", "leaky_relu", "silu", "tanh", "gelu", "gelu_tanh")
_ALIASES = {"leakyrelu": "leaky_relu", "swish": "silu", "gelu_erf": "gelu", "gelu_exact": "gelu",
            "gelu_approx": "gelu_tanh"}
_DEFAULT_PARAM = {"elu": 1.0, "leaky_relu": 0.01}


def activation_spec(act) -> Optional[Activation]:
    """An :class:`Activation` from a name (``"relu"``, ``"elu"``, ``"leaky_relu"``, ``"silu"``,
    ``"tanh"``, ``"gelu"``, ``"gelu_tanh"``), an ``(name, param)`` pair, an activation module
    (``nn.ReLU``, ``nn.ELU(alpha)``, ``nn.LeakyReLU(negative_slope)``, ``nn.SiLU``, ``nn.Tanh``,
    ``nn.GELU(approximate="none" | "tanh")``) or one of ``F.relu``, ``F.elu``, ``F.silu``,
    ``torch.tanh``, ``F.gelu``; None for anything else."""
    if isinstance(act, Activation):
        return act
    if isinstance(act, str):
        name = _ALIASES.get(act.strip().lower(), act.strip().lower())
        return Activation(name, _DEFAULT_PARAM.get(name, 0.0)) if name in ACTIVATION_NAMES else None
    if isinstance(act, tuple) and len(act) == 2 and isinstance(act[0], str):
        base = activation_spec(act[0])
        return None if base is None else Activation(base.name, float(act[1]))
    if type(act) is nn.ReLU:
        return Activation("relu")
    if type(act) is nn.ELU:
        return Activation("elu", float(act.alpha))
    if type(act) is nn.LeakyReLU:
        return Activation("leaky_relu", float(act.negative_slope))
    if type(act) is nn.SiLU:
        return Activation("silu")
    if type(act) is nn.Tanh:
        return Activation("tanh")
    if type(act) is nn.GELU:
        return Activation("gelu_tanh" if act.approximate == "tanh" else "gelu")
    functional = {F.relu: "relu", F.elu: "elu", F.silu: "silu", torch.tanh: "tanh", F.tanh: "tanh",
                  F.gelu: "gelu", torch.relu: "relu"}
    try:
        name = functional.get(act)
    except TypeError:  # unhashable
        name = None
    return None if name is None else Activation(name, _DEFAULT_PARAM.get(name, 0.0))


def apply_activation(z: Tensor, act: Activation) -> Tensor:
    """act(z) with the torch functions (autograd through them), out of place."""
    name, p = act
    if name == "relu":
        return F.relu(z)
    if name == "elu":
        return F.elu(z, alpha=p)
    if name == "leaky_relu":
        return F.leaky_relu(z, negative_slope=p)
    if name == "silu":
        return F.silu(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    raise ValueError(f"unknown activation {act!r}")


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activation_and_slope(z: Tensor, act: Activation) -> Tuple[Tensor, Tensor]:
    """(act(z), act'(z)) without autograd (the HMC sampler's explicit backward). ELU with alpha 1
    and ReLU reuse ``z``'s storage; the others allocate."""
    name, p = act
    if name == "elu" and p == 1.0:
        return _elu_and_slope_(z)
    if name == "relu":
        slope = (z > 0).to(z.dtype)
        return z.clamp_min_(0.0), slope
    if name == "elu":
        e = z.clamp(max=0.0).exp_()
        return torch.where(z > 0, z, p * (e - 1.0)), torch.where(z > 0, torch.ones_like(z), p * e)
    if name == "leaky_relu":
        return torch.where(z > 0, z, p * z), torch.where(z > 0, torch.ones_like(z), torch.full_like(z, p))
    if name == "silu":
        sig = torch.sigmoid(z)
        return z * sig, sig * (1.0 + z * (1.0 - sig))
    if name == "tanh":
        t = torch.tanh(z)
        return t, 1.0 - t * t
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        return z * cdf, cdf + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    if name == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z * z * z))
        return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (
            1.0 + 3.0 * 0.044715 * z * z)
    raise ValueError(f"unknown activation {act!r}")


class StackedLayers(list):
    """``[(weight (E, out, in), bias (E, out)), ...]`` (a plain list of the layers) that also carries
    the critics' hidden activation, so that whatever evaluates the layers (the fused ops, the HMC
    sampler) computes the network they came from. Slicing or rebuilding it gives a plain list.

    ``norms``: None, or one ``(scale (E, H), shift (E, H))`` per hidden layer: a LayerNorm after that
    layer's activation. Only :func:`ensemble_q` computes them; :func:`layers_activation` refuses
    layers that carry them for every other reader."""

    def __init__(self, layers=(), activation="elu", norms=None):
        super().__init__(layers)
        self.activation = activation
        self.norms = None if norms is None else list(norms)

    def select(self, members: slice) -> "StackedLayers":
        """The critics ``members`` (a slice of the ensemble dimension), norms and activation kept."""
        norms = None if self.norms is None else [(g[members], b[members]) for g, b in self.norms]
        return StackedLayers([(w[members], b[members]) for w, b in self], self.activation, norms)


def layers_activation(layers, activation=None, allow_norms: bool = False) -> Optional[Activation]:
    """The activation to apply to ``layers``: ``activation`` if given, else the one the layers carry
    (:class:`StackedLayers`), else None. Layers that carry LayerNorms raise ValueError unless
    ``allow_norms`` (a caller that applies them): a reader of plain MLP layers would compute
    another network."""
    if not allow_norms and getattr(layers, "norms", None):
        raise ValueError("these critic layers are layer-normalised (LayerNorm after each hidden activation): "
                         "only misa_fast.nets.ensemble_q or the critic's own forward computes them")
    if activation is None:
        activation = getattr(layers, "activation", None)
        if activation is None:
            return None
    spec = activation_spec(activation)
    if spec is None:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATION_NAMES}, an activation "
                         "module or an Activation")
    return spec


# --------------------------------------------------------------------------------------------------
# initialisation (flax semantics)
def variance_scaling_(
    tensor: Tensor, scale: float, distribution: str, generator: Optional[torch.Generator] = None
) -> Tensor:
    """flax ``variance_scaling(scale, "fan_in", distribution)``; fan_in is the last dimension."""
    fan_in = tensor.shape[-1]
    variance = scale / fan_in
    with torch.no_grad():
        if distribution == "uniform":
            limit = math.sqrt(3.0 * variance)
            return tensor.uniform_(-limit, limit, generator=generator)
        if distribution == "truncated_normal":
            # Cut at +-2 std; the constant is the std of a unit normal truncated there.
            std = math.sqrt(variance) / 0.87962566103423978
            return nn.init.trunc_normal_(tensor, 0.0, std, -2.0 * std, 2.0 * std, generator=generator)
    raise ValueError(f"unknown distribution {distribution!r}")


HIDDEN_INIT = dict(scale=1.0, distribution="truncated_normal")  # flax lecun_normal
OUTPUT_INIT = dict(scale=1e-2, distribution="uniform")


# --------------------------------------------------------------------------------------------------
# tanh-Gaussian distribution helpers (shared by the policy, the losses and the HMC target)
def tanh_log_det_jacobian(u: Tensor) -> Tensor:
    """log(1 - tanh(u)^2), stable for large |u|."""
    return 2.0 * (_LOG2 - u - F.softplus(-2.0 * u))


def tanh_gaussian_log_prob_pre_tanh(mean: Tensor, std: Tensor, u: Tensor) -> Tensor:
    """log pi(tanh(u)) for pre-tanh ``u``; broadcasts, sums the last dimension."""
    z = (u - mean) / std
    return (-0.5 * z * z - torch.log(std) - _HALF_LOG_2PI - tanh_log_det_jacobian(u)).sum(-1)


def tanh_gaussian_log_prob(mean: Tensor, std: Tensor, action: Tensor) -> Tensor:
    """log pi(action) for post-tanh actions in [-1, 1]; broadcasts, sums the last dimension."""
    u = torch.atanh(action.clamp(-ATANH_LIMIT, ATANH_LIMIT))
    return tanh_gaussian_log_prob_pre_tanh(mean, std, u)


def tanh_gaussian_sample(mean: Tensor, std: Tensor, noise: Tensor) -> Tuple[Tensor, Tensor]:
    """Reparameterised sample tanh(mean + std * noise) and its log-probability.

    The Gaussian part uses ``noise`` directly for (u - mean)/std: equal in value and in gradient
    (it does not depend on the parameters), one op cheaper and exact."""
    u = mean + std * noise
    log_prob = (
        -0.5 * noise * noise - torch.log(std) - _HALF_LOG_2PI - tanh_log_det_jacobian(u)
    ).sum(-1)
    return torch.tanh(u), log_prob


# --------------------------------------------------------------------------------------------------
class TanhGaussianPolicy(nn.Module):
    """MLP (ReLU) -> (mean, raw); mean clipped to [-9, 9]; log_std = m * raw + c with learnable
    scalars m (init 1) and c (init -1), clipped to [-5, 2]; action = tanh(mean + std * eps)."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int] = (256, 256),
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        sizes = [obs_dim, *hidden]
        layers: list = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [_linear(fan_in, fan_out, HIDDEN_INIT, generator), nn.ReLU()]
        layers.append(_linear(sizes[-1], 2 * act_dim, OUTPUT_INIT, generator))
        self.net = nn.Sequential(*layers)
        self.log_std_multiplier = nn.Parameter(torch.tensor(1.0))
        self.log_std_offset = nn.Parameter(torch.tensor(-1.0))

    def dist_params(self, obs: Tensor) -> Tuple[Tensor, Tensor]:
        """Pre-tanh (mean, std), each (..., A)."""
        mean, raw = self.net(obs).chunk(2, dim=-1)
        mean = mean.clamp(MEAN_MIN, MEAN_MAX)
        log_std = (self.log_std_multiplier * raw + self.log_std_offset).clamp(LOG_STD_MIN, LOG_STD_MAX)
        return mean, log_std.exp()

    def sample(
        self,
        obs: Tensor,
        generator: Optional[torch.Generator] = None,
        noise: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Reparameterised (action, log_prob). ``noise`` (standard normal, shape of the mean) wins
        over ``generator``."""
        mean, std = self.dist_params(obs)
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return tanh_gaussian_sample(mean, std, noise)

    def log_prob(self, obs: Tensor, action: Tensor) -> Tensor:
        """log pi(action | obs) for post-tanh actions; action (B, A) or (B, K, A) for obs (B, S)."""
        mean, std = self.dist_params(obs)
        if action.dim() == mean.dim() + 1:
            mean, std = mean.unsqueeze(-2), std.unsqueeze(-2)
        return tanh_gaussian_log_prob(mean, std, action)

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        """Deterministic evaluation action tanh(mean)."""
        return torch.tanh(self.dist_params(obs)[0])


def _linear(fan_in: int, fan_out: int, init: dict, generator: Optional[torch.Generator]) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    variance_scaling_(layer.weight, generator=generator, **init)
    nn.init.zeros_(layer.bias)
    return layer


# --------------------------------------------------------------------------------------------------
# Functional critic forward on stacked layers
def state_half(layers: Layers, obs: Tensor) -> Tensor:
    """Layer 1's state half obs @ W1[:, :, :S]^T + b1 for every critic: (E, B, H1)."""
    weight, bias = layers[0]
    return torch.matmul(obs, weight[:, :, : obs.shape[-1]].transpose(1, 2)) + bias.unsqueeze(1)


def ensemble_q(layers: Layers, state_half: Tensor, actions: Tensor, activation=None) -> Tensor:
    """Q of every critic from the precomputed state half of layer 1.

    state_half: (E, B, H1) = obs @ W1[:, :, :S]^T + b1 (see ``first_layer_state_half``).
    actions:    (B, A) -> returns (E, B);  (B, K, A) -> returns (E, B, K). For K samples per state the
    state half is broadcast, not recomputed.
    activation: "elu" (MISA, the official flax critics), "relu" (the TD3 family's critics) or any
    :func:`activation_spec`; None: the one ``layers`` carry (:class:`StackedLayers`), else ELU.
    """
    spec = layers_activation(layers, activation, allow_norms=True) or Activation("elu", 1.0)
    if spec == ("elu", 1.0) or spec.name == "relu":
        act = _ACTIVATIONS[spec.name]
    else:
        def act(t, inplace=False):
            return apply_activation(t, spec)
    norms = getattr(layers, "norms", None)
    w1 = layers[0][0]
    E, B, H = state_half.shape
    act_dim = actions.shape[-1]
    # In-place adds and activations on fresh intermediates (autograd allows it: matmul/baddbmm do not
    # need their outputs, ELU's backward uses its result): each avoided (E, B*K, H) temporary is
    # 26 MB at B=256, K=50, H=256.
    z = torch.matmul(actions.reshape(-1, act_dim), w1[:, :, -act_dim:].transpose(1, 2))  # (E, N, H)
    z.view(E, B, -1, H).add_(state_half.unsqueeze(2))
    h = act(z, inplace=True)
    if norms:
        h = ensemble_layer_norm(h, *norms[0])
    for i, (weight, bias) in enumerate(layers[1:-1], start=1):
        h = act(torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2)), inplace=True)
        if norms:
            h = ensemble_layer_norm(h, *norms[i])
    weight, bias = layers[-1]
    q = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))  # (E, N, 1)
    return q.view(E, *actions.shape[:-1])


def ensemble_layer_norm(h: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """LayerNorm over the last dimension with each critic's own affine: h (E, N, H), scale and shift
    (E, H). Out of place (the activation before it is in place; its backward needs the result)."""
    normed = F.layer_norm(h, h.shape[-1:], eps=LAYER_NORM_EPS)
    return torch.addcmul(shift.unsqueeze(1), normed, scale.unsqueeze(1))


def _elu_and_slope_(z: Tensor) -> Tuple[Tensor, Tensor]:
    """ELU(z), computed in place in ``z``, and ELU'(z) = exp(min(z, 0)). One exp instead of
    F.elu's expm1 (~6x dearer on CPU), the slope for free, one new tensor. Absolute error vs F.elu
    below 1e-7 (exp(z) - 1 for z <= 0; z + 1 - 1 for z > 0)."""
    slope = z.clamp(max=0.0).exp_()
    return z.clamp_min_(0.0).add_(slope).sub_(1.0), slope


def ensemble_q_and_action_grad(
    layers: Layers, state_half: Tensor, actions: Tensor, repeats: int = 1, activation=None
) -> Tuple[Tensor, Tensor]:
    """Q (E, C) and dQ/da (E, C, A) for actions (C, A), by an explicit backward pass through the
    MLP (no autograd graph: this runs ~110 times per training step inside the HMC sampler).
    ``activation``: as :func:`ensemble_q` (None: the one ``layers`` carry, else ELU).

    state_half: (E, C // repeats, H1); chains come in consecutive groups of ``repeats`` per state
    (the parallel HMC chains), so the state half is broadcast instead of materialised per chain.
    Big temporaries are updated in place: on CPU a fresh multi-MB tensor costs more than the op."""
    E, chains, act_dim = state_half.shape[0], actions.shape[0], actions.shape[-1]
    w_action = layers[0][0][:, :, -act_dim:]  # (E, H1, A)
    z = torch.matmul(actions, w_action.transpose(1, 2))  # (E, C, H1)
    z.view(E, chains // repeats, repeats, -1).add_(state_half.unsqueeze(2))
    spec = layers_activation(layers, activation) or Activation("elu", 1.0)
    h, slope = activation_and_slope(z, spec)
    slopes = [slope]
    for weight, bias in layers[1:-1]:
        h, slope = activation_and_slope(torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2)), spec)
        slopes.append(slope)
    w_out, b_out = layers[-1]  # (E, 1, H), (E, 1)
    q = torch.baddbmm(b_out.unsqueeze(1), h, w_out.transpose(1, 2)).squeeze(-1)
    grad = slopes[-1].mul_(w_out)  # dQ/dz of the last hidden layer, (E, C, H)
    for (weight, _), slope in zip(reversed(layers[1:-1]), reversed(slopes[:-1])):
        grad = torch.bmm(grad, weight).mul_(slope)
    return q, torch.bmm(grad, w_action)


class EnsembleCritic(nn.Module):
    """E independent Q networks MLP(concat(s, a)) with ELU (or ReLU: ``activation="relu"``, the TD3
    family's critics), stored stacked. ``stacked_layers()``
    returns :class:`StackedLayers`, which carry the activation to the HMC sampler and the fused ops.

    ``layer_norm=True`` puts a LayerNorm (per critic scale and shift, initialised to 1 and 0) after
    each hidden activation, as ReBRAC's critics (Linear -> ReLU -> LayerNorm in its reference code);
    it adds parameters ``norm_scales`` / ``norm_shifts`` and draws nothing from ``generator``, so the
    Linear layers are initialised as without it.

    ``forward(obs, actions)`` returns (E, B) for actions (B, A) and (E, B, K) for (B, K, A)."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int] = (256, 256),
        num_critics: int = 2,
        generator: Optional[torch.Generator] = None,
        activation: str = "elu",
        layer_norm: bool = False,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}")
        self.obs_dim, self.act_dim, self.num_critics = obs_dim, act_dim, num_critics
        self.activation = activation
        self.layer_norm = bool(layer_norm)
        sizes = [obs_dim + act_dim, *hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            weight = torch.empty(num_critics, fan_out, fan_in)
            is_output = i == len(sizes) - 2
            variance_scaling_(weight, generator=generator, **(OUTPUT_INIT if is_output else HIDDEN_INIT))
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(torch.zeros(num_critics, fan_out)))
        if self.layer_norm:  # only then: a plain ensemble's state dict keeps its keys
            self.norm_scales = nn.ParameterList(nn.Parameter(torch.ones(num_critics, h)) for h in hidden)
            self.norm_shifts = nn.ParameterList(nn.Parameter(torch.zeros(num_critics, h)) for h in hidden)

    def _norms(self, detach: bool, index=None) -> Optional[list]:
        if not self.layer_norm:
            return None
        pick = (lambda t: t) if index is None else (lambda t: t[index])
        return [(pick(g.detach() if detach else g), pick(b.detach() if detach else b))
                for g, b in zip(self.norm_scales, self.norm_shifts)]

    def stacked_layers(self, detach: bool = False) -> Layers:
        """[(weight (E, out, in), bias (E, out)), ...] in order; ``detach`` gives weights that carry
        no gradient (the actor's and the HMC target's view of the critics). The layer norms, if
        any, travel with them (:class:`StackedLayers`)."""
        if detach:
            return StackedLayers([(w.detach(), b.detach()) for w, b in zip(self.weights, self.biases)], self.activation,
                                 self._norms(True))
        return StackedLayers(zip(self.weights, self.biases), self.activation, self._norms(False))

    def layers(self, index: int) -> List[Tuple[Tensor, Tensor]]:
        """Critic ``index`` as nn.Linear-style [(weight (out, in), bias (out,)), ...] (views), with its
        layer norms' (scale (H,), shift (H,)) as ``norms`` if it has them."""
        return StackedLayers([(w[index], b[index]) for w, b in zip(self.weights, self.biases)], self.activation,
                             self._norms(False, index))

    def first_layer_state_half(self, obs: Tensor, detach: bool = False) -> Tensor:
        """obs @ W1[:, :, :S]^T + b1 for every critic: (E, B, H1). W1[:, :, S:] is the action half."""
        return state_half(self.stacked_layers(detach)[:1], obs)

    def forward(self, obs: Tensor, actions: Tensor) -> Tensor:
        return ensemble_q(self.stacked_layers(), self.first_layer_state_half(obs), actions, self.activation)


class TwinCritic(EnsembleCritic):
    """The two critics of MISA (an ensemble of 2)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256), generator=None,
                 activation: str = "elu"):
        super().__init__(obs_dim, act_dim, hidden, num_critics=2, generator=generator, activation=activation)


@torch.no_grad()
def polyak_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- (1 - tau) * target + tau * online, for every parameter (one fused foreach op)."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)
