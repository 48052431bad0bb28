"""W&B, offline: what a fit, a ``verify`` and a checkpoint-logging run put in their runs, read back from the runs'
``.wandb`` transaction logs with wandb's own protobuf records, and that no key value is in any file of a run."""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import fast_trainer

from lightning_wm import ImageClassifier
from lightning_wm.cli import main
from lightning_wm.data import DigitsDataModule
from lightning_wm.models import SmallCNN
from lightning_wm.verify import load_key
from lightning_wm.watermarks import UchidaWatermark

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """The ``Record`` protobufs of a ``run-*.wandb`` file: wandb's LevelDB-style log (a 7-byte ``:W&B`` header,
    32 KiB blocks of chunks, each with a 7-byte header: checksum, length, type full/first/middle/last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    out, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:
            break
        pending += data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


@dataclass
class OfflineRun:
    """One offline run as the W&B server would rebuild it from its log: config, history, summary, artifacts."""

    folder: Path
    id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Any] = field(default_factory=list)


def read_run(folder: Path) -> OfflineRun:
    """Decode the ``.wandb`` log of the offline run in ``folder``."""
    (log,) = folder.glob("run-*.wandb")
    run = OfflineRun(folder)
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.id, run.name = record.run.run_id, record.run.display_name
            run.group, run.job_type = record.run.run_group, record.run.job_type
            run.tags = list(record.run.tags)
            run.config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run.config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(item): json.loads(item.value_json) for item in record.summary.update})
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
    return run


def offline_runs(save_dir: Path) -> list[OfflineRun]:
    """Every offline run under ``save_dir/wandb``, oldest first (by its first file's time: two runs started in the
    same second have names that sort by their random ids). The W&B service is shut down first: ``finish`` can
    return before it has written a run's log (on busy cores a run read at once lacked even its run record)."""
    wandb.teardown()
    folders = (save_dir / "wandb").glob("offline-run-*")
    return [read_run(folder) for folder in sorted(folders, key=_started)]


def _started(folder: Path) -> float:
    return min((f.stat().st_mtime for f in folder.rglob("*") if f.is_file()), default=folder.stat().st_mtime)


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _contains(haystack: bytes, values: torch.Tensor) -> bool:
    """Whether the float32 bytes of ``values``, or their shortest decimal writing (JSON, YAML), occur in
    ``haystack``."""
    flat = values.detach().flatten().float()
    if flat.numpy().tobytes() in haystack:
        return True
    return any(repr(float(v)).encode() in haystack for v in flat if abs(float(v)) > 1e-3)


def _config(tmp_path: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 3,
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "lightning-wm-test", "save_dir": "wb", "name": "uchida", "group": "digits"},
            },
            "callbacks": [
                {
                    "class_path": "lightning_wm.watermarks.UchidaWatermark",
                    "init_args": {"layer": "conv3", "bits": 32, "strength": 0.05, "seed": 1, "key_path": "uchida.key"},
                },
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True, "dirpath": "ckpt"},
                },
            ],
        },
        "model": {
            "class_path": "lightning_wm.ImageClassifier",
            "init_args": {
                "num_classes": 10,
                "backbone": {"class_path": "lightning_wm.models.SmallCNN", "init_args": {"width": 8}},
            },
        },
        "data": {"class_path": "lightning_wm.data.DigitsDataModule", "init_args": {"batch_size": 64}},
    }
    path = tmp_path / "uchida.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-wm"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)
    wandb.teardown()


