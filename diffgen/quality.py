"""Sample quality of a class-conditional digit model, measured with the judge.

Two figures per class k:

* accuracy: the fraction of samples drawn for class k that the judge classifies as k;
* diversity: the mean pairwise L2 distance between the class's samples (pixel space, [-1, 1],
  over all pairs), divided by the same figure for real held-out digits of class k. A ratio of
  1.0 means as varied as real digits; far below 1 means mode collapse, far above means noise.

Both raw distances are reported too. Run ``python -m diffgen.quality --weights PATH`` to sample
a model and print the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from diffgen.data import Dataset, packaged_mnist
from diffgen.errors import DiffgenError
from diffgen.judge import NUM_CLASSES, TRAIN_COUNT, predict, to_unit_range

log = logging.getLogger(__name__)


def held_out_digits() -> Dataset:
    """The last 2,000 packaged digits: the judge never trained on them."""
    data = packaged_mnist()
    return Dataset(data.images[TRAIN_COUNT:], data.labels[TRAIN_COUNT:], data.class_names,
                   "packaged MNIST digits 8000..9999")


def mean_pairwise_distance(images: torch.Tensor) -> float | None:
    """Mean L2 distance over all pairs of images [N, ...]; None for fewer than two."""
    if images.shape[0] < 2:
        return None
    flat = images.reshape(images.shape[0], -1).to(torch.float64)
    return float(torch.pdist(flat).mean())


def as_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> [-1, 1]; float images are taken as already in [-1, 1]."""
    return to_unit_range(images) if images.dtype == torch.uint8 else images.float()


def evaluate_samples(samples: torch.Tensor, labels: list[int], judge: torch.nn.Module,
                     real_dataset_held_out: Dataset) -> dict:
    """Judge accuracy and diversity of samples [N, 1, 28, 28] in [-1, 1] drawn for ``labels``.

    Returns a dict with ``accuracy`` (overall), ``min_class_accuracy``, ``min_class``,
    ``mean_diversity_ratio``, ``predicted_counts`` (how often the judge chose each class) and
    ``per_class``: one entry per class present in ``labels`` with ``class``, ``n``,
    ``accuracy``, ``diversity`` (mean pairwise distance of the samples), ``real_diversity``
    (the same for the real digits) and ``diversity_ratio`` (their quotient; None when either
    side has fewer than two images).
    """
    if samples.ndim != 4 or tuple(samples.shape[1:]) != (1, 28, 28):
        raise DiffgenError(f"the judge needs samples [N, 1, 28, 28], got {tuple(samples.shape)}")
    if samples.shape[0] != len(labels) or not labels:
        raise DiffgenError(f"{samples.shape[0]} samples but {len(labels)} labels")
    label_tensor = torch.tensor(labels, dtype=torch.long)
    if int(label_tensor.min()) < 0 or int(label_tensor.max()) >= NUM_CLASSES:
        raise DiffgenError(f"labels must be in 0..{NUM_CLASSES - 1}")
    samples = samples.detach().float().cpu()
    predicted = predict(judge, samples)
    real_images = as_unit_range(real_dataset_held_out.images)
    per_class = []
    for k in sorted(set(labels)):
        mask = label_tensor == k
        own = mean_pairwise_distance(samples[mask])
        real = mean_pairwise_distance(real_images[real_dataset_held_out.labels == k])
        per_class.append({
            "class": k,
            "n": int(mask.sum()),
            "accuracy": float((predicted[mask] == k).double().mean()),
            "diversity": own,
            "real_diversity": real,
            "diversity_ratio": own / real if own is not None and real else None,
        })
    worst = min(per_class, key=lambda entry: entry["accuracy"])
    ratios = [entry["diversity_ratio"] for entry in per_class
              if entry["diversity_ratio"] is not None]
    return {
        "n": len(labels),
        "accuracy": float((predicted == label_tensor).double().mean()),
        "min_class_accuracy": worst["accuracy"],
        "min_class": worst["class"],
        "mean_diversity_ratio": sum(ratios) / len(ratios) if ratios else None,
        "predicted_counts": torch.bincount(predicted, minlength=NUM_CLASSES).tolist(),
        "per_class": per_class,
    }


