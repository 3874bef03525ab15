"""misa_fast.data: D4RL format round trips, qlearning semantics, validation errors, transforms,
normalized scores, Minari directories, the embedded default dataset."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from misa_fast.data import (
    DEFAULT_DATASET,
    DataInfo,
    clip_actions,
    load_dataset,
    normalized_score,
    observation_stats,
    prepare,
    qlearning_dataset,
    transform_rewards,
    validate_dataset,
    write_hdf5,
)
from misa_fast.data.download import default_dataset_path

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def episodes_raw() -> dict:
    """8 rows, three episodes: rows 0-2 end in a terminal, rows 3-5 end by timeout, rows 6-7 are
    cut by the end of the data. Row i holds observation [i, 10 i], action i/10, reward i."""
    n = 8
    obs = np.stack([np.arange(n), 10 * np.arange(n)], axis=1).astype(np.float64)
    next_obs = obs + 0.5  # distinguishable from obs[i + 1]
    terminals = np.zeros(n, bool)
    terminals[2] = True
    timeouts = np.zeros(n, bool)
    timeouts[5] = True
    return {
        "observations": obs, "next_observations": next_obs,
        "actions": (np.arange(n) / 10.0)[:, None].astype(np.float32),
        "rewards": np.arange(n, dtype=np.float32), "terminals": terminals, "timeouts": timeouts,
        "infos/qpos": np.arange(2 * n, dtype=np.float64).reshape(n, 2),
    }


# ----------------------------------------------------------------------------- format round trips
def test_hdf5_round_trip_keeps_arrays_dtypes_and_metadata(tmp_path):
    raw = episodes_raw()
    path = write_hdf5(tmp_path / "d.hdf5", raw, metadata={"env_id": "Hopper-v4", "size": 8, "score": 1.5})
    loaded = load_dataset(path)
    for key, value in raw.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
        assert loaded[key].dtype == value.dtype, key  # float64 observations stay float64
    assert loaded["metadata/env_id"] == "Hopper-v4"
    assert loaded["metadata/size"] == 8 and loaded["metadata/score"] == 1.5
    with h5py.File(path) as f:  # D4RL's layout: nested groups, not "infos/qpos" as a flat name
        assert isinstance(f["infos"], h5py.Group) and isinstance(f["metadata"], h5py.Group)


def test_npz_round_trip(tmp_path):
    raw = episodes_raw()
    np.savez(tmp_path / "d.npz", **raw)
    loaded = load_dataset(tmp_path / "d.npz")
    np.testing.assert_array_equal(loaded["observations"], raw["observations"])
    np.testing.assert_array_equal(loaded["infos/qpos"], raw["infos/qpos"])
    assert loaded["terminals"].dtype == bool and loaded["terminals"][2]


def test_float_terminals_and_column_rewards_are_normalised(tmp_path):
    raw = episodes_raw()
    raw["terminals"] = raw["terminals"].astype(np.float32)  # some D4RL files store 0./1.
    raw["rewards"] = raw["rewards"][:, None]  # and (N, 1) rewards
    loaded = load_dataset(write_hdf5(tmp_path / "d.hdf5", raw))
    assert loaded["terminals"].dtype == bool and loaded["terminals"].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    assert loaded["rewards"].shape == (8,)


# ------------------------------------------------------------------------------ qlearning semantics
def test_qlearning_skips_timeouts_and_last_row_and_uses_next_row():
    q = qlearning_dataset(episodes_raw())
    rows = [0, 1, 2, 3, 4, 6]  # 5 is a timeout (its next row starts a new episode); 7 is last
    np.testing.assert_array_equal(q["observations"][:, 0], rows)
    np.testing.assert_array_equal(q["next_observations"][:, 0], [r + 1 for r in rows])
    np.testing.assert_array_equal(q["next_observations"][:, 1], [10 * (r + 1) for r in rows])
    np.testing.assert_array_equal(q["rewards"], rows)
    np.testing.assert_allclose(q["actions"][:, 0], np.array(rows) / 10.0)
    np.testing.assert_array_equal(q["terminals"], [0, 0, 1, 0, 0, 0])  # dones = terminals only
    assert all(v.dtype == np.float32 for v in q.values())
    assert q["rewards"].shape == (6,) and q["terminals"].shape == (6,)


def test_qlearning_terminate_on_end_keeps_timeout_rows():
    q = qlearning_dataset(episodes_raw(), terminate_on_end=True)
    np.testing.assert_array_equal(q["observations"][:, 0], [0, 1, 2, 3, 4, 5, 6])
    assert q["next_observations"][5, 0] == 6  # D4RL's behaviour: the next row, whatever it is
    np.testing.assert_array_equal(q["terminals"], [0, 0, 1, 0, 0, 0, 0])


def test_qlearning_with_stored_next_observations_keeps_every_row():
    q = qlearning_dataset(episodes_raw(), use_next_observations=True)
    np.testing.assert_array_equal(q["observations"][:, 0], np.arange(8))
    np.testing.assert_array_equal(q["next_observations"][:, 0], np.arange(8) + 0.5)
    np.testing.assert_array_equal(q["terminals"], [0, 0, 1, 0, 0, 0, 0, 0])
    raw = episodes_raw()
    del raw["next_observations"]
    with pytest.raises(ValueError, match="next_observations"):
        qlearning_dataset(raw, use_next_observations=True)


# ------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("key", ["observations", "actions", "rewards", "terminals", "timeouts"])
def test_missing_key_is_named(tmp_path, key):
    raw = episodes_raw()
    del raw[key]
    path = write_hdf5(tmp_path / "d.hdf5", raw)
    with pytest.raises(ValueError, match=f"missing key '{key}'") as err:
        load_dataset(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("rewards", np.zeros(7, np.float32), r"'rewards' has shape \(7,\), expected \(8,\)"),
        ("timeouts", np.zeros(9, bool), r"'timeouts' has shape \(9,\), expected \(8,\)"),
        ("actions", np.zeros((7, 1), np.float32), r"'actions' has 7 rows, expected 8"),
        ("infos/qpos", np.zeros((5, 2)), r"'infos/qpos' has 5 rows, expected 8"),
        ("next_observations", np.zeros((8, 3)), r"'next_observations' has shape \(8, 3\), expected \(8, 2\)"),
        ("actions", np.zeros(8, np.float32), r"'actions' must have shape \(N, width\), got shape \(8,\)"),
        ("observations", np.zeros((8, 2), np.int64), r"'observations' must be a float array, got dtype int64"),
        ("terminals", np.full(8, 2.0), r"'terminals' must hold only 0/1"),
    ],
)
def test_inconsistent_shapes_are_named(key, value, message):
    raw = episodes_raw()
    raw[key] = value
    with pytest.raises(ValueError, match=message):
        validate_dataset(raw, source="x.hdf5")


@pytest.mark.parametrize("key", ["observations", "actions", "rewards", "next_observations"])
def test_non_finite_values_are_named_with_their_row(key):
    raw = episodes_raw()
    raw[key] = raw[key].astype(np.float64)
    raw[key][3] = np.nan if key != "actions" else np.inf
    with pytest.raises(ValueError, match=rf"'{key}' holds non-finite values .* in 1 rows, first at row 3"):
        validate_dataset(raw)


def test_widths_are_checked_against_what_is_expected():
    with pytest.raises(ValueError, match="'observations' has width 2, expected 11"):
        validate_dataset(episodes_raw(), obs_dim=11)
    with pytest.raises(ValueError, match="'actions' has width 1, expected 3"):
        validate_dataset(episodes_raw(), obs_dim=2, act_dim=3)


def test_named_d4rl_dataset_with_wrong_width_is_rejected(tmp_path, monkeypatch):
    # A file cached under hopper-medium-v2's name must have hopper's 11-dim observations.
    monkeypatch.setenv("MISA_FAST_DATA_DIR", str(tmp_path))
    write_hdf5(tmp_path / "hopper_medium-v2.hdf5", episodes_raw())
    with pytest.raises(ValueError, match="'observations' has width 2, expected 11"):
        load_dataset("hopper-medium-v2", download=False)


def test_truncated_hdf5_gives_an_error_naming_the_file(tmp_path):
    path = write_hdf5(tmp_path / "d.hdf5", {k: np.repeat(v, 500, axis=0) for k, v in episodes_raw().items()})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted") as err:
        load_dataset(path)
    assert str(path) in str(err.value)


def test_corrupted_hdf5_data_is_detected(tmp_path):
    rng = np.random.default_rng(0)
    raw = {k: np.repeat(v, 2000, axis=0) for k, v in episodes_raw().items()}
    raw["observations"] = rng.normal(size=raw["observations"].shape)
    path = write_hdf5(tmp_path / "d.hdf5", raw)
    with h5py.File(path) as f:  # overwrite bytes inside the observations' first data chunk
        offset = f["observations"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 100: offset + 164] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupted") as err:  # the checksum catches it
        load_dataset(path)
    assert str(path) in str(err.value)


def test_not_an_hdf5_file_and_missing_file(tmp_path):
    (tmp_path / "d.hdf5").write_text("observations,actions\n1,2\n")
    with pytest.raises(ValueError, match="cannot read this HDF5 file"):
        load_dataset(tmp_path / "d.hdf5")
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        load_dataset(tmp_path / "nope.hdf5")


# ----------------------------------------------------------------------------------------- Minari
def write_minari(root: Path, episodes: list[dict]) -> Path:
    (root / "data").mkdir(parents=True)
    with h5py.File(root / "data" / "main_data.hdf5", "w") as f:
        f.attrs["dataset_id"] = "pendulum/test-v0"
        for i, episode in enumerate(episodes):
            group = f.create_group(f"episode_{i}")
            for key, value in episode.items():
                if isinstance(value, dict):
                    sub = group.create_group(key)
                    for k, v in value.items():
                        sub.create_dataset(k, data=v)
                else:
                    group.create_dataset(key, data=value)
    return root


def minari_episode(steps: int, start: float, terminated: bool) -> dict:
    obs = start + np.arange(steps + 1, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    done = np.zeros(steps, bool)
    return {
        "observations": obs, "actions": np.full((steps, 1), 0.5, np.float32),
        "rewards": np.arange(steps, dtype=np.float64),
        "terminations": np.where(np.arange(steps) == steps - 1, terminated, done),
        "truncations": np.where(np.arange(steps) == steps - 1, not terminated, done),
        "infos": {"qpos": np.arange(steps + 1, dtype=np.float64)[:, None]},
    }


def test_minari_directory_is_flattened_to_d4rl_rows(tmp_path):
    root = write_minari(tmp_path / "ds", [minari_episode(3, 0.0, True), minari_episode(2, 100.0, False)])
    raw = load_dataset(root)
    np.testing.assert_array_equal(raw["observations"][:, 0], [0, 1, 2, 100, 101])
    np.testing.assert_array_equal(raw["next_observations"][:, 0], [1, 2, 3, 101, 102])
    assert raw["terminals"].tolist() == [False, False, True, False, False]
    assert raw["timeouts"].tolist() == [False, False, False, False, True]
    np.testing.assert_array_equal(raw["rewards"], [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(raw["infos/qpos"][:, 0], [0, 1, 2, 0, 1])  # aligned with rows
    assert raw["metadata/dataset_id"] == "pendulum/test-v0"
    q = qlearning_dataset(raw, use_next_observations=True)
    np.testing.assert_array_equal(q["next_observations"][:, 0], [1, 2, 3, 101, 102])


def test_minari_dict_observations_are_concatenated_in_key_order(tmp_path):
    episode = minari_episode(2, 0.0, True)
    episode["observations"] = {"observation": np.zeros((3, 2), np.float32),
                               "achieved_goal": np.ones((3, 1), np.float32)}
    raw = load_dataset(write_minari(tmp_path / "ds", [episode]))
    np.testing.assert_array_equal(raw["observations"], [[1, 0, 0], [1, 0, 0]])


def test_minari_errors_name_the_episode_and_key(tmp_path):
    bad = minari_episode(3, 0.0, True)
    bad["observations"] = bad["observations"][:3]  # one row short
    with pytest.raises(ValueError, match=r"episode_0: 'observations' has 3 rows, expected 4"):
        load_dataset(write_minari(tmp_path / "a", [bad]))
    missing = minari_episode(3, 0.0, True)
    del missing["truncations"]
    with pytest.raises(ValueError, match=r"episode_0: missing key 'truncations'"):
        load_dataset(write_minari(tmp_path / "b", [missing]))
    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match="not a Minari dataset directory"):
        load_dataset(tmp_path / "c")


# ------------------------------------------------------------------------------------- transforms
def test_action_clipping():
    np.testing.assert_allclose(clip_actions(np.array([-1.0, -0.5, 0.9995, 1.0])), [-0.999, -0.5, 0.999, 0.999])


def test_reward_transforms():
    r = np.array([0.0, 1.0, 0.5], np.float32)
    np.testing.assert_allclose(transform_rewards(r, "antmaze")[0], [-2.0, 2.0, 0.0])  # (r - 0.5) * 4
    scaled, params = transform_rewards(np.array([2.0, 4.0, 10.0]), "minmax")  # kitchen / adroit
    np.testing.assert_allclose(scaled, [-1.0, -0.5, 1.0])  # [0, .25, 1] then (x - 0.5) * 2
    assert params == {"min": 2.0, "max": 10.0}
    np.testing.assert_array_equal(transform_rewards(r, "none")[0], r)
    with pytest.raises(ValueError, match="unknown reward transform 'exp'"):
        transform_rewards(r, "exp")


def test_observation_statistics():
    obs = np.array([[0.0, 2.0], [4.0, 6.0]])
    mean, std = observation_stats(obs, "scalar")  # one mean/std over every entry
    np.testing.assert_allclose(mean, [3.0, 3.0])
    np.testing.assert_allclose(std, [np.sqrt(5.0) + 1e-3] * 2, rtol=1e-6)
    mean, std = observation_stats(obs, "per-dim")
    np.testing.assert_allclose(mean, [2.0, 4.0])
    np.testing.assert_allclose(std, [2.001, 2.001], rtol=1e-6)
    assert observation_stats(obs, "none") == (None, None)
    with pytest.raises(ValueError, match="unknown observation normalisation"):
        observation_stats(obs, "minmax")


def test_prepare_applies_the_domain_transforms_and_records_them(tmp_path):
    raw = episodes_raw()
    raw["actions"][:] = 1.0
    raw["rewards"] = (np.arange(8) % 2).astype(np.float32)  # antmaze-style 0/1 rewards
    path = write_hdf5(tmp_path / "antmaze-umaze-v2.hdf5", raw)  # the name tells the domain
    data, info = prepare(path, obs_norm="per-dim")
    rows = np.array([0, 1, 2, 3, 4, 6])
    np.testing.assert_allclose(data["actions"], 0.999)
    np.testing.assert_allclose(data["rewards"], ((rows % 2) - 0.5) * 4)
    mean = np.array([rows.mean(), 10 * rows.mean()])
    std = np.array([rows.std(), 10 * rows.std()]) + 1e-3
    np.testing.assert_allclose(info.obs_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(data["observations"][:, 0], (rows - mean[0]) / std[0], rtol=1e-5)
    np.testing.assert_allclose(data["next_observations"][:, 1], (10 * (rows + 1) - mean[1]) / std[1], rtol=1e-5)
    assert info.reward_transform == "antmaze" and info.env_id == "AntMaze_UMaze-v4"
    assert (info.name, info.n_transitions, info.obs_dim, info.act_dim) == ("antmaze-umaze-v2", 6, 2, 1)
    restored = DataInfo.from_dict(json.loads(json.dumps(info.to_dict())))  # checkpoint-safe
    assert restored == info
    np.testing.assert_allclose(restored.normalize(np.array([[mean[0], 0.0]])), [[0.0, -mean[1] / std[1]]],
                               rtol=1e-6, atol=1e-6)


def test_prepare_uses_recorded_env_and_minmax_for_adroit(tmp_path):
    raw = episodes_raw()
    path = write_hdf5(tmp_path / "pen-human-v1.hdf5", raw, metadata={"env_id": "MyPen-v0"})
    data, info = prepare(path)
    assert info.env_id == "MyPen-v0" and info.reward_transform == "minmax"
    assert info.reward_params == {"min": 0.0, "max": 6.0}  # over the kept transitions
    np.testing.assert_allclose(data["rewards"], (np.array([0, 1, 2, 3, 4, 6]) / 6 - 0.5) * 2, rtol=1e-6)
    assert info.obs_mean is None and info.obs_norm == "none"
    _, info = prepare(path, env_id="Other-v1", reward_transform="none")
    assert info.env_id == "Other-v1" and info.reward_transform == "none"
    with pytest.raises(ValueError, match="pass env_id"):
        prepare(write_hdf5(tmp_path / "mystery.hdf5", raw))


# --------------------------------------------------------------------------------- normalized score
D4RL_REFERENCES = {  # the docs' design page, data conventions
    "hopper-medium-v2": (-20.272305, 3234.3), "halfcheetah-expert-v2": (-280.178953, 12135.0),
    "walker2d-random-v2": (1.629008, 4592.3), "ant-medium-replay-v2": (-325.6, 3879.7),
    "antmaze-large-diverse-v2": (0.0, 1.0), "kitchen-mixed-v0": (0.0, 4.0),
    "pen-human-v1": (96.262799, 3076.8331017826877), "hammer-cloned-v1": (-274.856578, 12794.134825156867),
    "door-expert-v1": (-56.512833, 2880.5693087298737), "relocate-human-v1": (-6.425911, 4233.877797728884),
}


@pytest.mark.parametrize("name", sorted(D4RL_REFERENCES))
def test_normalized_score_matches_d4rl_references(name):
    low, high = D4RL_REFERENCES[name]
    assert normalized_score(name, low) == pytest.approx(0.0, abs=1e-9)
    assert normalized_score(name, high) == pytest.approx(100.0)
    assert normalized_score(name, (low + high) / 2) == pytest.approx(50.0)


def test_normalized_score_by_hand_and_by_env_id():
    assert normalized_score("hopper-medium-v2", 1000.0) == pytest.approx(31.3489, abs=1e-4)  # 100*1020.27/3254.57
    assert normalized_score("Hopper-v4", 1000.0) == normalized_score("hopper-medium-v2", 1000.0)
    scores = normalized_score("kitchen-partial-v0", [[0, 1], [2, 4]])
    np.testing.assert_allclose(scores, [[0, 25], [50, 100]])
    with pytest.raises(KeyError, match="unknown dataset domain"):
        normalized_score("cartpole-v1", 10.0)


# ------------------------------------------------------------------------------- embedded default
def test_default_dataset_ships_small_and_loads():
    path = default_dataset_path()
    assert path.is_file() and path.stat().st_size <= 5 * 1024 * 1024
    raw = load_dataset(DEFAULT_DATASET)
    assert raw["observations"].shape[1] == 3 and raw["actions"].shape[1] == 1
    assert np.abs(raw["actions"]).max() <= 1.0  # stored in [-1, 1] units
    assert raw["metadata/env_id"] == "Pendulum-v1" and "[-1, 1]" in raw["metadata/action_convention"]
    # Pendulum observations are (cos theta, sin theta, theta_dot); qpos/qvel hold theta, theta_dot.
    np.testing.assert_allclose(raw["observations"][:, 0], np.cos(raw["infos/qpos"][:, 0]), atol=1e-5)
    np.testing.assert_allclose(raw["observations"][:, 2], raw["infos/qvel"][:, 0], atol=1e-5)
    data, info = prepare()
    assert info.name == DEFAULT_DATASET and info.env_id == "Pendulum-v1"
    assert info.n_transitions == len(data["rewards"]) > 1000


# ----------------------------------------------------------------------- locally generated MuJoCo data
@pytest.mark.skipif(not (SHARED_DATA / "hopper-medium-replay-local.hdf5").exists(), reason="needs ../shared/data")
def test_shared_hopper_data_follows_d4rl_conventions():
    raw = load_dataset(SHARED_DATA / "hopper-medium-replay-local.hdf5")
    n = len(raw["rewards"])
    q = qlearning_dataset(raw)
    assert len(q["rewards"]) == n - 1 - int(raw["timeouts"][:-1].sum())
    # Where an episode continues, the next row's observation is the stored next observation.
    inside = ~(raw["terminals"] | raw["timeouts"])[:-1]
    np.testing.assert_allclose(raw["observations"][1:][inside], raw["next_observations"][:-1][inside], atol=1e-6)
    _, info = prepare(SHARED_DATA / "hopper-medium-replay-local.hdf5")
    assert info.env_id == "Hopper-v4" and info.name == "hopper-medium-replay-local"
