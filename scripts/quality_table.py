"""Regenerate the README's quality tables: ``diffgen evaluate`` over samplers, steps and guidance.

    python scripts/quality_table.py run --out results/quality [--only cfg,none] [--n 30]
    python scripts/quality_table.py speed --out results/quality
    python scripts/quality_table.py table --out results/quality
    python scripts/quality_table.py run --rows headline --n 100 --out results/quality-n100

``run`` calls ``diffgen evaluate --json`` once per row and keeps each result as one JSON file in
``--out``, so an interrupted run continues where it stopped and several runs (``--only``) can
share the work. ``speed`` times one batch of 100 digits per sampler, step count and kind of
guidance (the scale does not change the cost), alone on the machine, so the images/s column
does not depend on what else ran beside the quality runs. ``table`` prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SAMPLERS = [("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100), ("ddpm", 50),
            ("ddpm", 1000)]
CLASSIFIER_SCALES = (0.5, 1.0, 2.0, 4.0)
CFG_SCALES = (1.5, 2.0, 3.0, 5.0)
LONG_RUN = {"classifier": (0.5, 2.0), "cfg": (1.5, 3.0)}  # fewer scales for DDPM 1000
UNCONDITIONAL_SCALES = (0.0, 2.0, 5.0, 10.0)  # DDIM 50 on the null class


HEADLINE = [dict(kind="none", method="ddim", steps=50, scale=None)] + [
    dict(kind="classifier", method="ddim", steps=50, scale=s) for s in CLASSIFIER_SCALES] + [
    dict(kind="cfg", method="ddim", steps=50, scale=s) for s in CFG_SCALES[:3]]


def rows(preset: str = "full") -> list[dict]:
    """Every setting of a table, in the order it is printed."""
    if preset == "headline":
        return HEADLINE
    out = []
    for method, steps in SAMPLERS:
        long_run = steps == 1000
        out.append(dict(kind="none", method=method, steps=steps, scale=None))
        for scale in LONG_RUN["classifier"] if long_run else CLASSIFIER_SCALES:
            out.append(dict(kind="classifier", method=method, steps=steps, scale=scale))
        for scale in LONG_RUN["cfg"] if long_run else CFG_SCALES:
            out.append(dict(kind="cfg", method=method, steps=steps, scale=scale))
        if (method, steps) == ("ddim", 50):
            for scale in UNCONDITIONAL_SCALES:
                out.append(dict(kind="unconditional", method=method, steps=steps, scale=scale))
    return out


def row_id(row: dict) -> str:
    return f"{row['method']}{row['steps']}-{row['kind']}-{row['scale']}"


def evaluate_args(row: dict, n: int) -> list[str]:
    args = ["diffgen", "--quiet", "evaluate", "--json", "--n", str(n), "--steps",
            str(row["steps"]), "--ddim" if row["method"] == "ddim" else "--ddpm"]
    if row["kind"] == "classifier":
        args += ["--classifier-scale", str(row["scale"])]
    elif row["kind"] == "cfg":
        args += ["--cfg-scale", str(row["scale"])]
    elif row["kind"] == "unconditional":
        args += ["--unconditional"]
        if row["scale"]:
            args += ["--classifier-scale", str(row["scale"])]
    return args


def run(out: Path, only: set[str] | None, n: int, preset: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for row in rows(preset):
        target = out / f"{row_id(row)}.json"
        if target.exists() or (only and row["kind"] not in only):
            continue
        print(f"{row_id(row)} ...", file=sys.stderr, flush=True)
        done = subprocess.run(evaluate_args(row, n), capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps({"row": row, "result": json.loads(done.stdout)}))
        tmp.replace(target)
    return 0


SPEED_FILE = "speed.json"
SPEED_CODE = """
import json, sys, time, torch
from diffgen import pipeline
from diffgen.device import resolve
from diffgen.sampling import Guidance, SamplerConfig
method, steps, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
device, precision = resolve("auto", "auto")
loaded = pipeline.load(None, device)
classifier = pipeline.load_classifier(None, loaded, device)
guidance = {"none": Guidance(), "classifier": Guidance(classifier, 1.0),
            "cfg": Guidance(cfg_scale=2.0),
            "unconditional": Guidance(classifier, 5.0, unconditional=True)}[kind]
