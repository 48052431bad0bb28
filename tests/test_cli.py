"""``lightning-wm`` (LightningCLI): fit/test/resume on the digits baseline config, ``--print_config``, config
errors, ``verify``, and the CSV and (offline) W&B loggers. Each test runs in its own temporary working folder."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_wm import load_classifier
from lightning_wm.cli import main
from lightning_wm.verify import load_key
from lightning_wm.watermarks.uchida import UchidaKey

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASELINE = str(CONFIGS / "digits" / "baseline.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
OUT = Path("outputs") / "digits" / "baseline"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh working folder (the configs write to ``outputs/``), one thread, no stray argv for LightningCLI."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-wm"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit(*extra: str) -> None:
    main(["fit", "--config", BASELINE, "--trainer.max_epochs=1", *QUIET, *extra])


def test_fit_logs_to_csv_writes_checkpoints_and_test_evaluates_them(capsys) -> None:
    _fit()
    last = OUT / "last.ckpt"
    assert last.is_file()
    logs = Path("outputs/digits/logs/baseline/version_0")
    assert not list(OUT.glob("version_*")), "logs are kept apart from the checkpoints"
    rows = list(csv.DictReader((logs / "metrics.csv").open()))
    columns = set(rows[0])
    assert {"train/acc", "val/acc", "val/loss", "epoch"} <= columns
    assert any(row["val/acc"] for row in rows)
    assert (logs / "config.yaml").is_file(), "the CLI saves the run's config beside its logs"

    model = load_classifier(last)  # a CLI checkpoint records its backbone: no backbone= needed
    assert type(model.backbone).__name__ == "SmallCNN"

    capsys.readouterr()
    main(["test", "--config", BASELINE, "--ckpt_path", str(last), *QUIET])
    out = capsys.readouterr().out
    assert "test/acc" in out
    assert "test/loss" in out


def test_resume_from_last_checkpoint_continues_the_run() -> None:
    _fit()
    first = torch.load(OUT / "last.ckpt", map_location="cpu", weights_only=True)
    assert (first["epoch"], first["global_step"]) == (0, 14)
    main(["fit", "--config", BASELINE, "--trainer.max_epochs=2", "--ckpt_path", "last", *QUIET])
    resumed = torch.load(OUT / "last.ckpt", map_location="cpu", weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (1, 28), "the second epoch continued the first"


def test_print_config_shows_every_option_and_composes(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", BASELINE, "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["class_path"] == "lightning_wm.ImageClassifier"
    init = config["model"]["init_args"]
    assert {"backbone", "num_classes", "optimizer", "lr_scheduler", "pretrained", "teacher", "temperature"} <= set(init)
    assert init["optimizer"]["init_args"]["lr"] == 0.002
    assert {"attacker_fraction", "val_fraction", "train_split", "split_seed"} <= set(config["data"]["init_args"])
    assert {"precision", "strategy", "num_nodes", "accumulate_grad_batches"} <= set(config["trainer"])

    Path("printed.yaml").write_text(printed)
    main(["fit", "--config", "printed.yaml", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", *QUIET])
    assert (OUT / "last.ckpt").is_file(), "the printed config runs as it is"


def _write_config(edit) -> str:
    config = yaml.safe_load(Path(BASELINE).read_text())
    edit(config)
    Path("edited.yaml").write_text(yaml.safe_dump(config))
    return "edited.yaml"


def _no_such_key_in_yaml(config: dict) -> None:
    config["model"]["init_args"]["no_such_option"] = 3


def _unknown_class_path(config: dict) -> None:
    config["model"]["init_args"]["backbone"]["class_path"] = "lightning_wm.models.NoSuchNet"


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["--trainer.no_such_option=1"], "no_such_option"),
        ("yaml_key", "no_such_option"),
        ("class_path", "NoSuchNet"),
    ],
    ids=["cli-arg", "yaml-key", "class-path"],
)
def test_an_option_that_does_not_exist_is_a_clear_error(args, name, capsys) -> None:
    if args == "yaml_key":
        args = ["--config", _write_config(_no_such_key_in_yaml)]
    elif args == "class_path":
        args = ["--config", _write_config(_unknown_class_path)]
    else:
        args = ["--config", BASELINE, *args]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args])
    assert exit_.value.code not in (0, None)
    err = capsys.readouterr().err
    assert name in err
    assert "Traceback" not in err
    assert not OUT.exists(), "nothing ran"


def _error_lines(err: str) -> list[str]:
    lines = err.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(("error:", "lightning-wm: error:")))
    return lines[start:]


@pytest.mark.parametrize("edit", [_no_such_key_in_yaml, _unknown_class_path], ids=["yaml-key", "class-path"])
def test_a_bad_config_file_is_a_one_line_error(edit, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", _write_config(edit)])
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines


def _baseline_key(seed: int) -> UchidaKey:
    """An Uchida key for conv2 of the baseline's SmallCNN (width 32), never embedded."""
    generator = torch.Generator().manual_seed(seed)
    return UchidaKey(
        {"layer": "conv2", "weight_shape": [64, 32, 3, 3], "projection": "random"},
        {
            "projection": torch.randn(64, 288, generator=generator),
            "message": torch.randint(0, 2, (64,), generator=generator),
        },
    )


