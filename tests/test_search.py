"""The strongest-attacker search: a trial's parameters map to an attack, a tiny digits search writes its reports
and respects the budget, its SQLite storage resumes without new trials, and the realistic attacker tunes on a
proxy key of its own."""

from __future__ import annotations

import csv
import sys
from functools import partial
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.distributions import FloatDistribution

from lightning_wm import ImageClassifier
from lightning_wm.attacks import DistillationAttack, FineTuneAttack, PruneAttack, RemovalAttack
from lightning_wm.benchmark import Benchmark
from lightning_wm.benchmark.search import (
    AttackSearch,
    SearchConfig,
    SearchError,
    attack_from_params,
    factory_parts,
    grid,
    normalised_statistic,
    run_search,
    search_space,
)
from lightning_wm.cli import main
from lightning_wm.data import DigitsDataModule
from lightning_wm.models import SmallCNN
from lightning_wm.watermarks import UchidaWatermark

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_trials_parameters_map_to_the_attack_its_optimizer_and_its_epochs():
    base = {"mode": "FTAL", "optimizer": partial(torch.optim.Adam, lr=1e-3, betas=(0.8, 0.9))}
    factory, epochs = attack_from_params(FineTuneAttack, {"lr": 0.02, "epochs": 4, "mode": "RTLL"}, base)
    cls, args = factory_parts(factory)
    assert (cls, epochs, args["mode"]) == (FineTuneAttack, 4, "RTLL")
    assert args["optimizer"].func is torch.optim.Adam
    assert args["optimizer"].keywords == {"lr": 0.02, "betas": (0.8, 0.9)}
    factory, _ = attack_from_params(FineTuneAttack, {"optimizer": "sgd", "lr": 0.1}, base)
    assert factory.keywords["optimizer"].func is torch.optim.SGD
    assert factory.keywords["optimizer"].keywords == {"momentum": 0.9, "lr": 0.1}
    factory, epochs = attack_from_params(PruneAttack, {"rate": 0.7, "scope": "layer"}, {"rate": 0.5})
    assert epochs is None
    assert factory.keywords == {"rate": 0.7, "scope": "layer"}
    assert set(DistillationAttack.search_space()) == {"temperature", "epochs", "lr", "output"}
    assert RemovalAttack.search_space() == {}
    space = search_space(PruneAttack, {"rate": {"type": "float", "low": 0.5, "high": 0.9}, "lr": None})
    assert space["rate"] == FloatDistribution(0.5, 0.9)
    assert "lr" not in space
    assert grid({"rate": space["rate"]}, 3) == {"rate": [0.5, 0.7, 0.9]}
    with pytest.raises(SearchError, match="type"):
        search_space(PruneAttack, {"rate": {"type": "gauss"}})
    with pytest.raises(SearchError, match="unknown"):
        SearchConfig.from_dict({"trails": 3})


def test_the_normalised_statistic_puts_the_decision_threshold_at_one_half():
    assert normalised_statistic(0.3, 0.3) == 0.5
    assert normalised_statistic(0.0, 0.3) == 0.0
    assert normalised_statistic(0.4, 0.4, higher_is_watermarked=False) == 0.5
    assert normalised_statistic(0.0, 0.4, higher_is_watermarked=False) == 1.0
    assert normalised_statistic(5.0, 0.0, log10_p=-2.0, alpha=0.01) == 0.5


def _benchmark(output_dir: Path, schemes: dict[str, UchidaWatermark] | None = None) -> Benchmark:
    model = ImageClassifier(SmallCNN(width=8), num_classes=10, optimizer=partial(torch.optim.Adam, lr=3e-3))
    return Benchmark(
        model,
        DigitsDataModule(batch_size=64),
        schemes=schemes or {"uchida": UchidaWatermark(layer="conv3", bits=32, strength=0.05, seed=1)},
        attacks={"prune": partial(PruneAttack, rate=0.5, scope="global")},
        embed_epochs=4,
        attack_epochs={"prune": 0},
        null_models=1,
        output_dir=output_dir,
        progress=False,
    )


SPACE = {"prune": {"epochs": {"type": "int", "low": 0, "high": 1}, "lr": {"type": "float", "low": 1e-3, "high": 1e-2}}}


