"""Shared fixtures: a tiny U-Net config and a tiny model trained for a few steps on real digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffgen.data import Dataset, packaged_mnist
from diffgen.device import Precision
from diffgen.diffusion import ScheduleConfig
from diffgen.training import TrainConfig, Trainer
from diffgen.unet import UNetConfig

TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(14,),
            num_groups=4, num_heads=2)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return packaged_mnist()


@pytest.fixture(scope="session")
def few_digits(digits: Dataset) -> Dataset:
    """The first 32 real digits."""
    return Dataset(digits.images[:32].clone(), digits.labels[:32].clone(),
                   digits.class_names, "first 32 packaged digits")


@pytest.fixture
def tiny_config() -> UNetConfig:
    return UNetConfig(**TINY)


def make_trainer(data: Dataset, out_dir: Path, steps: int = 4, seed: int = 0,
                 config: UNetConfig | None = None, **train) -> Trainer:
    train_config = TrainConfig(steps=steps, batch_size=train.pop("batch_size", 8), seed=seed,
                               warmup_steps=2, checkpoint_every=train.pop("checkpoint_every", 100),
                               **train)
    return Trainer(config or UNetConfig(**TINY), ScheduleConfig(), train_config, data, out_dir,
                   torch.device("cpu"), Precision("fp32"))


@pytest.fixture(scope="session")
def tiny_model(few_digits: Dataset, tmp_path_factory) -> Path:
    """A tiny model file trained for 3 steps (its samples are noise; shapes are what count)."""
    out = tmp_path_factory.mktemp("tiny-run")
    make_trainer(few_digits, out, steps=3).run()
    return out / "model.safetensors"


@pytest.fixture(scope="session")
def tiny_classifier(few_digits: Dataset, tmp_path_factory) -> Path:
    """A tiny noisy-classifier file trained for 2 steps."""
    from diffgen.classifier import ClassifierConfig
    from diffgen.training import ClassifierTrainer

    out = tmp_path_factory.mktemp("tiny-classifier")
    train_config = TrainConfig(steps=2, batch_size=8, warmup_steps=1, class_dropout=0.0)
    ClassifierTrainer(ClassifierConfig(**TINY), ScheduleConfig(), train_config, few_digits, out,
                      torch.device("cpu"), Precision("fp32")).run()
    return out / "model.safetensors"
