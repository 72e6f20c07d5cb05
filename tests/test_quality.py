"""The quality figures on real digits, pure noise, hand-made images and features with known
Fréchet distances."""

from __future__ import annotations

import math

import pytest
import torch

from diffgen.data import Dataset
from diffgen.errors import DiffgenError
from diffgen.judge import TRAIN_COUNT, Judge, load_judge, to_unit_range
from diffgen.quality import (evaluate_samples, evaluate_with_floor, floor_digits, format_table,
                             frechet_distance, held_out_digits, mean_pairwise_distance,
                             precision_recall)


@pytest.fixture(scope="module")
def judge() -> Judge:
    return load_judge()


@pytest.fixture(scope="module")
def held_out() -> Dataset:
    return held_out_digits()


def subset(data: Dataset, start: int, stop: int) -> Dataset:
    return Dataset(data.images[start:stop], data.labels[start:stop], data.class_names, "part")


def test_held_out_digits_are_the_last_2000(held_out: Dataset, digits: Dataset) -> None:
    assert len(held_out) == 2000
    assert torch.equal(held_out.images, digits.images[TRAIN_COUNT:])


def test_real_held_out_digits_score_like_real_digits(judge: Judge, held_out: Dataset) -> None:
    # one half of the held-out digits plays the samples, the other half the reference
    samples, reference = subset(held_out, 0, 1000), subset(held_out, 1000, 2000)
    result = evaluate_samples(to_unit_range(samples.images), samples.labels.tolist(), judge,
                              reference)
    assert result["n"] == 1000 and len(result["per_class"]) == 10
    assert result["accuracy"] >= 0.98
    assert result["min_class_accuracy"] >= 0.95
    for entry in result["per_class"]:
        assert entry["n"] == int((samples.labels == entry["class"]).sum())
        assert 0.8 <= entry["diversity_ratio"] <= 1.2, entry
        # real digits of one class lie 13 (ones) to 20 (twos) apart in [-1, 1] pixel space
        assert 12.0 < entry["diversity"] < 22.0 and 12.0 < entry["real_diversity"] < 22.0
    assert sum(result["predicted_counts"]) == 1000


def test_a_set_against_itself_has_ratio_exactly_one(judge: Judge, held_out: Dataset) -> None:
    part = subset(held_out, 0, 300)
    result = evaluate_samples(to_unit_range(part.images), part.labels.tolist(), judge, part)
    for entry in result["per_class"]:
        assert entry["diversity"] == pytest.approx(entry["real_diversity"], rel=1e-6)
        assert entry["diversity_ratio"] == pytest.approx(1.0, rel=1e-6)
    assert result["mean_diversity_ratio"] == pytest.approx(1.0, rel=1e-6)


def test_pure_noise_is_near_chance_and_too_diverse(judge: Judge, held_out: Dataset) -> None:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(500, 1, 28, 28, generator=generator).clamp(-1, 1)
    labels = [k for k in range(10) for _ in range(50)]
    result = evaluate_samples(noise, labels, judge, held_out)
    assert result["accuracy"] < 0.3
    # the shipped judge calls every such noise image an 8: accuracy exactly 0.1
    assert result["predicted_counts"] == [0] * 8 + [500, 0]
    assert result["accuracy"] == pytest.approx(0.1) and result["min_class_accuracy"] == 0.0
    # E[clamp(z, -1, 1)^2] = 1 - 2 phi(1), so two noise images lie about
    # sqrt(784 * 2 * (1 - 2 phi(1))) = 28.45 apart; real digits of a class lie 13 to 20 apart.
    phi_1 = math.exp(-0.5) / math.sqrt(2 * math.pi)
    expected = math.sqrt(784 * 2 * (1 - 2 * phi_1))
    assert expected == pytest.approx(28.446, abs=1e-3)
    for entry in result["per_class"]:
        assert entry["diversity"] == pytest.approx(expected, abs=0.3)
        assert entry["diversity_ratio"] > 1.3


def test_hand_made_distances() -> None:
    black = -torch.ones(1, 1, 28, 28)
    white = torch.ones(1, 1, 28, 28)
    assert mean_pairwise_distance(torch.cat([black, white])) == pytest.approx(56.0)
    # three images: distances 56, 28, 28 (gray 0 sits halfway)
    three = torch.cat([black, white, torch.zeros(1, 1, 28, 28)])
    assert mean_pairwise_distance(three) == pytest.approx(112.0 / 3)
    assert mean_pairwise_distance(black) is None


