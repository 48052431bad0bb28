"""Content-addressed cache of benchmark cells: a cell's key is the hash of everything that determines it."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_wm.models.reinit import clone_module


def describe(obj: Any, depth: int = 0) -> Any:
    """A JSON-able description of ``obj`` that changes when any option that shapes its behaviour changes.

    LightningModules are described by class and hyperparameters, other modules by class, public attributes and
    parameter shapes, partials (the factories jsonargparse builds from ``class_path``/``init_args``) by function,
    arguments and keywords, other objects by class and public attributes. Private state (keys, caches) is left out.
    """
    if depth > 8:
        return type(obj).__qualname__
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [describe(v, depth + 1) for v in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, torch.Tensor):
        return {"tensor": list(obj.shape), "sum": float(obj.double().sum()) if obj.numel() else 0.0}
    if isinstance(obj, functools.partial):
        return {
            "partial": describe(obj.func, depth + 1),
            "args": describe(obj.args, depth + 1),
            "keywords": describe(obj.keywords, depth + 1),
        }
    if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if name.startswith("jsonargparse."):
        return name
    if isinstance(obj, L.LightningModule) and len(obj.hparams):
        fields = dict(obj.hparams)
        backbone = getattr(obj, "backbone", None)
        if isinstance(backbone, nn.Module):
            fields["backbone"] = backbone
        return {"class": name, **describe(fields, depth + 1)}
    if dataclasses.is_dataclass(obj):
        return {"class": name, **describe(dataclasses.asdict(obj), depth + 1)}
    fields = {k: v for k, v in vars(obj).items() if not k.startswith("_") and k not in ("training", "trainer")}
    if isinstance(obj, nn.Module):
        fields["parameters"] = {n: list(p.shape) for n, p in obj.named_parameters()}
        fields["children"] = {n: type(m).__qualname__ for n, m in obj.named_children()}
    return {"class": name, **describe(fields, depth + 1)}


def cell_id(*parts: Any) -> str:
    """A short stable hash of the descriptions of ``parts``."""
    text = json.dumps([describe(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CellCache:
    """Finished cells (JSON rows) and the models they produced, under one folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def row_path(self, cell: str) -> Path:
        return self.root / "cells" / f"{cell}.json"

    def model_path(self, cell: str) -> Path:
        return self.root / "models" / f"{cell}.pt"

    def key_path(self, cell: str) -> Path:
        return self.root / "keys" / f"{cell}.key"

    def load_row(self, cell: str) -> dict[str, Any] | None:
        path = self.row_path(cell)
        return json.loads(path.read_text()) if path.is_file() else None

    def save_row(self, cell: str, row: dict[str, Any]) -> None:
        path = self.row_path(cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _partial(path)
        tmp.write_text(json.dumps(row, indent=1, default=str))
        tmp.replace(path)

    def load_model(self, cell: str, template: nn.Module) -> nn.Module | None:

        path = self.model_path(cell)
        if not path.is_file():
            return None
        model = clone_module(template)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model

    def save_model(self, cell: str, model: nn.Module) -> None:
        path = self.model_path(cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _partial(path)
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)


def _partial(path: Path) -> Path:
    """A file name of this writer's own beside ``path``: written, then renamed over ``path`` (atomic on POSIX), so
    that concurrent writers (Ray workers, two benchmarks on one folder) never leave a torn file."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.partial")