def test_verify_prints_a_verdict_json(capsys) -> None:
    _fit("--trainer.limit_train_batches=2")
    key = _baseline_key(0).save_key("owner.key")
    capsys.readouterr()
    main(["verify", "--config", BASELINE, "--key", str(key), "--ckpt_path", str(OUT / "last.ckpt")])
    lines = capsys.readouterr().out.strip().splitlines()
    verdict = json.loads(lines[-1])
    assert verdict["scheme"] == "uchida"
    assert verdict["is_watermarked"] is False, "the baseline never carried this key"
    assert {"statistic", "p_value", "threshold", "alpha", "queries"} <= set(verdict)
    assert "not watermarked" in lines[-3]
    assert lines[-2].startswith("key: not checkable against a seed"), "a key built by hand has no secret to expand"


def test_verify_with_a_tampered_key_is_a_one_line_error(capsys) -> None:
    _fit("--trainer.limit_train_batches=1")
    path = _baseline_key(0).save_key("owner.key")
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["verify", "--config", BASELINE, "--key", str(path), "--ckpt_path", str(OUT / "last.ckpt")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert (
        err[0]
        == f"lightning-wm: error: {path} is corrupt: its SHA-256 does not match (the file was edited or truncated)"
    )


def _checkpoint_tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in _checkpoint_tensors(value)]
    if isinstance(obj, (list, tuple)):
        return [t for value in obj for t in _checkpoint_tensors(value)]
    return []


def _holds(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    """Whether the values of ``needle`` occur, contiguous and in order, among the values of ``haystack``."""
    hay, pin = haystack.detach().flatten().float(), needle.detach().flatten().float()
    if len(hay) < len(pin):
        return False
    starts = (hay[: len(hay) - len(pin) + 1] == pin[0]).nonzero().flatten()
    return any(torch.equal(hay[s : s + len(pin)], pin) for s in starts[:10_000].tolist())


def test_uchida_config_embeds_and_verify_declares_it(capsys) -> None:
    """The Uchida config embeds, its checkpoint holds neither the projection matrix nor any row of it (the key's
    values, searched in every tensor, not its name), and ``verify`` declares it."""
    config = str(CONFIGS / "digits" / "uchida.yaml")
    main(["fit", "--config", config, "--trainer.max_epochs=2", *QUIET])
    key_file = Path("outputs/digits/uchida.key")
    key = load_key(key_file)
    assert key.scheme == "uchida"
    hparams = yaml.safe_load(next(Path("outputs/digits/logs/uchida").rglob("hparams.yaml")).read_text())
    assert hparams["wm/uchida/key_fingerprint"] == key.fingerprint()[:16]
    checkpoint = next(Path("outputs").rglob("last.ckpt"))
    tensors = _checkpoint_tensors(torch.load(checkpoint, map_location="cpu", weights_only=True))
    projection = key.tensors["projection"]
    assert _holds(torch.cat([torch.randn(7), projection[3], torch.randn(3)]), projection[3]), "the search works"
    for needle in (projection, projection[0], projection[-1], key.tensors["message"]):
        assert not any(_holds(t, needle) for t in tensors)
    capsys.readouterr()
    main(["verify", "--config", config, "--key", str(key_file), "--ckpt_path", str(checkpoint)])
    verdict = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert verdict["is_watermarked"] is True, verdict


def test_offline_wandb_logger_writes_its_run_directory() -> None:
    import wandb

    try:
        _fit(
            "--trainer.limit_train_batches=2",
            "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
            "--trainer.logger.init_args.offline=true",
            "--trainer.logger.init_args.save_dir=wb",
            "--trainer.logger.init_args.project=lightning-wm-test",
        )
    finally:
        wandb.finish()
    runs = list(Path("wb/wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb")), "the offline run holds its log for a later `wandb sync`"
    assert Path("wb/config.yaml").is_file()


@pytest.mark.parametrize("name", sorted(p.name for p in (CONFIGS / "benchmark").glob("*.yaml")))
def test_every_benchmark_config_parses_and_an_overlay_names_only_what_its_base_has(name: str, capsys) -> None:
    config = CONFIGS / "benchmark" / name
    overlay = "model" not in yaml.safe_load(config.read_text())
    base = ["--config", str(CONFIGS / "benchmark" / "fashion_mnist.yaml")] if overlay else []
    with pytest.raises(SystemExit) as exited:
        main(["benchmark", *base, "--config", str(config), "--print_config"])
    assert exited.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["schemes"]
    assert resolved["attacks"]
    assert set(resolved.get("attack_epochs") or {}) <= set(resolved["attacks"]), "epochs of an attack not in the run"
    search = resolved.get("search") or {}
    assert set(search.get("schemes") or []) <= set(resolved["schemes"])
    assert set(search.get("attacks") or []) <= set(resolved["attacks"])
