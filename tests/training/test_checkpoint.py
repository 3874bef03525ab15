"""Loading a file never runs code from it: checkpoints (eval, train --resume, finetune, Python
callers) and exported policies are read weights-only; a release's checkpoint still loads and
resumes bit-identically; what misa-fast writes holds nothing but tensors and plain values."""
import hashlib
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from misa_fast.cli import main
from misa_fast.training import checkpoint as ckpt
from misa_fast.training.loop import RunConfig, train

FIXTURE = Path(__file__).parents[1] / "fixtures" / "release-0.1.0-run"
# Written by misa-fast 0.1.0 (numpy arrays and numpy's legacy RNG tuple inside): 10 steps of MISA
# on the embedded dataset with the settings below.
RELEASE_OVERRIDES = ("policy_hidden=32,32", "critic_hidden=32,32", "num_samples=4", "batch_size=32",
                     "hmc_burn_in=1")


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def parameter_digest(agent_state: dict) -> str:
    digest = hashlib.sha256()

    def walk(prefix, value):
        if isinstance(value, dict):
            for key in sorted(value):
                walk(f"{prefix}.{key}", value[key])
        elif torch.is_tensor(value):
            digest.update(prefix.encode())
            digest.update(value.detach().contiguous().numpy().tobytes())

    for key in ("policy", "critic", "target_critic", "log_alpha", "log_alpha_prime", "hmc_log_step_size"):
        walk(key, agent_state[key])
    return digest.hexdigest()