labels = [i % 10 for i in range(100)]
tic = time.perf_counter()
pipeline.generate(loaded, labels, list(range(100)), SamplerConfig(method, steps), device,
                  precision, 100, guidance=guidance)
print(json.dumps({"images_per_s": 100 / (time.perf_counter() - tic),
                  "threads": torch.get_num_threads(), "precision": precision.name}))
"""


def speed_key(row: dict) -> str:
    """Rows that cost the same share one timing: the unconditional row without a classifier
    costs what unguided sampling does."""
    kind = "none" if row["kind"] == "unconditional" and not row["scale"] else row["kind"]
    return f"{row['method']}{row['steps']}-{kind}"


def speed(out: Path, preset: str) -> int:
    """Images/s of one batch of 100 for each (sampler, steps, guidance kind) of the table."""
    path = out / SPEED_FILE
    found = json.loads(path.read_text()) if path.exists() else {}
    for row in rows(preset):
        key = speed_key(row)
        if key in found:
            continue
        print(f"timing {key} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-c", SPEED_CODE, row["method"],
                               str(row["steps"]), key.split("-")[1]], capture_output=True,
                              text=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        found[key] = json.loads(done.stdout)
        path.write_text(json.dumps(found, indent=1))
    return 0


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(out: Path, preset: str) -> str:
    speeds = json.loads((out / SPEED_FILE).read_text()) if (out / SPEED_FILE).exists() else {}
    lines = ["| sampler | steps | guidance | scale | accuracy | FD | precision | recall | "
             "diversity | img/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    floor = None
    for row in rows(preset):
        path = out / f"{row_id(row)}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())["result"]
        floor = floor or result["floor"]
        guidance = {"none": "none", "classifier": "classifier", "cfg": "classifier-free",
                    "unconditional": "unconditional + classifier"}[row["kind"]]
        scale = "-" if row["scale"] is None else (f"s = {row['scale']:g}" if row["kind"] !=
                                                  "cfg" else f"W = {row['scale']:g}")
        lines.append(f"| {row['method'].upper()} | {row['steps']} | {guidance} | {scale} | "
                     f"{fmt(result['accuracy'])} | {fmt(result['fd'], 3)} | "
                     f"{fmt(result['precision'], 2)} | {fmt(result['recall'], 2)} | "
                     f"{fmt(result['mean_diversity_ratio'], 2)} | "
                     f"{images_per_s(row, result, speeds)} |")
    if floor:
        lines.append(f"| real digits | | | | {fmt(floor['accuracy'])} | {fmt(floor['fd'], 3)} | "
                     f"{fmt(floor['precision'], 2)} | {fmt(floor['recall'], 2)} | "
                     f"{fmt(floor['mean_diversity_ratio'], 2)} | |")
    return "\n".join(lines)


def images_per_s(row: dict, result: dict, speeds: dict) -> str:
    """The separately timed figure where there is one, else the quality run's own."""
    timed = speeds.get(speed_key(row))
    if timed:
        return f"{timed['images_per_s']:.1f}"
    return f"({result.get('sampling', result)['images_per_s']:.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "speed", "table"])
    parser.add_argument("--rows", choices=["full", "headline"], default="full",
                        help="The full table or the DDIM-50 headline rows.")
    parser.add_argument("--out", type=Path, default=Path("results/quality"))
    parser.add_argument("--only", default="", help="Comma-separated kinds: none, classifier, "
                                                   "cfg, unconditional.")
    parser.add_argument("--n", type=int, default=30, help="Samples per class.")
    args = parser.parse_args()
    if args.action == "run":
        return run(args.out, set(filter(None, args.only.split(","))) or None, args.n, args.rows)
    if args.action == "speed":
        return speed(args.out, args.rows)
    print(table(args.out, args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