def test_hand_made_ratio_and_single_samples(judge: Judge) -> None:
    # four real threes, black, white, black, white: 4 of 6 pairs lie 56 apart
    real = Dataset(torch.tensor([0, 255, 0, 255], dtype=torch.uint8).repeat_interleave(784)
                   .reshape(4, 1, 28, 28), torch.tensor([3, 3, 3, 3]),
                   [str(i) for i in range(10)], "black and white threes")
    samples = torch.cat([-torch.ones(3, 1, 28, 28), torch.zeros(1, 1, 28, 28)])
    result = evaluate_samples(samples, [3, 3, 3, 5], judge, real)
    three, five = result["per_class"]
    assert (three["class"], three["n"], five["class"], five["n"]) == (3, 3, 5, 1)
    assert three["diversity"] == 0.0 and three["real_diversity"] == pytest.approx(56 * 4 / 6)
    assert three["diversity_ratio"] == 0.0
    assert five["diversity"] is None and five["diversity_ratio"] is None
    assert result["mean_diversity_ratio"] == 0.0
    assert "-" in format_table(result)


def test_bad_inputs(judge: Judge, held_out: Dataset) -> None:
    x = torch.zeros(4, 1, 28, 28)
    with pytest.raises(DiffgenError, match="labels"):
        evaluate_samples(x, [0, 1, 2], judge, held_out)
    with pytest.raises(DiffgenError, match=r"\[N, 1, 28, 28\]"):
        evaluate_samples(torch.zeros(4, 3, 28, 28), [0] * 4, judge, held_out)
    with pytest.raises(DiffgenError, match="0..9"):
        evaluate_samples(x, [0, 1, 2, 10], judge, held_out)
    with pytest.raises(DiffgenError, match="more than 3"):
        evaluate_samples(x[:3], [0, 1, 2], judge, held_out)
    with pytest.raises(DiffgenError, match="NaN"):
        evaluate_samples(x.fill_(float("nan")), [0] * 4, judge, held_out)


def test_frechet_distance_of_known_shifts_and_scalings() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=generator, dtype=torch.float64)
    shift = torch.arange(16, dtype=torch.float64) / 4
    # same covariance: the trace terms cancel and FD is the squared mean shift, 77.5
    assert float(shift.square().sum()) == pytest.approx(77.5)
    assert frechet_distance(x, x + shift) == pytest.approx(77.5, rel=1e-9)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    # b = 2 (x - mean): covariance 4 Σ, so FD = |mean|² + Tr(Σ + 4Σ - 2 * 2Σ) = |mean|² + Tr(Σ)
    centred = x - x.mean(0)
    expected = float(x.mean(0).square().sum() + torch.cov(x.T).trace())
    assert frechet_distance(x, 2 * centred) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(x + shift, x) == pytest.approx(frechet_distance(x, x + shift))


def test_precision_and_recall_of_overlapping_and_disjoint_sets() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=generator, dtype=torch.float64)
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x + 100.0, x) == (0.0, 0.0)
    # samples collapsed onto one real point: all precise, recall only that point's neighbourhood
    collapsed = x[:1].repeat(50, 1) + 1e-9 * torch.randn(50, 8, generator=generator,
                                                           dtype=torch.float64)
    precision, recall = precision_recall(collapsed, x)
    assert precision == 1.0 and recall <= 0.02


def test_real_digits_score_at_the_floor_and_noise_far_from_it(judge: Judge) -> None:
    labels = [k for k in range(10) for _ in range(50)]
    real, real_labels = floor_digits(labels, 500, seed=7)  # not the floor's own draw (seed 0)
    assert sorted(real_labels) == sorted(labels)
    result = evaluate_with_floor(real, real_labels, judge)
    floor = result["floor"]
    assert result["accuracy"] >= 0.98 and floor["accuracy"] >= 0.98
    assert result["fd"] == pytest.approx(floor["fd"], rel=0.35)
    assert result["recall"] == pytest.approx(floor["recall"], abs=0.06)
    noise = torch.randn(500, 1, 28, 28, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    bad = evaluate_with_floor(noise, labels, judge)
    assert bad["fd"] > 20 * floor["fd"]
    assert bad["precision"] < 0.05 and bad["recall"] < 0.05
    assert bad["floor"] == floor  # the floor depends on the labels and seed only


def test_unlabelled_images_get_every_figure_but_class_accuracy(judge: Judge) -> None:
    real, none = floor_digits(None, 200, seed=3)
    assert none is None and real.shape == (200, 1, 28, 28)
    result = evaluate_with_floor(real, None, judge)
    assert result["accuracy"] is None and result["per_class"] == []
    assert result["floor"]["accuracy"] is None and result["fd"] > 0
    assert 0.8 < result["mean_diversity_ratio"] < 1.2
    assert "accuracy" in format_table(result)
