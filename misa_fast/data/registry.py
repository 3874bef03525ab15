"""What misa-fast knows about named datasets: where D4RL publishes each file, which domain a name
belongs to (the domain decides the reward transform, the reference returns and the evaluation
environment) and where downloaded files are cached.

The URL table reproduces D4RL's (``d4rl/infos.py`` and the ``register`` calls of its env
packages): the files are plain HDF5, so nothing of D4RL itself is needed to read them.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

D4RL_BASE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"

# The dataset that ships inside the package (see scripts/make_default_dataset.py).
DEFAULT_DATASET = "pendulum-default"
DEFAULT_DATASET_FILE = "pendulum-default.hdf5"


def _locomotion_urls() -> dict[str, str]:
    # D4RL registers these in a loop: gym_mujoco_v2/<agent>_<dataset with underscores>-v2.hdf5
    urls = {}
    for agent in ("hopper", "halfcheetah", "walker2d", "ant"):
        for kind in ("random", "medium", "expert", "medium-replay", "medium-expert", "full-replay"):
            urls[f"{agent}-{kind}-v2"] = (
                f"{D4RL_BASE_URL}/gym_mujoco_v2/{agent}_{kind.replace('-', '_')}-v2.hdf5"
            )
    return urls


def _antmaze_urls() -> dict[str, str]:
    # The file names describe how the data was collected; v2 re-released them with fixed timeouts.
    layouts = {
        "umaze": ("u-maze", False, False),
        "umaze-diverse": ("u-maze", True, True),
        "medium-play": ("big-maze", True, False),
        "medium-diverse": ("big-maze", True, True),
        "large-play": ("hardest-maze", True, False),
        "large-diverse": ("hardest-maze", True, True),
    }
    urls = {}
    for task, (maze, multistart, multigoal) in layouts.items():
        stem = f"Ant_maze_{maze}_noisy_multistart_{multistart}_multigoal_{multigoal}_sparse"
        urls[f"antmaze-{task}-v0"] = f"{D4RL_BASE_URL}/ant_maze_new/{stem}.hdf5"
        urls[f"antmaze-{task}-v2"] = f"{D4RL_BASE_URL}/ant_maze_v2/{stem}_fixed.hdf5"
    return urls


def _adroit_urls() -> dict[str, str]:
    return {
        f"{task}-{kind}-v1": f"{D4RL_BASE_URL}/hand_dapg_v1/{task}-{kind}-v1.hdf5"
        for task in ("pen", "hammer", "door", "relocate")
        for kind in ("human", "cloned", "expert")
    }


_KITCHEN_URLS = {
    "kitchen-complete-v0": f"{D4RL_BASE_URL}/kitchen/mini_kitchen_microwave_kettle_light_slider-v0.hdf5",
    "kitchen-partial-v0": f"{D4RL_BASE_URL}/kitchen/kitchen_microwave_kettle_light_slider-v0.hdf5",
    "kitchen-mixed-v0": f"{D4RL_BASE_URL}/kitchen/kitchen_microwave_kettle_bottomburner_light-v0.hdf5",
}

D4RL_URLS: dict[str, str] = {**_locomotion_urls(), **_antmaze_urls(), **_adroit_urls(), **_KITCHEN_URLS}


@dataclass(frozen=True)
class Domain:
    """Everything that depends only on the task family of a dataset."""

    name: str
    env_id: str  # gymnasium id used for evaluation
    obs_dim: int  # width of the D4RL observations (checked when a named dataset is loaded)
    act_dim: int
    ref_min: float | None  # reference returns for the normalized score (D4RL's, or ours)
    ref_max: float | None
    reward_transform: str = "none"  # see transforms.REWARD_TRANSFORMS
    env_kwargs: dict = field(default_factory=dict)
    needs: str | None = None  # pip package that provides env_id, when gymnasium lacks it


# Reference returns: D4RL's. Pendulum has no D4RL reference; ours is
# measured with misa_fast.envs.rollout.evaluate over 100 seeded episodes (seeds 0..99):
#   ref_min: a uniform random policy;  ref_max: the best checkpoint of a stable-baselines3 SAC run
#   (10k steps, seed 0, default hyper-parameters), deterministic actions.
#   Measured by scripts/make_default_dataset.py (the run that made the embedded dataset).
PENDULUM_REF_MIN = -1212.33
PENDULUM_REF_MAX = -141.00

DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("hopper", "Hopper-v4", 11, 3, -20.272305, 3234.3),
        Domain("halfcheetah", "HalfCheetah-v4", 17, 6, -280.178953, 12135.0),
        Domain("walker2d", "Walker2d-v4", 17, 6, 1.629008, 4592.3),
        # D4RL's ant observations include the 84 contact-force entries (gym Ant-v3 layout).
        Domain("ant", "Ant-v4", 111, 8, -325.6, 3879.7, env_kwargs={"use_contact_forces": True}),
        # antmaze: D4RL scores success (return 0 or 1), so the episode must end at the goal.
        Domain("antmaze", "AntMaze_UMaze-v4", 29, 8, 0.0, 1.0, "antmaze",
               env_kwargs={"continuing_task": False}, needs="gymnasium-robotics"),
        Domain("kitchen", "FrankaKitchen-v1", 60, 9, 0.0, 4.0, "minmax", needs="gymnasium-robotics"),
        Domain("pen", "AdroitHandPen-v1", 45, 24, 96.262799, 3076.8331017826877, "minmax",
               env_kwargs={"max_episode_steps": 100}, needs="gymnasium-robotics"),
        Domain("hammer", "AdroitHandHammer-v1", 46, 26, -274.856578, 12794.134825156867, "minmax",
               needs="gymnasium-robotics"),
        Domain("door", "AdroitHandDoor-v1", 39, 28, -56.512833, 2880.5693087298737, "minmax",
               needs="gymnasium-robotics"),
        Domain("relocate", "AdroitHandRelocate-v1", 39, 30, -6.425911, 4233.877797728884, "minmax",
               needs="gymnasium-robotics"),
        Domain("pendulum", "Pendulum-v1", 3, 1, PENDULUM_REF_MIN, PENDULUM_REF_MAX),
    )
}

# antmaze sizes map to different gymnasium-robotics mazes (D4RL's medium/large mazes with the
# goal-and-reset cells of the "diverse" layouts).
ANTMAZE_ENV_IDS = {
    "umaze": "AntMaze_UMaze-v4",
    "medium": "AntMaze_Medium_Diverse_GR-v4",
    "large": "AntMaze_Large_Diverse_GR-v4",
}

# gymnasium env id (lower case, version stripped) -> domain, so scores work with env ids too.
_ENV_NAME_TO_DOMAIN = {
    "hopper": "hopper", "halfcheetah": "halfcheetah", "walker2d": "walker2d", "ant": "ant",
    "pendulum": "pendulum", "frankakitchen": "kitchen", "adroithandpen": "pen",
    "adroithandhammer": "hammer", "adroithanddoor": "door", "adroithandrelocate": "relocate",
}


# namespace/name/dataset-vN, as Minari writes its ids (the namespace is part of every hosted id).
_MINARI_ID = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+-v\d+$")

# Namespaces whose every environment is a locomotion task (Minari's own MuJoCo datasets).
LOCOMOTION_NAMESPACES = ("mujoco",)


def is_minari_id(name: str | os.PathLike) -> bool:
    return bool(_MINARI_ID.match(str(name)))


def environment_part(dataset_id: str) -> str:
    """The environment component of an id: ``mujoco/hopper/medium-v0`` -> ``hopper``."""
    return str(dataset_id).split("/")[-2]


def namespace_part(dataset_id: str) -> str:
    return str(dataset_id).split("/")[0]


# The keys of a Dict observation space that make the policy's input vector, per domain.
DICT_OBSERVATION_KEYS = {"antmaze": ("achieved_goal", "observation"), "kitchen": ("observation",)}


def domain_of(name: str) -> Domain:
    """Domain of a dataset name (``hopper-medium-v2``), a file name (``hopper-medium-local.hdf5``),
    a Minari id (``mujoco/hopper/medium-v0``) or a gymnasium id (``Hopper-v4``, ``AntMaze_UMaze-v4``)."""
    stem = Path(str(name)).name.lower()
    if is_minari_id(name):  # mujoco/hopper/medium-v0: the environment is the middle part
        stem = environment_part(name).lower()
    if stem.endswith((".hdf5", ".h5", ".npz")):
        stem = stem.rsplit(".", 1)[0]
    if stem.startswith("antmaze"):
        return DOMAINS["antmaze"]
    head = stem.split("-")[0].split("_")[0]
    head = _ENV_NAME_TO_DOMAIN.get(head, head)
    if head in DOMAINS:
        return DOMAINS[head]
    raise KeyError(
        f"unknown dataset domain for {name!r}: expected a name starting with one of "
        f"{sorted(DOMAINS)} (e.g. 'hopper-medium-v2') or a gymnasium id such as 'Hopper-v4'"
    )


def d4rl_filename(name: str) -> str:
    """Cached file name of a registered dataset: the basename of its URL, as D4RL caches it."""
    return D4RL_URLS[name].rsplit("/", 1)[-1]


def data_dir() -> Path:
    """Where downloaded datasets live: $MISA_FAST_DATA_DIR, else $XDG_CACHE_HOME/misa_fast/datasets,
    else ~/.cache/misa_fast/datasets."""
    if os.environ.get("MISA_FAST_DATA_DIR"):
        return Path(os.environ["MISA_FAST_DATA_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "misa_fast" / "datasets"


def d4rl_cache_dir() -> Path:
    """D4RL's own cache ($D4RL_DATASET_DIR or ~/.d4rl/datasets): files a d4rl install already
    downloaded are reused from there, without importing d4rl (which needs mujoco-py)."""
    return Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()


def env_id_for(dataset_name: str, override: str | None = None) -> str:
    """Gymnasium id on which a dataset's policies are evaluated; ``override`` wins when given."""
    if override:
        return override
    domain = domain_of(dataset_name)
    if domain.name == "antmaze":
        stem = Path(str(dataset_name)).name.lower()
        if is_minari_id(dataset_name):  # D4RL/antmaze/medium-diverse-v1: the size leads the last part
            size = stem.split("-")[0]
        else:
            size = stem.split("-")[1] if "-" in stem else "umaze"
        return ANTMAZE_ENV_IDS.get(size, domain.env_id)
    return domain.env_id
