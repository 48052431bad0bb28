"""The robustness matrix: every scheme × every removal attack, embedded, attacked and verified.

For each scheme the benchmark embeds the watermark in a copy of the configured model, trains unmarked models of
the same architecture (the first from the same initialisation: the accuracy baseline; the others from other seeds:
the false-positive check and the empirical null), then runs each attack on a copy of the marked model on the
attacker's split and verifies the result with the owner's key. A cell is cached on disk under the hash of
everything that determines it (model, data, scheme, attack, epochs, seed), so a rerun skips finished cells, an
interrupted run resumes, and a changed option reruns only the cells it touches.

An attack *removes* a watermark when the attacked model is no longer declared watermarked at ``alpha`` while its
test accuracy stays within ``accuracy_budget`` points of the marked model's (Lukas et al. 2022's criterion).

A cell whose attack does not fit the scheme's threat model (:class:`~lightning_wm.verify.NotApplicable`) reads
"n/a" with the reason; a white-box key whose layer the attacked model lacks (a student of another architecture,
:class:`~lightning_wm.watermarks.MissingLayerError`) reads as not declared, p 1, with the reason; any other
exception is an "error" cell, its traceback in ``logs/<cell>.log`` under
``output_dir``, and the run goes on. Every key is also tried on the benchmark's innocent models: the unmarked
ones, the models the other schemes marked, untrained networks and unmarked models collapsed by pruning 80% of
their weights (no fine-tuning); the four counts of declared models are columns of every row of the scheme.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from tqdm.auto import tqdm

from lightning_wm.attacks.base import RemovalAttack
from lightning_wm.benchmark.cache import CellCache, cell_id, describe
from lightning_wm.models.reinit import clone_module, reinitialised_copy
from lightning_wm.registry import attack_of, factory_class
from lightning_wm.side_training import fit_copy
from lightning_wm.verify.keys import WatermarkKey, load_key
from lightning_wm.verify.stats import empirical_p_value
from lightning_wm.verify.verdict import NotApplicable, Outcome, Verdict
from lightning_wm.watermarks.base import MissingLayerError, WatermarkScheme

AttackFactory = Callable[[nn.Module], RemovalAttack]
"""An attack with every option but the victim: ``class_path``/``init_args`` in a config, a ``partial`` in Python."""

INNOCENT_KINDS = ("clean", "other_schemes", "untrained", "collapsed")
"""The innocent suspects every key is tried on; ``fp_<kind>`` columns count the declared ones."""

COLLAPSE_RATE = 0.8

TRAINER_OPTIONS = (
    "accelerator",
    "devices",
    "strategy",
    "num_nodes",
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "deterministic",
    "limit_train_batches",
    "limit_val_batches",
    "limit_test_batches",
)


@contextlib.contextmanager
def quiet_lightning(enabled: bool = True) -> Iterator[None]:
    """Hold back Lightning's per-Trainer messages (devices, tips, seeds) and its deprecation warnings while the
    benchmark builds dozens of Trainers, so that its output is its progress bar and its table."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*deprecated")
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def quiet_trainer(
    trainer_kwargs: dict[str, Any], max_epochs: int, callbacks: list[L.Callback] | None = None, **overrides: Any
) -> L.Trainer:
    """A Trainer with the hardware options of ``trainer_kwargs`` and no logger (unless ``logger`` is in
    ``overrides``: a cell's W&B run), checkpoint or progress bar."""
    options = {k: v for k, v in trainer_kwargs.items() if k in TRAINER_OPTIONS}
    options.update(
        max_epochs=max_epochs,
        callbacks=callbacks or [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(overrides)
    return L.Trainer(**options)


class Benchmark:
    """Embed, attack and verify: the scheme × attack matrix of one model and dataset.

    Args:
        model: the LightningModule to watermark (e.g. an ``ImageClassifier``); copied for every run.
        datamodule: the owner's data; the attacks train on its ``attacker`` split (a copy with
            ``train_split="attacker"``).
        schemes: name → watermark scheme (a ``WatermarkScheme`` callback).
        attacks: name → attack factory (every option but the victim).
        scheme_models: name → a model that replaces ``model`` for that scheme (the new-label scheme needs K+1
            outputs).
        embed_epochs: epochs of embedding (and of each unmarked model).
        attack_epochs: epochs of each attack (one number, or name → number; 0 runs no training: pruning alone).
        null_models: unmarked models per architecture (≥ 1; the first shares the marked model's initialisation).
        alpha: significance level of the verdicts.
        accuracy_budget: accuracy points an attacker accepts to lose.
        output_dir: cache, tables and plot.
        seed: seed of the marked model and of the first unmarked one.
        trainer_kwargs: options of every Trainer the benchmark builds (accelerator, devices, precision...).
        progress: show a progress bar over the cells.
        rerun: schemes whose embedding and attack cells are recomputed even when cached (after a change of the
            scheme's code, which the cache key, made of options, does not see).
        verbose: let Lightning print its per-Trainer messages and warnings (held back by default).
        wandb_settings: log every computed cell to its own W&B run: ``wandb.init`` options (``project``,
            ``entity``, ``save_dir``, ``group``, ``mode``), the same for every cell; each run is named
            ``<scheme>×<attack>`` (``<scheme>×none`` for embedding, ``unmarked-<i>`` for an unmarked model), has
            ``job_type`` = its phase (``embed``, ``attack``) and tags for its scheme and attack, and holds the cell's
            training curves, per-epoch ``wm/`` verdicts and, in its summary, the cell's verdict fields. Cached cells
            log no run (their rows are in the report). None (default): no logger, as quiet as before.
    """

    def __init__(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule,
        schemes: dict[str, WatermarkScheme],
        attacks: dict[str, AttackFactory],
        scheme_models: dict[str, L.LightningModule] | None = None,
        embed_epochs: int = 10,
        attack_epochs: int | dict[str, int] = 3,
        null_models: int = 3,
        alpha: float = 0.01,
        accuracy_budget: float = 5.0,
        output_dir: str | Path = "outputs/benchmark",
        seed: int = 0,
        trainer_kwargs: dict[str, Any] | None = None,
        progress: bool = True,
        rerun: Sequence[str] = (),
        verbose: bool = False,
        wandb_settings: dict[str, Any] | None = None,
    ) -> None:
        if null_models < 1:
            raise ValueError(f"null_models must be at least 1 (the accuracy baseline), got {null_models}")
        unknown = (set(scheme_models or {}) | set(rerun)) - set(schemes)
        if unknown:
            raise ValueError(f"{sorted(unknown)} named in scheme_models or rerun are not schemes: {sorted(schemes)}")
        if not hasattr(datamodule, "train_split"):
            raise TypeError(f"{type(datamodule).__name__} has no train_split: the attacks need an attacker split")
        self.model = model
        self.datamodule = datamodule
        self.attacker_datamodule = copy.copy(datamodule)
        self.attacker_datamodule.train_split = "attacker"
        self.schemes = schemes
        self.attacks = attacks
        self.scheme_models = scheme_models or {}
        self.embed_epochs = embed_epochs
        self.attack_epochs = attack_epochs
        self.null_models = null_models
        self.alpha = alpha
        self.accuracy_budget = accuracy_budget
        self.output_dir = Path(output_dir)
        self.seed = seed
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.progress = progress
        self.rerun = set(rerun)
        self.verbose = verbose
        self.wandb_settings = dict(wandb_settings) if wandb_settings is not None else None
        self.cache = CellCache(self.output_dir)
        self.rows: list[dict[str, Any]] = []
        self._data_id = describe(datamodule)
        self._nulls: dict[str, tuple[L.LightningModule, float]] = {}

    @property
    def trainer_id(self) -> dict[str, Any]:
        """The Trainer options that can change a cell's result (hardware, precision, batch limits); display options
        such as the progress bar or the logger are left out so that they never invalidate the cache."""
        return {k: v for k, v in self.trainer_kwargs.items() if k in TRAINER_OPTIONS}

    def epochs_of(self, attack: str) -> int:
        """Training epochs of the attack named ``attack``."""
        if isinstance(self.attack_epochs, int):
            return self.attack_epochs
        return int(self.attack_epochs.get(attack, 1))

    def trainer(
        self, max_epochs: int, callbacks: list[L.Callback] | None = None, logger: Logger | bool = False
    ) -> L.Trainer:
        """A quiet Trainer with the benchmark's hardware options, logging to ``logger`` (a cell's run) if given."""
        if logger is False:
            return quiet_trainer(self.trainer_kwargs, max_epochs, callbacks)
        steps = self.trainer_kwargs.get("log_every_n_steps", 50)
        return quiet_trainer(self.trainer_kwargs, max_epochs, callbacks, logger=logger, log_every_n_steps=steps)

    def test_accuracy(self, module: L.LightningModule, logger: Logger | bool = False) -> float:
        """``test/acc`` of ``module`` on the owner's test split."""
        (metrics,) = self.trainer(1, logger=logger).test(module, datamodule=self.datamodule, verbose=False)
        return float(metrics["test/acc"])

    @contextlib.contextmanager
    def cell_run(self, phase: str, name: str, tags: Sequence[str], config: dict[str, Any]) -> Iterator[Any]:
        """The logger of one computed cell: a ``WandbLogger`` on a new run of the benchmark's group (see
        ``wandb_settings``), finished when the cell is (exit code 1 if it raised), or ``False`` without W&B. The
        runs print nothing (W&B's per-run banners would break the progress bar) unless ``verbose``."""
        if self.wandb_settings is None:
            yield False
            return
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        settings = dict(self.wandb_settings)
        save_dir = settings.pop("save_dir", None)
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            **settings,
            dir=save_dir,
            name=name,
            job_type=phase,
            tags=list(dict.fromkeys(tags)),
            config={"benchmark": {"phase": phase, "seed": self.seed, "alpha": self.alpha, **config}},
            reinit="create_new",
            settings=wandb.Settings(silent=not self.verbose),
        )
        try:
            yield WandbLogger(experiment=run)
        except BaseException:
            run.finish(exit_code=1)
            raise
        run.finish(exit_code=1 if run.summary.get("status") == "error" else 0)

    def _scheme_label(self, scheme: WatermarkScheme) -> str:
        return next((label for label, candidate in self.schemes.items() if candidate is scheme), scheme.name)

    def total_cells(self) -> int:
        """Cells the progress bar counts: per scheme, the unmarked models, the embedding and each attack."""
        return len(self.schemes) * (1 + self.null_models + len(self.attacks))

    def run(self) -> list[dict[str, Any]]:
        """Run (or load from the cache) every cell; return one row per scheme × (no attack + each attack)."""
        with quiet_lightning(not self.verbose):
            return self._run()

    def _run(self) -> list[dict[str, Any]]:
        started = time.perf_counter()
        self.rows = []
        bar = tqdm(total=self.total_cells(), desc="benchmark", unit="cell", disable=not self.progress, leave=True)
        embedded: dict[str, tuple[L.LightningModule, WatermarkKey, dict[str, Any]]] = {}
        nulls: dict[str, list[tuple[L.LightningModule, float]]] = {}
        for scheme_name, scheme in self.schemes.items():
            template = self.scheme_models.get(scheme_name, self.model)
            nulls[scheme_name] = [self.null_model(template, i, bar) for i in range(self.null_models)]
            try:
                embedded[scheme_name] = self.embed(scheme_name, scheme, template, bar)
            except Exception as err:  # noqa: BLE001  (an error cell; the run goes on)
                reason = self._log_error(f"embed-{scheme_name}", err)
                for attack in ["none", *self.attacks]:
                    self.rows.append(_skipped_row(scheme_name, attack, nulls[scheme_name][0][1], "error", reason))
                bar.update(1 + len(self.attacks))
        innocents = self.innocent_models(embedded, nulls)
        for scheme_name, (marked, key, embed) in embedded.items():
            scheme = self.schemes[scheme_name]
            own_nulls = nulls[scheme_name]
            null_verdicts = [key.verify(null.eval(), alpha=self.alpha) for null, _ in own_nulls]
            null_stats = [v.statistic for v in null_verdicts]
            higher = bool(embed.get("higher_is_watermarked", True))
            context = {
                "scheme": scheme_name,
                "baseline_acc": own_nulls[0][1],
                "acc_before": embed["acc"],
                "false_positives": f"{sum(v.is_watermarked for v in null_verdicts)}/{len(null_verdicts)}",
                **self.false_accusations(scheme_name, key, innocents),
                "key_fingerprint": key.fingerprint()[:12],
            }
            self.rows.append(
                {**context, **self._verdict_row("none", embed["acc"], embed, null_stats, higher), "attack_time": 0.0}
            )
            for attack_name, factory in self.attacks.items():
                bar.set_postfix_str(f"{scheme_name} × {attack_name}")
                row = self.attack(embed["cell"], attack_name, factory, marked, key, scheme, scheme_name in self.rerun)
                self.rows.append({**context, **self._verdict_row(attack_name, embed["acc"], row, null_stats, higher)})
                bar.update()
        bar.close()
        rank_zero_info(f"benchmark: {len(self.rows)} rows in {time.perf_counter() - started:.0f} s")
        return self.rows

    def innocent_models(
        self,
        embedded: dict[str, tuple[L.LightningModule, WatermarkKey, dict[str, Any]]],
        nulls: dict[str, list[tuple[L.LightningModule, float]]],
    ) -> dict[str, list[tuple[str, nn.Module]]]:
        """The innocent suspects by kind: ``(owner scheme or "", model)`` pairs; the untrained and collapsed ones
        are made from the unmarked models (same architectures), seeded."""
        from torch.nn.utils import prune

        clean = [(name, null) for name, models in nulls.items() for null, _ in models]
        unique: dict[int, tuple[str, nn.Module]] = {id(m): (n, m) for n, m in clean}
        untrained, collapsed = [], []
        for i, (name, model) in enumerate(unique.values()):
            torch.manual_seed(self.seed + 10_000 + i)
            untrained.append((name, reinitialised_copy(model).eval()))
            pruned = clone_module(model)
            layers = [(m, "weight") for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=COLLAPSE_RATE)
            collapsed.append((name, pruned.eval()))
        others = [(name, model) for name, (model, _, _) in embedded.items()]
        return {"clean": list(unique.values()), "other_schemes": others, "untrained": untrained, "collapsed": collapsed}

    def false_accusations(
        self, scheme_name: str, key: WatermarkKey, innocents: dict[str, list[tuple[str, nn.Module]]]
    ) -> dict[str, str]:
        """``fp_<kind>``: how many innocent suspects of each kind ``key`` declares, as ``declared/tried``.

        A suspect the key cannot read (another number of outputs, a white-box key on a served model) is not tried.
        """
        counts: dict[str, str] = {}
        for kind in INNOCENT_KINDS:
            declared = tried = 0
            for owner, model in innocents[kind]:
                if kind == "other_schemes" and owner == scheme_name:
                    continue
                try:
                    verdict = key.verify(model, alpha=self.alpha)
                except (NotApplicable, ValueError):
                    continue
                tried += 1
                declared += verdict.is_watermarked
            counts[f"fp_{kind}"] = f"{declared}/{tried}"
        return counts

    def _log_error(self, cell: str, err: BaseException) -> str:
        """Write ``err``'s traceback to the cell's log file; return the one line a table shows."""
        log = self.output_dir / "logs" / f"{cell}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(err)))
        return f"{type(err).__name__}: {_first_line(err)} (traceback: {log})"

    def null_model(self, template: L.LightningModule, index: int, bar: tqdm) -> tuple[L.LightningModule, float]:
        """The ``index``-th unmarked model of ``template``'s architecture and its test accuracy (cached)."""
        cell = cell_id("null", template, self._data_id, self.embed_epochs, self.seed + index, self.trainer_id)
        if cell in self._nulls:
            bar.update()
            return self._nulls[cell]
        bar.set_postfix_str(f"unmarked model {index + 1}/{self.null_models}")
        model = self.cache.load_model(cell, template)
        row = self.cache.load_row(cell)
        if model is None or row is None:
            with self.cell_run("embed", f"unmarked-{index}", ["unmarked"], {"cell": cell}) as logger:
                trainer = self.trainer(self.embed_epochs, logger=logger)
                model = fit_copy(
                    template, self.seed + index, trainer, reinitialise=index > 0, datamodule=self.datamodule
                )
                row = {"acc": self.test_accuracy(model, logger)}
                _log_cell_summary(logger, row)
            self.cache.save_model(cell, model)
            self.cache.save_row(cell, row)
        bar.update()
        self._nulls[cell] = (model.eval(), float(row["acc"]))
        return self._nulls[cell]

    def embed(
        self, name: str, scheme: WatermarkScheme, template: L.LightningModule, bar: tqdm
    ) -> tuple[L.LightningModule, WatermarkKey, dict[str, Any]]:
        """Train ``template`` with ``scheme``; return the marked model, its key and its row (cached)."""
        unkeyed = copy.copy(scheme)
        unkeyed.key_path = None
        cell = cell_id("embed", template, self._data_id, unkeyed, self.embed_epochs, self.seed, self.trainer_id)
        bar.set_postfix_str(f"{name}: embedding")
        model = self.cache.load_model(cell, template)
        row = None if name in self.rerun else self.cache.load_row(cell)
        key_file = self.cache.key_path(cell)
        if model is None or row is None or not key_file.is_file():
            scheme = copy.deepcopy(scheme)
            scheme.key_path = str(key_file)
            key_file.unlink(missing_ok=True)
            model = clone_module(template)
            L.seed_everything(self.seed, verbose=False)
            began = time.perf_counter()
            with self.cell_run("embed", f"{name}×none", [name, "none"], {"cell": cell, "scheme": name}) as logger:
                trainer = self.trainer(self.embed_epochs, callbacks=[scheme], logger=logger)
                trainer.fit(model, datamodule=self.datamodule)
                verdict = scheme.key.verify(model.eval(), alpha=self.alpha)
                row = {
                    "acc": self.test_accuracy(model, logger),
                    **_verdict_fields(verdict),
                    "embed_time": time.perf_counter() - began,
                }
                _log_cell_summary(logger, {**row, "key_fingerprint": scheme.key.fingerprint()[:12]})
            self.cache.save_model(cell, model)
            self.cache.save_row(cell, row)
        bar.update()
        return model.eval(), load_key(key_file), {**row, "cell": cell}

    def attack(
        self,
        embed_cell: str,
        name: str,
        factory: AttackFactory,
        marked: L.LightningModule,
        key: WatermarkKey,
        scheme: WatermarkScheme,
        rerun: bool = False,
    ) -> dict[str, Any]:
        """Run one attack on a copy of the marked model and verify it with the owner's key (cached)."""
        epochs = self.epochs_of(name)
        cell = cell_id("attack", embed_cell, factory, epochs, self.seed, self.trainer_id)
        row = None if rerun else self.cache.load_row(cell)
        if row is not None:
            return row
        began = time.perf_counter()
        label = self._scheme_label(scheme)
        run_config = {"cell": cell, "scheme": label, "attack": name, "epochs": epochs, "key": key.fingerprint()[:12]}
        with self.cell_run("attack", f"{label}×{name}", [label, name], run_config) as logger:
            try:
                L.seed_everything(self.seed, verbose=False)
                attack = factory(marked)
                attack.prepare(scheme)
                if epochs > 0:
                    self.trainer(epochs, logger=logger).fit(attack, datamodule=self.attacker_datamodule)
                acc = self.test_accuracy(attack, logger)
                try:
                    verdict = key.verify(attack.eval(), alpha=self.alpha)
                except MissingLayerError as err:
                    verdict = _unreadable_verdict(key.verify(marked.eval(), alpha=self.alpha), err)
                row = {
                    "acc": acc,
                    **_verdict_fields(verdict),
                    "queries": int(attack.queries) + int(verdict.queries or 0),
                }
            except NotApplicable as err:
                row = {"acc": math.nan, "status": "n/a", "reason": _first_line(err)}
            except Exception as err:  # noqa: BLE001  (an error cell; the run goes on)
                row = {"acc": math.nan, "status": "error", "reason": self._log_error(cell, err)}
            row["attack_time"] = time.perf_counter() - began
            _log_cell_summary(logger, row)
        if row.get("status") != "error":
            self.cache.save_row(cell, row)
        return row

    def _verdict_row(
        self, attack: str, acc_before: float, row: dict[str, Any], null_stats: list[float], higher: bool
    ) -> dict[str, Any]:
        factory = self.attacks.get(attack)
        cls = factory_class(factory) if factory is not None else None
        spec = attack_of(cls) if cls is not None else None
        out: dict[str, Any] = {
            "attack": attack,
            "category": spec.category if spec else "",
            "acc_after": row.get("acc", math.nan),
        }
        if row.get("status") in ("n/a", "error"):
            return {**out, "status": row["status"], "reason": row.get("reason", "")}
        if row.get("reason"):
            out["reason"] = row["reason"]
        drop = 100.0 * (acc_before - row["acc"])
        watermarked = _declared_at(row, self.alpha)
        within_budget = drop <= self.accuracy_budget
        status = "kept" if watermarked else ("removed" if within_budget else "removed, over budget")
        if row.get("outcome") == "undecidable":
            status = "undecidable" if within_budget else "removed, over budget"
        if attack == "none" and not watermarked:
            status = "not embedded"
        return {
            **out,
            "acc_drop": drop,
            "statistic_name": row["statistic_name"],
            "statistic": row["statistic"],
            "p_value": row["p_value"],
            "empirical_p": empirical_p_value(row["statistic"], null_stats, higher_is_watermarked=higher),
            "watermarked": watermarked,
            "status": status,
            "queries": row.get("queries", row.get("verify_queries", 0)),
            "attack_time": row.get("attack_time", 0.0),
        }


def _log_cell_summary(logger: Any, row: dict[str, Any]) -> None:
    """The cell's row (accuracy, statistic, p-value, outcome, status, reason...) in its W&B run's summary."""
    if logger is False:
        return
    values = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items() if k != "cell"}
    logger.experiment.summary.update(values)


def _declared_at(row: dict[str, Any], alpha: float) -> bool:
    """Whether a cached verdict declares at this run's ``alpha`` (the rule of :meth:`Verdict.decide`): a cell's
    id leaves ``alpha`` out, so a cell cached at another level is judged again from its log10 p."""
    if "log10_p" not in row:
        return bool(row["is_watermarked"])
    return row.get("outcome") != Outcome.UNDECIDABLE.value and float(row["log10_p"]) < math.log10(alpha)


def _unreadable_verdict(marked: Verdict, err: MissingLayerError) -> Verdict:
    """The verdict on a suspect whose white-box mark cannot be read (no layer of the key's name): not declared,
    p 1, in the marked model's terms (statistic name, threshold) so that the row reads like its neighbours."""
    return dataclasses.replace(
        marked,
        statistic=math.nan,
        p_value=1.0,
        log10_p=0.0,
        outcome=Outcome.NOT_WATERMARKED,
        queries=0,
        reason=f"the white-box mark cannot be read: {_first_line(err)}",
        details={},
    )


def _verdict_fields(verdict: Verdict) -> dict[str, Any]:
    return {
        "statistic_name": verdict.statistic_name,
        "statistic": float(verdict.statistic),
        "p_value": float(verdict.p_value),
        "log10_p": float(verdict.log10_p),
        "is_watermarked": bool(verdict.is_watermarked),
        "outcome": verdict.outcome.value,
        "higher_is_watermarked": bool(verdict.higher_is_watermarked),
        "threshold": float(verdict.threshold),
        "alpha": float(verdict.alpha),
        "verify_queries": int(verdict.queries or 0),
        "reason": verdict.reason,
    }


def _skipped_row(scheme: str, attack: str, baseline_acc: float, status: str, reason: str) -> dict[str, Any]:
    return {
        "scheme": scheme,
        "attack": attack,
        "baseline_acc": baseline_acc,
        "acc_before": math.nan,
        "acc_after": math.nan,
        "false_positives": "–",
        "key_fingerprint": "",
        "status": status,
        "reason": reason,
    }


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
