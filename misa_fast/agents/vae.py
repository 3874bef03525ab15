"""SPOT's conditional VAE of the behaviour policy (docs: the design page, SPOT) and its density estimates.

Model (as in the official SPOT code, github thuml/SPOT ``vae.py``): encoder q(z|s,a) = N(mean, std^2)
from an MLP on concat(s, a), log std clamped to [-4, 15]; prior p(z) = N(0, I); decoder
p(a|z,s) = N(tanh(MLP(concat(s, z))), sigma^2) — the mean is squashed by tanh (actions lie in
[-1, 1]) and the std is *fixed*, sigma = sqrt(beta / 4), not learned. That choice is what makes the
training loss ``mean (dec(z) - a)^2 + beta * mean_d KL_d`` a scaled negative ELBO: with
sigma^2 = beta/4, -log p(a|z,s) = (2/beta) * sum_j (dec_j - a_j)^2 + const, so for latent = 2A

    vae_loss = beta / (2A) * (-ELBO) + const.

Three estimates of log pi_beta(a|s), each a plain function of (vae, obs, actions, beta, noise), with
``noise`` (B, L, D) the standard-normal draws of L latent samples per state (so they are
deterministic given the noise, and the reparameterised z = mean + std * noise carries gradients to
the actions through the encoder):

- :func:`vae_loss`: SPOT's training loss and its default -log pi_beta in the actor ("elbo" mode).
- :func:`elbo`: the ELBO in nats, E_q[log p(a|z,s)] - KL(q(z|s,a) || p(z)), KL in closed form.
- :func:`importance_weighted_log_prob`: log mean_l p(a|z_l,s) p(z_l) / q(z_l|s,a) (IWAE), through
  the fused ``log_mean_exp`` op. ELBO <= IW(L) <= log p(a|s), and IW(L) -> log p(a|s) as L grows.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from misa_fast import ops

LOG_STD_MIN, LOG_STD_MAX = -4.0, 15.0  # encoder log std clamp (official)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def torch_default_linear(fan_in: int, fan_out: int, generator: Optional[torch.Generator] = None,
                         init_w: Optional[float] = None) -> nn.Linear:
    """nn.Linear with PyTorch's default init (weights and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    what the official PyTorch code of TD3+BC and SPOT gets), drawn from ``generator`` instead of the
    global RNG; ``init_w`` gives U(-init_w, init_w) instead (SPOT's small output layers)."""
    layer = nn.Linear(fan_in, fan_out)
    bound = 1.0 / math.sqrt(fan_in) if init_w is None else init_w
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


def _mlp(sizes: Sequence[int], generator: Optional[torch.Generator]) -> nn.Sequential:
    """Linear-ReLU stack whose last layer has no activation."""
    layers: list = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch_default_linear(fan_in, fan_out, generator))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ConditionalVAE(nn.Module):
    """q(z|s,a) and the decoder mean tanh(MLP(s, z)); official sizes: hidden 750-750, latent 2A."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (750, 750),
                 latent_dim: Optional[int] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.latent_dim = 2 * act_dim if latent_dim is None else latent_dim
        # One head for (mean, log std): the official two heads with the same fan-in, concatenated.
        self.encoder = _mlp([obs_dim + act_dim, *hidden, 2 * self.latent_dim], generator)
        self.decoder = _mlp([obs_dim + self.latent_dim, *hidden, act_dim], generator)

    def encode(self, obs: Tensor, actions: Tensor) -> Tuple[Tensor, Tensor]:
        """(mean, std) of q(z|s,a), each (B, D)."""
        mean, log_std = self.encoder(torch.cat([obs, actions], -1)).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp()

    def decode(self, obs: Tensor, z: Tensor) -> Tensor:
        """Decoder mean tanh(MLP(s, z)) in [-1, 1]; obs (B, S) with z (B, D) or (B, L, D)."""
        if z.dim() == obs.dim() + 1:
            obs = obs.unsqueeze(-2).expand(*z.shape[:-1], obs.shape[-1])
        return torch.tanh(self.decoder(torch.cat([obs, z], -1)))


def decoder_std(beta: float) -> float:
    """The decoder's fixed std sqrt(beta / 4) that makes ``vae_loss`` a scaled negative ELBO."""
    return math.sqrt(beta / 4.0)


