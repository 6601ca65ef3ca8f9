"""``celo2 theta push`` against a Hugging Face Hub stand-in on 127.0.0.1.

The stand-in implements the few endpoints huggingface_hub calls for ``create_repo``,
``create_branch`` and ``create_commit`` (README validation, preupload, the NDJSON
commit) and keeps what arrives, so the tests check the files the Hub would hold.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import celo2
from celo2.cli.main import main
from celo2.rule.variant import RuleVariant

pytest.importorskip("huggingface_hub")

TOKEN = "hf_good_token"


class HubStandIn(ThreadingHTTPServer):
    """The repositories (``owner/name`` -> settings) and files (``(repo, branch, path)`` -> bytes) pushed."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, dict] = {}
        self.branches: set[tuple[str, str]] = set()
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.commits: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: HubStandIn

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._send(401, {"error": "Invalid credentials in Authorization header"})
        parts = self.path.split("?")[0].strip("/").split("/")
        hub = self.server
        if parts == ["api", "repos", "create"]:
            request = json.loads(body)
            repo = f"{request['organization']}/{request['name']}"
            if repo in hub.repos:
                return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
            hub.repos[repo] = request
            hub.branches.add((repo, "main"))
            return self._send(200, {"url": f"{hub.url}/{repo}"})
        if parts == ["api", "validate-yaml"]:
            return self._send(200, {"errors": [], "warnings": []})
        if len(parts) >= 6 and parts[:2] == ["api", "models"]:
            repo, action, branch = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            if repo not in hub.repos:
                return self._send(404, {"error": "Repository not found"})
            if action == "branch":
                hub.branches.add((repo, branch))
                return self._send(200, {})
            if (repo, branch) not in hub.branches:
                return self._send(404, {"error": f"Invalid rev id: {branch}"})
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            if action == "commit":
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(item["value"] for item in lines if item["key"] == "header")
                for item in lines:
                    if item["key"] == "file":
                        value = item["value"]
                        assert value["encoding"] == "base64"
                        hub.files[(repo, branch, value["path"])] = base64.b64decode(value["content"])
                oid = hashlib.sha1(body).hexdigest()
                hub.commits.append({"repo": repo, "branch": branch, **header})
                return self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid,
                                        "pullRequestUrl": None})
        return self._send(404, {"error": f"no endpoint {self.path}"})


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = HubStandIn()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _push(capsys, *argv):
    code = main(["theta", "push", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _fingerprint(path):
    return path.read_bytes(), path.stat().st_mtime_ns


def _run_folder(tmp_path, theta):
    run = tmp_path / "run"
    run.mkdir()
    celo2.save_theta(theta, run / "theta.state")
    config = {"preset": "cpu-text", "tasks": ["text-docstrings"], "iterations": 120, "variant": theta.variant.to_dict()}
    (run / "metadata.json").write_text(json.dumps({
        "config": config, "iterations": 120, "inner_steps": 48000, "wall_time_s": 321.5,
        "final_meta_loss": 3.21, "git_commit": "abc1234"}))
    return run


def _bench_report(tmp_path):
    report = tmp_path / "report.md"
    report.write_text("# Bench\n\nFinal validation loss:\n\n| optimizer | mlp | gpt |\n| --- | --- | --- |\n"
                      "| celo2[mine] | 0.301 | 1.350 |\n| muon | 0.297 | 1.356 |\n\n![curves](curves.png)\n")
    return report


def test_push_uploads_the_theta_and_its_card(capsys, tmp_path, hub):
    run = _run_folder(tmp_path, celo2.Theta.init(3))
    before = _fingerprint(run / "theta.state")
    code, out, err = _push(capsys, str(run), "me/celo2-theta", "--token", TOKEN, "--endpoint", hub.url,
                           "--private", "--bench", str(_bench_report(tmp_path)))
    assert code == 0, err
    assert out.strip().startswith(f"{hub.url}/me/celo2-theta/commit/")
    assert hub.repos["me/celo2-theta"]["visibility"] == "private"
    assert hub.files[("me/celo2-theta", "main", "theta.state")] == before[0]  # the bytes as they are
    card = hub.files[("me/celo2-theta", "main", "README.md")].decode()
    assert card.startswith("---\nlibrary_name: celo2\n")
    assert 'celo2.load_theta("hf://me/celo2-theta")' in card
    assert celo2.load_theta(run / "theta.state").checksum() in card
    assert "- outer iterations: 120" in card and "- preset: cpu-text" in card and "abc1234" in card
    assert "| celo2[mine] | 0.301 | 1.350 |" in card and "Final validation loss:" in card
    assert "curves.png" not in card  # only the tables
    assert "the published Celo2 architecture" in card
    assert _fingerprint(run / "theta.state") == before  # the local file is untouched


def test_push_of_a_variant_to_a_branch(capsys, tmp_path, hub):
    variant = RuleVariant(hidden_width=4, output_norm="none")
    path = celo2.save_theta(celo2.Theta.init(1, variant), tmp_path / "mine.npz")
    code, out, err = _push(capsys, str(path), "me/variant", "--revision", "ablation", "--token", TOKEN,
                           "--endpoint", hub.url)
    assert code == 0, err
    arrived = tmp_path / "arrived.npz"
    arrived.write_bytes(hub.files[("me/variant", "ablation", "mine.npz")])
    assert celo2.load_theta(arrived).variant == variant
    card = hub.files[("me/variant", "ablation", "README.md")].decode()
    assert "| hidden_width | 4 | 8 |" in card and "| output_norm | none | rms |" in card
    assert 'celo2.load_theta("hf://me/variant/mine.npz")' in card and "chunked PyTorch backends" in card
    assert "Not recorded" in card  # no run folder given
    # Pushing again to an existing repository commits again.
    assert _push(capsys, str(path), "me/variant", "--token", TOKEN, "--endpoint", hub.url)[0] == 0
    assert len(hub.commits) == 2


def test_refused_credentials_are_named_and_lose_nothing(capsys, tmp_path, hub):
    path = celo2.save_theta(celo2.Theta.init(0), tmp_path / "theta.state")
    before = _fingerprint(path)
    code, _, err = _push(capsys, str(path), "me/x", "--token", "hf_wrong", "--endpoint", hub.url)
    assert code == 2 and "Traceback" not in err
    assert "refused the credentials" in err and "401" in err and "--token" in err and "unchanged" in err
    assert _fingerprint(path) == before and not hub.files


def test_no_network_is_named(capsys, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = celo2.save_theta(celo2.Theta.init(0), tmp_path / "theta.state")
    code, _, err = _push(capsys, str(path), "me/x", "--token", TOKEN, "--endpoint", f"http://127.0.0.1:{port}")
    assert code == 2 and f"cannot reach http://127.0.0.1:{port}" in err and "unchanged" in err


@pytest.mark.parametrize("make, needle", [
    (lambda tmp: (str(tmp / "missing.state"), "me/x"), "theta file not found"),
    (lambda tmp: (str(celo2.save_theta(celo2.Theta.init(0), tmp / "t.state")), "no-owner"), "owner/name"),
    (lambda tmp: (str(celo2.save_theta(celo2.Theta.init(0), tmp / "t.state")), "me/bad--name"),
     "not a valid Hugging Face repository id"),
    (lambda tmp: ((tmp / "t.state").write_bytes(b"\x80junk") and str(tmp / "t.state"), "me/x"), "t.state"),
])
def test_bad_local_input_fails_before_any_upload(capsys, tmp_path, hub, make, needle):
    theta, repo = make(tmp_path)
    code, _, err = _push(capsys, theta, repo, "--token", TOKEN, "--endpoint", hub.url)
    assert code == 2 and needle in err and "Traceback" not in err
    assert not hub.repos


def test_bad_run_metadata_and_report_are_named(capsys, tmp_path, hub):
    path = celo2.save_theta(celo2.Theta.init(0), tmp_path / "theta.state")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metadata.json").write_text("[1, 2")
    code, _, err = _push(capsys, str(path), "me/x", "--run", str(tmp_path / "run"), "--token", TOKEN,
                         "--endpoint", hub.url)
    assert code == 2 and "metadata.json: malformed run metadata" in err
    (tmp_path / "plain.md").write_text("no tables here\n")
    code, _, err = _push(capsys, str(path), "me/x", "--bench", str(tmp_path / "plain.md"), "--token", TOKEN,
                         "--endpoint", hub.url)
    assert code == 2 and "plain.md: no Markdown table" in err and not hub.repos


def test_missing_huggingface_hub_names_the_install(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    path = celo2.save_theta(celo2.Theta.init(0), tmp_path / "theta.state")
    code, _, err = _push(capsys, str(path), "me/x")
    assert code == 2 and "pip install huggingface_hub" in err