def test_a_two_trial_search_writes_its_reports_keeps_the_budget_and_resumes(tmp_path):
    bench = _benchmark(tmp_path)
    config = {"trials": 2, "oracle": [True, False], "accuracy_budget": 5.0, "spaces": SPACE, "startup_trials": 1}
    rows, paths = run_search(bench, config)
    assert {p.name for p in paths.values()} >= {"strongest.md", "strongest.csv", "search.csv", "pareto_uchida.png"}
    assert paths["pareto_uchida"].stat().st_size > 0
    assert "| uchida | prune |" in paths["strongest_md"].read_text()
    by_mode = {row["mode"]: row for row in rows}
    oracle, proxy = by_mode["oracle"], by_mode["proxy"]
    assert len(oracle["trials"]) == len(proxy["trials"]) == 2
    feasible = [t for t in oracle["trials"] if t["acc_drop"] <= 5.0]
    if feasible:
        assert oracle["acc_drop"] <= 5.0
        assert oracle["normalised"] == min(t["normalised"] for t in feasible)
    assert proxy["tuned_key"] != proxy["owner_key"] == oracle["owner_key"] == oracle["tuned_key"]
    assert {t["key_fingerprint"] for t in proxy["trials"]} == {proxy["tuned_key"]}
    assert proxy["key_fingerprint"] == proxy["owner_key"]
    with open(paths["strongest_csv"]) as f:
        assert {r["mode"] for r in csv.DictReader(f)} == {"oracle", "proxy"}

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'search.db'}")
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert names == ["uchida__prune__oracle", "uchida__prune__proxy"]
    again, _ = run_search(_benchmark(tmp_path), config)
    for name in names:
        assert len(optuna.load_study(study_name=name, storage=storage).trials) == 2
    assert [r["params"] for r in again] == [r["params"] for r in rows]


def test_the_realistic_attacker_marks_its_proxy_with_a_key_of_its_own(tmp_path):
    search = AttackSearch(_benchmark(tmp_path), {"trials": 1, "spaces": SPACE})
    owner, proxy = search.owner("uchida"), search.proxy("uchida")
    assert proxy.key.fingerprint() != owner.key.fingerprint()
    assert proxy.embed_cell != owner.embed_cell
    assert proxy.scheme.seed != owner.scheme.seed
    assert proxy.bench.datamodule.train_split == "attacker"


def test_a_scheme_subset_searches_only_those_schemes_and_names_an_unknown_one(tmp_path):
    uchida = partial(UchidaWatermark, layer="conv3", bits=32, strength=0.05)
    bench = _benchmark(tmp_path, {"uchida": uchida(seed=1), "uchida_b": uchida(seed=2)})
    with pytest.raises(SearchError, match="not schemes of the benchmark"):
        AttackSearch(bench, {"trials": 1, "spaces": SPACE, "schemes": ["uchida", "usp"]})
    search = AttackSearch(bench, {"trials": 1, "oracle": True, "spaces": SPACE, "schemes": ["uchida_b"]})
    assert search.scheme_names == ["uchida_b"]
    rows = search.run()
    assert [(r["scheme"], r["attack"], len(r["trials"])) for r in rows] == [("uchida_b", "prune", 1)]
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'search.db'}")
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["uchida_b__prune__oracle"]


SEARCH_QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "benchmark" / "search_quickstart.yaml"


def test_cli_benchmark_runs_the_search_of_a_config_with_a_search_section_only(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-wm"])
    config = yaml.safe_load(SEARCH_QUICKSTART.read_text())
    config["schemes"] = {"uchida": config["schemes"]["uchida"]}
    config["attacks"] = {"prune": config["attacks"]["prune"]}
    config["attack_epochs"] = {"prune": 0}
    config["embed_epochs"] = 3
    config["model"]["init_args"]["backbone"]["init_args"]["width"] = 8
    config["trainer"]["enable_progress_bar"] = False
    config["search"].update(trials=2, oracle=True, spaces={"prune": {"epochs": None, "lr": None}})
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["benchmark", "--config", str(path), "--output_dir", str(tmp_path / "bench")])
    assert "| oracle | uchida | prune | rate=" in capsys.readouterr().out
    assert (tmp_path / "bench" / "strongest.md").is_file()
    with open(tmp_path / "bench" / "results.csv") as f:
        categories = {r["attack"]: r["category"] for r in csv.DictReader(f)}
    assert categories["prune"] == "model modification", "a config's attack carries its registered category"
    main(["benchmark", "--config", str(path), "--output_dir", str(tmp_path / "alone"), "--matrix=false"])
    out = capsys.readouterr().out
    assert "| oracle | uchida | prune | rate=" in out
    assert "| uchida | none |" not in out, "no matrix table"
    assert not (tmp_path / "alone" / "results.csv").exists()
    assert (tmp_path / "alone" / "strongest.md").is_file()
    config.pop("search")
    path.write_text(yaml.safe_dump(config))
    main(["benchmark", "--config", str(path), "--output_dir", str(tmp_path / "plain")])
    assert "strongest attack" not in capsys.readouterr().out
    assert not (tmp_path / "plain" / "search.db").exists()
    with pytest.raises(SystemExit, match="runs only the search"):
        main(["benchmark", "--config", str(path), "--output_dir", str(tmp_path / "none"), "--matrix=false"])


