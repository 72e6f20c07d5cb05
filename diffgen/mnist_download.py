"""The full 60,000-digit MNIST training split, downloaded once into a local cache.

The files are verified by the SHA-256 of their decompressed content, so a hand-placed copy may be
gzipped or not, and a re-compressed copy (different gzip header) is accepted too.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import BinaryIO

from diffgen.data import Dataset, mnist_from_idx, parse_idx
from diffgen.errors import DiffgenError

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")

# SHA-256 of the DECOMPRESSED IDX files (47,040,016 and 60,008 bytes). Tests replace this table.
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
}

TIMEOUT_S = 60.0  # per blocking socket operation
MAX_DOWNLOAD_BYTES = 64 * 2**20  # the images archive is 9.9 MB
MAX_IDX_BYTES = 64 * 2**20  # the decompressed images file is 47 MB
CHUNK_BYTES = 2**16


def default_cache_dir() -> Path:
    """``$DIFFGEN_CACHE/mnist`` if that variable is set, else ``~/.cache/diffgen/mnist``."""
    root = os.environ.get("DIFFGEN_CACHE")
    if root:
        return Path(root).expanduser() / "mnist"
    return Path.home() / ".cache" / "diffgen" / "mnist"


def full_mnist(cache_dir: Path | None = None, base_url: str | None = None) -> Dataset:
    """The MNIST training split, from the cache or downloaded into it and verified."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if base_url is None:
        base_url = os.environ.get("DIFFGEN_MNIST_URL") or DEFAULT_BASE_URL
    raw = {}
    for name in TRAIN_FILES:
        cached = _from_cache(cache_dir, name)
        raw[name] = cached if cached is not None else _download(cache_dir, base_url, name)
    images = parse_idx(raw[TRAIN_FILES[0]], str(cache_dir / TRAIN_FILES[0]))
    labels = parse_idx(raw[TRAIN_FILES[1]], str(cache_dir / TRAIN_FILES[1]))
    return mnist_from_idx(images, labels, f"MNIST training split ({cache_dir})")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decompress(path: Path) -> bytes:
    """Decompressed content of a .gz file, refusing anything larger than MAX_IDX_BYTES."""
    with gzip.open(path, "rb") as f:
        data = f.read(MAX_IDX_BYTES + 1)
    if len(data) > MAX_IDX_BYTES:
        raise ValueError(f"decompresses to more than {MAX_IDX_BYTES} bytes")
    return data


def _from_cache(cache_dir: Path, name: str) -> bytes | None:
    """The verified decompressed content of a cached copy of ``name``, or None if none is good."""
    for path in (cache_dir / name, cache_dir / f"{name}.gz"):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".gz":
                data = _decompress(path)
            elif path.stat().st_size > MAX_IDX_BYTES:
                raise ValueError(f"is larger than {MAX_IDX_BYTES} bytes")
            else:
                data = path.read_bytes()
        except (OSError, EOFError, ValueError, zlib.error) as err:
            log.warning("ignoring cached %s: cannot read it (%s)", path, err)
            continue
        digest = _sha256(data)
        if digest == SHA256[name]:
            log.debug("using cached %s", path)
            return data
        log.warning("ignoring cached %s: SHA-256 %s, expected %s", path, digest, SHA256[name])
    return None


def _by_hand_hint(cache_dir: Path) -> str:
    names = " and ".join(f"{n}.gz" for n in TRAIN_FILES)
    return f"download {names} by hand and put them (gzipped or not) in {cache_dir}"


def _download(cache_dir: Path, base_url: str, name: str) -> bytes:
    """Download ``name``.gz into the cache, verify it and return the decompressed content."""
    url = base_url.rstrip("/") + f"/{name}.gz"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DiffgenError(f"cannot create the MNIST cache folder {cache_dir}: {err}") from None
    log.info("downloading %s into %s", url, cache_dir)
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{name}.gz.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(url, out, cache_dir)
        try:
            data = _decompress(tmp)
        except (OSError, EOFError, ValueError, zlib.error) as err:
            raise DiffgenError(
                f"downloaded {url} is not a valid gzip file ({err}); {_by_hand_hint(cache_dir)}"
            ) from None
        digest = _sha256(data)
        if digest != SHA256[name]:
            raise DiffgenError(
                f"checksum mismatch for {name} downloaded from {url}: SHA-256 of the decompressed "
                f"file is {digest}, expected {SHA256[name]}"
            )
        os.replace(tmp, cache_dir / f"{name}.gz")
    finally:
        tmp.unlink(missing_ok=True)
    return data


def _fetch(url: str, out: BinaryIO, cache_dir: Path) -> None:
    """Stream ``url`` into the open binary file ``out``; any failure is a DiffgenError."""
    total = 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            while chunk := response.read(CHUNK_BYTES):
                total += len(chunk)
                if total > MAX_DOWNLOAD_BYTES:
                    raise ValueError(f"response is larger than {MAX_DOWNLOAD_BYTES} bytes")
                out.write(chunk)
    except (OSError, ValueError, http.client.HTTPException) as err:
        plain_url_error = (isinstance(err, urllib.error.URLError)
                           and not isinstance(err, urllib.error.HTTPError))
        reason = err.reason if plain_url_error else err
        reason = " ".join(str(reason).split()) or type(err).__name__
        raise DiffgenError(
            f"downloading {url} failed ({reason}); {_by_hand_hint(cache_dir)}"
        ) from None
