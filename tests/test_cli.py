"""The command line: exit codes, messages, --json, and all four commands end to end."""

import json
import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

from diffgen import __version__
from diffgen.cli import app


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def run(runner, *args):
    return runner.invoke(app, ["--quiet", *map(str, args)])


def test_version(runner):
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"diffgen {__version__}"


def test_end_to_end_on_real_digits(runner, tmp_path):
    """Train a tiny model on 32 real digits, then sample, draw the path and denoise."""
    folder = tmp_path / "digits"
    from diffgen.data import packaged_mnist
    from diffgen.images import save_image

    digits = packaged_mnist()
    picks = [int(i) for k in range(10) for i in (digits.labels == k).nonzero()[:4, 0]]
    for i in picks:
        label = int(digits.labels[i])
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        save_image(digits.images[i].float() / 127.5 - 1, folder / str(label) / f"{i}.png")

    out = tmp_path / "run"
    result = run(runner, "train", "--data", folder, "--out", out, "--steps", 3,
                 "--batch-size", 8, "--base-channels", 8, "--channel-mult", "1,2",
                 "--attention-resolutions", "14", "--groups", 4, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["step"] == 3 and (out / "model.safetensors").is_file()
    assert record["files"] == [str(out / "model.safetensors"),
                               str(out / "train_state.safetensors"), str(out / "log.jsonl")]
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    weights = out / "model.safetensors"

    small = tmp_path / "small"
    result = run(runner, "train", "--data", folder, "--out", small, "--steps", 1,
                 "--batch-size", 8, "--image-size", 16, "--base-channels", 8, "--groups", 4)
    assert result.exit_code == 0, result.output
    from diffgen import checkpoint

    config = checkpoint.load_model(small / "model.safetensors").model_config
    assert config["image_size"] == [16, 16] and config["attention_resolutions"] == [4]

    result = run(runner, "sample", "--weights", weights, "--class", 3, "--class", 5, "--n", 4,
                 "--steps", 3, "-o", tmp_path / "grid.png", "--out-dir", tmp_path / "each",
                 "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["classes"] == [3] * 4 + [5] * 4 and record["seeds"] == list(range(8))
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.mode == "L" and grid.size == (4 * 30 + 2, 2 * 30 + 2)
    names = sorted(p.name for p in (tmp_path / "each").iterdir())
    assert names[0] == "0000_class3_seed0.png" and names[-1] == "0007_class5_seed7.png"

    result = run(runner, "trajectory", "--weights", weights, "-o", tmp_path / "path.gif",
                 "--steps", 5, "--frames", 6, "--frame-ms", 50, "--hold-ms", 0, "--show-x0")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "path.gif") as gif:
        assert gif.size == (2 * (10 * 30 + 2), 32)
        durations = []
        for index in range(gif.n_frames):
            gif.seek(index)
            durations.append(gif.info["duration"])
        assert sum(durations) == 6 * 50

    result = run(runner, "trajectory", "--weights", weights, "-o", tmp_path / "fwd.png",
                 "--forward", "--frames", 4, "--class", 7)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "fwd.png") as strip:
        assert strip.size == (4 * 32, 32)

    digit = folder / "7" / "0.png"
    result = run(runner, "denoise", digit, "--weights", weights, "--strength", 0.6,
                 "-o", tmp_path / "clean.png", "--strip")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "clean.png") as image:
        assert image.size == (3 * 30 + 2, 32) and image.mode == "L"

    other = tmp_path / "copy.png"
    shutil.copy(digit, other)
    result = run(runner, "denoise", digit, other, "--weights", weights, "--strength", 0,
                 "--out-dir", tmp_path / "denoised")
    assert result.exit_code == 0, result.output
    with Image.open(digit) as original, Image.open(tmp_path / "denoised" / "0.png") as kept:
        assert original.tobytes() == kept.tobytes()  # strength 0 returns the input
    assert (tmp_path / "denoised" / "copy.png").is_file()


