"""Training-time overhead of each scheme against plain training, measured side by side in one process.

Every configuration (plain and each scheme) is trained in turn, ``repeats`` times round-robin so that drifts of
a shared machine spread over all of them, each round starting one configuration further so that none always
runs first; the first epoch of every run (key generation, warm-up) is left out, and
validation is off. Every configuration takes the same task batches, so the cost of a scheme is the ratio of its
steady epochs' wall time to plain training's, whatever it adds to a batch (a trigger set's key images are part of
its cost). Two estimates are reported: the median of the ratios paired within each round, and the ratio of each
side's fastest run (noise on a shared machine only adds time, so the fastest run is the least disturbed; the
estimate ``timeit`` recommends). The median comes with a 95% bootstrap interval over the rounds: how far another
run of the same command may land. Both are ratios, never absolute times to compare across machines.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from dataclasses import dataclass
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
    """Steady training time with each scheme against plain training, as ratios (module docstring).

    Returns:
        One row per configuration: ``scheme``, ``samples_per_s`` (median over repeats of the task samples and key
        images it trained on per second), ``ms_per_step`` (median over repeats of the steady epochs' mean step
        time, the work at the end of an epoch included), ``slowdown`` (median over rounds of this configuration's
        steady time / plain training's in the same round: 1.0 is free), ``slowdown_low`` and ``slowdown_high`` (its
        95% bootstrap interval over the rounds), ``slowdown_min`` (the ratio of the two sides' fastest runs),
        ``setup_s`` (median time spent outside the training epochs: the Trainer's start, key generation, the
        scheme's preparation and whatever it does once training ends) and ``steady_s`` (the steady time of every
        run, in the order of the rounds: their spread is the measurement's noise).
    """
    if epochs < 2:
        raise ValueError("epochs must be at least 2: the first epoch is warm-up")
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    runs: dict[str, list[_Run]] = {"plain": [], **{name: [] for name in schemes}}
    scheme_models = scheme_models or {}
    names = list(runs)
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            template = scheme_models.get(name, model)
            timer = EpochTimer()
            callbacks: list[Callback] = [timer]
            if name != "plain":
                scheme = copy.deepcopy(schemes[name])
                scheme.key_path = None
                callbacks.insert(0, scheme)
            trainer = quiet_trainer(trainer_kwargs or {}, epochs, callbacks, limit_val_batches=0)
            gc.collect()
            began = time.perf_counter()
            trainer.fit(clone_module(template), datamodule=datamodule)
            elapsed = time.perf_counter() - began
            steady = timer.epochs[1:]
            steady_s = sum(t for t, _ in steady)
            runs[name].append(
                _Run(
                    steady_s=steady_s,
                    samples=sum(n for _, n in steady),
                    steps=max(sum(timer.steps[1:]), 1),
                    setup_s=elapsed - sum(t for t, _ in timer.epochs),
                )
            )
    plain = runs["plain"]
    fastest_plain = min(r.steady_s for r in plain)
    rows = []
    for name, measured in runs.items():
        ratios = [t.steady_s / p.steady_s for p, t in zip(plain, measured, strict=True)]
        low, high = bootstrap_interval(ratios)
        rows.append(
            {
                "scheme": name,
                "samples_per_s": statistics.median(m.samples / m.steady_s for m in measured),
                "ms_per_step": statistics.median(1000 * m.steady_s / m.steps for m in measured),
                "slowdown": statistics.median(ratios),
                "slowdown_low": low,
                "slowdown_high": high,
                "slowdown_min": min(m.steady_s for m in measured) / fastest_plain,
                "setup_s": statistics.median(m.setup_s for m in measured),
                "steady_s": [m.steady_s for m in measured],
            }
        )
    return rows


def bootstrap_interval(values: list[float], level: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``values`` (seeded, so a report is reproducible)."""
    draws = torch.tensor(values, dtype=torch.float64)
    picks = torch.randint(len(values), (resamples, len(values)), generator=torch.Generator().manual_seed(0))
    medians = draws[picks].median(dim=1).values
    tail = (1 - level) / 2
    return float(medians.quantile(tail)), float(medians.quantile(1 - tail))


@dataclass(frozen=True)
class _Run:
    steady_s: float
    samples: int
    steps: int
    setup_s: float


def overhead_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`measure_overhead` as a Markdown table."""
    lines = [
        "| scheme | samples/s | ms/step | slowdown, median of rounds [95% interval] | slowdown, fastest runs "
        "| set-up (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['scheme']} | {row['samples_per_s']:.0f} | {row['ms_per_step']:.2f} | {row['slowdown']:.2f}× "
            f"[{row['slowdown_low']:.2f}, {row['slowdown_high']:.2f}] | {row['slowdown_min']:.2f}× | "
            f"{row['setup_s']:.2f} |"
        )
    return "\n".join(lines)
