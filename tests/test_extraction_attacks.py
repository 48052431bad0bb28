"""The model-extraction attacks on digits: retraining (same and another architecture), smooth retraining, ensemble
distillation and Knockoff Nets each reach a measured accuracy, count their queries and keep to their budget;
Knockoff queries only its transfer set; the ensemble averages; and the benchmark's radar plots are written.

Bounds are measured on a SmallCNN (width 8, 8 epochs, 97.8% test accuracy) victim, students trained on the
attacker's split (431 images), seed 0, with a few points of margin: retraining 93.0% (an MLP student 91.4%, 200
queries 91.1%), smooth retraining 88.3%, ensemble distillation 93.6%, Knockoff from 2,000 photo-patch queries 48%
(random) and 48-57% (adaptive): the task's images are far from natural photographs.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import fast_trainer

from lightning_wm import ImageClassifier
from lightning_wm.attacks import EnsembleDistillationAttack, KnockoffAttack, RetrainingAttack, SmoothRetrainingAttack
from lightning_wm.attacks.knockoff import GradientBandit, kmeans
from lightning_wm.attacks.retraining import input_digest
from lightning_wm.data import DigitsDataModule
from lightning_wm.models import MLP, SmallCNN
from lightning_wm.verify import BlackBoxModel

pytestmark = pytest.mark.usefixtures("one_thread")

ATTACKER_IMAGES = 431
ADAM = partial(torch.optim.Adam, lr=3e-3)


@pytest.fixture(scope="module")
def victim(dm: DigitsDataModule) -> ImageClassifier:
    L.seed_everything(0)
    model = ImageClassifier(SmallCNN(1, 10, 8), num_classes=10)
    fast_trainer(8, limit_val_batches=0).fit(model, dm)
    return model.eval()


def _accuracy(model: torch.nn.Module, dm: DigitsDataModule) -> float:
    x, y = dm.dataset("test").tensors
    with torch.no_grad():
        return float((model.eval()(x).argmax(-1) == y).float().mean())


def _steal(attack: L.LightningModule, epochs: int = 10) -> L.LightningModule:
    L.seed_everything(0)
    fast_trainer(epochs, limit_val_batches=0).fit(attack, DigitsDataModule(batch_size=64, train_split="attacker"))
    return attack


def test_the_victim_is_accurate(victim: ImageClassifier, dm: DigitsDataModule) -> None:
    assert _accuracy(victim, dm) > 0.95


@pytest.mark.parametrize(("student", "bound"), [(None, 0.88), (MLP(64, 10), 0.86)])
def test_retraining_labels_each_image_once(
    victim: ImageClassifier, dm: DigitsDataModule, student: torch.nn.Module | None, bound: float
) -> None:
    attack = _steal(RetrainingAttack(victim, student=student, optimizer=ADAM))
    assert _accuracy(attack, dm) > bound
    assert attack.queries == attack.labelled == ATTACKER_IMAGES, "ten epochs, each image bought once"
    assert not any("_victim" in k for k in attack.state_dict())
    if student is not None:
        assert isinstance(attack.model, MLP)


def test_retraining_keeps_to_its_budget(victim: ImageClassifier, dm: DigitsDataModule) -> None:
    attack = _steal(RetrainingAttack(victim, query_budget=200, optimizer=ADAM))
    assert attack.queries == attack.labelled == 200
    assert _accuracy(attack, dm) > 0.85


def test_smooth_retraining_pays_a_query_per_vote(victim: ImageClassifier, dm: DigitsDataModule) -> None:
    attack = _steal(SmoothRetrainingAttack(victim, sigma=0.25, samples=8, optimizer=ADAM))
    assert _accuracy(attack, dm) > 0.83
    assert attack.queries == 8 * attack.labelled == 8 * ATTACKER_IMAGES
    assert attack.pixel_std is not None, "the noise is in pixels, read from the datamodule"
    budgeted = _steal(SmoothRetrainingAttack(victim, samples=8, query_budget=803, optimizer=ADAM), epochs=2)
    assert budgeted.queries == 800
    assert budgeted.labelled == 100


def test_smoothed_labels_are_the_majority_vote(victim: ImageClassifier, dm: DigitsDataModule) -> None:
    attack = SmoothRetrainingAttack(victim, sigma=0.0, samples=3)
    x = dm.dataset("test").tensors[0][:32]
    assert torch.equal(attack.answer_new(x), victim(x).argmax(-1))
    assert attack.queries == 96


def test_ensemble_distillation_sums_its_victims_queries(victim: ImageClassifier, dm: DigitsDataModule) -> None:
    attack = _steal(EnsembleDistillationAttack([victim, victim], optimizer=ADAM))
    assert _accuracy(attack, dm) > 0.88
    assert attack.queries == 2 * ATTACKER_IMAGES
    assert [api.queries for api in attack._apis] == [ATTACKER_IMAGES, ATTACKER_IMAGES]
    budgeted = _steal(EnsembleDistillationAttack([victim, victim], query_budget=301, optimizer=ADAM), epochs=2)
    assert budgeted.queries == 300


def test_two_identical_victims_give_the_single_victims_soft_labels(
    victim: ImageClassifier, dm: DigitsDataModule
) -> None:
    x = dm.dataset("test").tensors[0][:64]
    ensemble = EnsembleDistillationAttack([victim, victim], temperature=3.0)
    single = BlackBoxModel(victim, temperature=3.0)(x)
    torch.testing.assert_close(ensemble.answer_new(x), single)
    assert len(EnsembleDistillationAttack(victim, extra_victims=[victim])._apis) == 2, "one victim, as the benchmark"
    other = ImageClassifier(SmallCNN(1, 10, 8), num_classes=10).eval()
    mixed = EnsembleDistillationAttack([victim, other], temperature=3.0).answer_new(x)
    torch.testing.assert_close(mixed, (single + BlackBoxModel(other, temperature=3.0)(x)) / 2)
    votes = EnsembleDistillationAttack([victim, other], output="labels").answer_new(x)
    assert set(votes.unique().tolist()) <= {0.0, 0.5, 1.0}
    torch.testing.assert_close(votes.sum(-1), torch.ones(64))


@pytest.mark.parametrize("selection", ["random", "adaptive"])
def test_knockoff_queries_only_its_transfer_set(
    victim: ImageClassifier, dm: DigitsDataModule, selection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    attack = KnockoffAttack(victim, selection=selection, transfer_size=5000, query_budget=2000, optimizer=ADAM)
    sent: list[torch.Tensor] = []
    query = attack.query
    monkeypatch.setattr(attack, "query", lambda x: sent.append(x.detach().cpu()) or query(x))
    _steal(attack, epochs=20)
    assert attack.queries == 2000 == sum(map(len, sent))
    assert _accuracy(attack, dm) > 0.3, "well above chance (10%) from natural-photo patches only"
    pool = {input_digest(row) for row in attack.transfer_inputs}
    digits = {input_digest(row) for split in ("all", "val", "test") for row in dm.dataset(split).tensors[0]}
    queried = {input_digest(row) for row in torch.cat(sent)}
    assert queried <= pool
    assert not queried & digits
    if selection == "adaptive":
        assert attack.bandit is not None
        assert len(attack.bandit.policy) == 10
        assert attack.bandit.rewards == 2000


def test_knockoff_reads_fashion_mnist_when_available(victim: ImageClassifier) -> None:
    from lightning_wm.data.base import DatasetNotFoundError

    attack = KnockoffAttack(victim, transfer_set="fashion_mnist", transfer_size=300)
    try:
        inputs = attack.build_transfer_set((1, 8, 8))
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST is not on this machine")
    assert inputs.shape == (300, 1, 8, 8)
    assert float(inputs.min()) >= 0.0
    assert float(inputs.max()) <= 1.0


def test_kmeans_finds_separated_clusters_and_the_bandit_learns_the_best_arm() -> None:
    rng = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(50, 2, generator=rng) * 0.1 + c for c in (-5.0, 0.0, 5.0)])
    assignment = kmeans(points, 3, rng)
    assert sorted(torch.bincount(assignment).tolist()) == [50, 50, 50]
    assert all(len(set(assignment[i * 50 : (i + 1) * 50].tolist())) == 1 for i in range(3))
    bandit = GradientBandit(3, lr=0.1, generator=rng)
    for _ in range(300):
        arm = int(bandit.draw(1))
        bandit.update(arm, 1.0 if arm == 2 else 0.0)
    assert int(bandit.policy.argmax()) == 2


def test_radar_plots_and_the_per_category_table_show_the_strongest_attack_within_budget(tmp_path: Path) -> None:
    from lightning_wm.benchmark.report import (
        category_table,
        radar_plots,
        removal_strength,
        strongest_per_category,
        write_reports,
    )

    def row(scheme: str, attack: str, category: str, status: str, p: float) -> dict:
        return {
            "scheme": scheme,
            "attack": attack,
            "category": category,
            "status": status,
            "statistic": 0.5,
            "statistic_name": "accuracy",
            "p_value": p,
            "acc_before": 0.97,
            "acc_after": 0.95,
            "acc_drop": 2.0,
        }

    rows = [
        row("content", "none", "", "kept", 1e-20),
        row("content", "jpeg", "input preprocessing", "kept", 1e-10),
        row("content", "fine_tune", "model modification", "removed", 0.3),
        row("content", "retraining", "model extraction", "removed, over budget", 0.5),
        row("content", "knockoff", "model extraction", "kept", 1e-4),
        {**row("content", "smoothing", "input preprocessing", "kept", 1e-12), "acc_drop": 20.0},
        row("usp", "none", "", "kept", 1e-8),
        row("usp", "chain", "combined", "n/a", float("nan")),
    ]
    assert removal_strength(rows[1], 1e-20) == pytest.approx(10 / 18)
    assert removal_strength(rows[2], 1e-20) == 1.0
    assert removal_strength(rows[3], 1e-20) is None
    assert removal_strength(rows[4]) == pytest.approx(0.5)
    assert removal_strength(rows[5], 1e-20) is None, "a kept cell over the budget is no attack within it"
    chosen = strongest_per_category(rows)
    assert {c: row["attack"] for c, (_, row) in chosen["content"].items()} == {
        "input preprocessing": "jpeg",
        "model modification": "fine_tune",
        "model extraction": "knockoff",
    }, "retraining is over the budget, so knockoff (kept, halfway) is the strongest extraction within it"
    assert chosen["usp"] == {}
    table = category_table(rows)
    assert "| content | jpeg: kept (56% of the way), -2.0 pts | fine_tune: removed, -2.0 pts |" in table
    assert "| usp | none within budget | none within budget |" in table
    paths = radar_plots(rows, tmp_path)
    assert set(paths) == {"radar_content", "radar_usp"}
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths.values())
    reports = write_reports(rows, tmp_path / "bench")
    assert (tmp_path / "bench" / "radar_content.png").is_file()
    assert reports["categories"].read_text() == table + "\n"
    assert reports["radar_usp"].parent == reports["heatmap"].parent


def test_radar_plots_are_logged_to_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    from lightning_wm.benchmark.report import radar_plots

    logged: dict = {}

    class Run:
        def log(self, values: dict) -> None:
            logged.update(values)

    monkeypatch.setattr(WandbLogger, "experiment", property(lambda self: Run()))
    rows = [{"scheme": "content", "attack": "knockoff", "category": "model extraction", "status": "removed"}]
    radar_plots(rows, tmp_path, logger=WandbLogger.__new__(WandbLogger))
    assert list(logged) == ["benchmark/radar/content"]


def test_the_benchmark_reports_extraction_queries_and_radar_plots(tmp_path: Path) -> None:
    import csv

    from conftest import example_model, example_scheme

    from lightning_wm.benchmark import Benchmark
    from lightning_wm.benchmark.report import write_reports

    bench = Benchmark(
        example_model("content"),
        DigitsDataModule(batch_size=64),
        schemes={"content": example_scheme("content", seed=1)},
        attacks={"retraining": partial(RetrainingAttack, query_budget=120, optimizer=ADAM)},
        embed_epochs=3,
        attack_epochs=1,
        null_models=1,
        output_dir=tmp_path / "bench",
        progress=False,
    )
    results = bench.run()
    write_reports(results, tmp_path / "bench")
    rows = {r["attack"]: r for r in results}
    assert rows["retraining"]["category"] == "model extraction"
    assert rows["retraining"]["queries"] >= 120, "the attack's 120 queries plus the owner's verification queries"
    with open(tmp_path / "bench" / "results.csv") as f:
        written = {r["attack"]: r for r in csv.DictReader(f)}
    assert int(written["retraining"]["queries"]) == rows["retraining"]["queries"]
    assert (tmp_path / "bench" / "radar_content.png").is_file()
