"""The benchmark: a marked model is declared and clean ones are not, attacks land in the matrix, the reports are
written, an interrupted run resumes with the remaining cells only, a changed option reruns only what it touches,
and the CLI logs the table and heatmap to an offline W&B run."""

from __future__ import annotations

import csv
import sys
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from lightning_wm import ImageClassifier
from lightning_wm.attacks import FineTuneAttack, PruneAttack
from lightning_wm.benchmark import Benchmark, markdown_table, measure_overhead
from lightning_wm.benchmark.report import write_reports
from lightning_wm.cli import main
from lightning_wm.data import DigitsDataModule
from lightning_wm.models import SmallCNN
from lightning_wm.watermarks import ContentTrigger, TriggerSetWatermark, UchidaWatermark

pytestmark = pytest.mark.usefixtures("one_thread")

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "benchmark" / "quickstart.yaml"


def _benchmark(
    output_dir: Path,
    attack_epochs: dict[str, int] | None = None,
    rerun: tuple[str, ...] = (),
    trainer_kwargs: dict[str, Any] | None = None,
) -> Benchmark:
    model = ImageClassifier(SmallCNN(width=8), num_classes=10, optimizer=partial(torch.optim.Adam, lr=3e-3))
    return Benchmark(
        model,
        DigitsDataModule(batch_size=64),
        schemes={
            "uchida": UchidaWatermark(layer="conv3", bits=32, strength=0.05, seed=1),
            "content": TriggerSetWatermark(ContentTrigger(target_class=0), num_keys=50, num_verify=50, seed=2),
        },
        attacks={
            "prune_50": partial(PruneAttack, rate=0.5, scope="global"),
            "fine_tune": partial(FineTuneAttack, mode="FTAL", optimizer=partial(torch.optim.Adam, lr=1e-3)),
        },
        embed_epochs=6,
        attack_epochs=attack_epochs or {"prune_50": 0, "fine_tune": 1},
        null_models=2,
        output_dir=output_dir,
        progress=False,
        rerun=rerun,
        trainer_kwargs=trainer_kwargs,
    )


