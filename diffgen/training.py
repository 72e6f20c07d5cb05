"""Training ε_θ with the DDPM simple loss (Ho et al. 2020, algorithm 1 and eq. 14).

L_simple = E_{x_0, t, eps} || eps - ε_θ(sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) eps, t, y) ||², with t
uniform over 0..T-1 and y replaced by the null class with probability ``class_dropout`` so the
same network also learns the unconditional model used by classifier-free guidance.

Every random draw of step k (batch order, t, eps, class dropout, dropout masks) comes from a
generator seeded by (seed, k), so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from diffgen import checkpoint
from diffgen.classifier import ClassifierConfig, NoisyClassifier
from diffgen.data import Dataset
from diffgen.device import Precision, autocast
from diffgen.diffusion import GaussianDiffusion, ScheduleConfig
from diffgen.ema import EMA
from diffgen.errors import DiffgenError, InvalidSetting
from diffgen.unet import UNet, UNetConfig, count_parameters

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; stored in the checkpoint beside the model config."""

    data: str = "packaged"  # "packaged", "mnist" or an image folder
    steps: int = 10_000  # total optimizer steps
    batch_size: int = 128  # images per step
    lr: float = 1e-3  # AdamW peak learning rate
    warmup_steps: int = 500  # linear learning-rate warm-up
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: float = 0.9999  # EMA decay ceiling, reached through the warm-up of ema.py
    class_dropout: float = 0.1  # probability of training on the null class
    checkpoint_every: int = 1000  # steps between checkpoints (one is also written at the end)
    log_every: int = 50  # steps between log lines
    seed: int = 0  # seeds initialisation and every per-step draw
    max_nan_steps: int = 5  # consecutive non-finite losses before training stops
    holdout: int = 0  # the last N images of the data are kept out of training


    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "checkpoint_every", "log_every", "max_nan_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise InvalidSetting(f"--{name.replace('_', '-')} must be at least 1, "
                                   f"got {getattr(self, name)}")
        if not 0 < self.lr <= 1:
            raise InvalidSetting(f"--lr must be in (0, 1], got {self.lr}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise InvalidSetting(f"class dropout must be in [0, 1), got {self.class_dropout}")
        if not 0.0 < self.ema_decay < 1.0:
            raise InvalidSetting(f"EMA decay must be in (0, 1), got {self.ema_decay}")
        if self.holdout < 0:
            raise InvalidSetting(f"--holdout must be >= 0, got {self.holdout}")
        if self.warmup_steps < 0:
            raise InvalidSetting(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not self.grad_clip > 0:
            raise InvalidSetting(f"gradient clip must be positive, got {self.grad_clip}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepStats:
    """What the trainer reports after each step (the progress bar and the JSONL log)."""

    step: int
    total_steps: int
    loss: float
    lr: float
    grad_norm: float
    images_per_s: float
    skipped: bool = False


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for the draws of one step, distinct for every (seed, step) pair."""
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) % (2 ** 63)


class BatchSampler:
    """(x_0 indices, t, eps, labels) for step k, a pure function of (seed, k).

    Batches walk an epoch-wise permutation of the data, dropping the last partial batch.
    """

    def __init__(self, data: Dataset, batch_size: int, num_timesteps: int, seed: int,
                 class_dropout: float, null_class: int) -> None:
        if batch_size > len(data):
            raise InvalidSetting(f"batch size {batch_size} exceeds the {len(data)} images in "
                               f"{data.source}")
        self.data = data
        self.batch_size = batch_size
        self.num_timesteps = num_timesteps
        self.seed = seed
        self.class_dropout = class_dropout
        self.null_class = null_class
        self.batches_per_epoch = len(data) // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, index = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(step_seed(self.seed, -1 - epoch))
            self._epoch, self._perm = epoch, torch.randperm(len(self.data), generator=gen)
        idx = self._perm[index * self.batch_size:(index + 1) * self.batch_size]
        gen = torch.Generator().manual_seed(step_seed(self.seed, step))
        t = torch.randint(0, self.num_timesteps, (self.batch_size,), generator=gen)
        eps = torch.randn((self.batch_size, *self.data.images.shape[1:]), generator=gen)
        labels = self.data.labels[idx].clone()
        drop = torch.rand(self.batch_size, generator=gen) < self.class_dropout
        labels[drop] = self.null_class
        return idx, t, eps, labels


def split_holdout(data: Dataset, holdout: int) -> tuple[Dataset, Dataset | None]:
    """(the data without its last ``holdout`` images, those images or None when 0)."""
    if holdout == 0:
        return data, None
    if holdout >= len(data):
        raise InvalidSetting(f"--holdout {holdout} leaves nothing of the {len(data)} images in "
                             f"{data.source} to train on")
    keep = len(data) - holdout
    return (Dataset(data.images[:keep], data.labels[:keep], data.class_names,
                    f"{data.source} (first {keep} images)"),
            Dataset(data.images[keep:], data.labels[keep:], data.class_names,
                    f"{data.source} (last {holdout} images)"))


class Trainer:
    """Owns the model, EMA, optimizer and loss scaler of one training run in ``out_dir``.

    This trains the U-Net ε_θ; subclasses change the network and the loss (see
    :class:`ClassifierTrainer`), everything else is shared.
    """

    kind = checkpoint.KIND_UNET
    config_class = UNetConfig

    def __init__(self, model_config: UNetConfig, schedule_config: ScheduleConfig,
                 train_config: TrainConfig, data: Dataset, out_dir: Path,
                 device: torch.device, precision: Precision) -> None:
        if data.num_classes != model_config.num_classes:
            raise InvalidSetting(f"{data.source} has {data.num_classes} classes, the model "
                               f"config {model_config.num_classes}")
        if tuple(data.images.shape[1:]) != (model_config.in_channels, *model_config.image_size):
            raise InvalidSetting(f"{data.source} images are {tuple(data.images.shape[1:])}, the "
                               f"model expects {model_config.in_channels} x "
                               f"{model_config.image_size}")
        self.model_config, self.schedule_config, self.config = (
            model_config, schedule_config, train_config)
        data, self.held_out = split_holdout(data, train_config.holdout)
        self.out_dir = Path(out_dir)
        self.device, self.precision = device, precision
        self.diffusion = GaussianDiffusion(schedule_config)

        torch.manual_seed(train_config.seed)
        self.model = self.build_model(model_config).to(device)
        self.ema = EMA(self.model, train_config.ema_decay)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train_config.lr,
                                           weight_decay=train_config.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_loss_scaling)
        self.step = 0
        self.images = data.images.to(device)
        self.sampler = BatchSampler(data, train_config.batch_size,
                                    schedule_config.num_timesteps, train_config.seed,
                                    train_config.class_dropout, model_config.num_classes)

    def build_model(self, config: UNetConfig) -> torch.nn.Module:
        return UNet(config)

    def per_sample_loss(self, x_0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                        labels: torch.Tensor) -> torch.Tensor:
        """L_simple of each sample: || eps - ε_θ(x_t, t, y) ||² averaged over its pixels."""
        x_t = self.diffusion.q_sample(x_0, t, eps)
        with autocast(self.device, self.precision):
            eps_pred = self.model(x_t, t, labels)
        return F.mse_loss(eps_pred.float(), eps, reduction="none").mean(dim=(1, 2, 3))

    @property
    def model_path(self) -> Path:
        return self.out_dir / checkpoint.MODEL_FILE

    @property
    def state_path(self) -> Path:
        return self.out_dir / checkpoint.STATE_FILE

    @property
    def log_path(self) -> Path:
        return self.out_dir / LOG_FILE

    def lr_at(self, step: int) -> float:
        """Linear warm-up to the peak learning rate, then constant."""
        warmup = self.config.warmup_steps
        return self.config.lr * min(1.0, (step + 1) / warmup) if warmup else self.config.lr

    def save(self) -> None:
        """Training state first, then the model file that names its step."""
        checkpoint.save_train_state(self.state_path, self.step, self.optimizer,
                                    self.scaler.state_dict())
        checkpoint.save_model(self.model_path, checkpoint.Checkpoint(
            self.model_config.to_dict(), self.schedule_config.to_dict(), self.config.to_dict(),
            self.step, self.model.state_dict(), self.ema.state_dict(), self.kind))
        log.info("saved checkpoint at step %d to %s", self.step, self.model_path)

    def resume(self) -> None:
        """Restore weights, EMA, optimizer, loss scale and step from ``out_dir``."""
        if not self.model_path.is_file() or not self.state_path.is_file():
            raise DiffgenError(f"--resume: no checkpoint in {self.out_dir} "
                               f"(need {checkpoint.MODEL_FILE} and {checkpoint.STATE_FILE})")
        ckpt = checkpoint.load_model(self.model_path)
        if ckpt.kind != self.kind:
            raise DiffgenError(f"--resume: {self.model_path} holds a {ckpt.kind}, not a "
                               f"{self.kind}")
        if self.config_class.from_dict(ckpt.model_config) != self.model_config:
            raise DiffgenError(f"--resume: {self.model_path} holds another model config")
        if ScheduleConfig(**ckpt.schedule_config) != self.schedule_config:
            raise DiffgenError(f"--resume: {self.model_path} holds another schedule config")
        checkpoint.load_weights_into(self.model, ckpt.params, str(self.model_path))
        self.ema.load_state_dict(ckpt.ema)
        step, scaler_state = checkpoint.load_train_state(self.state_path, self.optimizer)
        if step != ckpt.step:
            raise DiffgenError(f"--resume: {self.state_path} is at step {step} but "
                               f"{self.model_path} at step {ckpt.step}")
        if scaler_state:
            self.scaler.load_state_dict(scaler_state)
        self.step = step
        log.info("resumed from step %d", step)

    def train_step(self) -> tuple[float, float, bool]:
        """One optimizer step; returns (loss, grad norm, skipped)."""
        idx, t, eps, labels = self.sampler.draw(self.step)
        x_0 = self.images[idx.to(self.device)].float() / 127.5 - 1.0
        t, eps, labels = t.to(self.device), eps.to(self.device), labels.to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)

        torch.manual_seed(step_seed(self.config.seed, self.step))  # dropout masks
        per_sample = self.per_sample_loss(x_0, t, eps, labels)
        loss = per_sample.mean()
        self.last_loss_by_quartile = self.loss_by_quartile(per_sample.detach(), t)
        if not torch.isfinite(loss):
            return float("nan"), float("nan"), True

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.model, self.step)
        return loss.item(), grad_norm.item(), False

    def loss_by_quartile(self, per_sample: torch.Tensor, t: torch.Tensor) -> list[float | None]:
        """Mean loss over each quarter of 0..T-1 (None where the batch has no t in it)."""
        quartile = (t * 4) // self.diffusion.num_timesteps
        return [per_sample[quartile == q].mean().item() if (quartile == q).any() else None
                for q in range(4)]

    def run(self, on_step: Callable[[StepStats], None] | None = None) -> int:
        """Train until ``config.steps``; checkpoint every N steps, at the end and on Ctrl-C."""
        log.info("%s: %s parameters, config %s", self.kind, f"{count_parameters(self.model):,}",
                 json.dumps(self.model_config.to_dict()))
        log.info("train config %s", json.dumps(self.config.to_dict()))
        fresh = not self.out_dir.exists()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DiffgenError(f"cannot create folder {self.out_dir}: {err.strerror}") from None
        try:
            return self._run(on_step)
        except OSError as err:  # the log file; checkpoint writes raise DiffgenError already
            raise DiffgenError(f"cannot write to {self.out_dir}: {err.strerror or err}") from None
        except DiffgenError:
            if fresh and not self.model_path.is_file():
                shutil.rmtree(self.out_dir, ignore_errors=True)  # nothing worth keeping
            raise

    def _run(self, on_step: Callable[[StepStats], None] | None) -> int:
        nan_run, start, saved = 0, self.step, -1
        if self.step >= self.config.steps:
            log.warning("the run is already at step %d of %d; nothing to do", self.step,
                        self.config.steps)
        tic = time.perf_counter()
        try:
            with open(self.log_path, "a") as log_file:
                while self.step < self.config.steps:
                    loss, grad_norm, skipped = self.train_step()
                    if skipped:
                        nan_run += 1
                        log.warning("step %d: non-finite loss, step skipped", self.step)
                        if nan_run >= self.config.max_nan_steps:
                            kept = (f"last good checkpoint kept in {self.out_dir}"
                                    if self.model_path.is_file() else "no checkpoint written")
                            raise DiffgenError(
                                f"training diverged: {nan_run} consecutive non-finite losses "
                                f"ending at step {self.step}; {kept}")
                    else:
                        nan_run = 0
                    self.step += 1
                    elapsed = time.perf_counter() - tic
                    stats = StepStats(self.step, self.config.steps, loss, self.lr_at(self.step - 1),
                                      grad_norm, (self.step - start) * self.config.batch_size
                                      / max(elapsed, 1e-9), skipped)
                    if on_step is not None:
                        on_step(stats)
                    if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                        self.write_log(log_file, stats, elapsed)
                    if self.step % self.config.checkpoint_every == 0 and nan_run == 0:
                        self.save()
                        saved = self.step
        except KeyboardInterrupt:
            if self.step > start and saved != self.step:
                self.save()
            raise
        if saved != self.step and (self.step > start or not self.model_path.is_file()):
            self.save()
        return self.step

    def final_report(self) -> dict:
        """Figures reported when a run ends; the diffusion model has none beyond its log."""
        return {}

    def write_log(self, log_file, stats: StepStats, elapsed: float) -> None:
        record = {"step": stats.step, "loss": None if stats.skipped else stats.loss, "lr": stats.lr,
                  "grad_norm": stats.grad_norm, "images_per_s": round(stats.images_per_s, 2),
                  "elapsed_s": round(elapsed, 2),
                  "loss_by_quartile": self.last_loss_by_quartile}
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        log.info("step %d loss %.4f lr %.2e grad-norm %.3f %.1f img/s", stats.step, stats.loss,
                 stats.lr, stats.grad_norm, stats.images_per_s)


def resume_trainer(out_dir: Path, device: torch.device, precision: Precision,
                   steps: int | None = None, epochs: int | None = None,
                   checkpoint_every: int | None = None) -> Trainer:
    """Rebuild a run from its saved configs; only the length and checkpoint interval change."""
    from dataclasses import replace

    from diffgen.data import load_dataset

    model_path = Path(out_dir) / checkpoint.MODEL_FILE
    if not model_path.is_file():
        raise DiffgenError(f"--resume: no checkpoint in {out_dir} (need {checkpoint.MODEL_FILE})")
    ckpt = checkpoint.load_model(model_path)
    trainer_class = ClassifierTrainer if ckpt.kind == checkpoint.KIND_CLASSIFIER else Trainer
    model_config = trainer_class.config_class.from_dict(ckpt.model_config)
    schedule_config = ScheduleConfig(**ckpt.schedule_config)
    train_config = TrainConfig(**ckpt.train_config)
    data = load_dataset(train_config.data, model_config.image_size, model_config.in_channels)
    if epochs is not None:
        steps = epochs * max(1, (len(data) - train_config.holdout) // train_config.batch_size)
    overrides = {k: v for k, v in (("steps", steps), ("checkpoint_every", checkpoint_every))
                 if v is not None}
    train_config = replace(train_config, **overrides)
    trainer = trainer_class(model_config, schedule_config, train_config, data, out_dir, device,
                            precision)
    trainer.resume()
    return trainer



@torch.no_grad()
def accuracy_by_timestep(classifier: NoisyClassifier, diffusion: GaussianDiffusion,
                         images: torch.Tensor, labels: torch.Tensor, timesteps: list[int],
                         device: torch.device, precision: Precision, seed: int = 0,
                         batch_size: int = 500) -> dict[int, float]:
    """Accuracy on x_t = q_sample(x_0, t, eps) for each t; images uint8 [N, C, H, W].

    The noise is drawn from ``seed``, so the figures are reproducible.
    """
    classifier.eval()
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(images.shape, generator=gen)
    x_0 = images.float() / 127.5 - 1.0
    result = {}
    for t in timesteps:
        correct = 0
        for begin in range(0, len(images), batch_size):
            end = min(begin + batch_size, len(images))
            t_batch = torch.full((end - begin,), t, dtype=torch.long)
            x_t = diffusion.q_sample(x_0[begin:end], t_batch, eps[begin:end]).to(device)
            with autocast(device, precision):
                logits = classifier(x_t, t_batch.to(device))
            correct += int((logits.argmax(dim=1).cpu() == labels[begin:end]).sum())
        result[t] = correct / len(images)
    return result

class ClassifierTrainer(Trainer):
    """Trains the noisy classifier p_φ(y | x_t, t) with cross-entropy at t uniform in 0..T-1."""

    kind = checkpoint.KIND_CLASSIFIER
    config_class = ClassifierConfig

    def build_model(self, config: ClassifierConfig) -> torch.nn.Module:
        if self.config.class_dropout:
            raise InvalidSetting("the classifier trains on true labels; class dropout must be 0")
        return NoisyClassifier(config)

    def per_sample_loss(self, x_0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                        labels: torch.Tensor) -> torch.Tensor:
        x_t = self.diffusion.q_sample(x_0, t, eps)
        with autocast(self.device, self.precision):
            logits = self.model(x_t, t)
        return F.cross_entropy(logits.float(), labels, reduction="none")

    def final_report(self) -> dict:
        """Held-out accuracy at t = 0, T/4, T/2, 3T/4 and T - 1 of the EMA weights (logged)."""
        if self.held_out is None:
            return {}
        classifier = NoisyClassifier(self.model_config).to(self.device)
        classifier.load_state_dict(self.ema.state_dict())
        last = self.diffusion.num_timesteps - 1
        timesteps = sorted({0, last // 4, last // 2, 3 * last // 4, last})
        accuracy = accuracy_by_timestep(classifier, self.diffusion, self.held_out.images,
                                        self.held_out.labels, timesteps, self.device,
                                        self.precision)
        for t, value in accuracy.items():
            log.info("held-out accuracy at t = %d: %.4f (%d images)", t, value,
                     len(self.held_out))
        return {"held_out_accuracy": {str(t): round(v, 4) for t, v in accuracy.items()}}
