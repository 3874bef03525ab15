"""Everything a run can check before its first step, so that a mistake costs seconds, not the
training done before the first evaluation or checkpoint found it: the run options, the evaluation
environment against the data, the memory a step needs, and a resume's options against its
checkpoint. Each failure is a :class:`~misa_fast.errors.UserError` naming the option, key or file.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from misa_fast.errors import UserError

# Seeds feed torch, numpy and the C++ sampler (uint64) and are offset for evaluation episodes.
MAX_SEED = 2**63 - 1
EVAL_SEED_OFFSET = 1_000_000


def check_positive(value, option: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{option}: expected a positive integer, got {value!r}")


def check_seed(seed, option: str = "--seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - EVAL_SEED_OFFSET:
        raise UserError(f"{option} must lie in [0, 2**63 - {EVAL_SEED_OFFSET + 1}], got {seed!r}")


def check_device(name: str) -> None:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available on this machine (use --device cpu or auto)")


def check_run_options(run) -> None:
    """The options of ``misa-fast train`` that need no data: intervals, length, seeds, device."""
    for name in ("steps", "eval_every", "eval_episodes", "log_every", "checkpoint_every", "threads"):
        check_positive(getattr(run, name), "--" + name.replace("_", "-"))
    check_seed(run.seed)
    if run.seeds is not None:
        from misa_fast.agents.members import parse_seeds

        try:
            seeds = parse_seeds(run.seeds)
        except ValueError as err:
            raise UserError(str(err)) from None
        for seed in seeds:
            check_seed(seed, "--seeds")
    check_device(run.device)


def check_environment(env_id: str, env_kwargs: Optional[dict], obs_dim: int, act_dim: int, where: str) -> None:
    """Makes the evaluation environment once and checks its spaces against the data's widths.
    ``where`` says where the id came from (``--env X`` or the dataset's metadata)."""
    import gymnasium as gym

    from misa_fast.envs.rollout import make_env

    try:
        env = make_env(env_id, **(env_kwargs or {}))
    except ModuleNotFoundError as err:
        raise UserError(f"{where}: {err}") from None
    except (gym.error.Error, TypeError, ValueError, AttributeError, OSError) as err:
        raise UserError(f"{where}: cannot make the evaluation environment {env_id!r}: "
                        f"{' '.join(str(err).split())}") from None
    try:
        obs_space, act_space = env.observation_space, env.action_space
    finally:
        env.close()
    if not isinstance(act_space, gym.spaces.Box):
        raise UserError(f"{where}: {env_id} has {type(act_space).__name__} actions; misa-fast learns continuous "
                        "(Box) actions")
    problems = []
    if tuple(obs_space.shape or ()) != (obs_dim,):
        problems.append(f"observations of shape {tuple(obs_space.shape or ())} (the data's: ({obs_dim},))")
    if tuple(act_space.shape) != (act_dim,):
        problems.append(f"actions of shape {tuple(act_space.shape)} (the data's: ({act_dim},))")
    if problems:
        raise UserError(f"{where}: {env_id} has {' and '.join(problems)}; evaluate in the environment the data "
                        "came from")


# ------------------------------------------------------------------------------------------- memory
def _mlp_params(inputs: int, hidden: Sequence[int], outputs: int) -> int:
    sizes = [inputs, *hidden, outputs]
    return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))


def step_memory(cfg, obs_dim: int, act_dim: int) -> dict:
    """A rough upper estimate, in bytes, of what one update holds: per config key that drives it.
    Parameters count four times (weights, gradients, two Adam moments) plus the target copies;
    the critics' activations over the batch's sampled actions count eight times (forward,
    backward and the HMC chain's leapfrog states)."""
    from misa_fast.agents.config_base import hidden_sizes

    policy_hidden, critic_hidden = hidden_sizes(cfg, "actor"), hidden_sizes(cfg, "critic")
    critics = int(getattr(cfg, "num_critics", 2))
    samples = max(int(getattr(cfg, "num_samples", 1)), 1)
    params = (_mlp_params(obs_dim, policy_hidden, 2 * act_dim) * 5
              + critics * _mlp_params(obs_dim + act_dim, critic_hidden, 1) * 6)
    activations = cfg.batch_size * (samples + 2) * critics * (sum(critic_hidden) + sum(policy_hidden)) * 8
    return {"parameters": 4 * params, "activations": 4 * activations}


def available_memory(device) -> Optional[int]:
    """Free memory of the device, in bytes (None when it cannot be told)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _largest_setting(cfg, keys: Sequence[str]) -> str:
    """The key among ``keys`` that is furthest above its default, as ``key=value``."""
    defaults = type(cfg)()

    def size(value) -> float:
        return float(sum(value)) if isinstance(value, tuple) else float(value)

    present = [k for k in keys if hasattr(cfg, k)]
    key = max(present, key=lambda k: size(getattr(cfg, k)) / max(size(getattr(defaults, k)), 1.0))
    value = getattr(cfg, key)
    return f"{key}={'-'.join(map(str, value)) if isinstance(value, tuple) else value}"


def check_memory(cfg, obs_dim: int, act_dim: int, device, members: int = 1) -> None:
    """Refuses a configuration whose update cannot fit in the device's free memory, naming the
    config key that makes it large."""
    parts = {k: v * members for k, v in step_memory(cfg, obs_dim, act_dim).items()}
    free = available_memory(device)
    if free is None or sum(parts.values()) <= free:
        return
    if parts["activations"] >= parts["parameters"]:
        culprit = _largest_setting(cfg, ("batch_size", "num_samples", "critic_hidden", "policy_hidden",
                                         "actor_hidden", "num_critics"))
    else:
        culprit = _largest_setting(cfg, ("policy_hidden", "actor_hidden", "critic_hidden", "num_critics"))
    raise UserError(f"--set {culprit}: one update would need about {sum(parts.values()) / 2**30:,.1f} GiB, more "
                    f"than the {free / 2**30:,.1f} GiB free on {device}" + (f" for {members} seeds" if members > 1
                                                                           else ""))


# ------------------------------------------------------------------------------------------- resume
# Options that decide what a run computes: a resumed run keeps its checkpoint's.
FIXED_ON_RESUME = ("algo", "preset", "env", "obs_norm", "data_source", "rescale_actions", "overrides")


def check_resume_options(given, saved, out) -> None:
    """Refuses a resume whose options contradict the checkpoint's run (an option left at its
    default is not a contradiction): names each option with both values."""
    defaults = type(given)()
    conflicts = []
    for name in FIXED_ON_RESUME:
        value, recorded = getattr(given, name), getattr(saved, name)
        if name == "overrides":
            value, recorded = tuple(value or ()), tuple(recorded or ())
        if value == getattr(defaults, name) or value == recorded:
            continue
        flag = "--set" if name == "overrides" else "--" + name.replace("_", "-")
        shown = (lambda v: " ".join(v) or "(none)") if name == "overrides" else (lambda v: v)
        conflicts.append(f"{flag} (checkpoint: {shown(recorded)}, given: {shown(value)})")
    if conflicts:
        raise UserError(f"--resume: {'; '.join(conflicts)}: a resumed run keeps its checkpoint's settings; drop "
                        f"these options, or start a new run with another --out than {out}")
