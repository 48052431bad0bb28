"""GPU throughput of every registered scheme against plain training, and the quickstart matrix's scale-out.

On a CUDA machine (``python benchmarks/gpu.py``) it trains ``lightning_wm.models.resnet18_cifar`` adapted to 28×28
grey inputs (one input channel) on Fashion-MNIST in ``bf16-mixed`` precision, plain and with each scheme of
``lightning_wm.registry.schemes()`` (its registry example), interleaved round-robin in one process by
:func:`~lightning_wm.benchmark.overhead.measure_overhead`, and prints one Markdown row per configuration: ms/step,
samples/s and the overhead ratio to plain training. A scheme that cannot run on this model is listed with the
reason. It then times the quickstart matrix (``configs/benchmark/quickstart.yaml``) with 1 worker and with one Ray
worker per GPU (``lightning_wm.benchmark.parallel.run_on_ray`` through the CLI's ``--workers``).

``--tiny`` runs on CPU in seconds (2 schemes, 2 steps per epoch, digits, a width-8 SmallCNN, no matrix), so that
``tests/test_gpu_script.py`` can run it. ``--json PATH`` also writes the rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lightning_wm import ImageClassifier, registry
from lightning_wm.benchmark.overhead import measure_overhead
from lightning_wm.data import DigitsDataModule, FashionMNISTDataModule
from lightning_wm.models import SmallCNN, resnet18_cifar
from lightning_wm.watermarks import CSPWatermark, USPWatermark

COLUMNS = ("scheme", "ms_per_step", "samples_per_s", "overhead", "overhead_min", "setup_s", "note")
ROOT = Path(__file__).resolve().parent.parent


def _model(tiny: bool, outputs: int) -> ImageClassifier:
    """The classifier of the run: ResNet-18 (3×3 stem, grey input) on GPU, a width-8 SmallCNN with ``--tiny``."""
    backbone = SmallCNN(in_channels=1, num_classes=outputs, width=8) if tiny else resnet18_cifar(outputs, 1)
    return ImageClassifier(num_classes=outputs, backbone=backbone)


def overhead_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per configuration (plain first): ms/step, samples/s, overhead ratio (median of rounds, fastest runs)."""
    specs = registry.schemes()
    names = sorted(specs)[:2] if args.tiny else sorted(specs)
    if args.schemes:
        names = [n for n in names if n in args.schemes.split(",")]
    if args.tiny:
        datamodule: Any = DigitsDataModule(batch_size=32)
        trainer_kwargs: dict[str, Any] = {"accelerator": "cpu", "devices": 1, "limit_train_batches": 2}
    else:
        datamodule = FashionMNISTDataModule(batch_size=args.batch_size, data_dir=args.data_dir)
        trainer_kwargs = {
            "accelerator": "gpu",
            "devices": 1,
            "precision": "bf16-mixed",
            "limit_train_batches": args.steps,
        }
    num_classes = 10
    model = _model(args.tiny, num_classes)
    schemes: dict[str, Any] = {}
    scheme_models: dict[str, ImageClassifier] = {}
    skipped: dict[str, str] = {}
    for name in names:
        spec = specs[name]
        try:
            schemes[name] = spec.example(seed=0)
        except Exception as err:  # a plugin's example may not build here: report it, keep going
            skipped[name] = f"example does not build: {err}"
            continue
        if not args.tiny:
            _side_training_on_gpu(schemes[name], args.steps)
        if spec.example_outputs:
            scheme_models[name] = _model(args.tiny, num_classes + spec.example_outputs)
    rows: list[dict[str, Any]] = []
    plain: dict[str, Any] | None = None
    for name in ["plain", *schemes]:
        # every scheme is measured against its own interleaved plain runs; one that fails (a layer the backbone
        # lacks, say) is reported without stopping the others
        try:
            measured = measure_overhead(
                model,
                datamodule,
                {name: schemes[name]} if name != "plain" else {},
                scheme_models={k: v for k, v in scheme_models.items() if k == name},
                epochs=args.epochs,
                repeats=args.repeats,
                trainer_kwargs=trainer_kwargs,
            )
        except Exception as err:
            skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
            continue
        if plain is None:
            plain = measured[0]
            rows.append(_row(plain, ""))
        if name != "plain":
            rows.append(_row(measured[-1], ""))
    rows += [dict.fromkeys(COLUMNS, float("nan")) | {"scheme": n, "note": why} for n, why in skipped.items()]
    return rows


def _side_training_on_gpu(scheme: Any, steps: int) -> None:
    """Train USP's references and CSP's calibration models on the GPU over ``steps`` batches per epoch: side
    training defaults to one CPU over all the data, which a ResNet-18 on Fashion-MNIST makes take hours."""
    side = {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed", "limit_train_batches": steps}
    if isinstance(scheme, USPWatermark):
        scheme.references = dataclasses.replace(scheme.references, trainer=side)
    elif isinstance(scheme, CSPWatermark):
        calibration = dataclasses.replace(scheme.verification.calibration, trainer=side)
        scheme.verification = dataclasses.replace(scheme.verification, calibration=calibration)


def _row(measured: dict[str, Any], note: str) -> dict[str, Any]:
    return {
        "scheme": measured["scheme"],
        "ms_per_step": measured["ms_per_step"],
        "samples_per_s": measured["samples_per_s"],
        "overhead": measured["slowdown"],
        "overhead_min": measured["slowdown_min"],
        "setup_s": measured["setup_s"],
        "note": note,
    }


def matrix_wall_times(gpus: int) -> list[dict[str, Any]]:
    """Wall time of the quickstart matrix (fresh cache) with 1 worker and with one Ray worker per GPU."""
    rows = []
    for workers in sorted({1, max(gpus, 1)}):
        with tempfile.TemporaryDirectory() as out:
            command = [
                sys.executable,
                "-m",
                "lightning_wm.cli",
                "benchmark",
                "--config",
                str(ROOT / "configs/benchmark/quickstart.yaml"),
                "--trainer.accelerator=gpu" if gpus else "--trainer.accelerator=cpu",
                "--trainer.enable_progress_bar=false",
                f"--output_dir={out}",
                f"--workers={workers}",
                f"--gpus_per_cell={1 if gpus and workers > 1 else 0}",
            ]
            began = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - began
        note = "" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
        rows.append({"workers": workers, "wall_s": wall, "note": note})
    return rows


def markdown(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """``rows`` as a Markdown table of ``columns`` (floats with 2 decimals)."""

    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, digits, 2 schemes, 2 steps per epoch, no matrix")
    parser.add_argument("--steps", type=int, default=50, help="training steps per epoch (limit_train_batches)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved round-robin repeats")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--schemes", default="", help="comma-separated subset of the registered schemes")
    parser.add_argument("--no_matrix", action="store_true", help="skip the quickstart matrix's wall times")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs, args.repeats = 2, 1
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny on CPU")
    torch.set_float32_matmul_precision("high")
    rows = overhead_rows(args)
    print(markdown(rows, COLUMNS))
    matrix: list[dict[str, Any]] = []
    if not (args.tiny or args.no_matrix):
        matrix = matrix_wall_times(torch.cuda.device_count())
        print()
        print(markdown(matrix, ("workers", "wall_s", "note")))
    if args.json:
        Path(args.json).write_text(json.dumps({"overhead": rows, "matrix": matrix}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
