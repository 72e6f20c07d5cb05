"""PNG grids and trajectory GIFs (CASES O1)."""

import pytest
import torch
from PIL import Image, ImageSequence

from diffgen import images
from diffgen.errors import DiffgenError


def test_grid_layout():
    batch = torch.linspace(-1, 1, 6).reshape(6, 1, 1, 1).expand(6, 1, 4, 5)
    grid = images.make_grid(batch, ncol=3, padding=2)
    assert grid.shape == (1, 2 * 6 + 2, 3 * 7 + 2)
    assert grid[0, 2, 2].item() == -1.0 and grid[0, 8, 16].item() == 1.0


def test_uint8_rounding():
    assert images.to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0])).tolist() == [0, 128, 255, 255]


def frames_with_repeats():
    frames = [torch.full((1, 28, 28), -1 + 2 * i / 9) for i in range(8)]
    return frames + [frames[-1].clone() for _ in range(2)]  # the last 3 are identical


def test_gif_keeps_total_duration_when_frames_merge(tmp_path):  # O1
    frames = frames_with_repeats()
    path = images.save_gif(frames, tmp_path / "path.gif", frame_ms=50)
    with Image.open(path) as gif:
        read = [(frame.copy(), frame.info["duration"]) for frame in ImageSequence.Iterator(gif)]
    assert sum(d for _, d in read) == 10 * 50
    assert len(read) == 8  # Pillow merged the three identical last frames into one
    first, last = (torch.tensor(list(f.convert("L").tobytes())) for f in (read[0][0],
                                                                          read[-1][0]))
    assert first.unique().tolist() == [0] and last.unique().tolist() == [198]


def test_gif_hold_and_rounding(tmp_path, caplog):
    assert images.frame_duration(55) in (50, 60)
    with pytest.raises(DiffgenError, match=r"--frame-ms must be in \[20, 655350\]"):
        images.frame_duration(10)
    with pytest.raises(DiffgenError, match="--hold-ms must be in"):
        images.frame_duration(40, hold_ms=-10)
    frames = [torch.full((1, 8, 8), v) for v in (-1.0, 0.0, 1.0)]
    path = images.save_gif(frames, tmp_path / "hold.gif", frame_ms=40, hold_ms=500)
    with Image.open(path) as gif:
        durations = [f.info["duration"] for f in ImageSequence.Iterator(gif)]
    assert durations == [40, 40, 540]


def test_fifty_frame_gif_is_small(tmp_path, digits):  # O1
    # A path like the sampler's: pure noise fading into a real digit over 50 frames.
    noise = torch.randn((1, 28, 28), generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    digit = digits.images[0].float() / 127.5 - 1
    frames = [(1 - a) * noise + a * digit for a in torch.linspace(0, 1, 50).tolist()]
    path = images.save_gif(frames, tmp_path / "fifty.gif", frame_ms=40)
    assert path.stat().st_size < 100 * 1024


def test_output_checks(tmp_path):
    with pytest.raises(DiffgenError, match="must end in .png"):
        images.check_output(tmp_path / "grid.jpg", (".png",))
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DiffgenError, match="is a folder"):
        images.check_output(tmp_path / "dir.png", (".png",))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DiffgenError, match="file is a file"):
        images.check_output(blocker / "sub" / "x.png", (".png",))
    assert not (tmp_path / "new").exists()
    images.check_output(tmp_path / "new" / "x.png", (".png",))
    assert not (tmp_path / "new").exists()  # checked, not created


def test_write_all_leaves_nothing_behind_when_one_write_fails(tmp_path):
    from diffgen.files import write_all

    kept = tmp_path / "kept.png"
    kept.write_bytes(b"old")
    (tmp_path / "out" / "0001.png").mkdir(parents=True)  # a folder where a file must go

    def png(path):
        return images.save_image(torch.zeros(1, 4, 4), path)

    jobs = [(tmp_path / "grid.png", png), (tmp_path / "new" / "deep" / "0000.png", png),
            (tmp_path / "out" / "0001.png", png)]
    with pytest.raises(DiffgenError, match="0001.png"):
        write_all(jobs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.png", "out"]
    assert kept.read_bytes() == b"old"
    assert write_all(jobs[:2]) == [p for p, _ in jobs[:2]] and jobs[1][0].is_file()


def test_load_image_round_trip(tmp_path):
    image = torch.linspace(-1, 1, 28 * 28).reshape(1, 28, 28)
    images.save_image(image, tmp_path / "x.png")
    back = images.load_image(tmp_path / "x.png", 1, (28, 28))
    assert (back - image).abs().max().item() <= 1 / 127.5
    with pytest.raises(DiffgenError, match="cannot read image"):
        (tmp_path / "bad.png").write_bytes(b"not a png")
        images.load_image(tmp_path / "bad.png", 1, (28, 28))


def test_written_files_get_ordinary_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        path = images.save_image(torch.zeros(1, 4, 4), tmp_path / "p.png")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
