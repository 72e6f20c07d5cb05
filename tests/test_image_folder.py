"""load_image_folder on small generated image folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from diffgen.data import load_dataset
from diffgen.errors import DiffgenError
from diffgen.image_folder import load_image_folder


def save(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30),
         color: int | tuple[int, ...] = (255, 0, 0)) -> None:
    """Save a solid image; size is Pillow's (W, H)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_shapes_labels_and_rgb_to_gray(tmp_path: Path) -> None:
    save(tmp_path / "dog" / "a.png", color=(255, 0, 0))
    save(tmp_path / "dog" / "b.JPG", color=(255, 0, 0))
    save(tmp_path / "cat" / "x.bmp", mode="L", color=200)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    data = load_image_folder(tmp_path, (28, 28), 1)
    assert data.class_names == ["cat", "dog"]
    assert data.images.shape == (3, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0, 1, 1] and data.labels.dtype == torch.int64
    assert data.images[0].unique().tolist() == [200]
    red_as_gray = round(0.299 * 255)  # Pillow's ITU-R 601-2 luma
    assert abs(data.images[1].float().mean().item() - red_as_gray) <= 2
    assert data.num_classes == 2 and len(data) == 3


def test_resize_to_28x28_from_40x30_and_rgb(tmp_path: Path) -> None:
    path = tmp_path / "0" / "img.png"
    path.parent.mkdir()
    im = Image.new("RGB", (40, 30), (0, 0, 255))
    im.paste((0, 255, 0), (0, 0, 20, 30))  # left half green, right half blue
    im.save(path)
    data = load_image_folder(tmp_path, (28, 28), 3)
    assert data.images.shape == (1, 3, 28, 28)
    pixels = data.images[0]
    assert pixels[:, :, 0].tolist() == [[0] * 28, [255] * 28, [0] * 28]
    assert pixels[:, :, -1].tolist() == [[0] * 28, [0] * 28, [255] * 28]


def test_non_square_size_and_gray_to_rgb(tmp_path: Path) -> None:
    save(tmp_path / "a" / "1.webp", mode="L", size=(10, 10), color=77)
    save(tmp_path / "b" / "2.gif", mode="L", size=(10, 10), color=0)
    data = load_image_folder(tmp_path, (12, 20), 3)
    assert data.images.shape == (2, 3, 12, 20)
    assert data.images[0].unique().tolist() == [77]


def test_integer_class_names_sort_numerically(tmp_path: Path) -> None:
    for name in ("10", "2", "1"):
        save(tmp_path / name / "x.png", mode="L", size=(8, 8), color=int(name))
    data = load_image_folder(tmp_path, (8, 8), 1)
    assert data.class_names == ["1", "2", "10"]
    assert [int(data.images[i].max()) for i in range(3)] == [1, 2, 10]


def test_mixed_class_names_sort_as_text(tmp_path: Path) -> None:
    for name in ("10", "2", "b"):
        save(tmp_path / name / "x.png", size=(8, 8))
    assert load_image_folder(tmp_path, (8, 8), 1).class_names == ["10", "2", "b"]


def test_load_dataset_uses_image_folder(tmp_path: Path) -> None:
    save(tmp_path / "only" / "x.png")
    data = load_dataset(str(tmp_path), (16, 16), 1)
    assert data.images.shape == (1, 1, 16, 16) and data.class_names == ["only"]


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DiffgenError, match="does not exist") as err:
        load_image_folder(tmp_path / "nope", (28, 28), 1)
    assert str(tmp_path / "nope") in str(err.value)


def test_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DiffgenError, match="is not a folder"):
        load_image_folder(tmp_path / "file.png", (28, 28), 1)


def test_no_class_folders(tmp_path: Path) -> None:
    save(tmp_path / "loose.png")
    with pytest.raises(DiffgenError, match="no class sub-folders"):
        load_image_folder(tmp_path, (28, 28), 1)


def test_class_folder_without_images(tmp_path: Path) -> None:
    save(tmp_path / "a" / "x.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(DiffgenError, match="has no images") as err:
        load_image_folder(tmp_path, (28, 28), 1)
    assert str(tmp_path / "b") in str(err.value)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    save(tmp_path / "a" / "good.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DiffgenError, match="broken.png") as err:
        load_image_folder(tmp_path, (28, 28), 1)
    assert "\n" not in str(err.value)


def test_truncated_image_names_the_file(tmp_path: Path) -> None:
    save(tmp_path / "a" / "cut.jpg", size=(64, 64))
    path = tmp_path / "a" / "cut.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DiffgenError, match="cut.jpg"):
        load_image_folder(tmp_path, (28, 28), 1)


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_bad_channels(tmp_path: Path, channels: int) -> None:
    save(tmp_path / "a" / "x.png")
    with pytest.raises(DiffgenError, match=f"channels is {channels}"):
        load_image_folder(tmp_path, (28, 28), channels)


def test_bad_image_size(tmp_path: Path) -> None:
    save(tmp_path / "a" / "x.png")
    with pytest.raises(DiffgenError, match="image size"):
        load_image_folder(tmp_path, (0, 28), 1)