def kl_to_prior(mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(0, 1)) per latent dimension."""
    return 0.5 * (mean * mean + std * std - 1.0) - torch.log(std)


def _latents(vae: ConditionalVAE, obs: Tensor, actions: Tensor, noise: Tensor):
    mean, std = vae.encode(obs, actions)
    z = mean.unsqueeze(1) + std.unsqueeze(1) * noise  # (B, L, D)
    return mean, std, z, vae.decode(obs, z)  # decoded (B, L, A)


def _gaussian_log_prob(x: Tensor, mean: Tensor, std: float) -> Tensor:
    z = (x - mean) / std
    return (-0.5 * z * z - math.log(std) - _HALF_LOG_2PI).sum(-1)


def vae_loss(vae: ConditionalVAE, obs: Tensor, actions: Tensor, beta: float, noise: Tensor) -> Tensor:
    """SPOT's training loss per state (B,): mean over the L samples and A action dims of
    (dec(z) - a)^2 plus beta * the KL averaged over the D latent dims. Its batch mean is the
    official pretraining loss (L = 1); in the actor it is SPOT's default -log pi_beta."""
    mean, std, _, decoded = _latents(vae, obs, actions, noise)
    recon = (decoded - actions.unsqueeze(1)).pow(2).mean(dim=(1, 2))
    return recon + beta * kl_to_prior(mean, std).mean(-1)


def elbo(vae: ConditionalVAE, obs: Tensor, actions: Tensor, beta: float, noise: Tensor) -> Tensor:
    """ELBO of log pi_beta(a|s) in nats per state (B,): the mean over L samples of
    log p(a|z_l,s) minus the closed-form KL; the decoder std is sqrt(beta / 4)."""
    mean, std, _, decoded = _latents(vae, obs, actions, noise)
    log_lik = _gaussian_log_prob(actions.unsqueeze(1), decoded, decoder_std(beta)).mean(-1)
    return log_lik - kl_to_prior(mean, std).sum(-1)


def importance_weighted_log_prob(vae: ConditionalVAE, obs: Tensor, actions: Tensor, beta: float,
                                 noise: Tensor) -> Tensor:
    """The L-sample importance-weighted estimate (B,) of log pi_beta(a|s), L = noise.shape[1]:
    log mean_l exp(log p(a|z_l,s) + log p(z_l) - log q(z_l|s,a)), with z_l ~ q(.|s,a). Since
    (z_l - mean) / std is ``noise`` itself, log q(z_l) is written with it (same value and gradient)."""
    _, std, z, decoded = _latents(vae, obs, actions, noise)
    log_lik = _gaussian_log_prob(actions.unsqueeze(1), decoded, decoder_std(beta))
    log_prior = (-0.5 * z * z - _HALF_LOG_2PI).sum(-1)
    log_q = (-0.5 * noise * noise - _HALF_LOG_2PI).sum(-1) - torch.log(std).sum(-1, keepdim=True)
    return ops.log_mean_exp(log_lik + log_prior - log_q, dim=1)


def neg_log_density(vae: ConditionalVAE, obs: Tensor, actions: Tensor, beta: float, noise: Tensor,
                    estimator: str = "elbo") -> Tensor:
    """SPOT's -log pi_beta(a|s) per state (B,): ``vae_loss`` for "elbo" (official default) or
    minus :func:`importance_weighted_log_prob` for "iwae" (official ``--iwae``). The two differ in
    scale (the first is the negative ELBO times beta / 2A, plus a constant): lambda is tuned per mode."""
    if estimator == "elbo":
        return vae_loss(vae, obs, actions, beta, noise)
    if estimator == "iwae":
        return -importance_weighted_log_prob(vae, obs, actions, beta, noise)
    raise ValueError(f"unknown density estimator {estimator!r}")