def format_table(result: dict) -> str:
    """The per-class table and the overall figures as plain text."""

    def fmt(value: float | None, width: int = 9) -> str:
        return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"

    lines = [f"{'class':>5} {'n':>5} {'accuracy':>9} {'diversity':>9} {'real':>9} {'ratio':>9}"]
    for entry in result["per_class"]:
        lines.append(f"{entry['class']:>5} {entry['n']:>5} {fmt(entry['accuracy'])} "
                     f"{fmt(entry['diversity'])} {fmt(entry['real_diversity'])} "
                     f"{fmt(entry['diversity_ratio'])}")
    lines.append(f"overall accuracy {result['accuracy']:.3f}, min class accuracy "
                 f"{result['min_class_accuracy']:.3f} (class {result['min_class']}), "
                 f"mean diversity ratio {fmt(result['mean_diversity_ratio'], 0).strip()}")
    lines.append("how often the judge chose each label 0..9: "
                 + " ".join(str(c) for c in result["predicted_counts"]))
    return "\n".join(lines)


def measure(weights: Path | None, n: int, steps: int, ddpm: bool, seed: int, batch_size: int,
            device_spec: str = "auto", precision_spec: str = "auto",
            judge_path: Path | None = None) -> dict:
    """Sample ``n`` digits per class from a model file and evaluate them."""
    from diffgen import device as devices
    from diffgen import pipeline
    from diffgen.judge import load_judge
    from diffgen.sampling import SamplerConfig

    config = SamplerConfig(method="ddpm" if ddpm else "ddim", steps=steps, eta=0.0)
    device, precision = devices.resolve(device_spec, precision_spec)
    judge = load_judge(judge_path)
    loaded = pipeline.load(weights, device)
    shape = (loaded.config.in_channels, *loaded.config.image_size)
    if shape != (1, 28, 28) or loaded.num_classes != NUM_CLASSES:
        raise DiffgenError(f"{loaded.path} makes {shape[0]}x{shape[1]}x{shape[2]} images in "
                           f"{loaded.num_classes} classes; the judge rates 1x28x28 digits in 10")
    labels = pipeline.class_labels(loaded, [], n)
    seeds = pipeline.seeds_for(seed, len(labels))
    log.info("sampling %d digits (%d per class) with %s, %d steps", len(labels), n,
             config.method, steps)
    tic = time.perf_counter()
    samples = pipeline.generate(loaded, labels, seeds, config, device, precision, batch_size)
    seconds = time.perf_counter() - tic
    result = evaluate_samples(samples, labels, judge, held_out_digits())
    return {"weights": str(loaded.path), "step": loaded.step, "sampler": config.method,
            "steps": steps, "eta": config.eta, "n_per_class": n, "seed": seed,
            "device": str(device), "precision": precision.name,
            "sampling_seconds": round(seconds, 2), **result}


def main(argv: list[str] | None = None) -> int:
    """``python -m diffgen.quality --weights PATH --n 100 --steps 50 [--ddpm] [--json]``."""
    parser = argparse.ArgumentParser(
        prog="python -m diffgen.quality",
        description="Sample n digits per class (no guidance) and rate them with the judge.")
    parser.add_argument("--weights", type=Path, default=None,
                        help="Model file [default: the shipped model].")
    parser.add_argument("--n", type=int, default=100, help="Samples per class.")
    parser.add_argument("--steps", type=int, default=50, help="Sampler steps.")
    parser.add_argument("--ddpm", action="store_true", help="DDPM ancestral sampling "
                                                            "instead of DDIM (eta 0).")
    parser.add_argument("--seed", type=int, default=0, help="Sample i gets seed + i.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--judge", type=Path, default=None,
                        help="Judge file [default: the shipped judge].")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        result = measure(args.weights, args.n, args.steps, args.ddpm, args.seed,
                         args.batch_size, args.device, args.precision, args.judge)
    except DiffgenError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        print(f"{result['weights']} (step {result['step']}): {result['n_per_class']} per class, "
              f"{result['sampler']} {result['steps']} steps, seed {result['seed']}")
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
