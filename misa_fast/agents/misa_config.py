"""Hyperparameters of the MISA learner: one dataclass, presets per D4RL domain, and a ``--set
key=value`` parser for the CLI.

Every value of the learner (the docs' design page) has a name here, with the official code's default. Variants of
the paper (BA, MISA-f, MISA-DV, MISA-biased, no-BA, ...) are settings of this one config, not new
classes: ``energy_bound`` picks the critic regulariser, ``use_ba`` the log pi(a_D|s) term and
``use_hmc`` the unbiased (MCMC) correction of the actor, ``unbiased_estimator`` how that correction is
estimated (HMC chains, or SNIS over the log-partition's samples). SAC-N and EDAC are settings too: no
energy term, no BA or correction term, the soft TD target (``backup_entropy``), N critics of the
EDAC networks (``network_style``) and, for EDAC, the ensemble-diversity term (``diversity_weight``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Tuple

from misa_fast.agents.config_base import ConfigBase

EnergyBound = Literal["misa", "dv", "f", "cql", "none"]
EnergyNetwork = Literal["q", "separate"]
LseNorm = Literal["k", "batch"]
HMCMode = Literal["faithful", "adaptive", "parallel"]
HMCSpace = Literal["post_tanh", "pre_tanh"]
UnbiasedEstimator = Literal["hmc", "snis"]
DotPrecision = Literal["tf32", "tf32x3", "ieee", "bf16"]
# The sampled-Q kernel has no tf32x3 path (kernels/sampled_q_kernels.py): its choices are these.
SampledQPrecision = Literal["tf32", "ieee", "bf16"]
LRSchedule = Literal["constant", "cosine"]
NetworkStyle = Literal["misa", "edac"]


@dataclass(frozen=True)
class MISAConfig(ConfigBase):
    # --- run -------------------------------------------------------------------------------------
    seed: int = 0
    device: str = "cpu"
    # Shapes of the data set; the trainer fills them in (MISA(config, obs_dim, act_dim) also works).
    obs_dim: Optional[int] = None
    act_dim: Optional[int] = None

    # --- networks --------------------------------------------------------------------------------
    policy_hidden: Tuple[int, ...] = (256, 256)
    critic_hidden: Tuple[int, ...] = (256, 256)  # (256, 256, 256) for antmaze
    num_critics: int = 2
    # "misa": the official MISA (flax) networks: ELU critics, lecun-normal hidden layers with zero
    # bias, output layers U(+-sqrt(3e-2 / fan_in)), log std = m * raw + c with learnable m, c.
    # "edac": the networks of the SAC-N/EDAC codes (official and CORL): ReLU critics, hidden layers
    # U(+-1/sqrt(fan_in)) with bias 0.1, output layers U(+-3e-3) (critics) and U(+-1e-3) (actor),
    # log std read directly from the actor's output (m = 1, c = 0, both frozen); see misa.edac_init_.
    network_style: NetworkStyle = "misa"

    # --- RL / optimisation -----------------------------------------------------------------------
    gamma: float = 0.99
    tau: float = 5e-3  # Polyak rate of the target critics, applied every step
    # The soft TD target of SAC: y = r + gamma (1 - d) (min_i Q'_i(s', a') - alpha log pi(a'|s')).
    # False (the official MISA code): no entropy term in the target.
    backup_entropy: bool = False
    batch_size: int = 256
    policy_lr: float = 1e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 1e-4
    alpha_prime_lr: float = 3e-4  # official (JaxCQL lineage): the Lagrange multiplier uses the critic lr
    # Paper appendix B: cosine decay of the policy and critic learning rates (official code: constant).
    lr_schedule: LRSchedule = "constant"
    lr_decay_steps: int = 1_000_000

    # --- SAC temperature -------------------------------------------------------------------------
    auto_alpha: bool = True
    log_alpha_init: float = 0.0
    target_entropy: Optional[float] = None  # None -> -act_dim

    # --- mutual-information regulariser ----------------------------------------------------------
    num_samples: int = 50  # K: policy samples in the log-mean-exp, and HMC samples per state
    min_q_weight: float = 5.0  # w_q
    bc_weight: float = 0.5
    # Scale of the actor's Q term. None: raw Q, as the official code. A number c: c * Q / mean|Q|
    # (held fixed per batch), TD3+BC's scale-free actor (its c is 2.5), not part of the paper.
    actor_q_scale: Optional[float] = None
    unbiased_weight: float = 0.1  # w_u, weight of the HMC correction term of the actor (eq. 15)
    # Critic regulariser: "misa" eq. 10 (per-state log-mean-exp), "dv" eq. 9 (log-mean-exp over the
    # whole batch), "f" eq. 8 (mean exp(Q-1)), "cql" (importance-sampled log-sum-exp over uniform and
    # policy proposals, K = N per proposal), "none" (BA: no energy term).
    energy_bound: EnergyBound = "misa"
    # The energy T of the bound: "q" the critics themselves (MISA), "separate" an extra network T_psi
    # trained only to maximise the bound, with plain TD critics (the paper's MISA-T).
    energy_network: EnergyNetwork = "q"
    energy_lr: float = 3e-4  # T_psi's Adam learning rate (energy_network="separate")
    use_ba: bool = True  # the Barber-Agakov term -log pi(a_D|s) of the actor; False = "no-BA"
    # logsumexp_k Q - log(norm): "k" = log K (a true log-mean-exp), "batch" = log(batch size) as in the
    # official code. Gradients are the same; under Lagrange the threshold shifts by log K - log B.
    lse_norm: LseNorm = "k"
    # Dot precision of the fused sampled-Q log-mean-exp on CUDA: the log-partition of the "misa" and
    # "cql" bounds (the torch path is always fp32). "tf32", the op's default, rounds the dot inputs
    # to 10 mantissa bits (Q off by ~1e-3 relative); "ieee" gives fp32 dots (the torch path's
    # values to float rounding); "bf16" halves the operand traffic at ~1e-2. Which one learns as
    # well as fp32 is an open, measurable question (a GPU learning run per precision).
    sampled_q_precision: SampledQPrecision = "tf32"

    # --- ensemble gradient diversity (EDAC, An et al. 2021, eq. 5) -------------------------------
    # eta: weight of (1 / (N - 1)) sum_{i != j} <g_i, g_j> (batch mean) in the critics' loss, g_i the
    # unit-normalised dQ_i/da at the data (s, a). 0 leaves it out (every non-EDAC algorithm).
    diversity_weight: float = 0.0

    # --- Lagrange variant (paper eq. 17 / 26) ----------------------------------------------------
    lagrange: bool = False
    lagrange_tau: float = 1.0  # the "budget" of the log-mean-exp gap; presets: antmaze 10, adroit/kitchen 3
    log_alpha_prime_init: float = 1.0
    alpha_prime_min: float = 0.0
    alpha_prime_max: float = 1e6

    # --- HMC sampler for the unbiased actor gradient ---------------------------------------------
    use_hmc: bool = True  # False: drop the correction term ("MISA-biased")
    # How the correction term's E_p[grad log pi(a|s)] is estimated: "hmc" (the paper's) chains
    # sampling p(a|s) ~ pi(a|s) e^{min_i Q_i(s, a)} with the hmc_* settings below; "snis" reweights
    # the K detached policy samples of the critic's log-partition term by w_k = softmax_k(min_i Q_i(s,
    # a_k)) (self-normalised importance sampling, no chain, no extra critic evaluation; accurate
    # while the tilt is weak: see the snis_ess diagnostic and the docs, "SNIS instead of HMC").
    unbiased_estimator: UnbiasedEstimator = "hmc"
    hmc_mode: HMCMode = "faithful"
    # Where the chains move (misa_fast.ops.hmc_reference): "post_tanh" the action itself, as the official sampler
    # does (step 1 leaves the box: no move is ever accepted); "pre_tanh" the policy-whitened pre-tanh
    # action, split HMC with the step size as the rotation angle of one leapfrog step, which samples
    # the tilted policy (the docs, "Does the HMC sample?").
    hmc_space: HMCSpace = "post_tanh"
    hmc_burn_in: int = 5
    hmc_leapfrog_steps: int = 2
    # None: 1 post-tanh (official), a quarter rotation per transition pre-tanh (pi / (2 L)); see
    # misa_fast.ops.hmc_reference.default_step_size
    hmc_step_size: Optional[float] = None
    # Per-chain step-size adaptation during burn-in. None -> on exactly when hmc_mode == "adaptive";
    # True also adapts the parallel chains.
    hmc_adapt: Optional[bool] = None
    hmc_target_accept: float = 0.65
    hmc_adapt_rate: float = 0.5  # log step += rate * (acceptance probability - target), per transition
    # Dot precision of the fused HMC kernel on CUDA (the torch path is always fp32). tf32x3 keeps
    # the MLP near fp32: plain tf32's ~1e-3 relative error is 0.1-0.5 in log p at locomotion Q scales.
    hmc_precision: DotPrecision = "tf32x3"

    # --- safety ----------------------------------------------------------------------------------
    # Check losses and gradients for NaN/inf before every optimizer step (one host sync per step).
    check_finite: bool = True

    def validate(self) -> None:
        _validate(self)

    @property
    def hmc_chain(self) -> bool:
        """Whether an update runs the HMC chain: the correction term is on and estimated by HMC."""
        return self.use_hmc and self.unbiased_estimator == "hmc"

    @property
    def snis_term(self) -> bool:
        """Whether the correction term is the self-normalised importance-sampling estimate."""
        return self.use_hmc and self.unbiased_estimator == "snis"

    @property
    def adapt_hmc(self) -> bool:
        return self.hmc_mode == "adaptive" if self.hmc_adapt is None else self.hmc_adapt

    @property
    def resolved_hmc_step_size(self) -> float:
        from misa_fast.ops.hmc_reference import default_step_size

        if self.hmc_step_size is not None:
            return float(self.hmc_step_size)
        return default_step_size(self.hmc_space, self.hmc_leapfrog_steps)

    def resolved_target_entropy(self, act_dim: int) -> float:
        return -float(act_dim) if self.target_entropy is None else float(self.target_entropy)


# ---------------------------------------------------------------------------------------------------
# Presets: learner settings per D4RL domain (data-side settings such as reward scaling live with the
# data loader). The Lagrange presets use the official log(batch) normalisation, since tau was tuned
# with it.
PRESETS: dict[str, dict] = {
    "locomotion": {},
    "antmaze": {
        "critic_hidden": (256, 256, 256),
        "lagrange": True,
        "lagrange_tau": 10.0,
        "lse_norm": "batch",
    },
    "adroit": {"lagrange": True, "lagrange_tau": 3.0, "lse_norm": "batch"},
    "kitchen": {"lagrange": True, "lagrange_tau": 3.0, "lse_norm": "batch"},
    # The embedded Pendulum dataset (3-dim states, 1-dim actions): the locomotion learner, 256x256
    # networks included, with K=10 so that the default `misa-fast train` runs in a few CPU minutes.
    # 64x64 networks peak and then collapse on these data whatever the other settings (the docs,
    # "Learning on the embedded dataset": 2 seeds x 8k steps per setting).
    "pendulum": {"num_samples": 10},
}



def preset(name: str, **overrides) -> MISAConfig:
    """The config for a domain ("locomotion", "antmaze", "adroit", "kitchen"), plus overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return MISAConfig().replace(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------------
# SAC-N and EDAC (An et al. 2021) per D4RL dataset, keyed by the dataset name without its version
# ("hopper-medium-v2" -> "hopper-medium"). Sources: CORL's configs (configs/offline/sac_n/*.yaml,
# configs/offline/edac/*.yaml); the EDAC values agree with the "suggested hypers" of OfflineRL-Kit's
# run_edac.py. Datasets not listed (random, expert, full-replay, other domains) keep the
# algorithm's defaults (N = 10, eta = 1): their values were not checked against the paper's table.
SAC_N_CRITICS: dict[str, int] = {
    "halfcheetah-medium": 10, "halfcheetah-medium-replay": 10, "halfcheetah-medium-expert": 10,
    "hopper-medium": 500, "hopper-medium-replay": 200, "hopper-medium-expert": 200,
    "walker2d-medium": 20, "walker2d-medium-replay": 20, "walker2d-medium-expert": 20,
}
EDAC_VALUES: dict[str, Tuple[int, float]] = {  # (N, eta)
    "halfcheetah-medium": (10, 1.0), "halfcheetah-medium-replay": (10, 1.0), "halfcheetah-medium-expert": (10, 5.0),
    "hopper-medium": (50, 1.0), "hopper-medium-replay": (50, 1.0), "hopper-medium-expert": (50, 1.0),
    "walker2d-medium": (10, 1.0), "walker2d-medium-replay": (10, 1.0), "walker2d-medium-expert": (10, 5.0),
}


def dataset_key(dataset_name: str, keys) -> Optional[str]:
    """The longest of ``keys`` that a D4RL-style dataset name (or file path, or Minari id) starts
    with, followed by nothing or "-...": "hopper-medium-expert-v2" -> "hopper-medium-expert",
    "data/walker2d-medium.hdf5" -> "walker2d-medium", "mujoco/hopper/medium-v0" -> "hopper-medium".
    None if no key fits."""
    from misa_fast.data import registry

    text = str(dataset_name).replace("\\", "/").lower()
    if registry.is_minari_id(text):  # namespace/environment/dataset-vN
        text = f"{registry.environment_part(text)}-{text.rsplit('/', 1)[-1]}"
    name = text.rsplit("/", 1)[-1]
    for suffix in (".hdf5", ".h5", ".npz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    matches = [key for key in keys if name == key or name.startswith(key + "-")]
    return max(matches, key=len) if matches else None


def sac_n_values_for(dataset_name: str) -> dict:
    """SAC-N's ensemble size for a dataset (``SAC_N_CRITICS``); {} where no value is known."""
    key = dataset_key(dataset_name, SAC_N_CRITICS)
    return {} if key is None else {"num_critics": SAC_N_CRITICS[key]}


def edac_values_for(dataset_name: str) -> dict:
    """EDAC's ensemble size and diversity weight eta for a dataset (``EDAC_VALUES``); {} where no
    value is known."""
    key = dataset_key(dataset_name, EDAC_VALUES)
    if key is None:
        return {}
    num_critics, eta = EDAC_VALUES[key]
    return {"num_critics": num_critics, "diversity_weight": eta}


MAX_HMC_STEP_SIZE = 10.0


def _validate(cfg: MISAConfig) -> None:
    positive_ints = ["num_critics", "batch_size", "num_samples", "hmc_leapfrog_steps", "lr_decay_steps"]
    for name in positive_ints:
        if getattr(cfg, name) < 1:
            raise ValueError(f"config key {name!r} must be >= 1, got {getattr(cfg, name)}")
    for name in ("obs_dim", "act_dim"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"config key {name!r} must be >= 1, got {getattr(cfg, name)}")
    if cfg.hmc_burn_in < 0:
        raise ValueError(f"config key 'hmc_burn_in' must be >= 0, got {cfg.hmc_burn_in}")
    if not cfg.policy_hidden or not cfg.critic_hidden or min(cfg.policy_hidden + cfg.critic_hidden) < 1:
        raise ValueError("hidden sizes must be non-empty tuples of positive ints")
    for name in ("policy_lr", "critic_lr", "alpha_lr", "alpha_prime_lr", "energy_lr", "hmc_step_size",
                 "actor_q_scale"):
        if getattr(cfg, name) is not None and not getattr(cfg, name) > 0:
            raise ValueError(f"config key {name!r} must be > 0, got {getattr(cfg, name)}")
    for name in ("min_q_weight", "bc_weight", "unbiased_weight", "alpha_prime_min", "diversity_weight"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"config key {name!r} must be >= 0, got {getattr(cfg, name)}")
    # HMC moves actions in [-1, 1] (or the policy-whitened pre-tanh space): steps beyond this only reject.
    if cfg.hmc_step_size is not None and cfg.hmc_step_size > MAX_HMC_STEP_SIZE:
        raise ValueError(f"config key 'hmc_step_size' must be <= {MAX_HMC_STEP_SIZE}, got {cfg.hmc_step_size}")
    if not 0.0 <= cfg.tau <= 1.0 or not 0.0 <= cfg.gamma <= 1.0:
        raise ValueError("tau and gamma must lie in [0, 1]")
    if not 0.0 < cfg.hmc_target_accept < 1.0:
        raise ValueError("hmc_target_accept must lie in (0, 1)")
    if not cfg.alpha_prime_min <= cfg.alpha_prime_max:
        raise ValueError("alpha_prime_min must be <= alpha_prime_max")
    if cfg.use_hmc and cfg.energy_bound != "misa":
        # The HMC correction samples pi(a|s) e^Q(s,a) / Z(s), the tilted distribution of eq. 10 only.
        raise ValueError(f"use_hmc=True needs energy_bound='misa' (got {cfg.energy_bound!r})")
    if cfg.diversity_weight > 0 and cfg.num_critics < 2:
        raise ValueError("diversity_weight > 0 needs num_critics >= 2 (the term compares pairs of critics)")
    if cfg.lagrange and cfg.energy_bound == "none":
        raise ValueError("lagrange=True needs an energy bound")
    if cfg.energy_network == "separate":
        if cfg.energy_bound in ("none", "cql"):
            raise ValueError(f"energy_network='separate' needs a MISA bound (misa, dv or f), got {cfg.energy_bound!r}")
        if cfg.lagrange:
            raise ValueError("energy_network='separate' trains T_psi on the bound alone: lagrange must be False")
