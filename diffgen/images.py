"""Image files: tensors in [-1, 1] to PNG grids, single PNGs and GIFs, and back.

Every file is written under a temporary name in its folder and renamed into place, so a failed
write never leaves a half-written image.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from diffgen.errors import DiffgenError, InvalidSetting
from diffgen.files import atomic_write, check_can_create

log = logging.getLogger(__name__)

MIN_FRAME_MS = 20  # browsers slow down GIF frames shorter than this
MAX_FRAME_MS = 655_350  # a GIF delay is a 16-bit count of hundredths of a second


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 [0, 255], rounding to nearest."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image [C, H, W] in [-1, 1] -> a PIL image in mode L or RGB."""
    array = to_uint8(image).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array,
                           "L" if array.shape[2] == 1 else "RGB")


def make_grid(images: torch.Tensor, ncol: int, padding: int = 2) -> torch.Tensor:
    """Tile [N, C, H, W] into [C, rows * (H + p) + p, ncol * (W + p) + p] on a -1 background."""
    n, c, h, w = images.shape
    ncol = max(1, min(ncol, n))
    nrow = (n + ncol - 1) // ncol
    grid = torch.full((c, nrow * (h + padding) + padding, ncol * (w + padding) + padding), -1.0)
    for k in range(n):
        row, col = divmod(k, ncol)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = images[k]
    return grid


def check_output(path: Path, suffixes: tuple[str, ...]) -> Path:
    """Fail early, before any sampling, on an output path that cannot be written."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise InvalidSetting(f"output {path} must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise InvalidSetting(f"output {path} is a folder; give a file name")
    check_can_create(path.parent)
    return path


def save_atomic(image: Image.Image | list[Image.Image], path: Path, **params) -> Path:
    """Save a PIL image (or GIF frames) to a temporary file beside ``path``, then rename."""
    path = Path(path)
    fmt = {".png": "PNG", ".gif": "GIF"}[path.suffix.lower()]
    frames = image if isinstance(image, list) else [image]

    def write(tmp: Path) -> None:
        extra = dict(save_all=True, append_images=frames[1:]) if len(frames) > 1 else {}
        frames[0].save(tmp, format=fmt, **extra, **params)

    return atomic_write(path, write)


def save_grid(images: torch.Tensor, path: Path, ncol: int) -> Path:
    """Write [N, C, H, W] in [-1, 1] as one PNG grid with ``ncol`` columns."""
    return save_atomic(to_pil(make_grid(images, ncol)), path)


def save_image(image: torch.Tensor, path: Path) -> Path:
    return save_atomic(to_pil(image), path)


def frame_duration(frame_ms: int, hold_ms: int = 0) -> int:
    """GIF delays are in hundredths of a second: round to 10 ms, at least 20 ms.

    Also checks that the last frame, held ``hold_ms`` longer, still fits a GIF delay.
    """
    if not MIN_FRAME_MS <= frame_ms <= MAX_FRAME_MS:
        raise InvalidSetting(f"--frame-ms must be in [{MIN_FRAME_MS}, {MAX_FRAME_MS}], "
                             f"got {frame_ms}")
    if not 0 <= hold_ms <= MAX_FRAME_MS - frame_ms:
        raise InvalidSetting(f"--hold-ms must be in [0, {MAX_FRAME_MS - frame_ms}], got {hold_ms}")
    rounded = int(round(frame_ms / 10.0)) * 10
    if rounded != frame_ms:
        log.warning("GIF frame delays are multiples of 10 ms; using %d ms", rounded)
    return rounded


def save_gif(frames: list[torch.Tensor], path: Path, frame_ms: int, hold_ms: int = 0) -> Path:
    """Write grids [C, H, W] in [-1, 1] as a looping GIF; the last frame shows ``hold_ms`` more.

    ``frame_ms`` and ``hold_ms`` must already be checked by :func:`frame_duration`.

    Pillow merges identical consecutive frames and adds up their delays, so the total duration
    is kept even when the frame count shrinks.
    """
    durations = [frame_ms] * len(frames)
    durations[-1] += int(round(hold_ms / 10.0)) * 10
    pil_frames = [to_pil(frame) for frame in frames]
    if pil_frames[0].mode == "RGB":
        pil_frames = [f.quantize(colors=256) for f in pil_frames]
    return save_atomic(pil_frames, path, duration=durations, loop=0, optimize=False)


def load_image(path: Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Read an image file as [C, H, W] in [-1, 1], converted and resized to the model's shape.

    16-bit grayscale is scaled to 8 bits; images too large to decode safely are refused.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                if image.mode.startswith("I"):  # 16-bit grey: 0..65535 down to 0..255
                    image = Image.fromarray(
                        (np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255)
                        .astype(np.uint8), "L")
                image = image.convert("L" if channels == 1 else "RGB")
    except FileNotFoundError:
        raise DiffgenError(f"input image {path} does not exist") from None
    except IsADirectoryError:
        raise DiffgenError(f"input {path} is a folder, not an image") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise DiffgenError(f"input image {path} is too large to decode safely") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DiffgenError(f"cannot read image {path}: {err}") from None
    if image.size != (size[1], size[0]):
        log.info("resizing %s from %dx%d to %dx%d", path, image.size[1], image.size[0],
                 size[0], size[1])
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    array = array.reshape(size[0], size[1], channels).permute(2, 0, 1)
    return array.float() / 127.5 - 1.0
