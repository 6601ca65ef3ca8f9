"""``hf://`` theta sources without internet: offline mode, a dead endpoint, and a Hub stand-in on 127.0.0.1.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_HOME`` when it is imported, so every case
runs ``load_theta`` in a fresh interpreter with its own environment and an empty cache.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import celo2
from celo2.rule.theta import ThetaError
from celo2.theta_files import load_theta, save_theta

pytest.importorskip("huggingface_hub")

SRC = Path(celo2.__file__).resolve().parents[1]
#: Generous for a loaded 2-core CI machine; offline failures take well under a second here.
FAST_S = 10.0

_LOAD = """
import json, sys
from celo2.rule.theta import ThetaError
from celo2.theta_files import load_theta
try:
    theta = load_theta(sys.argv[1])
except ThetaError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({"checksum": theta.checksum()}))
"""


def _load_in_fresh_interpreter(url: str, tmp_path: Path, **env: str) -> tuple[dict, float]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environ.update(PYTHONPATH=str(SRC), HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", **env)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _LOAD, url], env=environ, capture_output=True, text=True, timeout=120
    )
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), elapsed


def _free_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _HubStandIn(http.server.BaseHTTPRequestHandler):
    """Answers ``/{owner}/{repo}/resolve/{revision}/{file}`` as the Hub does for one stored file, 404 otherwise."""

    files: dict[str, bytes] = {}
    commit = "0123456789abcdef0123456789abcdef01234567"

    def _answer(self, body: bool) -> None:
        data = self.files.get(self.path.split("?")[0])
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Error-Message", "Entry not found")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", self.commit)
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub(tmp_path, random_theta):
    """A Hub stand-in on 127.0.0.1 that serves ``owner/celo2/theta.state`` (the random theta)."""
    data = save_theta(random_theta, tmp_path / "served.state").read_bytes()
    _HubStandIn.files = {"/owner/celo2/resolve/main/theta.state": data}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubStandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_offline_mode_fails_at_once_with_how_to_get_the_file(tmp_path):
    result, elapsed = _load_in_fresh_interpreter("hf://amoudgl/celo2", tmp_path, HF_HUB_OFFLINE="1")
    assert elapsed < FAST_S
    assert "HF_HUB_OFFLINE" in result["error"] and "not in the local cache" in result["error"]
    assert "pass its local path" in result["error"]


def test_unreachable_endpoint_fails_fast_without_a_retry_loop(tmp_path):
    endpoint = f"http://127.0.0.1:{_free_port()}"
    result, elapsed = _load_in_fresh_interpreter("hf://amoudgl/celo2", tmp_path, HF_ENDPOINT=endpoint)
    assert elapsed < FAST_S
    assert f"cannot reach {endpoint}" in result["error"] and "pass its local path" in result["error"]


def test_endpoint_that_never_answers_times_out_in_seconds(tmp_path):
    """A socket that accepts connections and never replies stands in for a network that drops packets."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        result, elapsed = _load_in_fresh_interpreter("hf://amoudgl/celo2", tmp_path, HF_ENDPOINT=endpoint)
    assert elapsed < FAST_S + 5  # the request's own 5 s timeout, plus the interpreter's start
    assert f"cannot reach {endpoint}" in result["error"] and "timeout 5 s" in result["error"]


def test_local_hub_serves_the_file_then_the_cache_serves_it_offline(tmp_path, hub, random_theta):
    result, _ = _load_in_fresh_interpreter("hf://owner/celo2", tmp_path, HF_ENDPOINT=hub)
    assert result == {"checksum": random_theta.checksum()}
    # The same cache, the Hub gone: served from the cache, offline mode or not.
    dead = f"http://127.0.0.1:{_free_port()}"
    for env in ({"HF_ENDPOINT": dead}, {"HF_ENDPOINT": dead, "HF_HUB_OFFLINE": "1"}):
        result, elapsed = _load_in_fresh_interpreter("hf://owner/celo2", tmp_path, **env)
        assert result == {"checksum": random_theta.checksum()} and elapsed < FAST_S


def test_missing_file_on_the_hub_is_a_theta_error(tmp_path, hub):
    result, elapsed = _load_in_fresh_interpreter("hf://owner/celo2/nope.state", tmp_path, HF_ENDPOINT=hub)
    assert elapsed < FAST_S
    assert result["error"].startswith("hf://owner/celo2/nope.state: the Hub at")
    assert "404" in result["error"] or "not found" in result["error"].lower()


def test_malformed_url_names_the_expected_form():
    with pytest.raises(ThetaError, match=r"hf://owner/repo\[/file\]"):
        load_theta("hf://just-owner")


@pytest.mark.parametrize("url,bad", [
    ("hf://own er/repo", "'own er'"),
    ("hf://owner/re..po", "'re..po'"),
    ("hf://-owner/repo/theta.state", "'-owner'"),
    ("hf://owner/repo.", "'repo.'"),
    ("hf://owner/repo.git", "ends in .git"),
])
def test_a_bad_repository_id_is_named_as_such_without_asking_the_hub(url, bad, tmp_path):
    # A dead endpoint: were the Hub asked, the message would be about reaching it.
    answer, _ = _load_in_fresh_interpreter(url, tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{_free_port()}")
    error = answer["error"]
    assert "is not a valid Hugging Face repository id" in error and bad in error, error
    assert "cannot reach" not in error


def test_an_empty_revision_is_refused():
    with pytest.raises(ThetaError, match="the revision after '@' is empty"):
        load_theta("hf://owner/repo@")
    with pytest.raises(ThetaError, match="the revision after '@' is empty"):
        load_theta("hf://owner/repo/theta.state@ ")
