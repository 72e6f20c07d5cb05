"""A folder of images with one sub-folder per class, read into memory with Pillow.

Class names are the sorted sub-folder names (numerically if every name is an integer). Only image
files directly inside a class folder count; hidden files and folders are skipped. Every image is
converted to grayscale ("L") or RGB and stretched to the requested size, ignoring aspect ratio.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from diffgen.data import Dataset
from diffgen.errors import DiffgenError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
PIL_MODES = {1: "L", 3: "RGB"}
_INTEGER = re.compile(r"[+-]?\d+")


def class_folders(root: Path) -> list[Path]:
    """The class sub-folders of ``root`` in label order."""
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if all(_INTEGER.fullmatch(p.name) for p in folders):
        return sorted(folders, key=lambda p: (int(p.name), p.name))
    return sorted(folders, key=lambda p: p.name)


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: Path, image_size: tuple[int, int], channels: int) -> np.ndarray:
    """One image as uint8 [C, H, W]; an unreadable file is a DiffgenError naming it."""
    height, width = image_size
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert(PIL_MODES[channels])
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.array(im, dtype=np.uint8)
    except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as err:
        raise DiffgenError(f"cannot read image {path}: {err}") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def load_image_folder(root: Path, image_size: tuple[int, int], channels: int) -> Dataset:
    """Read every image under ``root``/<class>/ into uint8 [N, channels, H, W] with labels."""
    root = Path(root)
    if channels not in PIL_MODES:
        raise DiffgenError(f"channels is {channels}; allowed: 1 (grayscale) or 3 (RGB)")
    if len(image_size) != 2 or not all(isinstance(s, int) and s > 0 for s in image_size):
        raise DiffgenError(f"image size is {image_size}; allowed: two positive integers (H, W)")
    if not root.exists():
        raise DiffgenError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DiffgenError(f"image folder {root} is not a folder")
    try:
        folders = class_folders(root)
    except OSError as err:
        raise DiffgenError(f"cannot list image folder {root}: {err}") from None
    if not folders:
        raise DiffgenError(
            f"image folder {root} has no class sub-folders; allowed: one sub-folder per class"
        )
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(folders):
        try:
            found = image_files(folder)
        except OSError as err:
            raise DiffgenError(f"cannot list class folder {folder}: {err}") from None
        if not found:
            raise DiffgenError(
                f"class folder {folder} has no images; allowed: {', '.join(IMAGE_SUFFIXES)}"
            )
        files.extend((path, label) for path in found)
    images = torch.empty((len(files), channels, *image_size), dtype=torch.uint8)
    for i, (path, _) in enumerate(files):
        images[i] = torch.from_numpy(read_image(path, image_size, channels))
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    log.info("image folder %s: %d images in %d classes", root, len(files), len(folders))
    return Dataset(images, labels, [p.name for p in folders], f"image folder {root}")