@pytest.mark.parametrize("code, args, message", [
    (2, ["sample", "--class", "12", "-o", "{tmp}/x.png"], "--class 12 is out of range"),
    (2, ["sample", "--steps", "1001", "-o", "{tmp}/x.png"], "--steps 1001 exceeds the model's T"),
    (2, ["sample", "--precision", "fp16", "--device", "cpu", "-o", "{tmp}/x.png"],
     "fp16 is not supported on the CPU"),
    (2, ["sample", "--device", "tpu", "-o", "{tmp}/x.png"], "--device 'tpu'"),
    (2, ["sample", "-o", "{tmp}/x.jpg"], "must end in .png"),
    (2, ["sample", "--ddpm", "--eta", "0.5", "-o", "{tmp}/x.png"], "--eta applies to DDIM only"),
    (2, ["trajectory", "-o", "{tmp}/x.gif", "--frame-ms", "5"], "--frame-ms must be in [20,"),
    (2, ["trajectory", "-o", "{tmp}/x.gif", "--hold-ms", "-100"], "--hold-ms must be in [0,"),
    (2, ["denoise", "{tmp}/img.png", "--t", "1000", "-o", "{tmp}/x.png"], "--t 1000 is out"),
    (2, ["denoise", "{tmp}/img.png", "-o", "{tmp}/img.png"], "would overwrite an input"),
    (2, ["denoise", "{tmp}/img.png", "{tmp}/sub/img.png", "--out-dir", "{tmp}/o"],
     "would both be written to"),
    (2, ["train", "--out", "{tmp}/run", "--base-channels", "24", "--groups", "32"],
     "level 0 has 24 channels"),
    (2, ["train", "--out", "{tmp}/run", "--schedule", "sigmoid"], "schedule 'sigmoid'"),
    (1, ["sample", "--weights", "{tmp}/none.safetensors", "-o", "{tmp}/x.png"],
     "does not exist"),
    (1, ["sample", "--weights", "{tmp}/corrupt.safetensors", "-o", "{tmp}/x.png"],
     "not a readable safetensors file"),
    (1, ["sample", "--weights", "{tmp}", "-o", "{tmp}/x.png"], "is a folder; pass the"),
    (1, ["sample", "--weights", "{tmp}/nan.safetensors", "-o", "{tmp}/x.png"], "NaN or inf"),
    (1, ["sample", "--out-dir", "{tmp}/blocker/sub"], "blocker is a file"),
    (1, ["denoise", "{tmp}/corrupt.safetensors", "-o", "{tmp}/x.png"], "cannot read image"),
    (1, ["denoise", "{tmp}/missing.png", "-o", "{tmp}/x.png"], "does not exist"),
    (1, ["train", "--out", "{tmp}/run", "--data", "{tmp}/nowhere"], "nowhere"),
    (1, ["train", "--out", "{tmp}/blocker", "--steps", "1"], "blocker is a file"),
    (1, ["train", "--out", "{tmp}/blocker/run", "--steps", "1"], "blocker is a file"),
    (2, ["sample", "--variance", "large", "-o", "{tmp}/x.png"], "--variance applies to DDPM"),
    (2, ["denoise", "{tmp}/img.png", "--steps", "1001", "-o", "{tmp}/x.png"], "exceeds"),
    (2, ["train", "--out", "{tmp}/run", "--lr", "1e38"], "--lr must be in (0, 1]"),
    (1, ["train", "--out", "{tmp}/run", "--resume"], "no checkpoint"),
])
def test_user_mistakes_get_one_line_and_an_exit_code(runner, tmp_path, tiny_model, code, args,
                                                     message):
    import torch

    from diffgen import checkpoint
    from diffgen.images import save_image

    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "blocker").write_text("a file, not a folder")
    shutil.copy(tiny_model, tmp_path / "tiny.safetensors")
    ckpt = checkpoint.load_model(tiny_model)
    ckpt.ema = {k: torch.full_like(v, float("nan")) for k, v in ckpt.ema.items()}
    checkpoint.save_model(tmp_path / "nan.safetensors", ckpt)
    save_image(torch.zeros(1, 28, 28), tmp_path / "img.png")
    (tmp_path / "sub").mkdir()
    save_image(torch.zeros(1, 28, 28), tmp_path / "sub" / "img.png")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] != "train" and "--weights" not in args:
        args += ["--weights", str(tmp_path / "tiny.safetensors")]
    result = run(runner, *args)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.gif").exists()