def test_fit_and_verify_runs_hold_config_verdicts_and_artifact_but_no_key(workdir: Path, capsys) -> None:
    config = _config(workdir)
    main(["fit", "--config", str(config)])
    verify_args = ["verify", "--config", str(config), "--key", "uchida.key", "--ckpt_path", "ckpt/last.ckpt"]
    main(verify_args)
    fit, verify = offline_runs(workdir / "wb")
    resume = [f"--trainer.logger.init_args.id={fit.id}", "--trainer.logger.init_args.resume=allow"]
    main([*verify_args, *resume])
    resumed = offline_runs(workdir / "wb")[2]
    assert resumed.id == fit.id, "verify logs into the fit's run when given its id"
    assert resumed.job_type == ""
    assert resumed.config["verify"]["key"] == "uchida.key", "verify's config sits beside the fit's, not over it"
    assert "trainer" not in resumed.config
    assert resumed.summary["verify/uchida/outcome"] == "watermarked"

    assert (fit.job_type, fit.group, fit.name) == ("fit", "digits", "uchida")
    assert fit.config["trainer"]["max_epochs"] == 3
    assert fit.config["data"]["class_path"] == "lightning_wm.data.DigitsDataModule"
    assert fit.config["model"]["init_args"]["backbone"]["init_args"]["width"] == 8
    assert fit.config["seed_everything"] == 0
    (uchida,) = [c for c in fit.config["trainer"]["callbacks"] if c["class_path"].endswith("UchidaWatermark")]
    assert uchida["init_args"]["bits"] == 32
    assert uchida["init_args"]["strength"] == 0.05
    assert uchida["init_args"]["seed"] == "<secret>", "a scheme's seed rebuilds its key: it stays off the dashboard"
    key = load_key("uchida.key")
    assert fit.config["wm/uchida/key_fingerprint"] == key.fingerprint()[:16]

    epochs = [row for row in fit.history if "wm/uchida/p_value" in row]
    assert len(epochs) == 3, "one verdict per validation epoch"
    for name in ("statistic", "neg_log10_p", "threshold", "watermarked", "undecidable"):
        assert all(f"wm/uchida/{name}" in row for row in epochs), name
    assert epochs[-1]["wm/uchida/watermarked"] == 1.0
    assert fit.summary["wm/uchida/verdict"] == "watermarked"
    assert fit.summary["wm/uchida/log10_p"] < -2
    assert fit.summary["wm/uchida/key_fingerprint"] == key.fingerprint()[:16]

    assert (verify.job_type, verify.group) == ("verify", "digits"), "verify joins the fit's group"
    assert verify.config["key"] == "uchida.key"
    assert verify.config["verify/key_fingerprint"] == key.fingerprint()[:16]
    assert verify.summary["verify/uchida/outcome"] == "watermarked"
    assert verify.summary["verify/uchida/p_value"] < 0.01
    (artifact,) = verify.artifacts
    assert artifact.type == "verdict"
    assert [entry.path for entry in artifact.manifest.contents] == ["verdict.json"]
    assert json.loads(artifact.metadata)["key_fingerprint"] == key.fingerprint()[:16]

    projection = key.tensors["projection"]
    pieces = [projection[0], projection[7], projection[-1, :16]]
    for run in (fit, verify, resumed):
        for path in (p for p in run.folder.rglob("*") if p.is_file()):
            content = path.read_bytes()
            assert not any(_contains(content, piece) for piece in pieces), f"{path} holds key values"


def test_log_model_logs_the_checkpoint_as_a_model_artifact_without_the_key(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``WandbLogger(log_model=True)`` hands to ``Run.log_artifact`` is read at the call (the offline log
    receives the artifact record from a background thread, late on a loaded machine), then searched for the key."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import WandbLogger
    from wandb.sdk.wandb_run import Run

    logged: list[tuple[str, dict[str, Path]]] = []
    log_artifact = Run.log_artifact

    def recording_log_artifact(self: Any, artifact: Any, *args: Any, **kwargs: Any) -> Any:
        files = {name: Path(entry.local_path) for name, entry in artifact.manifest.entries.items() if entry.local_path}
        logged.append((artifact.type, files))
        return log_artifact(self, artifact, *args, **kwargs)

    monkeypatch.setattr(Run, "log_artifact", recording_log_artifact)
    scheme = UchidaWatermark(layer="conv3", bits=32, strength=0.05, seed=1)
    logger = WandbLogger(project="lightning-wm-test", save_dir=str(workdir), log_model=True)
    trainer = fast_trainer(
        2, [scheme, ModelCheckpoint(dirpath=workdir / "ckpt")], logger=logger, enable_checkpointing=True
    )
    trainer.fit(ImageClassifier(SmallCNN(width=8), num_classes=10), DigitsDataModule(batch_size=64))
    wandb.finish()

    ((kind, files),) = logged
    assert kind == "model"
    ((name, path),) = files.items()
    assert name.endswith(".ckpt")
    projection = scheme.key.tensors["projection"]
    pieces = [projection[0], projection[7], projection[-1, :16]]
    assert not any(_contains(path.read_bytes(), piece) for piece in pieces), "the model artifact holds key values"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert "projection" not in str(checkpoint.get("callbacks"))
    (run,) = offline_runs(workdir)
    assert run.summary["wm/uchida/verdict"] in ("watermarked", "not watermarked")
