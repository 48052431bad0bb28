"""``lightning-wm``: the LightningCLI with ``verify`` and ``benchmark`` beside ``fit/validate/test/predict``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_wm.data.base import DatasetNotFoundError
from lightning_wm.verify.keys import KeyFileError, load_key
from lightning_wm.verify.verdict import Verdict


class WatermarkTrainer(L.Trainer):
    """A ``lightning.Trainer`` with the ``verify`` and ``benchmark`` subcommands of ``lightning-wm``."""

    def verify(
        self,
        model: L.LightningModule,
        key: str,
        ckpt_path: str | None = None,
        alpha: float = 0.01,
        layer: str | None = None,
        datamodule: L.LightningDataModule | None = None,
    ) -> Verdict:
        """Test a suspect model for the watermark of a key file and print the verdict.

        Args:
            model: the suspect's architecture (the config's ``model``); its weights come from ``ckpt_path``.
            key: the owner's key file.
            ckpt_path: the suspect's checkpoint (a ``.ckpt`` of ``lightning-wm fit`` or of an attack).
            alpha: significance level of the decision.
            layer: for white-box schemes, the suspect's layer to read when its name differs from the key's.
        """
        owner_key = load_key(key)
        if ckpt_path is not None:
            load_weights(model, ckpt_path)
        kwargs = {"layer": layer} if layer is not None else {}
        verdict = owner_key.verify(model.eval(), alpha=alpha, **kwargs)
        if self.is_global_zero:
            print(verdict)
            print(json.dumps(verdict.as_dict(), default=str))
        return verdict

    def benchmark(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
    ) -> None:
        """Run the scheme × attack matrix (embed, attack, verify) and print the table."""
        raise SystemExit(
            "lightning-wm benchmark: no scheme configured yet; see configs/benchmark/ once the schemes have landed"
        )


def load_weights(model: torch.nn.Module, ckpt_path: str | Path) -> None:
    """Load the ``state_dict`` of a Lightning checkpoint into ``model``, with a one-line error when it does not fit."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path} does not fit the configured model: {first}") from None
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"checkpoint {path} does not load: {type(err).__name__}: {err}") from None


class WatermarkCLI(LightningCLI):
    """LightningCLI whose ``model`` and ``data`` are any LightningModule / LightningDataModule, chosen by
    ``class_path`` (an ``ImageClassifier``, an attack, a user's own module), and whose trainer adds ``verify``
    and ``benchmark``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", WatermarkTrainer)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands["verify"] = {"model", "datamodule"}
        commands["benchmark"] = {"model", "datamodule"}
        return commands


_USER_ERRORS = (DatasetNotFoundError, KeyFileError, FileNotFoundError, ValueError, TypeError)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-wm`` console script.

    Errors caused by the input (a missing dataset, a tampered key, a checkpoint that does not fit) are printed as
    one line; set ``LIGHTNING_WM_DEBUG=1`` for the traceback.
    """
    try:
        WatermarkCLI(args=args)
    except _USER_ERRORS as err:
        if os.environ.get("LIGHTNING_WM_DEBUG"):
            raise
        print(f"lightning-wm: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def _one_line(err: BaseException) -> str:
    """The innermost message of an error: jsonargparse wraps errors raised while instantiating a config."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    nested = [line.removeprefix("- ").strip() for line in lines if line.startswith("- ")]
    informative = [line for line in nested if not line.startswith(("Expected a", "Not a valid subclass"))]
    if informative or nested:
        return (informative or nested)[0]
    return lines[0] if lines else type(err).__name__


if __name__ == "__main__":
    main()
