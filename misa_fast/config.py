"""Hyperparameters of the MISA learner: one dataclass, presets per D4RL domain, and a ``--set
key=value`` parser for the CLI.

Every value of the learner (the docs' design page) has a name here, with the official code's default. Variants of
the paper (BA, MISA-f, MISA-DV, MISA-biased, no-BA, ...) are settings of this one config, not new
classes: ``energy_bound`` picks the critic regulariser, ``use_ba`` the log pi(a_D|s) term and
``use_hmc`` the unbiased (MCMC) correction of the actor, ``unbiased_estimator`` how that correction is
estimated (HMC chains, or SNIS over the log-partition's samples).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

EnergyBound = Literal["misa", "dv", "f", "cql", "none"]
EnergyNetwork = Literal["q", "separate"]
LseNorm = Literal["k", "batch"]
HMCMode = Literal["faithful", "adaptive", "parallel"]
HMCSpace = Literal["post_tanh", "pre_tanh"]
UnbiasedEstimator = Literal["hmc", "snis"]
DotPrecision = Literal["tf32", "tf32x3", "ieee", "bf16"]
# The sampled-Q kernel has no tf32x3 path (kernels/sampled_q.py): its choices are these.
SampledQPrecision = Literal["tf32", "ieee", "bf16"]
LRSchedule = Literal["constant", "cosine"]


class ConfigBase:
    """Shared behaviour of the learners' frozen config dataclasses: every field is type-checked
    from its annotation (so a new field needs no parser code), ``replace`` validates, and
    ``apply_overrides`` parses CLI text by the field's type."""

    def __post_init__(self) -> None:
        types = self.field_types()
        for f in dataclasses.fields(self):  # type/choice checks, and list -> tuple, int -> float
            object.__setattr__(self, f.name, _coerce(types, f.name, getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses extend."""

    @classmethod
    def field_types(cls) -> dict:
        cached = cls.__dict__.get("_field_types_cache")
        if cached is None:
            cached = typing.get_type_hints(cls)
            cached = {f.name: cached[f.name] for f in dataclasses.fields(cls)}
            setattr(cls, "_field_types_cache", cached)
        return cached

    def replace(self, **changes):
        """A copy with ``changes`` applied (validated). Unknown names raise ValueError."""
        types = self.field_types()
        unknown = [k for k in changes if k not in types]
        if unknown:
            raise ValueError(_unknown_key_message(types, unknown[0]))
        coerced = {k: _coerce(types, k, v) for k, v in changes.items()}
        return dataclasses.replace(self, **coerced)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict):
        """Inverse of to_dict (lists become tuples); unknown keys raise ValueError."""
        return cls().replace(**values)


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

    # --- RL / optimisation -----------------------------------------------------------------------
    gamma: float = 0.99
    tau: float = 5e-3  # Polyak rate of the target critics, applied every step
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
    # Where the chains move (misa_fast.hmc): "post_tanh" the action itself, as the official sampler
    # does (step 1 leaves the box: no move is ever accepted); "pre_tanh" the policy-whitened pre-tanh
    # action, split HMC with the step size as the rotation angle of one leapfrog step, which samples
    # the tilted policy (the docs, "Does the HMC sample?").
    hmc_space: HMCSpace = "post_tanh"
    hmc_burn_in: int = 5
    hmc_leapfrog_steps: int = 2
    # None: 1 post-tanh (official), a quarter rotation per transition pre-tanh (pi / (2 L)); see
    # misa_fast.hmc.default_step_size
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
        from misa_fast.hmc import default_step_size

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
    # The embedded Pendulum dataset (3-dim states, 1-dim actions): the locomotion learner with
    # smaller networks and K, so the default `misa-fast train` learns visibly in a few CPU minutes.
    "pendulum": {"policy_hidden": (64, 64), "critic_hidden": (64, 64), "num_samples": 10},
}

_ADROIT_TASKS = ("pen", "hammer", "door", "relocate")
_LOCOMOTION_TASKS = ("hopper", "walker", "halfcheetah", "cheetah", "ant")


def preset(name: str, **overrides) -> MISAConfig:
    """The config for a domain ("locomotion", "antmaze", "adroit", "kitchen"), plus overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return MISAConfig().replace(**{**PRESETS[name], **overrides})


def preset_name_for_env(env_name: str) -> str:
    """Map a D4RL-style dataset name (e.g. "antmaze-umaze-v0", "hopper-medium-v2") or a Minari id
    ("mujoco/hopper/medium-v0", "D4RL/door/human-v2") to a preset."""
    from misa_fast.data import minari_ids

    name = env_name.lower()
    if minari_ids.is_minari_id(name):  # the environment is the id's middle part
        if minari_ids.namespace_part(name) in minari_ids.LOCOMOTION_NAMESPACES:
            return "locomotion"
        name = minari_ids.environment_part(name)
    # antmaze before locomotion: "antmaze" contains "ant".
    if "antmaze" in name:
        return "antmaze"
    if "kitchen" in name:
        return "kitchen"
    if name.startswith("pendulum"):
        return "pendulum"
    if any(name.startswith(t) for t in _ADROIT_TASKS):
        return "adroit"
    if any(name.startswith(t) for t in _LOCOMOTION_TASKS):
        return "locomotion"
    raise ValueError(f"no preset known for environment {env_name!r}")


def apply_overrides(cfg: ConfigBase, assignments: typing.Iterable[str]) -> ConfigBase:
    """Apply CLI ``--set key=value`` strings. Values are parsed by the field's type: ints, floats
    ("3e-4"), bools (true/false/1/0/yes/no/on/off), tuples ("256,256", "256-256" or "[256, 256]"),
    choices, and "none" for optional fields. Unknown keys or bad values raise ValueError."""
    types = cfg.field_types()
    changes: dict = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        if key not in types:
            raise ValueError(_unknown_key_message(types, key))
        changes[key] = _parse_text(types, key, text.strip())
    return cfg.replace(**changes)


# ---------------------------------------------------------------------------------------------------
# Parsing and validation. Types come from the annotations, so a new field needs no parser code.
def _unknown_key_message(types: dict, key: str) -> str:
    close = difflib.get_close_matches(key, list(types), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}{hint}"


def _strip_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_text(types: dict, key: str, text: str):
    tp, optional = _strip_optional(types[key])
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if tp is bool:
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected a boolean (true/false)")
        if tp is int:
            as_float = float(text)  # accepts "1e6"
            if not as_float.is_integer():
                raise ValueError("expected an integer")
            return int(as_float)
        if tp is float:
            return float(text)
        if typing.get_origin(tp) is tuple:
            parts = text.strip("[]() ").replace("-", ",").split(",")
            return tuple(int(p) for p in parts if p.strip())
        return text  # str and Literal: checked by _coerce
    except ValueError as err:
        raise ValueError(f"bad value {text!r} for config key {key!r}: {err}") from None


def _coerce(types: dict, key: str, value):
    """Type-check (and normalise, e.g. list -> tuple, int -> float) a Python value for a field."""
    tp, optional = _strip_optional(types[key])
    if value is None:
        if optional:
            return None
        raise ValueError(f"config key {key!r} may not be None")
    bad = ValueError(f"bad value {value!r} for config key {key!r} (expected {tp})")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise bad
        return tuple(value)
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(
                f"bad value {value!r} for config key {key!r}; choose one of {typing.get_args(tp)}"
            )
        return value
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config field type {tp} for {key!r}")  # pragma: no cover


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
    for name in ("policy_lr", "critic_lr", "alpha_lr", "alpha_prime_lr", "energy_lr", "hmc_step_size"):
        if getattr(cfg, name) is not None and not getattr(cfg, name) > 0:
            raise ValueError(f"config key {name!r} must be > 0, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.tau <= 1.0 or not 0.0 <= cfg.gamma <= 1.0:
        raise ValueError("tau and gamma must lie in [0, 1]")
    if not 0.0 < cfg.hmc_target_accept < 1.0:
        raise ValueError("hmc_target_accept must lie in (0, 1)")
    if not cfg.alpha_prime_min <= cfg.alpha_prime_max:
        raise ValueError("alpha_prime_min must be <= alpha_prime_max")
    if cfg.use_hmc and cfg.energy_bound != "misa":
        # The HMC correction samples pi(a|s) e^Q(s,a) / Z(s), the tilted distribution of eq. 10 only.
        raise ValueError(f"use_hmc=True needs energy_bound='misa' (got {cfg.energy_bound!r})")
    if cfg.lagrange and cfg.energy_bound == "none":
        raise ValueError("lagrange=True needs an energy bound")
    if cfg.energy_network == "separate":
        if cfg.energy_bound in ("none", "cql"):
            raise ValueError(f"energy_network='separate' needs a MISA bound (misa, dv or f), got {cfg.energy_bound!r}")
        if cfg.lagrange:
            raise ValueError("energy_network='separate' trains T_psi on the bound alone: lagrange must be False")



# ---------------------------------------------------------------------------------------------------
# The deterministic-actor learner (misa_fast.agents.TD3): TD3+BC and SPOT are its two settings of
# ``behavior_reg``. Values marked "official" are those of the authors' PyTorch code: TD3+BC
# (github sfujim/TD3_BC, main.py) and SPOT (github thuml/SPOT, main.py, train_vae.py, configs/).
BehaviorReg = Literal["bc", "vae"]
DensityEstimator = Literal["elbo", "iwae"]
Activation = Literal["relu", "elu"]


@dataclass(frozen=True)
class TD3Config(ConfigBase):
    # --- run -------------------------------------------------------------------------------------
    seed: int = 0
    device: str = "cpu"
    obs_dim: Optional[int] = None
    act_dim: Optional[int] = None

    # --- networks (official: 256-256 ReLU MLPs, PyTorch's default nn.Linear init) ------------------
    actor_hidden: Tuple[int, ...] = (256, 256)
    critic_hidden: Tuple[int, ...] = (256, 256)
    num_critics: int = 2
    critic_activation: Activation = "relu"
    # Dropout after every hidden layer of the actor while training (also in the target actor, as in
    # the official code, whose target copy is never put in eval mode). None -> 0.1 for SPOT
    # (official), 0 for TD3+BC (official: no dropout). SPOT's antmaze configs use 0.
    actor_dropout: Optional[float] = None
    # Output layer init U(-w, w) for weights and bias instead of the default; SPOT's antmaze configs:
    # actor 1e-3, critic 3e-3. None: PyTorch's default init (official elsewhere).
    actor_init_w: Optional[float] = None
    critic_init_w: Optional[float] = None

    # --- TD3 (official, both methods) ------------------------------------------------------------
    gamma: float = 0.99
    tau: float = 5e-3  # Polyak rate of the target actor and critics, applied on actor steps only
    batch_size: int = 256
    actor_lr: float = 3e-4  # SPOT antmaze: 1e-4
    critic_lr: float = 3e-4
    policy_noise: float = 0.2  # target policy smoothing: std of the noise on the target action
    noise_clip: float = 0.5  # ... clipped to +-noise_clip
    policy_freq: int = 2  # one actor (and target) update every policy_freq critic updates

    # --- behaviour regularisation ----------------------------------------------------------------
    behavior_reg: BehaviorReg = "bc"  # "bc": TD3+BC, "vae": SPOT
    bc_alpha: float = 2.5  # TD3+BC: lambda = alpha / mean|Q(s, pi(s))| (official)
    # SPOT: weight of -log pi_beta(pi(s)|s). Per dataset see ``spot_lambda_for``; 0.1 is the
    # official value for hopper medium / medium-replay (the official CLI default, 1.0, is never used).
    spot_lambda: float = 0.1
    spot_normalize_q: bool = True  # SPOT: -Q / mean|Q| (official; its --without_Q_norm turns it off)

    # --- SPOT's conditional VAE (official, train_vae.py) -----------------------------------------
    vae_hidden: Tuple[int, ...] = (750, 750)
    vae_latent: Optional[int] = None  # None -> 2 * act_dim
    vae_beta: float = 0.5  # KL weight of the training loss; the decoder's std is sqrt(beta / 4)
    vae_lr: float = 1e-3
    vae_steps: int = 100_000  # pretraining iterations on batches of batch_size (official 1e5, 256)
    # -log pi_beta: "elbo" = the VAE's training loss (official default), "iwae" = minus the L-sample
    # importance-weighted estimate of log pi_beta, a log-mean-exp over L = density_samples samples.
    density_estimator: DensityEstimator = "elbo"
    density_samples: int = 1  # official num_samples = 1

    # --- safety ----------------------------------------------------------------------------------
    check_finite: bool = True

    def validate(self) -> None:
        for name in ("num_critics", "batch_size", "policy_freq", "density_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"config key {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("obs_dim", "act_dim", "vae_latent"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"config key {name!r} must be >= 1, got {getattr(self, name)}")
        if self.vae_steps < 0:
            raise ValueError(f"config key 'vae_steps' must be >= 0, got {self.vae_steps}")
        hidden = self.actor_hidden + self.critic_hidden + self.vae_hidden
        if not self.actor_hidden or not self.critic_hidden or not self.vae_hidden or min(hidden) < 1:
            raise ValueError("hidden sizes must be non-empty tuples of positive ints")
        for name in ("actor_lr", "critic_lr", "vae_lr", "vae_beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"config key {name!r} must be > 0, got {getattr(self, name)}")
        for name in ("policy_noise", "noise_clip", "bc_alpha", "spot_lambda"):
            if getattr(self, name) < 0:
                raise ValueError(f"config key {name!r} must be >= 0, got {getattr(self, name)}")
        for name in ("actor_init_w", "critic_init_w"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"config key {name!r} must be > 0 or none, got {getattr(self, name)}")
        if not 0.0 <= self.tau <= 1.0 or not 0.0 <= self.gamma <= 1.0:
            raise ValueError("tau and gamma must lie in [0, 1]")
        if self.actor_dropout is not None and not 0.0 <= self.actor_dropout < 1.0:
            raise ValueError(f"actor_dropout must lie in [0, 1), got {self.actor_dropout}")

    @property
    def resolved_actor_dropout(self) -> float:
        if self.actor_dropout is not None:
            return self.actor_dropout
        return 0.1 if self.behavior_reg == "vae" else 0.0

    def resolved_vae_latent(self, act_dim: int) -> int:
        return 2 * act_dim if self.vae_latent is None else self.vae_latent


# Domain settings of the TD3 family. antmaze: SPOT's official antmaze configs (the agent's side;
# the reward (0 at the goal, -1 elsewhere) and no state normalisation belong to the data loader).
TD3_PRESETS: dict[str, dict] = {
    "locomotion": {},
    "antmaze": {"actor_lr": 1e-4, "actor_dropout": 0.0, "actor_init_w": 1e-3, "critic_init_w": 3e-3},
    "adroit": {},
    "kitchen": {},
    # The embedded Pendulum dataset: smaller networks and a short VAE pretraining, for CPU minutes.
    "pendulum": {"actor_hidden": (64, 64), "critic_hidden": (64, 64), "vae_hidden": (64, 64), "vae_steps": 2_000},
}


def td3_preset(name: str, **overrides) -> TD3Config:
    """The TD3-family config for a domain (see ``TD3_PRESETS``), plus overrides."""
    if name not in TD3_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(TD3_PRESETS)}")
    return TD3Config().replace(**{**TD3_PRESETS[name], **overrides})


# SPOT's lambda per D4RL dataset (official configs/offline/*.yml); keys are matched against the
# dataset name with the version suffix dropped ("hopper-medium-v2" -> "hopper-medium").
SPOT_LAMBDAS: dict[str, float] = {
    "hopper-medium": 0.1, "hopper-medium-replay": 0.1, "hopper-medium-expert": 0.2,
    "walker2d-medium": 0.2, "walker2d-medium-replay": 0.2, "walker2d-medium-expert": 0.5,
    "halfcheetah-medium": 0.05, "halfcheetah-medium-replay": 0.05, "halfcheetah-medium-expert": 1.0,
    "antmaze-umaze": 0.25, "antmaze-umaze-diverse": 0.25,
    "antmaze-medium-play": 0.05, "antmaze-medium-diverse": 0.025,
    "antmaze-large-play": 0.025, "antmaze-large-diverse": 0.025,
}
SPOT_DEFAULT_LAMBDA = 0.1


def spot_lambda_for(dataset_name: str) -> float:
    """SPOT's lambda for a D4RL-style dataset name or file path: the longest ``SPOT_LAMBDAS`` key the
    name starts with, followed by nothing or "-..." ("hopper-medium-expert-v2" -> 0.2,
    "data/walker2d-medium.hdf5" -> 0.2, "hopper-medium-replay-local" -> 0.1). Names the official
    configs do not cover get 0.1 (``SPOT_DEFAULT_LAMBDA``, hopper-medium's value)."""
    name = dataset_name.replace("\\", "/").rsplit("/", 1)[-1].lower()
    for suffix in (".hdf5", ".h5", ".npz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    matches = [key for key in SPOT_LAMBDAS if name == key or name.startswith(key + "-")]
    return SPOT_LAMBDAS[max(matches, key=len)] if matches else SPOT_DEFAULT_LAMBDA