def test_the_command_lines_strings_are_read_as_yaml():
    config = SearchConfig.from_dict({"trials": "3", "oracle": "[false, true]", "sampler": "grid"})
    assert (config.trials, config.modes, config.sampler) == (3, [False, True], "grid")


def test_an_interrupted_grid_search_resumes_with_the_missing_trials_only(tmp_path):
    config = {"trials": 1, "sampler": "grid", "grid_points": 2, "oracle": True, "spaces": {"prune": {"lr": None}}}
    config["spaces"]["prune"]["epochs"] = None
    run_search(_benchmark(tmp_path), config)
    rows, _ = run_search(_benchmark(tmp_path), {**config, "trials": 2})
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'search.db'}")
    trials = optuna.load_study(study_name="uchida__prune__oracle", storage=storage).trials
    assert len(trials) == 2
    assert {t.params["rate"] for t in trials} <= {0.1, 0.95}
    assert {t.params["scope"] for t in trials} <= {"layer", "global"}
    assert len(rows[0]["trials"]) == 2


def test_the_reports_are_logged_to_an_offline_wandb_run(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger
    from test_wandb import offline_runs

    from lightning_wm.benchmark.pareto import write_search_reports

    monkeypatch.setenv("WANDB_MODE", "offline")
    trial = {"normalised": 0.3, "acc": 0.93, "acc_before": 0.95, "number": 0, "acc_drop": 2.0}
    row = {
        **trial,
        "mode": "oracle",
        "scheme": "uchida",
        "attack": "prune",
        "params": {"rate": 0.5},
        "statistic_name": "ber",
        "statistic": 0.45,
        "p_value": 0.2,
        "status": "removed",
        "tuned_value": 0.3,
        "tuned_feasible": True,
        "tuned_acc_drop": 2.0,
        "trial": 0,
        "trials": [trial],
    }
    logger = WandbLogger(project="lightning-wm-test", save_dir=str(tmp_path))
    try:
        paths = write_search_reports([row], tmp_path / "out", 5.0, logger=logger)
        logger.experiment.finish()
    finally:
        wandb.teardown()
    assert "| oracle | uchida | prune | rate=0.5 | 95.0 → 93.0 | 2.0 |" in paths["strongest_md"].read_text()
    (run,) = offline_runs(tmp_path)
    (report,) = [artifact for artifact in run.artifacts if artifact.type == "search-report"]
    names = {entry.path for entry in report.manifest.contents}
    assert names == {"strongest.md", "strongest.csv", "search.csv", "pareto_uchida.png"}
    media = run.folder / "files" / "media"
    assert list(media.rglob("*.table.json")), "the strongest-attack table is in the run"
    assert list(media.rglob("*.png")), "the Pareto plot is in the run"


def test_every_registered_search_space_builds_its_attack():
    from lightning_wm import registry
    from lightning_wm.benchmark.search import suggest

    victim = SmallCNN(width=8)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for spec in registry.attacks().values():
        space = spec.attack.search_space()
        if not space:
            continue
        assert all(isinstance(d, optuna.distributions.BaseDistribution) for d in space.values()), spec.name
        trial = study.ask()
        params = {name: suggest(trial, f"{spec.name}.{name}", dist) for name, dist in space.items()}
        params = {name.removeprefix(f"{spec.name}."): value for name, value in params.items()}
        factory, epochs = attack_from_params(spec.attack, params, {})
        attack = factory(victim)
        assert isinstance(attack, spec.attack)
        assert epochs == params.get("epochs")


def test_a_student_without_the_white_box_layer_is_a_removal_in_the_search_not_the_marked_models_verdict(tmp_path):
    from lightning_wm.attacks import RetrainingAttack
    from lightning_wm.models import MLP

    bench = _benchmark(tmp_path)
    bench.attacks = {
        "retrain_mlp": partial(RetrainingAttack, student=MLP(64, 10), optimizer=partial(torch.optim.Adam, lr=3e-3))
    }
    bench.attack_epochs = {"retrain_mlp": 1}
    space = {"retrain_mlp": {"epochs": {"type": "int", "low": 1, "high": 2}}}
    (row,) = AttackSearch(bench, {"trials": 1, "oracle": True, "spaces": space}).run()
    (trial,) = row["trials"]
    assert trial["watermarked"] is False
    assert trial["p_value"] == 1.0
    assert trial["normalised"] == 0.0, "an unreadable mark is as far from declared as it gets"
    assert "cannot be read" in trial["reason"]
    assert row["status"] in ("removed", "removed, over budget")
