"""Offline sample quality of a digit model, measured with the judge (``diffgen evaluate``).

The judge (``judge.py``) is a clean-digit CNN, a different network from the noisy classifier
that guides sampling, so guidance cannot score itself. For a set of samples it gives:

* accuracy: the fraction of samples drawn for class k that the judge classifies as k;
* Fréchet distance (FD): ||μ_s - μ_r||² + Tr(Σ_s + Σ_r - 2 (Σ_s Σ_r)^½) between Gaussians fitted
  to the judge's 128-d features of the samples and of the reference digits (as FID does with
  Inception features; the values are not comparable with FID);
* precision and recall (Kynkäänniemi et al. 2019, k = 3): the fraction of samples inside the
  k-nearest-neighbour balls of the reference features, and of references inside the samples';
* diversity: the mean pairwise L2 distance between a class's samples in pixel space, divided by
  the same figure for real digits of the class; 1.0 is as varied as real digits.

The reference is the 2,000 packaged digits the judge never trained on (8000..9999). The floor
is what real digits score: the same figures for as many real digits per class, drawn from the
other 8,000. FD and recall depend on the number of images, so compare figures at one ``n``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from diffgen.data import Dataset, packaged_mnist
from diffgen.errors import DiffgenError
from diffgen.judge import NUM_CLASSES, TRAIN_COUNT, predict, to_unit_range

NEIGHBOURS = 3  # k of the precision/recall manifolds


def held_out_digits(data: Dataset | None = None) -> Dataset:
    """The last 2,000 packaged digits (of ``data`` when given): the judge never trained on
    them."""
    data = packaged_mnist() if data is None else data
    return Dataset(data.images[TRAIN_COUNT:], data.labels[TRAIN_COUNT:], data.class_names,
                   "packaged MNIST digits 8000..9999")


def floor_digits(labels: list[int] | None, count: int, seed: int = 0,
                 data: Dataset | None = None) -> tuple[torch.Tensor, list[int] | None]:
    """Real digits standing in for samples: one per label (or ``count`` balanced over the
    classes when unlabeled), drawn with ``seed`` from packaged digits 0..7999 (of ``data``
    when given). Returns ([N, 1, 28, 28] in [-1, 1], labels)."""
    data = packaged_mnist() if data is None else data
    pool_labels = data.labels[:TRAIN_COUNT]
    wanted = labels if labels is not None else [i % NUM_CLASSES for i in range(count)]
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for k in range(NUM_CLASSES):
        need = sum(1 for label in wanted if label == k)
        if need:
            candidates = (pool_labels == k).nonzero().flatten()
            if need > len(candidates):
                raise DiffgenError(f"the floor needs {need} real digits of class {k}; only "
                                   f"{len(candidates)} exist (use a smaller --n)")
            order = candidates[torch.randperm(len(candidates), generator=gen)[:need]]
            picks.append(order)
    index = torch.cat(picks)
    images = to_unit_range(data.images[index])
    return images, (data.labels[index].tolist() if labels is not None else None)


@torch.no_grad()
def judge_features(judge: torch.nn.Module, images: torch.Tensor, batch_size: int = 500
                   ) -> torch.Tensor:
    """The judge's penultimate features [N, 128] (float64) of images in [-1, 1]."""
    judge.eval()
    device = next(judge.parameters()).device
    out = [judge.features(images[i:i + batch_size].to(device, torch.float32)).double().cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FD between Gaussians fitted to feature sets a [N, D] and b [M, D] (float64).

    Tr((Σ_a Σ_b)^½) is the sum of the square roots of the eigenvalues of Σ_a^½ Σ_b Σ_a^½,
    which is symmetric, so no general matrix square root is needed.
    """
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise DiffgenError("the Fréchet distance needs at least two images on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each feature to its k-th nearest other feature."""
    distances = torch.cdist(features, features)
    return distances.kthvalue(k + 1, dim=1).values  # the 1st is the point itself (0)


def precision_recall(samples: torch.Tensor, reference: torch.Tensor, k: int = NEIGHBOURS
                     ) -> tuple[float, float]:
    """Improved precision and recall of sample features against reference features."""
    if samples.shape[0] <= k or reference.shape[0] <= k:
        raise DiffgenError(f"precision and recall need more than {k} images on each side")
    between = torch.cdist(samples, reference)  # [N_samples, N_reference]
    precision = (between <= knn_radii(reference, k)[None, :]).any(dim=1).double().mean()
    recall = (between <= knn_radii(samples, k)[:, None]).any(dim=0).double().mean()
    return float(precision), float(recall)


def mean_pairwise_distance(images: torch.Tensor) -> float | None:
    """Mean L2 distance over all pairs of images [N, ...]; None for fewer than two."""
    if images.shape[0] < 2:
        return None
    flat = images.reshape(images.shape[0], -1).to(torch.float64)
    return float(torch.pdist(flat).mean())


def evaluate_samples(samples: torch.Tensor, labels: list[int] | None, judge: torch.nn.Module,
                     reference: Dataset, reference_features: torch.Tensor | None = None
                     ) -> dict:
    """Every figure for samples [N, 1, 28, 28] in [-1, 1] drawn for ``labels`` (None: no class).

    Returns ``n``, ``accuracy``, ``min_class_accuracy``, ``min_class``, ``fd``, ``precision``,
    ``recall``, ``mean_diversity_ratio``, ``predicted_counts`` (how often the judge chose each
    class) and ``per_class`` (``class``, ``n``, ``accuracy``, ``diversity``, ``real_diversity``,
    ``diversity_ratio``). Class figures are None without labels. ``reference_features``, the
    judge features of the reference images, saves computing them again for every call.
    """
    if samples.ndim != 4 or tuple(samples.shape[1:]) != (1, 28, 28):
        raise DiffgenError(f"the judge needs images [N, 1, 28, 28], got {tuple(samples.shape)}")
    if labels is not None and samples.shape[0] != len(labels):
        raise DiffgenError(f"{samples.shape[0]} images but {len(labels)} labels")
    if samples.shape[0] <= NEIGHBOURS:
        raise DiffgenError(f"evaluation needs more than {NEIGHBOURS} images, got "
                           f"{samples.shape[0]}")
    samples = samples.detach().float().cpu()
    if not torch.isfinite(samples).all():
        raise DiffgenError("the images hold NaN or infinite values")
    predicted = predict(judge, samples)
    real_images = to_unit_range(reference.images)
    features = judge_features(judge, samples)
    real_features = (judge_features(judge, real_images) if reference_features is None
                     else reference_features)
    precision, recall = precision_recall(features, real_features)
    result = {"n": samples.shape[0], "fd": frechet_distance(features, real_features),
              "precision": precision, "recall": recall,
              "predicted_counts": torch.bincount(predicted, minlength=NUM_CLASSES).tolist(),
              "accuracy": None, "min_class_accuracy": None, "min_class": None,
              "mean_diversity_ratio": None, "per_class": []}
    if labels is None:
        own = mean_pairwise_distance(samples)
        real = mean_pairwise_distance(real_images)
        result["mean_diversity_ratio"] = own / real if own is not None and real else None
        return result
    label_tensor = torch.tensor(labels, dtype=torch.long)
    if int(label_tensor.min()) < 0 or int(label_tensor.max()) >= NUM_CLASSES:
        raise DiffgenError(f"labels must be in 0..{NUM_CLASSES - 1}")
    for k in sorted(set(labels)):
        mask = label_tensor == k
        own = mean_pairwise_distance(samples[mask])
        real = mean_pairwise_distance(real_images[reference.labels == k])
        result["per_class"].append({
            "class": k, "n": int(mask.sum()),
            "accuracy": float((predicted[mask] == k).double().mean()),
            "diversity": own, "real_diversity": real,
            "diversity_ratio": own / real if own is not None and real else None,
        })
    worst = min(result["per_class"], key=lambda entry: entry["accuracy"])
    ratios = [e["diversity_ratio"] for e in result["per_class"]
              if e["diversity_ratio"] is not None]
    result.update(accuracy=float((predicted == label_tensor).double().mean()),
                  min_class_accuracy=worst["accuracy"], min_class=worst["class"],
                  mean_diversity_ratio=sum(ratios) / len(ratios) if ratios else None)
    return result


def evaluate_with_floor(samples: torch.Tensor, labels: list[int] | None,
                        judge: torch.nn.Module, seed: int = 0) -> dict:
    """``evaluate_samples`` of the samples and, as ``floor``, of as many real digits."""
    data = packaged_mnist()
    reference = held_out_digits(data)
    features = judge_features(judge, to_unit_range(reference.images))
    result = evaluate_samples(samples, labels, judge, reference, features)
    real, real_labels = floor_digits(labels, samples.shape[0], seed, data)
    floor = evaluate_samples(real, real_labels, judge, reference, features)
    return {**result, "floor": {k: floor[k] for k in ("n", "accuracy", "fd", "precision",
                                                       "recall", "mean_diversity_ratio")}}


_SAMPLE_NAME = re.compile(r"_(class(\d+)|uncond)_")


@dataclass
class ImageSet:
    """Images read for evaluation: [N, 1, 28, 28] in [-1, 1], labels or None, and the source."""

    images: torch.Tensor
    labels: list[int] | None
    source: str


def read_images(root: Path) -> ImageSet:
    """Images from a folder: classes from sub-folder names 0..9 (as ``train --data DIR``), or
    from file names as ``sample --out-dir`` writes them (``0007_class3_seed7.png``; ``uncond``
    for no class). A folder of other names is read unlabeled."""
    from diffgen.image_folder import class_folders, image_files
    from diffgen.images import load_image

    root = Path(root)
    if not root.is_dir():
        raise DiffgenError(f"--images {root} is not a folder")
    folders = class_folders(root)
    if folders and image_files(root):
        raise DiffgenError(f"--images {root} holds both class sub-folders and images; give a "
                           "folder of one kind")
    files: list[Path] = []
    labels: list[int | None] = []
    if folders:
        for folder in folders:
            if not re.fullmatch(r"\d", folder.name):
                raise DiffgenError(f"--images: sub-folder {folder.name!r} is not a digit class "
                                   "0..9")
            found = image_files(folder)
            files += found
            labels += [int(folder.name)] * len(found)
    else:
        files = image_files(root)
        for path in files:
            match = _SAMPLE_NAME.search(path.stem)
            labels.append(int(match.group(2)) if match and match.group(2) else None)
    if not files:
        raise DiffgenError(f"--images {root} holds no PNG, JPEG, BMP or TIFF images")
    known = [label for label in labels if label is not None]
    if known and len(known) != len(labels):
        raise DiffgenError(f"--images {root}: {len(labels) - len(known)} of {len(labels)} file "
                           "names carry no class (like 0007_class3_seed7.png)")
    if any(label >= NUM_CLASSES for label in known):
        raise DiffgenError(f"--images {root}: classes must be 0..{NUM_CLASSES - 1}")
    images = torch.stack([load_image(p, 1, (28, 28)) for p in files])
    return ImageSet(images, known or None, str(root))


def format_table(result: dict) -> str:
    """The per-class table, the overall figures and the real-digit floor as plain text."""

    def fmt(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    floor = result.get("floor", {})
    lines = []
    if result["per_class"]:
        lines.append(f"{'class':>5} {'n':>5} {'accuracy':>9} {'diversity':>9} {'real':>9} "
                     f"{'ratio':>9}")
        for e in result["per_class"]:
            lines.append(f"{e['class']:>5} {e['n']:>5} {fmt(e['accuracy']):>9} "
                         f"{fmt(e['diversity']):>9} {fmt(e['real_diversity']):>9} "
                         f"{fmt(e['diversity_ratio']):>9}")
    rows = [("accuracy", "accuracy", 3), ("Fréchet distance (judge features)", "fd", 2),
            ("precision", "precision", 3), ("recall", "recall", 3),
            ("diversity ratio", "mean_diversity_ratio", 3)]
    lines.append(f"{'':<36}{'samples':>9} {'real digits':>12}")
    for name, key, digits in rows:
        lines.append(f"{name:<36}{fmt(result.get(key), digits):>9} "
                     f"{fmt(floor.get(key), digits):>12}")
    if result.get("min_class") is not None:
        lines.append(f"lowest class: {result['min_class']} at "
                     f"{result['min_class_accuracy']:.3f}")
    lines.append("how often the judge chose each label 0..9: "
                 + " ".join(str(c) for c in result["predicted_counts"]))
    return "\n".join(lines)