@pytest.fixture
def count_fits(monkeypatch):
    calls: list[str] = []
    original = L.Trainer.fit

    def fit(self, model, *args, **kwargs):
        calls.append(type(model).__name__)
        return original(self, model, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", fit)
    return calls


def test_matrix_declares_marked_models_not_clean_ones_and_writes_reports(tmp_path, count_fits):
    rows = _benchmark(tmp_path).run()
    assert [(r["scheme"], r["attack"]) for r in rows] == [
        (s, a) for s in ("uchida", "content") for a in ("none", "prune_50", "fine_tune")
    ]
    for row in rows:
        assert row["false_positives"] == "0/2"
        assert (row["fp_clean"], row["fp_untrained"], row["fp_collapsed"]) == ("0/2", "0/2", "0/2"), row
        assert row["fp_other_schemes"] == "0/1"
        assert 0.0 <= row["acc_after"] <= 1.0
    status = {(r["scheme"], r["attack"]): r["status"] for r in rows}
    assert status[("uchida", "prune_50")] == "kept"  # 50% global pruning leaves Uchida's bits (the paper's claim)
    assert status[("uchida", "fine_tune")] == "kept"
    unattacked = {r["scheme"]: r for r in rows if r["attack"] == "none"}
    assert all(r["watermarked"] and r["p_value"] < 1e-6 for r in unattacked.values())
    assert abs(unattacked["uchida"]["acc_before"] - unattacked["uchida"]["baseline_acc"]) < 0.1
    assert count_fits.count("ImageClassifier") == 2 * 1 + 2  # two unmarked (shared architecture) + two embeddings
    paths = write_reports(rows, tmp_path)
    with open(paths["csv"]) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert "| uchida | prune_50 |" in paths["markdown"].read_text()
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown_table(rows).count("\n") == len(rows) + 1


def test_an_interrupted_run_resumes_with_the_remaining_cells_only(tmp_path, count_fits, monkeypatch):
    bench = _benchmark(tmp_path)
    original = Benchmark.attack
    done: list[str] = []

    def interrupted(self, *args, **kwargs):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(args[1])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Benchmark, "attack", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.run()
    monkeypatch.setattr(Benchmark, "attack", original)
    assert done == ["prune_50", "fine_tune"]  # uchida's two attacks; content was embedded, then interrupted
    before = len(count_fits)
    rows = _benchmark(tmp_path).run()
    assert count_fits[before:] == ["FineTuneAttack"]  # content × fine_tune only: the rest comes from the cache
    assert len(rows) == 6
    assert all("status" in r for r in rows)


def test_a_changed_option_reruns_only_the_cells_it_touches(tmp_path, count_fits):
    _benchmark(tmp_path).run()
    before = len(count_fits)
    rows = _benchmark(tmp_path).run()
    assert count_fits[before:] == []  # everything cached
    first = {(r["scheme"], r["attack"]): r["acc_after"] for r in rows}
    kept = {(r["scheme"], r["attack"]) for r in rows if r["status"] == "kept"}
    rows = _benchmark(tmp_path, attack_epochs={"prune_50": 0, "fine_tune": 2}).run()
    assert count_fits[before:] == ["FineTuneAttack", "FineTuneAttack"]  # one per scheme, nothing else
    again = {(r["scheme"], r["attack"]): r["acc_after"] for r in rows}
    assert again[("uchida", "prune_50")] == first[("uchida", "prune_50")]
    before = len(count_fits)
    _benchmark(tmp_path, rerun=("content",)).run()
    assert count_fits[before:] == ["ImageClassifier", "FineTuneAttack"]  # content's embedding and attacks only
    before = len(count_fits)
    _benchmark(tmp_path, trainer_kwargs={"enable_progress_bar": False, "log_every_n_steps": 5}).run()
    assert count_fits[before:] == [], "display options change no result, so they rerun nothing"
    strict = _benchmark(tmp_path)
    strict.alpha = 1e-60
    rows = strict.run()
    assert count_fits[before:] == [], "alpha is not part of a cell"
    for row in rows:
        assert row["watermarked"] == (row["p_value"] < 1e-60), "cached verdicts are judged again at the run's alpha"
    assert any(r["status"] == "removed" for r in rows if (r["scheme"], r["attack"]) in kept), "kept at 0.01 only"
    _benchmark(tmp_path, trainer_kwargs={"limit_train_batches": 3}).run()
    assert count_fits[before:].count("ImageClassifier") == 4, "a batch limit changes every model: nulls and embeddings"


def test_a_failing_cell_is_an_error_with_its_traceback_and_a_threat_mismatch_is_not_applicable(tmp_path):
    from lightning_wm.attacks import EvasionAttack

    def broken(victim):
        raise RuntimeError("a bug in the attack")

    bench = _benchmark(tmp_path)
    bench.schemes = {"uchida": bench.schemes["uchida"]}
    bench.attacks = {
        "broken": broken,
        "evasion": partial(EvasionAttack, optimizer=partial(torch.optim.Adam, lr=1e-3)),
        "prune_50": bench.attacks["prune_50"],
    }
    bench.attack_epochs = {"broken": 1, "evasion": 1, "prune_50": 0}
    rows = {r["attack"]: r for r in bench.run()}
    assert rows["broken"]["status"] == "error"
    log = Path(rows["broken"]["reason"].split("traceback: ")[1].rstrip(")"))
    assert "a bug in the attack" in log.read_text()
    assert "Traceback" in log.read_text()
    assert rows["evasion"]["status"] == "n/a"
    assert "exposes no weights" in rows["evasion"]["reason"]
    assert rows["prune_50"]["status"] == "kept", "the run goes on after an error cell"
    assert "error (RuntimeError: a bug in the attack" in markdown_table(list(rows.values()))


def test_overhead_is_reported_as_ratios_to_plain_training(tmp_path):
    model = ImageClassifier(SmallCNN(width=8), num_classes=10)
    rows = measure_overhead(
        model,
        DigitsDataModule(batch_size=64),
        {"uchida": UchidaWatermark(layer="conv3", bits=32, seed=1)},
        epochs=2,
        repeats=2,
    )
    by_name = {r["scheme"]: r for r in rows}
    assert by_name["plain"]["slowdown"] == pytest.approx(1.0)
    assert by_name["plain"]["slowdown_min"] == pytest.approx(1.0)
    uchida = by_name["uchida"]
    assert uchida["samples_per_s"] > 0
    assert len(uchida["steady_s"]) == 2
    ratios = [t / p for t, p in zip(uchida["steady_s"], by_name["plain"]["steady_s"], strict=True)]
    assert uchida["slowdown"] == pytest.approx(sum(ratios) / 2), "the median of the paired rounds"
    assert min(ratios) <= uchida["slowdown_low"] <= uchida["slowdown"] <= uchida["slowdown_high"] <= max(ratios)
    assert uchida["slowdown_min"] == pytest.approx(min(uchida["steady_s"]) / min(by_name["plain"]["steady_s"]))


def test_cli_benchmark_logs_a_run_per_cell_and_a_summary_run_to_offline_wandb(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-wm"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = yaml.safe_load(QUICKSTART.read_text())
    config["schemes"] = {"noise": config["schemes"]["noise"]}
    config["attacks"] = {"prune_50": config["attacks"]["prune_50"]}
    config.pop("scheme_models")
    config["attack_epochs"] = {"prune_50": 0}
    config["embed_epochs"] = 3
    config["null_models"] = 1
    config["model"]["init_args"]["backbone"]["init_args"]["width"] = 8
    config["trainer"]["enable_progress_bar"] = False
    config["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "lightning-wm-test", "save_dir": str(tmp_path), "group": "quickstart"},
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    import wandb

    try:
        main(["benchmark", "--config", str(path), "--output_dir", str(tmp_path / "bench")])
    finally:
        wandb.teardown()
    out = capsys.readouterr().out
    assert "| noise | none |" in out
    assert "| noise | prune_50 |" in out
    assert (tmp_path / "bench" / "heatmap.png").is_file()
    from test_wandb import offline_runs

    runs = {run.name: run for run in offline_runs(tmp_path)}
    assert set(runs) == {"unmarked-0", "noise×none", "noise×prune_50", "summary"}, "one run per cell, one summary"
    assert {run.group for run in runs.values()} == {"quickstart"}
    assert {name: run.job_type for name, run in runs.items()} == {
        "unmarked-0": "embed",
        "noise×none": "embed",
        "noise×prune_50": "attack",
        "summary": "benchmark",
    }
    cell = runs["noise×prune_50"]
    assert set(cell.tags) == {"noise", "prune_50"}
    assert cell.summary["outcome"] in ("watermarked", "not watermarked", "undecidable")
    assert "p_value" in cell.summary
    assert "statistic" in cell.summary
    assert any("wm/noise/p_value" in row for row in runs["noise×none"].history), "the embedding's per-epoch verdicts"
    summary = runs["summary"]
    (report,) = [artifact for artifact in summary.artifacts if artifact.type == "benchmark-report"]
    assert {entry.path for entry in report.manifest.contents} == {
        "results.csv",
        "results.md",
        "heatmap.png",
        "radar_noise.png",
        "strongest_per_category.md",
    }, "the reports, the per-category table and the one scheme's radar plot"
    media = summary.folder / "files" / "media"
    assert list(media.rglob("*.table.json")), "the benchmark table is in the summary run"
    assert list(media.rglob("*.png")), "the heatmap is in the summary run"


def test_a_student_of_another_architecture_escapes_a_white_box_key_and_a_mismatched_student_is_na(tmp_path):
    from lightning_wm.attacks import RetrainingAttack
    from lightning_wm.models import MLP

    bench = _benchmark(tmp_path)
    bench.schemes = {"uchida": bench.schemes["uchida"]}
    retrain = partial(RetrainingAttack, optimizer=partial(torch.optim.Adam, lr=3e-3))
    bench.attacks = {
        "mlp_student": partial(retrain, student=MLP(64, 10)),
        "eleven": partial(retrain, student=MLP(64, 11)),
    }
    bench.attack_epochs = {"mlp_student": 2, "eleven": 1}
    rows = {r["attack"]: r for r in bench.run()}
    escaped = rows["mlp_student"]
    assert escaped["status"] in ("removed", "removed, over budget"), escaped
    assert escaped["watermarked"] is False
    assert escaped["p_value"] == 1.0
    assert escaped["empirical_p"] == 1.0, "an unreadable statistic is no evidence against the null models either"
    assert "cannot be read: no layer named 'conv3'" in escaped["reason"]
    assert "cannot be read" in markdown_table(list(rows.values()))
    mismatched = rows["eleven"]
    assert mismatched["status"] == "n/a", mismatched
    assert "outputs 11 logits but the victim outputs 10" in mismatched["reason"]
