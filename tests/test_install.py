"""Installing into one checkout again and again: non-editable, editable, non-editable, each into the
same fresh venv, each followed by an import of the compiled extension from outside the checkout;
then the error a user gets importing from the checkout's root.

A build backend that keeps its CMake cache in the checkout breaks the second install (the cache
names the cmake/ninja of the first build's deleted isolated environment); scikit-build-core
configures every build in a fresh directory. The venv sees the outer environment's packages
(torch, numpy, ...) so that only misa-fast itself is installed three times; its own site-packages
comes first on sys.path, so the outer misa_fast cannot answer for it.
"""
import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
LEFTOVERS = ("build", "dist", "runs", ".git", "*.egg-info", "__pycache__", "*.so", ".pytest_cache",
             ".benchmarks", ".hypothesis")

# Prints where the package and the extension came from, and uses the extension once.
PROBE = """
import misa_fast, misa_fast._C
from misa_fast import ReplayBuffer
buf = ReplayBuffer(8, obs_dim=2, act_dim=1, seed=0)
buf.add(observations=[[0, 1]], actions=[[0.5]], rewards=[1.0], next_observations=[[1, 2]], terminals=[0])
assert buf.sample(4)["actions"].shape == (4, 1)
print(misa_fast.__file__)
print(misa_fast._C.__file__)
"""


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_reinstalling_in_one_checkout_keeps_building(tmp_path):
    if not (CHECKOUT / "pyproject.toml").is_file() or not (CHECKOUT / "csrc").is_dir():
        pytest.skip("not run from a source checkout")
    checkout = tmp_path / "misa-fast"
    shutil.copytree(CHECKOUT, checkout, ignore=shutil.ignore_patterns(*LEFTOVERS))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('platlib'))"], tmp_path).strip())

    for editable in (False, True, False):
        run([python, "-m", "pip", "install", "-q", "--no-deps", *(["-e"] if editable else []), "."], checkout)
        package_file, extension_file = run([python, "-c", PROBE], tmp_path).split()
        expected_package = checkout / "misa_fast" if editable else site / "misa_fast"
        assert Path(package_file).parent == expected_package, "installed misa_fast was not the one imported"
        assert Path(extension_file).parent == site / "misa_fast", "the extension is built into site-packages"

    # Nothing of the three builds is left in the checkout (no stale CMake cache to trip on).
    assert not (checkout / "build").exists()
    assert not list((checkout / "misa_fast").glob("_C*"))

    # In the checkout's root, its misa_fast/ (no extension) shadows the installed one: the error
    # says so and what to do, instead of a bare "cannot import name '_C'".
    proc = subprocess.run([python, "-c", "from misa_fast import ReplayBuffer"], cwd=checkout,
                          capture_output=True, text=True, env=clean_env())
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(f"ImportError: misa_fast._C, the compiled C++ replay buffer, is not in "
                              f"{checkout / 'misa_fast'}"), message
    assert f"shadows the installed package in {site}" in message
    assert "PYTHONSAFEPATH=1" in message and "pip install -e ." in message