@pytest.mark.parametrize("args", [
    ["sample", "--n", "x", "-o", "a.png"], ["sample"], ["sample", "--bogus"],
    ["sample", "--n", "0", "-o", "a.png"], ["sample", "--eta", "1.5", "-o", "a.png"],
    ["sample", "--steps", "0", "-o", "a.png"], ["trajectory", "-o", "a.gif", "--frames", "1"],
    ["denoise", "a.png", "--strength", "2", "-o", "b.png"],
    ["denoise", "a.png", "--strength", "0.5", "--t", "3", "-o", "b.png"],
    ["denoise", "a.png", "b.png", "-o", "c.png"], ["train"]])
def test_usage_errors_exit_2(runner, args):
    assert run(runner, *args).exit_code == 2


def test_json_output_is_the_only_stdout(runner, tmp_path, tiny_model):
    result = runner.invoke(app, ["sample", "--weights", str(tiny_model), "--n", "1",
                                 "--class", "0", "--steps", "2", "-o", str(tmp_path / "a.png"),
                                 "--json"])
    assert result.exit_code == 0
    record = json.loads(result.stdout)
    assert record["files"] == [str(tmp_path / "a.png")] and record["precision"] in ("fp32",
                                                                                     "bf16")


def test_resume_continues_a_run(runner, tmp_path, few_digits):
    out = tmp_path / "run"
    common = ["--base-channels", "8", "--channel-mult", "1,2", "--attention-resolutions", "14",
              "--groups", "4", "--batch-size", "8"]
    assert run(runner, "train", "--out", out, "--steps", 2, *common).exit_code == 0
    again = run(runner, "train", "--out", out, "--steps", 2, *common)
    assert again.exit_code == 1 and "already holds a model" in again.stderr
    result = run(runner, "train", "--out", out, "--resume", "--steps", 4, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step"] == 4


def test_sigterm_stops_training_with_a_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from diffgen import checkpoint

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffgen", "train", "--out", str(out), "--steps", "100000",
         "--batch-size", "8", "--base-channels", "8", "--channel-mult", "1,2",
         "--attention-resolutions", "", "--groups", "4", "--checkpoint-every", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stderr
    assert stdout.split() == [str(out / name) for name in ("model.safetensors",
                                                             "train_state.safetensors",
                                                             "log.jsonl")]
    assert checkpoint.load_model(out / "model.safetensors").step >= 50


def test_weights_from_the_hub(runner, tmp_path, tiny_model, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, revision=None):
        calls.append((repo_id, filename, revision))
        if repo_id == "someone/missing":
            raise huggingface_hub.errors.RepositoryNotFoundError("404 Client Error\nmore")
        return str(tiny_model)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    result = run(runner, "sample", "--weights", "hf://someone/mnist/run/model.safetensors@v1",
                 "--class", 2, "--n", 1, "--steps", 2, "-o", tmp_path / "hub.png")
    assert result.exit_code == 0, result.output
    assert calls == [("someone/mnist", "run/model.safetensors", "v1")]
    missing = run(runner, "sample", "--weights", "hf://someone/missing/model.safetensors",
                  "-o", tmp_path / "x.png")
    assert missing.exit_code == 1
    assert "cannot fetch hf://someone/missing/model.safetensors" in missing.stderr
    bad = run(runner, "sample", "--weights", "hf://nothing", "-o", tmp_path / "x.png")
    assert bad.exit_code == 2 and "is not of the form" in bad.stderr


def test_forward_trajectory_noises_real_digits_evenly(runner, tmp_path, tiny_model):
    result = run(runner, "trajectory", "--weights", tiny_model, "--forward", "--frames", 3,
                 "--class", 4, "-o", tmp_path / "f.gif", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["timesteps"] == [-1, 500, 999]


@pytest.mark.parametrize("args, message", [
    (["sample", "--n", "0", "-o", "a.png"], "Invalid value for '--n'"),
    (["sample", "--bogus"], "No such option: --bogus"),
])
def test_console_usage_errors_are_one_line(tmp_path, args, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "diffgen", *args], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr
