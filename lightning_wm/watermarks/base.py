"""``WatermarkScheme``: the Callback every scheme derives from."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_wm.verify.blackbox import Suspect
from lightning_wm.verify.commitment import commit
from lightning_wm.verify.derive import DERIVATION_VERSION, derived_rng, seed_secret
from lightning_wm.verify.keys import WatermarkKey, load_key
from lightning_wm.verify.verdict import Outcome, Verdict


class WatermarkScheme(Callback):
    """A watermark scheme: owns its secret key, changes training, verifies suspects.

    The key is made when ``fit`` starts (from ``seed``, or from the OS's entropy when ``seed`` is None), or read
    from ``key_path`` if that file exists, so that a resumed run continues with the same key. It is broadcast from
    rank 0, so every DDP rank holds the same key, and written to ``key_path`` by rank 0. The key lives in this
    callback and in the key file only: the model's checkpoint holds the key's SHA-256 fingerprint (to check, on
    resume, that the same key came back) and never the key.

    After every validation epoch the scheme verifies the model being trained and logs ``wm/<name>/statistic``,
    ``p_value`` (float32: 0 below ~1e-38), ``neg_log10_p`` (exact), ``threshold``, ``watermarked`` and
    ``undecidable`` (0/1); after ``fit`` the final verdict goes into each W&B run's summary. ``name`` also labels
    its fingerprint in the logged hyperparameters and its verdicts, so several schemes (two trigger sets, say) can
    share one fit.

    Subclasses set ``key_scheme`` (the scheme name their key files carry), implement :meth:`make_key`, and
    override any of :meth:`training_loss` (a term the :class:`~lightning_wm.mixin.WatermarkMixin` adds to the
    loss), :meth:`on_key_ready` and the Callback hooks.

    Args:
        key_path: where the key file is written (and read from when it exists).
        seed: makes the key reproducible. Anyone with the config and the seed can rebuild the key: leave it
            ``None`` for a key that exists only in the key file.
        alpha: significance level of the logged verdicts.
        name: the scheme's label in metric names, hyperparameters and verdicts (default: :meth:`default_name`).
    """

    key_scheme: ClassVar[str] = ""

    def __init__(
        self, key_path: str | None = None, seed: int | None = None, alpha: float = 0.01, name: str | None = None
    ) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(
                f"name must be letters, digits, '_', '.' or '-' (it is part of metric names), got {name!r}"
            )
        self.name = name or self.default_name()
        self.key_path = key_path
        self.seed = seed
        self.alpha = alpha
        self._key: WatermarkKey | None = None
        self._secret: bytes | None = None
        self._resumed_fingerprint: str | None = None
        self.loss_reached = False

    def default_name(self) -> str:
        """The label used when no ``name`` is given: the key's scheme name."""
        return self.key_scheme

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name, key_path=self.key_path)

    @property
    def key(self) -> WatermarkKey:
        """The secret key; exists once ``fit`` has started (or after :meth:`set_key`)."""
        if self._key is None:
            raise RuntimeError(f"{type(self).__name__} has no key yet: it is made when trainer.fit starts")
        return self._key

    def set_key(self, key: WatermarkKey) -> None:
        """Use an existing key (e.g. to keep embedding the same watermark in another run)."""
        if key.scheme != self.key_scheme:
            raise ValueError(f"{type(self).__name__} needs a {self.key_scheme!r} key, got a {key.scheme!r} key")
        self._key = key

    def make_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> WatermarkKey:
        """Generate a fresh key for ``pl_module`` trained on ``trainer.datamodule``."""
        raise NotImplementedError

    def key_rng(self, purpose: str = "key") -> torch.Generator:
        """The random number generator a new key's ``purpose`` pieces are drawn from: seeded with
        HMAC-SHA256(secret, purpose) (:mod:`lightning_wm.verify.derive`), the secret being fresh from the OS, or a
        hash of ``seed`` (reproducible keys). Each purpose gets its own stream, so a key's derivable pieces can be
        re-computed from its secret alone."""
        if self._secret is None:
            self._secret = seed_secret(self.seed)
        return derived_rng(self._secret, f"{self.key_scheme}/{purpose}")

    def _new_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> WatermarkKey:
        self._secret = seed_secret(self.seed)
        key = self.make_key(trainer, pl_module)
        key.config["derivation"] = {"version": DERIVATION_VERSION, "secret": self._secret.hex()}
        return key

    def split_datamodule(self, trainer: L.Trainer, purpose: str) -> Any:
        """The Trainer's lightning_wm ``SplitDataModule``, which a scheme that draws its key from the data needs."""
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "dataset"):
            raise ValueError(f"{type(self).__name__} needs a lightning_wm SplitDataModule ({purpose})")
        return datamodule

    def on_key_ready(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called on every rank once the key exists, before training: prepare tensors, check or adapt the model."""

    def training_loss(self, pl_module: L.LightningModule, batch: Any, output: Any) -> Tensor | None:
        """A term added to the training loss by :class:`~lightning_wm.mixin.WatermarkMixin` (None: no term)."""
        return None

    @property
    def needs_loss_term(self) -> bool:
        """Whether this scheme embeds through :meth:`training_loss` (so the model must include the mixin)."""
        return type(self).training_loss is not WatermarkScheme.training_loss

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.loss_reached or not self.needs_loss_term:
            return
        if hasattr(pl_module, "watermark_schemes") and self not in pl_module.watermark_schemes:
            return  # the module deliberately leaves this scheme out (an overwriting attacker embeds its own only)
        module = type(pl_module).__name__
        raise RuntimeError(
            f"{type(self).__name__}'s loss term did not reach {module}'s training loss, so the model is not being "
            f"watermarked: {module} must include lightning_wm.WatermarkMixin (class {module}(WatermarkMixin, "
            "L.LightningModule)) and its training_step must return the loss (or a dict with 'loss')"
        )

    def verify(self, suspect: Suspect, alpha: float | None = None) -> Verdict:
        """Test ``suspect`` with this scheme's key; the verdict carries this scheme's ``name``."""
        verdict = self.key.verify(suspect, alpha=self.alpha if alpha is None else alpha)
        return dataclasses.replace(verdict, scheme=self.name)

    def save_key(self, path: str | Path) -> Path:
        """Write this scheme's key file."""
        return self.key.save_key(path)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.loss_reached = False
        if stage != "fit":
            if self._key is None and self.key_path and Path(self.key_path).is_file():
                self._key = load_key(self.key_path, scheme=self.key_scheme)
            return
        if self._key is None:
            key = None
            if trainer.is_global_zero:
                if self.key_path and Path(self.key_path).is_file():
                    key = load_key(self.key_path, scheme=self.key_scheme)
                else:
                    key = self._new_key(trainer, pl_module)
                    if self.key_path:
                        key.save_key(self.key_path)
            self._key = trainer.strategy.broadcast(key, src=0)
        self.on_key_ready(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_hyperparams({f"wm/{self.name}/scheme": type(self).__name__, **self.public_summary()})

    def public_summary(self) -> dict[str, Any]:
        """What a dashboard may show of this scheme: the key's fingerprint and significance level, never the key."""
        return {f"wm/{self.name}/key_fingerprint": self.key.fingerprint()[:16], f"wm/{self.name}/alpha": self.alpha}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resumed_fingerprint is not None and self._resumed_fingerprint != self.key.fingerprint():
            raise RuntimeError(
                f"{type(self).__name__}: the checkpoint was trained with key {self._resumed_fingerprint[:12]} but "
                f"the key now in use is {self.key.fingerprint()[:12]}; resume with the original key_path"
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._key is None or trainer.sanity_checking:
            return
        verdict = self.verify(pl_module)
        prefix = f"wm/{self.name}"
        metrics = {
            "statistic": float(verdict.statistic),
            "p_value": float(verdict.p_value),
            "neg_log10_p": -float(verdict.log10_p),
            "threshold": float(verdict.threshold),
            "watermarked": float(verdict.is_watermarked),
            "undecidable": float(verdict.outcome is Outcome.UNDECIDABLE),
        }
        for metric, value in metrics.items():
            pl_module.log(f"{prefix}/{metric}", value, sync_dist=True)

    def commitment_path(self) -> Path | None:
        """Where the commitment record is written beside the key file (``<key_path>.commitment.json``)."""
        return None if not self.key_path else Path(f"{self.key_path}.commitment.json")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """After ``fit``, write the commitment record of the final key and of the marked weights: small, keyless,
        meant to be published (:mod:`lightning_wm.verify.commitment`); and put the final model's verdict in the
        summary of every W&B run the fit logs to (:meth:`log_verdict_summary`)."""
        if stage != "fit" or self._key is None or not trainer.is_global_zero:
            return
        path = self.commitment_path()
        if path is not None:
            commit(self.key, pl_module).save(path)
        self.log_verdict_summary(trainer, pl_module)

    def log_verdict_summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write ``wm/<name>/verdict`` (the outcome), ``p_value``, ``log10_p``, ``statistic``, ``threshold`` and
        ``key_fingerprint`` of the trained model into ``run.summary`` of each ``WandbLogger``: the run's table row
        shows whether the fit ended watermarked. Other loggers have no summary; their last ``wm/`` metrics say it."""
        from lightning.pytorch.loggers import WandbLogger

        runs = [logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not runs:
            return
        verdict = self.verify(pl_module)
        prefix = f"wm/{self.name}"
        summary = {
            **verdict.summary(prefix),
            f"{prefix}/verdict": verdict.outcome.value,
            f"{prefix}/key_fingerprint": self.key.fingerprint()[:16],
        }
        for run in runs:
            run.summary.update(summary)

    def state_dict(self) -> dict[str, Any]:
        if self._key is None:
            return {}
        return {"fingerprint": self.key.fingerprint(), "key_path": self.key_path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_fingerprint = state_dict.get("fingerprint")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Find the key the checkpoint was trained with even when ``key_path`` (part of :attr:`state_key`) changed.

        Lightning hands a callback only the state saved under its own ``state_key``; a run resumed with another
        ``key_path`` would otherwise continue silently with another key. When the checkpoint holds no state for
        this ``state_key`` but exactly one of this scheme's class, its fingerprint is the one to check against.
        """
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        prefix = f"{type(self).__qualname__}{{"
        same_scheme = [state for key, state in states.items() if isinstance(key, str) and key.startswith(prefix)]
        if len(same_scheme) == 1 and isinstance(same_scheme[0], dict):
            self._resumed_fingerprint = same_scheme[0].get("fingerprint")


def weight_layer_names(model: nn.Module) -> list[str]:
    """Names (as in ``named_modules()``) of the conv and linear layers of ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, _WEIGHT_LAYERS) and name]


class MissingLayerError(ValueError):
    """The suspect has no layer of the key's name, or one of another shape than the key reads: a white-box mark
    cannot be read from it (e.g. a student of another architecture), which is evidence of nothing, so the benchmark
    reads it as not declared."""


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The conv or linear layer ``name`` of ``model``.

    ``name`` may be given relative to the backbone (``conv2``), to the LightningModule (``backbone.conv2``) or as
    the unique suffix of a longer name (``model.conv2`` in an attack module), and
    ``torch.compile``'s ``_orig_mod.`` prefix is ignored, so one key reads a backbone, a LightningModule or a
    compiled module alike.

    Raises:
        MissingLayerError: no such layer; the message lists the valid names.
        ValueError: a layer without a conv/linear weight, or an ambiguous suffix.
    """
    modules = {n.replace("_orig_mod.", ""): m for n, m in model.named_modules()}
    candidates = [name, f"backbone.{name}", name.removeprefix("backbone.")]
    for candidate in candidates:
        layer = modules.get(candidate)
        if layer is not None:
            if not isinstance(layer, _WEIGHT_LAYERS):
                raise ValueError(
                    f"layer {name!r} is a {type(layer).__name__}, not a conv or linear layer; "
                    f"valid names: {', '.join(weight_layer_names(model))}"
                )
            return layer
    suffix_matches = {n: m for n, m in modules.items() if n.endswith(f".{name.removeprefix('backbone.')}")}
    if len(suffix_matches) == 1:
        ((found, layer),) = suffix_matches.items()
        if not isinstance(layer, _WEIGHT_LAYERS):
            raise ValueError(
                f"layer {found!r} is a {type(layer).__name__}, not a conv or linear layer; "
                f"valid names: {', '.join(weight_layer_names(model))}"
            )
        return layer
    if len(suffix_matches) > 1:
        raise ValueError(f"layer name {name!r} is ambiguous: it ends {', '.join(suffix_matches)}; give the full name")
    raise MissingLayerError(f"no layer named {name!r}; valid names: {', '.join(weight_layer_names(model))}")


_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def logs_this_step(pl_module: L.LightningModule) -> bool:
    """Whether Lightning writes on-step metrics at this training step (every ``log_every_n_steps``; True outside a
    Trainer). Per-step watermark metrics are logged only then: each ``self.log`` call costs about a millisecond on a
    CPU, as much as a scheme's own arithmetic on a small model's step."""
    connector = getattr(getattr(pl_module, "_trainer", None), "_logger_connector", None)
    return True if connector is None else bool(connector.should_update_logs)
