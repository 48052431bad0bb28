"""Training-throughput overhead of each scheme against plain training, measured side by side in one process.

Every configuration (plain, then each scheme) is trained in turn, ``repeats`` times round-robin so that drifts of
a shared machine spread over all of them; the first epoch of every run (key generation, warm-up) is left out of
the throughput, and validation is off. The result is reported as ratios to plain training, never as absolute
times to compare across machines.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_wm.benchmark.matrix import quiet_trainer
from lightning_wm.models.reinit import clone_module
from lightning_wm.watermarks.base import WatermarkScheme


class EpochTimer(Callback):
    """Wall time of each training epoch, the number of task samples it saw and its number of steps."""

    def __init__(self) -> None:
        self.epochs: list[tuple[float, int]] = []
        self.steps: list[int] = []
        self._began = 0.0
        self._samples = 0
        self._steps = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _synchronise(pl_module)
        self._began = time.perf_counter()
        self._samples = 0
        self._steps = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._samples += len(batch[0])
        self._steps += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _synchronise(pl_module)
        self.epochs.append((time.perf_counter() - self._began, self._samples))
        self.steps.append(self._steps)


def _synchronise(pl_module: L.LightningModule) -> None:
    """Wait for the GPU's queued kernels, so that an epoch's wall time holds its own work (no-op on CPU)."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


def measure_overhead(
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    schemes: dict[str, WatermarkScheme],
    scheme_models: dict[str, L.LightningModule] | None = None,
    epochs: int = 3,
    repeats: int = 5,
    trainer_kwargs: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Samples per second of plain training and of training with each scheme, and their ratio.

    Returns:
        One row per configuration: ``scheme``, ``samples_per_s`` (median over repeats), ``slowdown`` (the median
        over repeats of plain throughput / this one, each ratio taken within one round-robin round, so that a
        slow phase of the machine hits both sides: 1.0 is free), ``slowdown_min`` (the smallest of those ratios,
        the least disturbed), ``ms_per_step`` (median over repeats of the steady epochs' mean step time) and
        ``setup_s`` (median time spent outside the training epochs: the Trainer's start, key generation, the
        scheme's preparation and whatever it does once training ends).
    """
    if epochs < 2:
        raise ValueError("epochs must be at least 2: the first epoch is warm-up")
    runs: dict[str, list[tuple[float, float, float]]] = {"plain": [], **{name: [] for name in schemes}}
    scheme_models = scheme_models or {}
    for _ in range(repeats):
        for name in runs:
            template = scheme_models.get(name, model)
            timer = EpochTimer()
            callbacks: list[Callback] = [timer]
            if name != "plain":
                scheme = copy.deepcopy(schemes[name])
                scheme.key_path = None
                callbacks.insert(0, scheme)
            trainer = quiet_trainer(trainer_kwargs or {}, epochs, callbacks, limit_val_batches=0)
            began = time.perf_counter()
            trainer.fit(clone_module(template), datamodule=datamodule)
            outside_epochs = time.perf_counter() - began - sum(t for t, _ in timer.epochs)
            steady = timer.epochs[1:]
            steady_s = sum(t for t, _ in steady)
            throughput = sum(n for _, n in steady) / steady_s
            runs[name].append((throughput, outside_epochs, 1000 * steady_s / max(sum(timer.steps[1:]), 1)))
    rows = []
    for name, measured in runs.items():
        ratios = [p[0] / t[0] for p, t in zip(runs["plain"], measured, strict=True)]
        rows.append(
            {
                "scheme": name,
                "samples_per_s": statistics.median(m[0] for m in measured),
                "ms_per_step": statistics.median(m[2] for m in measured),
                "slowdown": statistics.median(ratios),
                "slowdown_min": min(ratios),
                "setup_s": statistics.median(m[1] for m in measured),
            }
        )
    return rows


def overhead_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`measure_overhead` as a Markdown table."""
    lines = [
        "| scheme | samples/s | ms/step | slowdown vs plain (median) | slowdown (min) | set-up time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['scheme']} | {row['samples_per_s']:.0f} | {row['ms_per_step']:.2f} | {row['slowdown']:.2f}× | "
            f"{row['slowdown_min']:.2f}× | "
            f"{row['setup_s']:.2f} |"
        )
    return "\n".join(lines)