def release_run(tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    return run


def plant(run: Path, where: str, marker: Path) -> None:
    """Replaces the run's checkpoint by one carrying the payload at ``where``."""
    state = ckpt.load(run)
    if where == "top":
        state["run"] = Payload(marker)
    elif where == "nested":
        state["agent"]["policy"] = {"layers": [{"weight": Payload(marker)}]}
    elif where == "optimizer":
        first = next(iter(state["agent"]["optimizers"]["critic"]["state"]))
        state["agent"]["optimizers"]["critic"]["state"][first]["exp_avg"] = Payload(marker)
    torch.save(state, run / ckpt.CHECKPOINT_NAME)


def test_the_payload_is_live(tmp_path):
    """Without the weights-only rule, the planted file runs its command: the tests below can fail."""
    marker = tmp_path / "PWNED"
    run = release_run(tmp_path)
    plant(run, "nested", marker)
    torch.load(run / ckpt.CHECKPOINT_NAME, weights_only=False)
    assert marker.exists()


COMMANDS = {
    "eval": lambda run, tmp: ["eval", "--checkpoint", str(run), "--episodes", "1"],
    "train-resume": lambda run, tmp: ["train", "--out", str(run), "--resume", "--steps", "20", "--no-progress",
                                      "--no-tensorboard"],
    "finetune": lambda run, tmp: ["finetune", "--checkpoint", str(run), "--out", str(tmp / "ft"), "--steps", "5",
                                  "--no-progress", "--no-tensorboard"],
}


@pytest.mark.parametrize("where", ["top", "nested", "optimizer"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_commands_refuse_a_checkpoint_that_would_run_code(tmp_path, capsys, command, where):
    marker = tmp_path / "PWNED"
    run = release_run(tmp_path)
    plant(run, where, marker)
    code = main(COMMANDS[command](run, tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert not marker.exists()
    refusal = [line for line in err if "never holds" in line]
    assert len(refusal) == 1 and str(run / ckpt.CHECKPOINT_NAME) in refusal[0], err
    assert "posix.system" in refusal[0] or "os.system" in refusal[0]


def test_the_refusal_is_one_line_without_a_traceback(tmp_path):
    marker = tmp_path / "PWNED"
    run = release_run(tmp_path)
    plant(run, "top", marker)
    proc = subprocess.run([sys.executable, "-m", "misa_fast.cli", "eval", "--checkpoint", str(run)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert not marker.exists()
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "never holds" in proc.stderr


def test_python_callers_get_the_refusal_as_an_exception(tmp_path):
    marker = tmp_path / "PWNED"
    run = release_run(tmp_path)
    plant(run, "optimizer", marker)
    with pytest.raises(ckpt.UnsafeCheckpointError, match="never holds"):
        ckpt.load(run)
    assert issubclass(ckpt.UnsafeCheckpointError, ValueError)
    assert not marker.exists()


def test_an_environment_id_from_a_file_imports_no_module(tmp_path, capsys):
    run = release_run(tmp_path)
    state = ckpt.load(run)
    state["data_info"]["env_id"] = "this:Pendulum-v1"  # importing `this` prints; any module would run
    ckpt.save_atomic(state, run / ckpt.CHECKPOINT_NAME)
    assert main(["eval", "--checkpoint", str(run), "--episodes", "1"]) == 2
    assert "would import the module 'this'" in capsys.readouterr().err
    assert "this" not in sys.modules


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated"])
def test_truncated_or_foreign_files_get_a_clear_error(tmp_path, capsys, content):
    run = release_run(tmp_path)
    path = run / ckpt.CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:5000] if content == "truncated" else content)
    assert main(["eval", "--checkpoint", str(run), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "not a readable misa-fast checkpoint" in err and str(path) in err


def test_a_release_checkpoint_loads_and_resumes_bit_identically(tmp_path):
    """Resumed straight to step 20, or to 15 and then to 20, the release's run ends with the same
    parameters. (The parameters themselves depend on the CPU's matrix kernels, so they are compared
    between two resumes on this machine rather than with a digest recorded on another.)"""
    state = ckpt.load(FIXTURE)
    assert state["step"] == 10 and isinstance(state["rng"]["numpy"], tuple)  # the release's layout

    def resume(run, steps):
        return train(RunConfig(steps=steps, out=str(run), eval_every=5, eval_episodes=1, log_every=5,
                               checkpoint_every=5, overrides=RELEASE_OVERRIDES, progress=False, tensorboard=False,
                               device="cpu", resume=True))

    straight = release_run(tmp_path / "straight")
    assert resume(straight, 20)["steps"] == 20
    split = release_run(tmp_path / "split")
    resume(split, 15)
    assert resume(split, 20)["steps"] == 20
    assert parameter_digest(ckpt.load(straight)["agent"]) == parameter_digest(ckpt.load(split)["agent"])


@pytest.mark.parametrize("algo", ["misa", "td3bc"])
def test_new_checkpoints_hold_only_tensors_and_plain_values(tmp_path, algo):
    out = tmp_path / algo
    train(RunConfig(algo=algo, steps=10, out=str(out), eval_every=10, eval_episodes=1, log_every=10,
                    overrides=RELEASE_OVERRIDES if algo == "misa" else ("actor_hidden=16,16", "critic_hidden=16,16"),
                    progress=False, tensorboard=False, device="cpu"))
    path = out / ckpt.CHECKPOINT_NAME
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    plain = torch.load(path, weights_only=True)  # no allow-list needed
    assert isinstance(plain["sampler"]["rng_state"][ckpt.NUMPY_TAG], torch.Tensor)
    state = ckpt.load(path)
    assert state["sampler"]["rng_state"].dtype == np.uint64  # numpy again for the code that reads it
    code = main(["finetune", "--checkpoint", str(out), "--out", str(tmp_path / "ft"), "--steps", "3",
                 "--eval-every", "3", "--eval-episodes", "1", "--no-progress", "--no-tensorboard"])
    assert code == 0
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "ft" / ckpt.CHECKPOINT_NAME)) == []


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    np.random.seed(3)
    torch.manual_seed(3)
    ckpt.save_atomic({"rng": ckpt.rng_state()}, tmp_path / "rng.pt")
    expected = (np.random.rand(4), torch.rand(4))
    np.random.seed(99)
    torch.manual_seed(99)
    ckpt.set_rng_state(ckpt.load(tmp_path / "rng.pt")["rng"])
    again = (np.random.rand(4), torch.rand(4))
    assert np.array_equal(expected[0], again[0]) and torch.equal(expected[1], again[1])


def test_saving_an_object_that_could_not_be_loaded_safely_fails_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\.extra\.thing: a .*Payload cannot be stored"):
        ckpt.save_atomic({"extra": {"thing": Payload(tmp_path / "x")}}, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()


def rewrite_archive(path: Path, replace) -> None:
    """Rewrites a .pt2 zip, passing each entry's (name, bytes) through ``replace``."""
    with zipfile.ZipFile(path) as old:
        entries = [(info, old.read(info.filename)) for info in old.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as new:
        for info, data in entries:
            new.writestr(info, replace(info.filename, data))


def pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("where", ["sample_inputs", "pickled_weight"])
def test_an_exported_policy_that_would_run_code_is_refused(tmp_path, capsys, where):
    marker = tmp_path / "PWNED"
    policy = tmp_path / ckpt.POLICY_NAME
    shutil.copy(FIXTURE.parent / "release-0.1.0-policy.pt2", policy)

    def replace(name: str, data: bytes) -> bytes:
        if where == "sample_inputs" and name.endswith("data/sample_inputs/model.pt"):
            return pickled((Payload(marker),))
        if where == "pickled_weight" and name.endswith("model_weights_config.json"):
            return data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
        if where == "pickled_weight" and name.endswith("data/weights/weight_0"):
            return pickled(Payload(marker))
        return data

    rewrite_archive(policy, replace)
    code = main(["eval", "--checkpoint", str(policy), "--env", "Pendulum-v1", "--episodes", "1"])
    assert code == 2 and not marker.exists()
    assert "refused" in capsys.readouterr().err
    try:  # the control: torch's own loader runs the payload
        torch.export.load(str(policy))
    except Exception:
        pass
    assert marker.exists()


def test_an_exported_policy_still_loads_and_acts(tmp_path):
    module = ckpt.load_exported_policy(FIXTURE.parent / "release-0.1.0-policy.pt2")
    actions = module(torch.zeros(3, 3))
    assert actions.shape == (3, 1) and torch.all(actions.abs() <= 1)

