"""A clean-digit classifier that measures sample quality (it never guides sampling).

The judge is a small CNN on 28x28 grayscale digits in [-1, 1]. It is trained on the first 8,000
digits of the packaged MNIST split and tested on the last 2,000, which it never sees in
training; ``weights/judge.safetensors`` ships the trained network (see ``weights/JUDGE.md``).

Reproduce the shipped file with ``python -m diffgen.judge --out weights/judge.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffgen import checkpoint
from diffgen.data import Dataset, packaged_mnist
from diffgen.errors import DiffgenError
from diffgen.shipped import shipped_file

log = logging.getLogger(__name__)

FORMAT = "diffgen-judge-1"
ARCHITECTURE = "judge-cnn-v1"
JUDGE_FILE = "judge.safetensors"
NUM_CLASSES = 10
TRAIN_COUNT = 8000
DEFAULT_EPOCHS = 20
BATCH_SIZE = 64


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in 0..255 -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class Judge(nn.Module):
    """conv 32 -> pool -> conv 64 -> pool -> conv 128 -> conv 128 -> global pool -> linear 10.

    ``features`` is the 128-d global-pooled vector before dropout and the last layer.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_block(1, 32), nn.MaxPool2d(2),  # 14x14
            *conv_block(32, 64), nn.MaxPool2d(2),  # 7x7
            *conv_block(64, 128), *conv_block(128, 128),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features [N, 128] of images [N, 1, 28, 28] in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10] of images [N, 1, 28, 28] in [-1, 1]."""
        return self.head(self.dropout(self.features(x)))


def default_judge_path() -> Path:
    """The judge shipped with diffgen (inside the installed package or the source tree)."""
    try:
        return shipped_file(JUDGE_FILE)
    except DiffgenError:
        raise DiffgenError(f"the shipped judge {JUDGE_FILE} is missing; reinstall diffgen, pass "
                           "--judge, or train one with python -m diffgen.judge") from None


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to +-2 px, rotations of up to +-8 degrees and scaling by 0.92-1.08.

    Background stays -1 (the image is shifted to [0, 2] so grid_sample's zero padding is black).
    """
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(8)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * 0.08
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 / 14)  # 2 px in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) - 1


@torch.no_grad()
def predict(judge: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted classes [N] of images [N, 1, 28, 28] in [-1, 1], in eval mode."""
    judge.eval()
    device = next(judge.parameters()).device
    out = [judge(images[i:i + batch_size].to(device, torch.float32)).argmax(1).cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def per_class_accuracy(predicted: torch.Tensor, labels: torch.Tensor,
                       num_classes: int = NUM_CLASSES) -> list[float | None]:
    """Fraction right for each class; None for a class with no examples."""
    result: list[float | None] = []
    for k in range(num_classes):
        mask = labels == k
        count = int(mask.sum())
        result.append(float((predicted[mask] == k).sum()) / count if count else None)
    return result


def train_judge(dataset: Dataset, train_count: int = TRAIN_COUNT, epochs: int = DEFAULT_EPOCHS,
                seed: int = 0) -> tuple[Judge, float, list[float | None]]:
    """Train on the first ``train_count`` digits, test on the rest.

    Returns (model in eval mode, held-out accuracy, held-out accuracy per class).
    """
    if dataset.images.shape[1:] != (1, 28, 28):
        raise DiffgenError("the judge needs 1x28x28 digits, got "
                           f"{tuple(dataset.images.shape[1:])}")
    if not 0 < train_count < len(dataset):
        raise DiffgenError(f"train_count must be in 1..{len(dataset) - 1}, got {train_count}")
    if epochs < 1:
        raise DiffgenError(f"--epochs must be at least 1, got {epochs}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_train = to_unit_range(dataset.images[:train_count])
    y_train = dataset.labels[:train_count]
    x_test = to_unit_range(dataset.images[train_count:])
    y_test = dataset.labels[train_count:]
    model = Judge(num_classes=NUM_CLASSES)
    steps_per_epoch = math.ceil(train_count / BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch, pct_start=0.2)
    for epoch in range(epochs):
        model.train()
        tic = time.perf_counter()
        order = torch.randperm(train_count, generator=generator)
        total_loss = 0.0
        for i in range(0, train_count, BATCH_SIZE):
            index = order[i:i + BATCH_SIZE]
            x = augment(x_train[index], generator)
            loss = F.cross_entropy(model(x), y_train[index], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * index.numel()
        accuracy = float((predict(model, x_test) == y_test).double().mean())
        log.info("judge epoch %d/%d: loss %.4f, held-out accuracy %.4f (%.1f s)", epoch + 1,
                 epochs, total_loss / train_count, accuracy, time.perf_counter() - tic)
    predicted = predict(model, x_test)
    accuracy = float((predicted == y_test).double().mean())
    return model.eval(), accuracy, per_class_accuracy(predicted, y_test)


def save_judge(model: Judge, path: Path | str, metrics: dict) -> None:
    """Write the judge as safetensors; ``metrics`` go into the metadata as JSON."""
    metadata = {"format": FORMAT, "architecture": ARCHITECTURE,
                "num_classes": str(model.head.out_features)}
    for key, value in metrics.items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    checkpoint.atomic_save(model.state_dict(), metadata, Path(path))


def load_judge(path: Path | str | None = None, device: torch.device | str = "cpu") -> Judge:
    """Load a judge file (the shipped one by default) in eval mode."""
    path = default_judge_path() if path is None else Path(path)
    if not path.is_file():
        raise DiffgenError(f"judge file {path} does not exist; train one with "
                           "python -m diffgen.judge --out PATH")
    tensors, metadata = checkpoint.read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise DiffgenError(f"{path} is not a diffgen judge file (no {FORMAT!r} metadata)")
    if metadata.get("architecture") != ARCHITECTURE:
        raise DiffgenError(f"{path} holds judge architecture {metadata.get('architecture')!r}; "
                           f"this diffgen reads {ARCHITECTURE!r}")
    model = Judge(num_classes=NUM_CLASSES)
    checkpoint.load_weights_into(model, tensors, str(path))
    log.info("loaded judge %s (held-out accuracy %s)", path, metadata.get("accuracy", "?"))
    return model.to(device).eval()


def judge_metadata(path: Path | str | None = None) -> dict[str, str]:
    """The metadata of a judge file (accuracy, training command, ...)."""
    path = default_judge_path() if path is None else Path(path)
    return checkpoint.read_safetensors(path)[1]


def main(argv: list[str] | None = None) -> int:
    """``python -m diffgen.judge --out PATH [--epochs N] [--seed S]``."""
    parser = argparse.ArgumentParser(prog="python -m diffgen.judge",
                                     description="Train the digit judge on the packaged split.")
    parser.add_argument("--out", type=Path, required=True, help="Where to write the judge.")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        tic = time.perf_counter()
        model, accuracy, per_class = train_judge(packaged_mnist(), TRAIN_COUNT, args.epochs,
                                                 args.seed)
        seconds = time.perf_counter() - tic
        save_judge(model, args.out, {
            "accuracy": f"{accuracy:.4f}", "per_class_accuracy": per_class,
            "train": "packaged MNIST digits 0..7999", "test": "packaged MNIST digits 8000..9999",
            "epochs": args.epochs, "seed": args.seed, "seconds": round(seconds),
            "command": " ".join(["python -m diffgen.judge", *argv]),
            "torch": torch.__version__,
        })
    except DiffgenError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} in {seconds:.0f} s")
    print(f"held-out accuracy {accuracy:.4f} on 2000 digits")
    for k, value in enumerate(per_class):
        print(f"  class {k}: {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
