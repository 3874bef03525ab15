"""Data that contradicts itself is refused, not guessed: a name field that does not fit the data,
actions outside [-1, 1] beyond rounding (unless rescaled on request), zero-width arrays, HDF5
files whose arrays live in other files, Minari metadata that is not an object of fields or whose
bounds and reference scores are not finite and ordered. HDF5 keys are read only when used. Each
file is made by tests/fixtures/make_crafted_files.py; each refusal names the file and the field."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from misa_fast.data import load_dataset, prepare
from misa_fast.data.errors import DataError, UnsafeDataError
from misa_fast.errors import UserError

_spec = importlib.util.spec_from_file_location(
    "make_crafted_files", Path(__file__).parents[1] / "fixtures" / "make_crafted_files.py")
crafted = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crafted)


@pytest.fixture
def reads(monkeypatch):
    """The HDF5 datasets read while the test runs, by name."""
    names = []
    real_getitem = h5py.Dataset.__getitem__

    def recording_getitem(self, *args, **kwargs):
        names.append(self.name)
        return real_getitem(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording_getitem)
    return names


def train_cli(dataset: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "misa_fast.cli", "train", "--dataset", str(dataset), "--steps", "1",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path, timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_data_errors_are_user_errors():
    assert issubclass(UnsafeDataError, DataError) and issubclass(DataError, UserError)


# ------------------------------------------------------------------------------ the name field
def test_a_name_field_that_does_not_fit_the_data_is_refused(tmp_path):
    path = crafted.mislabelled_dataset(tmp_path)
    with pytest.raises(DataError, match=r"name field 'antmaze-umaze-v2'.*actions have width 3 where antmaze's have 8"):
        prepare(path)
    # The control: the same data under a name that fits it trains as a hopper dataset.
    fitting = crafted.write_dataset(tmp_path / "fits.hdf5", crafted.dataset_arrays(),
                                    {"dataset_name": "hopper-medium-v2"})
    _, info = prepare(fitting)
    assert info.name == "hopper-medium-v2" and info.env_id == "Hopper-v4"


def test_a_name_field_that_contradicts_the_recorded_environment_is_refused(tmp_path):
    path = crafted.write_dataset(tmp_path / "d.hdf5", crafted.dataset_arrays(),
                                 {"dataset_name": "hopper-medium-v2", "env_id": "Walker2d-v4"})
    with pytest.raises(DataError, match=r"d\.hdf5: its name field 'hopper-medium-v2'.*Walker2d-v4 \(walker2d\)"):
        prepare(path)


def test_a_name_field_with_the_wrong_observation_width_is_refused(tmp_path):
    arrays = crafted.dataset_arrays(obs_dim=5)
    path = crafted.write_dataset(tmp_path / "d.hdf5", arrays, {"dataset_name": "hopper-medium-v2"})
    with pytest.raises(DataError, match="observations have width 5 where hopper's have 11"):
        prepare(path)


def test_cli_refuses_a_mislabelled_dataset_in_one_line(tmp_path):
    path = crafted.mislabelled_dataset(tmp_path)
    assert_one_line(train_cli(path, tmp_path), str(path), "antmaze-umaze-v2")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------ action range
def test_actions_outside_the_unit_box_are_refused_with_a_count(tmp_path):
    path = crafted.scaled_actions_dataset(tmp_path)
    with pytest.raises(DataError) as caught:
        prepare(path, env_id="Hopper-v4")
    message = str(caught.value)
    assert str(path) in message and "'actions'" in message
    count, total = map(int, re.search(r"(\d+) of (\d+) actions are outside \[-1, 1\]", message).groups())
    actions = crafted.dataset_arrays()["actions"] * 50
    kept = np.ones(len(actions), bool)
    kept[9::10] = False  # timeouts (and the last row) are no transitions
    assert total == kept.sum() and count == (np.abs(actions[kept]) > 1.001).any(axis=1).sum()
    assert "rescale" in message


def test_rescaling_on_request_says_how_many_and_records_the_divisors(tmp_path, capsys):
    path = crafted.scaled_actions_dataset(tmp_path)
    data, info = prepare(path, env_id="Hopper-v4", rescale_actions=True)
    assert np.abs(data["actions"]).max() <= 0.999 + 1e-7
    assert info.action_scale is not None and len(info.action_scale) == 3 and min(info.action_scale) > 40
    note = capsys.readouterr().err
    assert "of 36 actions were outside [-1, 1]; rescaled" in note and str(path) in note


def test_rounding_past_the_bounds_is_only_clipped(tmp_path):
    arrays = crafted.dataset_arrays()
    arrays["actions"][0, 0] = 1.0005
    data, info = prepare(crafted.write_dataset(tmp_path / "d.hdf5", arrays), env_id="Hopper-v4")
    assert data["actions"].max() <= 0.999 + 1e-7 and info.action_scale is None


def test_cli_refuses_actions_out_of_range_in_one_line(tmp_path):
    path = crafted.scaled_actions_dataset(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "misa_fast.cli", "train", "--dataset", str(path), "--env",
                           "Hopper-v4", "--steps", "1", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert_one_line(proc, str(path), "outside [-1, 1]")


# ------------------------------------------------------------------------------ zero widths
@pytest.mark.parametrize("key", ["observations", "actions"])
def test_zero_width_arrays_are_refused_naming_the_key(tmp_path, key):
    path = crafted.zero_width_dataset(tmp_path, key)
    with pytest.raises(DataError, match=rf"zero-width-{key}\.hdf5: '{key}' has width 0"):
        load_dataset(path)


def test_cli_refuses_zero_width_in_one_line(tmp_path):
    path = crafted.zero_width_dataset(tmp_path, "actions")
    assert_one_line(train_cli(path, tmp_path), str(path), "'actions' has width 0")


# ------------------------------------------------------------------------------ HDF5 storage
def test_external_storage_is_refused_unread(tmp_path, reads):
    secret = tmp_path / "secret.bin"
    path = crafted.external_storage_dataset(tmp_path, secret)
    with pytest.raises(UnsafeDataError, match=rf"{re.escape(str(path))}: refused: 'observations' is stored in "
                                              rf"another file \({re.escape(str(secret))}\)"):
        load_dataset(path)
    assert reads == []
    with h5py.File(path) as f:  # the control: h5py reads the other file's bytes as observations
        leaked = f["observations"][()]
    assert leaked.tobytes() == secret.read_bytes()[:leaked.nbytes]


def test_virtual_datasets_are_refused_unread(tmp_path, reads):
    path = crafted.virtual_dataset(tmp_path)
    with pytest.raises(UnsafeDataError, match="'observations' is a virtual dataset"):
        load_dataset(path)
    assert reads == []


def test_links_into_other_files_are_refused_unread(tmp_path, reads):
    path = crafted.external_link_dataset(tmp_path)
    with pytest.raises(UnsafeDataError, match=r"'observations' is a link into another file \(.*linked-other\.hdf5\)"):
        load_dataset(path)
    assert reads == []


def test_cli_refuses_external_storage_in_one_line(tmp_path):
    path = crafted.external_storage_dataset(tmp_path, tmp_path / "secret.bin")
    assert_one_line(train_cli(path, tmp_path), str(path), "refused", "observations")


def test_keys_are_read_only_when_used(tmp_path, reads):
    """A declared 1 TB dataset nobody uses costs nothing: load and prepare never read it."""
    path = crafted.huge_unused_key_dataset(tmp_path)
    raw = load_dataset(path)
    assert "unused/huge" in raw
    data, _ = prepare(path, env_id="Hopper-v4")
    assert len(data["rewards"]) == 36
    assert "/unused/huge" not in reads and "/observations" in reads


def test_npz_arrays_are_read_only_when_used(tmp_path, monkeypatch):
    arrays = {**crafted.dataset_arrays(), "unused": np.zeros(1 << 20, dtype=np.uint8)}
    path = tmp_path / "d.npz"
    np.savez_compressed(path, **arrays)
    read = []
    real_getitem = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__",
                        lambda self, key: read.append(key) or real_getitem(self, key))
    raw = load_dataset(path)
    assert "unused" in raw and raw.shape("unused") == (1 << 20,)
    prepare(path, env_id="Hopper-v4")
    assert "unused" not in read and "observations" in read


# ------------------------------------------------------------------------------ Minari metadata
@pytest.mark.parametrize("metadata, words", [
    (["not", "fields"], "not a list"),
    ('"a string"', "not a str"),
    (crafted.nested_metadata(), "nested too deeply"),
])
def test_minari_metadata_that_is_not_an_object_is_refused(tmp_path, metadata, words):
    root = crafted.minari_dataset(tmp_path, metadata)
    with pytest.raises(DataError, match=rf"{re.escape(str(root / 'data' / 'metadata.json'))}: .*{words}"):
        load_dataset(root)


def test_a_deeply_nested_space_field_is_refused(tmp_path):
    metadata = crafted.minari_metadata()
    metadata["action_space"] = crafted.nested_metadata()
    with pytest.raises(DataError, match="'action_space' is nested too deeply"):
        load_dataset(crafted.minari_dataset(tmp_path, metadata))


@pytest.mark.parametrize("bounds, words", [
    ((2.0, -2.0), "not ordered"),
    ((1.0, 1.0), "not ordered"),
    ((-float("inf"), 2.0), "not finite"),
    ((float("nan"), 2.0), "not finite"),
])
def test_minari_action_bounds_that_are_not_finite_and_ordered_are_refused(tmp_path, bounds, words):
    root = crafted.minari_dataset(tmp_path, crafted.minari_metadata(*bounds))
    with pytest.raises(DataError, match=rf"metadata\.json: .*action space's bounds are {words}"):
        load_dataset(root)


@pytest.mark.parametrize("references", [(100.0, 100.0), (200.0, 100.0), (float("nan"), 1.0), (0.0, float("inf")),
                                        ("low", 1.0)])
def test_minari_reference_scores_that_are_not_finite_and_ordered_are_refused(tmp_path, references):
    root = crafted.minari_dataset(tmp_path, crafted.minari_metadata(ref_min=references[0], ref_max=references[1]))
    with pytest.raises(DataError, match=r"metadata\.json: metadata fields 'ref_min_score'"):
        load_dataset(root)


def test_minari_control_dataset_loads_with_its_bounds_and_references(tmp_path):
    root = crafted.minari_dataset(tmp_path, crafted.minari_metadata())
    raw = load_dataset(root)
    assert np.abs(raw["actions"]).max() <= 1.0
    assert (raw["metadata/ref_min_score"], raw["metadata/ref_max_score"]) == (-1200.0, -150.0)
    assert raw["metadata/env_id"] == "Pendulum-v1"


def test_minari_spaces_the_episodes_contradict_are_refused(tmp_path):
    metadata = crafted.minari_metadata()
    metadata["action_space"] = json.dumps({"type": "Box", "dtype": "float32", "shape": [2], "low": [-2.0, -2.0],
                                           "high": [2.0, 2.0]})
    with pytest.raises(DataError, match=r"action space has shape \(2,\), but the episodes' actions have width 1"):
        load_dataset(crafted.minari_dataset(tmp_path, metadata))


def test_cli_refuses_bad_minari_metadata_in_one_line(tmp_path):
    root = crafted.minari_dataset(tmp_path, ["a", "list"])
    assert_one_line(train_cli(root, tmp_path), str(root / "data" / "metadata.json"), "not a list")
    root = crafted.minari_dataset(tmp_path, crafted.minari_metadata(low=2.0, high=-2.0), "bounds")
    assert_one_line(train_cli(root, tmp_path), "not ordered")
