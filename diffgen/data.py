"""Training data: the packaged MNIST split, the full MNIST download, and image folders.

Every source is read fully into memory as uint8 images [N, C, H, W] and int64 labels [N]; the
trainer scales them to [-1, 1]. MNIST's IDX format is read here directly.
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from diffgen.errors import DiffgenError

log = logging.getLogger(__name__)

IDX_DTYPES = {0x08: torch.uint8}  # the only element type MNIST uses
PACKAGED_MNIST = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@dataclass
class Dataset:
    """Images uint8 [N, C, H, W] with labels int64 [N] in 0..len(class_names)-1."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]


def parse_idx(raw: bytes, name: str = "IDX data") -> torch.Tensor:
    """Decode an IDX file (magic 0x0000TTNN: type byte, then N big-endian int32 dims)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DiffgenError(f"{name} is not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code not in IDX_DTYPES:
        raise DiffgenError(f"{name}: IDX element type 0x{dtype_code:02x} is not supported")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DiffgenError(f"{name} is truncated (header)")
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    count = 1
    for d in dims:
        count *= d
    if len(raw) != header + count:
        raise DiffgenError(
            f"{name} has {len(raw) - header} data bytes, but its header promises {count}"
        )
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return data.reshape(dims)


def read_idx(path: Path | str) -> torch.Tensor:
    """Read an IDX file, gzip-compressed or not."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise DiffgenError(f"cannot read {path}: {err}") from None
    return parse_idx(raw, str(path))


def mnist_from_idx(images: torch.Tensor, labels: torch.Tensor, source: str) -> Dataset:
    """A 10-class Dataset from IDX images [N, H, W] and labels [N] in 0..9."""
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DiffgenError(f"{source}: image and label files do not match")
    if labels.numel() and int(labels.max()) > 9:
        raise DiffgenError(f"{source}: label {int(labels.max())} found; allowed: 0 to 9")
    return Dataset(images[:, None].contiguous(), labels.long(),
                   [str(i) for i in range(10)], source)


def packaged_mnist() -> Dataset:
    """The 10,000-digit MNIST test split that ships inside diffgen (CC BY-SA 3.0)."""
    root = resources.files("diffgen") / "assets" / "mnist"
    with resources.as_file(root / PACKAGED_MNIST[0]) as images_path, \
            resources.as_file(root / PACKAGED_MNIST[1]) as labels_path:
        return mnist_from_idx(read_idx(images_path), read_idx(labels_path),
                              "packaged MNIST test split")


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize uint8 images [N, C, H, W] to size (H, W) with antialiased bilinear filtering."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = torch.nn.functional.interpolate(images.float(), size=size, mode="bilinear",
                                          antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def load_dataset(spec: str, image_size: tuple[int, int] = (28, 28), channels: int = 1
                 ) -> Dataset:
    """Load a data source by name: "packaged", "mnist" or a folder of class sub-folders.

    Images come back at ``image_size`` with ``channels`` channels.
    """
    if spec == "packaged":
        data = packaged_mnist()
    elif spec == "mnist":
        from diffgen.mnist_download import full_mnist

        data = full_mnist()
    else:
        from diffgen.image_folder import load_image_folder

        data = load_image_folder(Path(spec), image_size, channels)
    images = data.images
    if images.shape[1] != channels:
        images = images.expand(-1, channels, -1, -1) if images.shape[1] == 1 else (
            images.float().mean(1, keepdim=True).round().to(torch.uint8))
    data.images = resize(images.contiguous(), image_size)
    log.info("data: %s, %d images, %d classes", data.source, len(data), data.num_classes)
    return data
