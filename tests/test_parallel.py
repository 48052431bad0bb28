"""The benchmark's cells as Ray tasks: the table of one process from two local workers: the same cells, outcomes,
false-accusation counts and accuracies (both benchmarks start from the same template weights: the benchmark
trains copies of the template, so a template drawn at another point of the global random stream is another
experiment)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lightning_wm import ImageClassifier
from lightning_wm.attacks import FineTuneAttack, PruneAttack
from lightning_wm.benchmark import Benchmark
from lightning_wm.data import DigitsDataModule
from lightning_wm.models import SmallCNN
from lightning_wm.watermarks import UchidaWatermark

pytest.importorskip("ray", reason="Ray is the optional extra [ray] (part of [dev]); without it --workers says how")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # Ray's start-up and workers take ~1 min


def _benchmark(output_dir) -> Benchmark:
    torch.manual_seed(0)
    model = ImageClassifier(SmallCNN(width=8), num_classes=10, optimizer=partial(torch.optim.Adam, lr=3e-3))
    return Benchmark(
        model,
        DigitsDataModule(batch_size=64),
        schemes={"uchida": UchidaWatermark(layer="conv3", bits=32, strength=0.05, seed=1)},
        attacks={
            "prune_50": partial(PruneAttack, rate=0.5, scope="global"),
            "fine_tune": partial(FineTuneAttack, mode="FTAL", optimizer=partial(torch.optim.Adam, lr=1e-3)),
        },
        embed_epochs=3,
        attack_epochs={"prune_50": 0, "fine_tune": 1},
        null_models=2,
        output_dir=output_dir,
        progress=False,
    )


def test_two_ray_workers_give_the_table_of_one_process(tmp_path, monkeypatch) -> None:
    from lightning_wm.benchmark.parallel import run_on_ray

    monkeypatch.setenv("RAY_ACCEPT_CPU_LIMITS", "1")
    sequential = _benchmark(tmp_path / "one").run()
    parallel_bench = _benchmark(tmp_path / "two")
    parallel = run_on_ray(parallel_bench, workers=2)
    keep = ("scheme", "attack", "status", "fp_clean", "fp_other_schemes", "fp_untrained", "fp_collapsed")
    assert [{k: r.get(k) for k in keep} for r in parallel] == [{k: r.get(k) for k in keep} for r in sequential]
    for one, two in zip(sequential, parallel, strict=True):
        for column in ("baseline_acc", "acc_before", "acc_after"):
            assert one[column] == pytest.approx(two[column], abs=0.02), (column, one, two)
    assert len(list((tmp_path / "two" / "cells").glob("*.json"))) == len(
        list((tmp_path / "one" / "cells").glob("*.json"))
    )
    assert not list((tmp_path / "two").rglob("*.partial")), "every write was renamed into place"
