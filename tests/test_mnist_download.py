"""full_mnist against a local HTTP server on 127.0.0.1 serving small fake IDX files."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import socket
import struct
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

from diffgen import mnist_download
from diffgen.errors import DiffgenError

IMAGES, LABELS = mnist_download.TRAIN_FILES
N, H, W = 6, 4, 5
REAL_SHA256 = dict(mnist_download.SHA256)  # taken before the fixture patches the table


def fake_idx() -> dict[str, bytes]:
    """Small decompressed IDX files with the real MNIST headers' layout."""
    pixels = bytes(range(N * H * W))
    labels = bytes([3, 1, 4, 1, 5, 9])
    return {IMAGES: struct.pack(">iiii", 2051, N, H, W) + pixels,
            LABELS: struct.pack(">ii", 2049, N) + labels}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    """An http.server on 127.0.0.1 (port 0) in a thread, counting the GET requests it gets."""

    def __init__(self, directory: Path) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mnist/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Fake checksums, no proxies, no user cache or mirror from the environment."""
    data = fake_idx()
    monkeypatch.setattr(mnist_download, "SHA256", {k: sha256(v) for k, v in data.items()})
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                "ALL_PROXY", "DIFFGEN_CACHE", "DIFFGEN_MNIST_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    return data


def serve(tmp_path: Path, files: dict[str, bytes]) -> Server:
    """Write ``files`` gzipped under tmp_path/www/mnist/ and serve tmp_path/www."""
    folder = tmp_path / "www" / "mnist"
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(content))
    return Server(tmp_path / "www")


@pytest.fixture
def server(tmp_path: Path, isolated: dict[str, bytes]):
    srv = serve(tmp_path, isolated)
    yield srv
    srv.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


def check_fake(data) -> None:
    assert data.images.shape == (N, 1, H, W)
    assert data.images.dtype == torch.uint8
    assert data.images.flatten().tolist() == list(range(N * H * W))
    assert data.labels.dtype == torch.int64
    assert data.labels.tolist() == [3, 1, 4, 1, 5, 9]
    assert data.class_names == [str(i) for i in range(10)]


def test_download_verifies_and_caches(tmp_path: Path, server: Server) -> None:
    cache = tmp_path / "cache"
    check_fake(mnist_download.full_mnist(cache, server.url))
    assert sorted(server.requests) == [f"/mnist/{IMAGES}.gz", f"/mnist/{LABELS}.gz"]
    assert sorted(p.name for p in cache.iterdir()) == [f"{IMAGES}.gz", f"{LABELS}.gz"]
    check_fake(mnist_download.full_mnist(cache, server.url))
    assert len(server.requests) == 2  # the second call used the cache


def test_hand_placed_decompressed_files_need_no_network(
        tmp_path: Path, isolated: dict[str, bytes]) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, content in isolated.items():
        (cache / name).write_bytes(content)
    (cache / "t10k-images-idx3-ubyte.gz").write_bytes(b"the test split is not needed")
    check_fake(mnist_download.full_mnist(cache, closed_port_url()))


def test_environment_variables(tmp_path: Path, server: Server,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFGEN_CACHE", str(tmp_path / "envcache"))
    monkeypatch.setenv("DIFFGEN_MNIST_URL", server.url)
    assert mnist_download.default_cache_dir() == tmp_path / "envcache" / "mnist"
    check_fake(mnist_download.full_mnist())
    assert (tmp_path / "envcache" / "mnist" / f"{IMAGES}.gz").is_file()
    assert len(server.requests) == 2


def test_default_cache_dir_without_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert mnist_download.default_cache_dir() == tmp_path / ".cache" / "diffgen" / "mnist"


def test_corrupt_cached_file_is_downloaded_again(tmp_path: Path, server: Server) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{IMAGES}.gz").write_bytes(gzip.compress(b"not the right content"))
    (cache / LABELS).write_bytes(fake_idx()[LABELS])
    check_fake(mnist_download.full_mnist(cache, server.url))
    assert server.requests == [f"/mnist/{IMAGES}.gz"]
    assert gzip.decompress((cache / f"{IMAGES}.gz").read_bytes()) == fake_idx()[IMAGES]


def test_corrupt_download_fails_and_leaves_nothing(tmp_path: Path) -> None:
    wrong = fake_idx()
    wrong[IMAGES] = wrong[IMAGES][:-1] + b"\xff"
    srv = serve(tmp_path, wrong)
    cache = tmp_path / "cache"
    try:
        with pytest.raises(DiffgenError, match="checksum") as err:
            mnist_download.full_mnist(cache, srv.url)
    finally:
        srv.close()
    message = str(err.value)
    assert IMAGES in message and "\n" not in message
    assert mnist_download.SHA256[IMAGES] in message and sha256(wrong[IMAGES]) in message
    assert list(cache.iterdir()) == []


def test_download_that_is_not_gzip_fails_and_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "www" / "mnist"
    folder.mkdir(parents=True)
    (folder / f"{IMAGES}.gz").write_bytes(b"<html>an error page</html>")
    srv = Server(tmp_path / "www")
    cache = tmp_path / "cache"
    try:
        with pytest.raises(DiffgenError, match="not a valid gzip"):
            mnist_download.full_mnist(cache, srv.url)
    finally:
        srv.close()
    assert list(cache.iterdir()) == []


def test_missing_file_on_server(tmp_path: Path) -> None:
    srv = serve(tmp_path, {})
    cache = tmp_path / "cache"
    try:
        with pytest.raises(DiffgenError, match="404") as err:
            mnist_download.full_mnist(cache, srv.url)
    finally:
        srv.close()
    assert str(cache) in str(err.value)
    assert list(cache.iterdir()) == []


def test_server_down_names_the_cache_path(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DiffgenError, match="failed") as err:
        mnist_download.full_mnist(cache, closed_port_url())
    message = str(err.value)
    assert str(cache) in message and "\n" not in message
    assert f"{IMAGES}.gz" in message and f"{LABELS}.gz" in message
    assert list(cache.iterdir()) == []


def test_real_checksum_table_covers_the_train_files() -> None:
    assert set(REAL_SHA256) == set(mnist_download.TRAIN_FILES)
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in REAL_SHA256.values())


def test_real_mnist_files_verify_by_decompressed_checksum(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The packaged test split, whose gzip bytes differ from the mirror's, passes its published
    decompressed SHA-256 (listed alongside the train-split values used in SHA256)."""
    names = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    monkeypatch.setattr(mnist_download, "TRAIN_FILES", names)
    monkeypatch.setattr(mnist_download, "SHA256", {
        names[0]: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        names[1]: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    })
    packaged = Path(mnist_download.__file__).parent / "assets" / "mnist"
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in names:
        (cache / f"{name}.gz").write_bytes((packaged / f"{name}.gz").read_bytes())
    data = mnist_download.full_mnist(cache, closed_port_url())
    assert data.images.shape == (10000, 1, 28, 28)
    assert data.labels[:5].tolist() == [7, 2, 1, 0, 4]
