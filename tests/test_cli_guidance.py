"""The command line of guidance, train-classifier and evaluate."""

import json
import re

import pytest
from typer.testing import CliRunner

from diffgen.cli import app

TINY_ARGS = ["--base-channels", "8", "--channel-mult", "1,2", "--attention-resolutions", "14",
             "--groups", "4", "--batch-size", "8"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def run(runner, *args):
    return runner.invoke(app, ["--quiet", *map(str, args)])


def test_guided_sampling_writes_what_it_says(runner, tmp_path, tiny_model, tiny_classifier):
    common = ["--weights", tiny_model, "--steps", 3, "--precision", "fp32", "--json"]
    for extra in (["--classifier-scale", 2, "--classifier", tiny_classifier],
                  ["--cfg-scale", 3], ["--classifier-scale", 1, "--classifier", tiny_classifier,
                                       "--cfg-scale", 2]):
        result = run(runner, "sample", "-c", 4, "-n", 2, "-o", tmp_path / "g.png", *common, *extra)
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout)
        assert record["classes"] == [4, 4] and record["files"] == [str(tmp_path / "g.png")]
    result = run(runner, "trajectory", "-c", 1, "-o", tmp_path / "t.gif", "--frames", 3,
                 "--classifier-scale", 1, "--classifier", tiny_classifier, *common)
    assert result.exit_code == 0, result.output
    result = run(runner, "denoise", tmp_path / "g.png", "--class", 2, "-o", tmp_path / "d.png",
                 "--cfg-scale", 2, *common)
    assert result.exit_code == 0, result.output


def test_unconditional_samples_are_named_uncond(runner, tmp_path, tiny_model, tiny_classifier):
    result = run(runner, "sample", "--unconditional", "-n", 3, "--out-dir", tmp_path / "u",
                 "--weights", tiny_model, "--steps", 2, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["classes"] == [None, None, None]
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == [
        "0000_uncond_seed0.png", "0001_uncond_seed1.png", "0002_uncond_seed2.png"]
    result = run(runner, "sample", "--unconditional", "-c", 5, "-n", 2, "--out-dir",
                 tmp_path / "s", "--weights", tiny_model, "--steps", 2, "--classifier-scale", 5,
                 "--classifier", tiny_classifier)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "0000_class5_seed0.png", "0001_class5_seed1.png"]


@pytest.mark.parametrize("code, args, message", [
    (2, ["sample", "--unconditional", "--cfg-scale", "2"], "cannot be used with --unconditional"),
    (2, ["sample", "--unconditional", "-c", "3"], "needs --classifier-scale"),
    (2, ["sample", "--classifier-scale", "-1"], "--classifier-scale"),
    (2, ["sample", "--cfg-scale", "inf"], "--cfg-scale"),
    (1, ["sample", "--classifier-scale", "1", "--classifier", "{model}"], "pass it as --weights"),
    (1, ["sample", "--weights", "{classifier}"], "pass it as --classifier"),
    (1, ["sample", "--classifier-scale", "1", "--classifier", "{tmp}/none.safetensors"],
     "does not exist"),
    (2, ["denoise", "{tmp}/none.png", "--cfg-scale", "2"], "give --class"),
    (2, ["trajectory", "--forward", "--cfg-scale", "2"], "reverse path only"),
    (2, ["evaluate", "--images", "{tmp}", "--cfg-scale", "2"], "not to --images"),
    (1, ["evaluate", "--images", "{tmp}/nowhere"], "is not a folder"),
    (1, ["evaluate", "--images", "{tmp}"], "holds no PNG"),
])
def test_guidance_mistakes_get_one_line(runner, tmp_path, tiny_model, tiny_classifier, code, args,
                                        message):
    args = [a.replace("{tmp}", str(tmp_path)).replace("{model}", str(tiny_model))
            .replace("{classifier}", str(tiny_classifier)) for a in args]
    if args[0] != "evaluate" or "--images" not in args:
        args += ["-o", str(tmp_path / ("x.gif" if args[0] == "trajectory" else "x.png"))]
        if "--weights" not in args:
            args += ["--weights", str(tiny_model)]
    result = run(runner, *args)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stdout == "" and not (tmp_path / "x.png").exists()


