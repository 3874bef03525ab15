"""No file acts: an exported policy (``policy.pt2``) is refused, unread and unrun, when torch's
loader would unpickle, execute or evaluate anything in it, or when its graph calls an operator a
misa-fast export never calls (a file reader, an in-place write); a pickled checkpoint's or npz's
refusal never advises the unsafe switch. Each crafted file is made from a real export by
tests/fixtures/make_crafted_files.py, and each test has a control showing the file is live."""
import importlib.util
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from misa_fast.errors import UserError
from misa_fast.training import checkpoint as ckpt

_spec = importlib.util.spec_from_file_location(
    "make_crafted_files", Path(__file__).parents[1] / "fixtures" / "make_crafted_files.py")
crafted = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crafted)


def eval_cli(policy: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "misa_fast.cli", "eval", "--checkpoint", str(policy),
                           "--env", "Pendulum-v1", "--episodes", "1"],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_refusal(proc: subprocess.CompletedProcess, policy: Path) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(policy) in lines[0] and "refused" in lines[0], proc.stderr
    assert "weights_only" not in proc.stderr and "allow_pickle" not in proc.stderr


def torch_loads_and_runs(policy: Path, observations: torch.Tensor) -> torch.Tensor:
    """The control: torch's own loader, unguarded."""
    logging.disable(logging.CRITICAL)  # torch logs its unsafe fallback with a broken format string
    try:
        return torch.export.load(str(policy)).module()(observations)
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("kind", ["misa", "td3"])
@pytest.mark.parametrize("obs_norm", [True, False])
def test_every_policy_this_project_exports_loads(tmp_path, kind, obs_norm):
    policy = crafted.real_policy(tmp_path / "policy.pt2", kind, obs_norm)
    observations = torch.randn(4, crafted.OBS_DIM)
    expected = torch.export.load(str(policy)).module()(observations)
    assert torch.equal(ckpt.load_exported_policy(policy)(observations), expected)


@pytest.mark.parametrize("make", ["pickled_constant", "guard_code", "shape_expression", "sample_inputs"])
def test_an_archive_that_would_run_code_is_refused_unrun(tmp_path, make):
    marker = tmp_path / "MARKER"
    policy = getattr(crafted, f"crafted_{make}")(tmp_path, marker)
    proc = eval_cli(policy, tmp_path)
    assert_one_line_refusal(proc, policy)
    assert not marker.exists()
    with pytest.raises(ckpt.UnsafeCheckpointError):
        ckpt.load_exported_policy(policy)
    assert not marker.exists()
    try:  # the control: torch's own loader runs the payload
        torch_loads_and_runs(policy, torch.zeros(2, crafted.OBS_DIM))
    except Exception:
        pass
    assert marker.exists()


def secret_file(tmp_path: Path) -> tuple[Path, np.ndarray]:
    values = np.array([5.0, -6.0, 7.0], dtype=np.float32)
    path = tmp_path / "secret.bin"
    path.write_bytes(values.tobytes())
    return path, values


def test_an_archive_whose_graph_reads_a_file_is_refused_unread(tmp_path, monkeypatch):
    secret, values = secret_file(tmp_path)
    policy = crafted.crafted_file_reader(tmp_path, secret)
    proc = eval_cli(policy, tmp_path)
    assert_one_line_refusal(proc, policy)
    assert "aten.from_file" in proc.stderr

    opened = []
    real_open = torch.from_file
    monkeypatch.setattr(torch, "from_file", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    with pytest.raises(ckpt.UnsafeCheckpointError, match="from_file"):
        ckpt.load_exported_policy(policy)
    assert not opened
    # The control: torch's loader computes the actions from the file's bytes.
    honest = crafted.real_policy(tmp_path / "honest.pt2")
    leaked = torch_loads_and_runs(policy, torch.zeros(1, crafted.OBS_DIM))
    from_secret = torch.export.load(str(honest)).module()(torch.as_tensor(values)[None] + crafted.OBS_MEAN)
    assert torch.allclose(leaked.flatten(), from_secret.flatten())


def test_the_graph_is_checked_again_after_loading(tmp_path, monkeypatch):
    """Second line: with the archive check skipped, the loaded graph's operators are still vetted
    before anything runs it."""
    secret, _ = secret_file(tmp_path)
    monkeypatch.setattr(ckpt, "_check_archive", lambda path, contents: None)
    with pytest.raises(ckpt.UnsafeCheckpointError, match="from_file"):
        ckpt.load_exported_policy(crafted.crafted_file_reader(tmp_path, secret))
    with pytest.raises(ckpt.UnsafeCheckpointError, match=r"sub_"):
        ckpt.load_exported_policy(crafted.crafted_in_place(tmp_path))


def test_an_archive_whose_graph_writes_in_place_is_refused(tmp_path):
    policy = crafted.crafted_in_place(tmp_path)
    proc = eval_cli(policy, tmp_path)
    assert_one_line_refusal(proc, policy)
    assert "sub_" in proc.stderr
    observations = torch.zeros(2, crafted.OBS_DIM)
    torch_loads_and_runs(policy, observations)  # the control: the caller's observations change
    assert not torch.equal(observations, torch.zeros(2, crafted.OBS_DIM))


def test_an_operator_passed_to_a_region_is_checked_too(tmp_path):
    policy = crafted.crafted_operator_argument(tmp_path)
    with pytest.raises(ckpt.UnsafeCheckpointError, match="operator argument torch.ops.aten.from_file"):
        ckpt.load_exported_policy(policy)


@pytest.mark.parametrize("entry", ["data/aotinductor/model/model.so", "data/weights/model.pt",
                                   "data/constants/custom_obj_0", "extra/notes.txt", "models/other.json"])
def test_entries_torch_would_load_or_unpickle_are_refused(tmp_path, entry):
    policy = crafted.rewrite_archive(crafted.real_policy(tmp_path / "policy.pt2"), lambda name, data: data,
                                     add={entry: b"\x80\x04N."})
    with pytest.raises(ckpt.UnsafeCheckpointError, match=entry.replace(".", r"\.")):
        ckpt.load_exported_policy(policy)


def test_a_non_archive_is_a_user_error_not_a_refusal(tmp_path):
    policy = tmp_path / "policy.pt2"
    policy.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable exported policy") as caught:
        ckpt.load_exported_policy(policy)
    assert not isinstance(caught.value, ckpt.UnsafeCheckpointError)


def test_refusals_are_user_errors():
    assert issubclass(ckpt.UnsafeCheckpointError, UserError) and issubclass(UserError, ValueError)


@pytest.mark.parametrize("layout", ["legacy", "plain"])
def test_a_pickle_checkpoint_refusal_never_advises_the_unsafe_switch(tmp_path, layout):
    marker = tmp_path / "MARKER"
    path = tmp_path / "checkpoint.pt"
    state = {"agent": crafted.ShellPayload(marker)}
    if layout == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(state))
    proc = subprocess.run([sys.executable, "-m", "misa_fast.cli", "eval", "--checkpoint", str(path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and str(path) in proc.stderr
    assert "weights_only" not in proc.stderr and "succeed" not in proc.stderr
    assert not marker.exists()


def test_an_npz_refusal_never_advises_allow_pickle(tmp_path):
    from misa_fast.data.npz import read_npz

    path = tmp_path / "data.npz"
    np.savez(path, observations=np.array([crafted.ShellPayload(tmp_path / "MARKER")], dtype=object))
    with pytest.raises(UserError, match="observations") as caught:
        read_npz(path)
    assert "allow_pickle" not in str(caught.value) and str(path) in str(caught.value)
    assert not (tmp_path / "MARKER").exists()
