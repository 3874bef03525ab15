"""Named D4RL datasets: cache lookup, download with progress/resume/size check/atomic rename, and
the offline error. A small HTTP server on 127.0.0.1 stands in for D4RL's (no real network)."""
from __future__ import annotations

import http.server
import socket
import threading

import numpy as np
import pytest

from misa_fast.data import load_dataset, registry, write_hdf5
from misa_fast.data.download import IncompleteDownloadError, download_file, resolve_dataset


class FakeD4RLServer:
    """Serves one payload; honours "Range: bytes=N-" (206) unless ignore_range; can drop the
    connection after `cut_after` bytes of its next response."""

    def __init__(self, payload: bytes):
        self.payload, self.cut_after, self.ignore_range, self.requests = payload, None, False, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.headers.get("Range"))
                start = 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].rstrip("-"))
                    if start >= len(server.payload):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(server.payload)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                else:
                    self.send_response(200)
                body = server.payload[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after is not None:
                    body, server.cut_after = body[: server.cut_after], None
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hopper_medium-v2.hdf5"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def small_hopper_file(path):
    rng = np.random.default_rng(0)
    n = 300
    raw = {"observations": rng.normal(size=(n, 11)).astype(np.float32),
           "actions": rng.uniform(-1, 1, (n, 3)).astype(np.float32),
           "rewards": rng.normal(size=n).astype(np.float32),
           "terminals": np.zeros(n, bool), "timeouts": np.arange(n) % 100 == 99}
    return write_hdf5(path, raw), raw


@pytest.fixture
def server(tmp_path, monkeypatch):
    path, raw = small_hopper_file(tmp_path / "source.hdf5")
    fake = FakeD4RLServer(path.read_bytes())
    fake.raw = raw
    monkeypatch.setitem(registry.D4RL_URLS, "hopper-medium-v2", fake.url)
    monkeypatch.setenv("MISA_FAST_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl-cache"))
    yield fake
    fake.close()


def test_named_dataset_is_downloaded_once_into_the_cache(server, tmp_path):
    raw = load_dataset("hopper-medium-v2")
    np.testing.assert_array_equal(raw["observations"], server.raw["observations"])
    cached = tmp_path / "cache" / "hopper_medium-v2.hdf5"
    assert cached.read_bytes() == server.payload
    assert not (tmp_path / "cache" / "hopper_medium-v2.hdf5.part").exists()
    load_dataset("hopper-medium-v2")
    assert server.requests == [None]  # the second load used the cache


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    target = tmp_path / "cache" / "hopper_medium-v2.hdf5"
    server.cut_after = 1000
    with pytest.raises(IncompleteDownloadError, match=f"stopped at 1000 of {len(server.payload)} bytes"):
        download_file(server.url, target)
    assert not target.exists()  # nothing half-written under the final name
    assert (tmp_path / "cache" / "hopper_medium-v2.hdf5.part").stat().st_size == 1000
    download_file(server.url, target)
    assert server.requests == [None, "bytes=1000-"]
    assert target.read_bytes() == server.payload


def test_server_ignoring_the_range_restarts_the_download(server, tmp_path):
    target = tmp_path / "cache" / "x.hdf5"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "x.hdf5.part").write_bytes(b"garbage that is not the file")
    server.ignore_range = True
    download_file(server.url, target)
    assert target.read_bytes() == server.payload


def test_complete_part_file_is_finished_without_refetching(server, tmp_path):
    target = tmp_path / "cache" / "x.hdf5"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "x.hdf5.part").write_bytes(server.payload)
    download_file(server.url, target)  # the server answers 416: the range is past the end
    assert server.requests == [f"bytes={len(server.payload)}-"]
    assert target.read_bytes() == server.payload


def test_offline_error_says_which_file_to_place_where(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on: connection refused, as when offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/gym_mujoco_v2/hopper_medium-v2.hdf5"
    monkeypatch.setitem(registry.D4RL_URLS, "hopper-medium-v2", url)
    monkeypatch.setenv("MISA_FAST_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl-cache"))
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("hopper-medium-v2")
    message = str(err.value)
    assert url in message and str(tmp_path / "cache" / "hopper_medium-v2.hdf5") in message
    with pytest.raises(FileNotFoundError, match="downloads are disabled"):
        resolve_dataset("hopper-medium-v2", download=False)


def test_d4rl_cache_is_reused_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("MISA_FAST_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    path, raw = small_hopper_file(tmp_path / "d4rl" / "hopper_medium-v2.hdf5")
    assert resolve_dataset("hopper-medium-v2", download=False) == path
    np.testing.assert_array_equal(load_dataset("hopper-medium-v2")["actions"], raw["actions"])


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MISA_FAST_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.data_dir() == tmp_path / "xdg" / "misa_fast" / "datasets"
    monkeypatch.setenv("MISA_FAST_DATA_DIR", str(tmp_path / "mine"))
    assert registry.data_dir() == tmp_path / "mine"


def test_url_table_follows_d4rl_naming():
    urls = registry.D4RL_URLS
    base = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
    assert urls["hopper-medium-replay-v2"] == f"{base}/gym_mujoco_v2/hopper_medium_replay-v2.hdf5"
    assert urls["ant-full-replay-v2"] == f"{base}/gym_mujoco_v2/ant_full_replay-v2.hdf5"
    assert urls["antmaze-medium-play-v2"] == (
        f"{base}/ant_maze_v2/Ant_maze_big-maze_noisy_multistart_True_multigoal_False_sparse_fixed.hdf5")
    assert urls["antmaze-umaze-v0"] == (
        f"{base}/ant_maze_new/Ant_maze_u-maze_noisy_multistart_False_multigoal_False_sparse.hdf5")
    assert urls["door-cloned-v1"] == f"{base}/hand_dapg_v1/door-cloned-v1.hdf5"
    assert urls["kitchen-complete-v0"] == f"{base}/kitchen/mini_kitchen_microwave_kettle_light_slider-v0.hdf5"
    assert len([k for k in urls if k.endswith("-v2") and not k.startswith("antmaze")]) == 24
    assert registry.d4rl_filename("walker2d-medium-expert-v2") == "walker2d_medium_expert-v2.hdf5"