def test_train_classifier_reports_held_out_accuracy_and_resumes(runner, tmp_path, few_digits):
    out = tmp_path / "clf"
    result = run(runner, "train-classifier", "--out", out, "--steps", 2, "--holdout", 8,
                 "--json", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["step"] == 2
    assert sorted(record["held_out_accuracy"], key=int) == ["0", "249", "499", "749", "999"]
    assert all(0.0 <= v <= 1.0 for v in record["held_out_accuracy"].values())
    again = run(runner, "train-classifier", "--out", out, "--resume", "--steps", 3, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["step"] == 3
    wrong = run(runner, "train", "--out", out, "--resume", "--steps", 4)
    assert wrong.exit_code == 1 and "train-classifier" in wrong.stderr
    too_many = run(runner, "train-classifier", "--out", tmp_path / "c2", "--holdout", 10000)
    assert too_many.exit_code == 2 and "leaves nothing" in too_many.stderr


def test_evaluate_samples_and_reads_them_back(runner, tmp_path, tiny_model):
    result = run(runner, "evaluate", "--weights", tiny_model, "--n", 1, "--steps", 2, "--json",
                 "--precision", "fp32")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["n"] == 10 and record["sampling"]["n_per_class"] == 1
    assert record["sampling"]["images_per_s"] > 0 and record["sampling"]["precision"] == "fp32"
    assert 0.0 <= record["precision"] <= 1.0  # the metric, not the number format
    for key in ("accuracy", "fd", "precision", "recall", "mean_diversity_ratio"):
        assert key in record and key in record["floor"]
    assert record["floor"]["accuracy"] >= 0.9  # ten real digits
    # the tiny model draws noise: far from the real-digit floor
    assert record["fd"] > 5 * record["floor"]["fd"]

    folder = tmp_path / "out"
    made = run(runner, "sample", "--weights", tiny_model, "-n", 1, "--steps", 2, "--out-dir",
               folder, "--precision", "fp32")
    assert made.exit_code == 0, made.output
    back = run(runner, "evaluate", "--images", folder, "--json")
    assert back.exit_code == 0, back.output
    again = json.loads(back.stdout)
    assert again["n"] == 10 and [e["class"] for e in again["per_class"]] == list(range(10))
    assert again["fd"] == pytest.approx(record["fd"], rel=0.05)  # PNG rounding only
    table = run(runner, "evaluate", "--images", folder)
    assert table.exit_code == 0 and "Fréchet distance" in table.stdout
    assert re.search(r"accuracy\s+\d\.\d{3}\s+\d\.\d{3}", table.stdout)


def test_evaluate_reads_class_folders(runner, tmp_path, digits):
    from diffgen.images import save_image
    from diffgen.judge import to_unit_range

    for i in range(40):
        label = int(digits.labels[8000 + i])
        (tmp_path / str(label)).mkdir(exist_ok=True)
        save_image(to_unit_range(digits.images[8000 + i]), tmp_path / str(label) / f"{i}.png")
    result = run(runner, "evaluate", "--images", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["n"] == 40 and record["accuracy"] >= 0.95
    save_image(to_unit_range(digits.images[0]), tmp_path / "0007_class7_seed7.png")
    mixed = run(runner, "evaluate", "--images", tmp_path)
    assert mixed.exit_code == 1 and "both class sub-folders and images" in mixed.stderr
    (tmp_path / "0007_class7_seed7.png").unlink()
    (tmp_path / "cats").mkdir()
    bad = run(runner, "evaluate", "--images", tmp_path)
    assert bad.exit_code == 1 and "not a digit class" in bad.stderr
    ignored = run(runner, "evaluate", "--images", tmp_path, "--steps", 10)
    assert ignored.exit_code == 2 and "--steps applies to sampling" in ignored.stderr


def test_a_failed_write_leaves_no_outputs(runner, tmp_path, tiny_model):
    (tmp_path / "many" / "0001_class1_seed1.png").mkdir(parents=True)
    result = run(runner, "sample", "-c", 1, "-n", 3, "--steps", 2, "-o", tmp_path / "grid.png",
                 "--out-dir", tmp_path / "many", "--weights", tiny_model)
    assert result.exit_code == 1 and "0001_class1_seed1.png" in result.stderr
    assert not (tmp_path / "grid.png").exists()
    assert [p.name for p in (tmp_path / "many").iterdir()] == ["0001_class1_seed1.png"]
    early = run(runner, "sample", "-c", 12, "--out-dir", tmp_path / "fresh", "--weights",
                tiny_model)
    assert early.exit_code == 2 and not (tmp_path / "fresh").exists()


def test_huge_scales_are_refused(runner, tmp_path, tiny_model):
    for option, value in (("--cfg-scale", "1e39"), ("--classifier-scale", "1e39"),
                          ("--cfg-scale", "101")):
        result = run(runner, "sample", "-c", 1, option, value, "-o", tmp_path / "x.png",
                     "--weights", tiny_model)
        assert result.exit_code == 2 and f"{option} must be a number in [0, " in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_checkpoint_every_zero_is_refused(runner, tmp_path):
    result = run(runner, "train-classifier", "--out", tmp_path / "c", "--checkpoint-every", 0)
    assert result.exit_code == 2 and "--checkpoint-every must be at least 1" in result.stderr
    assert not (tmp_path / "c").exists()


def test_resume_accepts_saved_values_and_refuses_changes(runner, tmp_path):
    out = tmp_path / "run"
    assert run(runner, "train-classifier", "--out", out, "--steps", 2, *TINY_ARGS).exit_code == 0
    same = run(runner, "train-classifier", "--out", out, "--resume", "--steps", 3, *TINY_ARGS,
               "--seed", 0, "--data", "packaged")
    assert same.exit_code == 0, same.output
    changed = run(runner, "train-classifier", "--out", out, "--resume", "--batch-size", 16)
    assert changed.exit_code == 2
    assert "--batch-size differs from the run's saved 8" in changed.stderr
    missing = run(runner, "train", "--out", tmp_path / "none", "--resume", "--lr", 0.1)
    assert missing.exit_code == 1 and "no checkpoint" in missing.stderr


def test_unwritable_training_files_are_one_line_errors(runner, tmp_path):
    (tmp_path / "w1" / "log.jsonl").mkdir(parents=True)  # a folder where the log must go
    result = run(runner, "train-classifier", "--out", tmp_path / "w1", "--steps", 1, *TINY_ARGS)
    assert result.exit_code == 1 and "cannot write to" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.output
    assert sorted(p.name for p in (tmp_path / "w1").iterdir()) == ["log.jsonl"]


def test_seeds_beyond_64_bits_are_refused(runner, tmp_path, tiny_model):
    result = run(runner, "sample", "-c", 1, "-n", 2, "--seed", 2 ** 63 - 2, "-o",
                 tmp_path / "x.png", "--weights", tiny_model)
    assert result.exit_code == 2 and "--seed must be in [0, 2^63 - 1 - 2]" in result.stderr
    assert not (tmp_path / "x.png").exists()
