"""download_dataset against a local http.server on 127.0.0.1 serving files the tests make (never the internet)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest

import celo2.data.download as dl
from celo2.data import DownloadError, download_dataset, load_images

from celo2_data_makers import idx_bytes, write_cifar, write_mnist_like, write_svhn


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; records requests; under /truncated/ it promises more bytes than it sends."""

    requests: list[str] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        if self.path.startswith("/truncated/"):
            body = (Path(self.directory) / self.path.split("/", 2)[2]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 1000))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """A server for ``tmp_path / 'srv'``; yields (base URL, served folder, request log); always stopped."""
    served = tmp_path / "srv"
    served.mkdir()
    handler = type("H", (_Handler,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", served, handler.requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _short_timeout(monkeypatch):
    monkeypatch.setattr(dl, "TIMEOUT_S", 5.0)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".part")


def test_mnist_download_then_load_and_skip_present(server, tmp_path):
    url, served, requests = server
    written = write_mnist_like(served, n_train=12, n_test=5)
    root = tmp_path / "data"
    out = download_dataset("mnist", root, base_url=url, progress=False)
    assert out == root / "mnist"
    assert sorted(p.name for p in out.iterdir()) == sorted(dl.SOURCES["mnist"].files)
    x, y = load_images("mnist", "test", root=root)
    np.testing.assert_allclose(x * 255, written["t10k"][0], atol=1e-4)
    assert len(requests) == 4
    download_dataset("mnist", root, base_url=url, progress=False)
    assert len(requests) == 4  # everything present: nothing fetched again


def test_mirror_fallback_and_progress_output(server, tmp_path, capsys):
    url, served, requests = server
    write_mnist_like(served / "fashion")
    root = tmp_path / "data"
    download_dataset("fashion-mnist", root, base_url=[url + "nothing-here/", url + "fashion/"], progress=True)
    assert load_images("fashion-mnist", root=root)[0].shape == (12, 28, 28)
    assert any(r.startswith("/nothing-here/") for r in requests)
    assert "downloading " + url in capsys.readouterr().err


def test_malformed_download_is_rejected_and_leaves_nothing(server, tmp_path):
    url, served, _ = server
    write_mnist_like(served)
    (served / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8))))  # labels
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match=r"t10k-images-idx3-ubyte.gz.*0x00000801"):
        download_dataset("mnist", root, base_url=url, progress=False)
    assert not (root / "mnist" / "t10k-images-idx3-ubyte.gz").exists()
    assert _leftovers(root) == []
    (served / "t10k-images-idx3-ubyte.gz").write_bytes(b"<html>not found</html>")
    with pytest.raises(DownloadError, match="t10k-images-idx3-ubyte.gz"):
        download_dataset("mnist", root, base_url=url, progress=False)
    assert _leftovers(root) == []


def test_truncated_transfer_is_detected(server, tmp_path):
    url, served, _ = server
    write_mnist_like(served)
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match="train-images-idx3-ubyte.gz"):
        download_dataset("mnist", root, base_url=url + "truncated/", progress=False)
    assert not (root / "mnist" / "train-images-idx3-ubyte.gz").exists()
    assert _leftovers(root) == []


def test_default_sources_verify_md5(server, tmp_path, monkeypatch):
    url, served, _ = server
    write_mnist_like(served)
    good = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()}
    monkeypatch.setitem(dl.SOURCES, "mnist", dl.Source((url,), good))
    download_dataset("mnist", tmp_path / "ok", progress=False)
    assert load_images("mnist", root=tmp_path / "ok")[0].shape == (12, 28, 28)
    bad = dict(good, **{"train-labels-idx1-ubyte.gz": "0" * 32})
    monkeypatch.setitem(dl.SOURCES, "mnist", dl.Source((url,), bad))
    with pytest.raises(DownloadError, match=r"train-labels-idx1-ubyte.gz.*MD5"):
        download_dataset("mnist", tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad" / "mnist" / "train-labels-idx1-ubyte.gz").exists()


def _cifar_archive(folder: Path, tmp_path: Path, evil: bool = False) -> dict:
    written = write_cifar(tmp_path / "stage" / "cifar-10-batches-py", n_per_batch=2)
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "stage" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        if evil:
            payload = b"escaped"
            info = tarfile.TarInfo("../escaped.txt")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return written


def test_cifar_download_extracts_safely(server, tmp_path):
    url, served, _ = server
    written = _cifar_archive(served, tmp_path, evil=True)
    root = tmp_path / "data"
    out = download_dataset("cifar10", root, base_url=url, progress=False)
    assert out == root / "cifar10"
    assert not (out / "cifar-10-python.tar.gz").exists()  # archive removed once unpacked
    assert not (root / "escaped.txt").exists() and not (out / "escaped.txt").exists()
    x, y = load_images("cifar10", "test", root=root)
    np.testing.assert_allclose(x * 255, written["test_batch"][0], atol=1e-4)
    assert load_images("cifar10", "train", root=root)[0].shape == (10, 32, 32, 3)
    assert _leftovers(root) == []


def test_cifar_archive_without_batches_is_rejected(server, tmp_path):
    url, served, _ = server
    with tarfile.open(served / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("readme.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DownloadError, match=r"cifar-10-python.tar.gz.*data_batch_1"):
        download_dataset("cifar10", tmp_path / "data", base_url=url, progress=False)


def test_svhn_download(server, tmp_path):
    url, served, _ = server
    images, digits = write_svhn(served, "train", n=11)
    write_svhn(served, "test", n=4)
    root = tmp_path / "data"
    download_dataset("svhn", root, base_url=url, progress=False)
    x, y = load_images("svhn", root=root)
    assert x.shape == (11, 32, 32, 3) and y.tolist() == digits.tolist()


def test_download_rejects_builtin_and_unknown(tmp_path):
    with pytest.raises(ValueError, match="built in"):
        download_dataset("digits", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        download_dataset("imagenet", tmp_path)
