"""The digit judge: the shipped file's accuracy, save/load round trips, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffgen import checkpoint
from diffgen.data import Dataset
from diffgen.errors import DiffgenError
from diffgen.judge import (ARCHITECTURE, FORMAT, TRAIN_COUNT, Judge, default_judge_path,
                           judge_metadata, load_judge, predict, save_judge, to_unit_range,
                           train_judge)


@pytest.fixture(scope="module")
def shipped() -> Judge:
    return load_judge()


def test_default_path_is_the_shipped_weights_file() -> None:
    path = default_judge_path()
    assert path.name == "judge.safetensors" and path.parent.name == "weights" and path.is_file()


def test_shipped_judge_on_held_out_digits(shipped: Judge, digits: Dataset) -> None:
    x = to_unit_range(digits.images[TRAIN_COUNT:])
    y = digits.labels[TRAIN_COUNT:]
    assert x.shape == (2000, 1, 28, 28) and x.min() == -1 and x.max() == 1
    accuracy = float((predict(shipped, x) == y).float().mean())
    assert accuracy >= 0.98
    # the figure recorded at training time, give or take one digit for float differences
    recorded = float(judge_metadata()["accuracy"])
    assert recorded >= 0.99
    assert abs(accuracy - recorded) <= 1 / 2000 + 1e-9


def test_features_and_logits_shapes(shipped: Judge, digits: Dataset) -> None:
    x = to_unit_range(digits.images[:5])
    with torch.no_grad():
        assert shipped.features(x).shape == (5, 128)
        assert shipped(x).shape == (5, 10)
    assert not shipped.training


def test_save_load_round_trip_gives_identical_logits(tmp_path: Path, digits: Dataset) -> None:
    torch.manual_seed(3)
    model = Judge()
    x = to_unit_range(digits.images[:64])
    model.train()
    with torch.no_grad():
        model(x)  # moves the BatchNorm running statistics away from their defaults
    model.eval()
    path = tmp_path / "j.safetensors"
    save_judge(model, path, {"accuracy": "0.5000", "per_class_accuracy": [0.5] * 10})
    loaded = load_judge(path)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
        assert torch.equal(model.features(x), loaded.features(x))
    meta = judge_metadata(path)
    assert meta["format"] == FORMAT and meta["architecture"] == ARCHITECTURE
    assert meta["accuracy"] == "0.5000" and meta["per_class_accuracy"] == str([0.5] * 10)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DiffgenError, match="does not exist"):
        load_judge(tmp_path / "nope.safetensors")


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x07garbage, not a safetensors header" * 10)
    with pytest.raises(DiffgenError, match="not a readable safetensors file"):
        load_judge(path)


def test_truncated_file(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_judge(Judge(), good, {})
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(DiffgenError):
        load_judge(bad)


def test_other_safetensors_files_are_refused(tmp_path: Path) -> None:
    state = Judge().state_dict()
    plain = tmp_path / "plain.safetensors"
    checkpoint.atomic_save(state, {}, plain)
    with pytest.raises(DiffgenError, match="not a diffgen judge file"):
        load_judge(plain)
    other = tmp_path / "other.safetensors"
    checkpoint.atomic_save(state, {"format": FORMAT, "architecture": "resnet"}, other)
    with pytest.raises(DiffgenError, match="architecture 'resnet'"):
        load_judge(other)
    state["head.weight"] = torch.zeros(10, 64)
    wrong = tmp_path / "wrong.safetensors"
    checkpoint.atomic_save(state, {"format": FORMAT, "architecture": ARCHITECTURE}, wrong)
    with pytest.raises(DiffgenError, match="head.weight"):
        load_judge(wrong)


def test_train_judge_smoke(digits: Dataset) -> None:
    small = Dataset(digits.images[:160], digits.labels[:160], digits.class_names, "160 digits")
    model, accuracy, per_class = train_judge(small, train_count=128, epochs=1, seed=0)
    assert not model.training
    assert 0.0 <= accuracy <= 1.0 and len(per_class) == 10
    assert all(v is None or 0.0 <= v <= 1.0 for v in per_class)


def test_train_judge_checks_arguments(digits: Dataset) -> None:
    with pytest.raises(DiffgenError, match="train_count"):
        train_judge(digits, train_count=len(digits), epochs=1)
    with pytest.raises(DiffgenError, match="--epochs"):
        train_judge(digits, epochs=0)
