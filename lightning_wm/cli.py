"""``lightning-wm``: the LightningCLI with ``verify`` and ``benchmark`` beside ``fit/validate/test/predict``."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from lightning_wm.benchmark.matrix import AttackFactory, quiet_lightning
from lightning_wm.data.base import DatasetNotFoundError
from lightning_wm.registry import RegistryError
from lightning_wm.verify.commitment import commit, load_commitment, model_fingerprint
from lightning_wm.verify.derive import DISPUTE_ALPHA
from lightning_wm.verify.keys import KeyFileError, load_key
from lightning_wm.verify.verdict import NotApplicable, Verdict
from lightning_wm.watermarks.base import WatermarkScheme


class WatermarkTrainer(L.Trainer):
    """A ``lightning.Trainer`` with the ``verify`` and ``benchmark`` subcommands of ``lightning-wm``."""

    def verify(
        self,
        model: L.LightningModule,
        key: str,
        ckpt_path: str | None = None,
        alpha: float = 0.01,
        options: dict[str, Any] | None = None,
        commitment: str | None = None,
        dispute: bool = False,
        datamodule: L.LightningDataModule | None = None,
    ) -> Verdict:
        """Test a suspect (its checkpoint, --ckpt_path, is required) for the watermark of a key file; print the verdict.

        Args:
            model: the suspect's architecture (the config's ``model``); its weights come from ``ckpt_path``.
            key: the owner's key file.
            ckpt_path: the suspect's checkpoint (a ``.ckpt`` of ``lightning-wm fit`` or of an attack); required.
            alpha: significance level of the decision.
            options: keyword arguments of the key's ``verify``, e.g. ``'{"layer": "conv2"}'`` (a white-box key
                reading a layer of another name), ``'{"customer": "alice"}'`` (CSP).
            commitment: the key's published commitment record: the key must match it, and its date is reported.
            dispute: decide at the dispute level (p < 1e-9), at which a forger trying a million seeds succeeds by
                luck with probability at most 1e-3; overrides ``alpha``.
        """
        if ckpt_path is None:
            raise ValueError("verify needs the suspect: give its checkpoint with --ckpt_path")
        owner_key = load_key(key)
        derived = owner_key.check_derivation(datamodule)
        record = None
        if commitment is not None:
            record = load_commitment(commitment)
            record.check(owner_key)
        load_weights(model, ckpt_path)
        alpha = DISPUTE_ALPHA if dispute else alpha
        verdict = owner_key.verify(model.eval(), alpha=alpha, **_verify_options(owner_key, options or {}))
        provenance = {
            "derived": derived,
            "committed": record.created if record is not None else None,
            "forger_seeds_at_this_level": int(0.01 / alpha) if alpha < 0.01 else 1,
        }
        verdict = dataclasses.replace(verdict, details={**verdict.details, "key_provenance": provenance})
        if self.logger is not None:
            prefix = f"verify/{owner_key.scheme}"
            self.logger.log_hyperparams({"verify/key_fingerprint": owner_key.fingerprint()[:16], "verify/alpha": alpha})
            self.logger.log_metrics(
                {
                    f"{prefix}/statistic": float(verdict.statistic),
                    f"{prefix}/p_value": float(verdict.p_value),
                    f"{prefix}/log10_p": float(verdict.log10_p),
                    f"{prefix}/watermarked": float(verdict.is_watermarked),
                }
            )
            self.logger.save()
            from lightning.pytorch.loggers import WandbLogger

            if isinstance(self.logger, WandbLogger):
                _log_verdict_to_wandb(self.logger, verdict, owner_key.fingerprint(), model, ckpt_path)
        if self.is_global_zero:
            print(verdict)
            print(_provenance_line(provenance))
            print(json.dumps(verdict.as_dict(), default=str))
        return verdict

    benchmark_seed: int = 0
    benchmark_trainer_kwargs: dict[str, Any] = {}
    """The ``trainer:`` options of the config, which the benchmark gives every Trainer it builds."""

    def benchmark(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule,
        schemes: dict[str, WatermarkScheme],
        attacks: dict[str, AttackFactory] | None = None,
        scheme_models: dict[str, L.LightningModule] | None = None,
        embed_epochs: int = 10,
        attack_epochs: int | dict[str, int] = 3,
        null_models: int = 3,
        alpha: float = 0.01,
        accuracy_budget: float = 5.0,
        output_dir: str = "outputs/benchmark",
        overhead: bool = False,
        overhead_epochs: int | None = None,
        overhead_repeats: int = 5,
        rerun: list[str] | None = None,
        verbose: bool = False,
        search: dict | None = None,
        matrix: bool = True,
        workers: int = 1,
        ray_address: str | None = None,
        gpus_per_cell: float = 0.0,
    ) -> list[dict[str, Any]]:
        """Run the scheme × attack matrix (embed, attack, verify) or, with --overhead, the throughput comparison.

        Prints the table and writes it (CSV, Markdown, heatmap PNG) under ``output_dir``.

        Args:
            model: the model to watermark (copied for every run).
            datamodule: the owner's data; attacks use its attacker split.
            schemes: name → watermark scheme.
            attacks: name → attack (``class_path``/``init_args`` without the victim).
            scheme_models: name → a model replacing ``model`` for that scheme (new label: K+1 outputs).
            embed_epochs: epochs of embedding and of each unmarked model.
            attack_epochs: epochs of every attack, or name → epochs (0: no training, e.g. pruning alone).
            null_models: unmarked models per architecture (accuracy baseline, false positives, empirical null).
            alpha: significance level of the verdicts.
            accuracy_budget: accuracy points an attacker accepts to lose.
            output_dir: cache of finished cells and the reports.
            overhead: measure training throughput with each scheme against plain training instead.
            overhead_epochs: epochs of each overhead run (the first is warm-up; default ``embed_epochs``, so that
                work a scheme does every few epochs weighs as in the embedding it measures).
            overhead_repeats: round-robin repeats of the overhead runs.
            rerun: schemes whose cells are recomputed even when cached (after a change of their code).
            verbose: show Lightning's messages for every Trainer the benchmark builds.
            workers: run the cells as Ray tasks on a local Ray instance with this many CPUs (needs
                ``pip install -e ".[ray]"``); 1 runs them one after another in this process.
            ray_address: run the cells on an existing Ray cluster instead (``auto`` or ``ray://host:10001``).
            gpus_per_cell: GPUs each Ray task asks for (0 on a CPU machine).
            search: after the matrix, search each attack's strongest setting within the accuracy budget (Optuna;
                ``trials``, ``sampler``, ``oracle``, ``accuracy_budget``, ``seed``, ``spaces``...: see
                :class:`~lightning_wm.benchmark.search.SearchConfig`; ``--search='{}'`` for the defaults); writes
                ``strongest.md``/``.csv``, ``search.csv`` and a Pareto plot per scheme beside ``results.csv``.
            matrix: false runs the search alone (its embeddings are loaded from the cache or computed; no matrix
                cell and no ``results.csv``). It may share the ``output_dir`` of a matrix that is still running once
                that matrix's embeddings are cached; two searches at once need separate output
                folders (each holds one Optuna storage).
        """
        from lightning_wm.benchmark import Benchmark, measure_overhead, overhead_table
        from lightning_wm.benchmark.report import markdown_table, write_reports

        if overhead:
            rows = measure_overhead(
                model,
                datamodule,
                schemes,
                scheme_models=scheme_models,
                epochs=overhead_epochs or embed_epochs,
                repeats=overhead_repeats,
                trainer_kwargs=self.benchmark_trainer_kwargs,
            )
            table = overhead_table(rows)
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "overhead.md").write_text(table + "\n")
            if self.is_global_zero:
                print(table)
            return rows
        bench = Benchmark(
            model,
            datamodule,
            schemes,
            attacks or {},
            scheme_models=scheme_models,
            embed_epochs=embed_epochs,
            attack_epochs=attack_epochs,
            null_models=null_models,
            alpha=alpha,
            accuracy_budget=accuracy_budget,
            output_dir=output_dir,
            seed=self.benchmark_seed,
            trainer_kwargs=self.benchmark_trainer_kwargs,
            progress=bool(self.benchmark_trainer_kwargs.get("enable_progress_bar", True)),
            rerun=rerun or (),
            verbose=verbose,
            wandb_settings=_wandb_settings(self.logger, output_dir),
        )
        if not matrix and search is None:
            raise SystemExit("benchmark: --matrix=false runs only the search; give a `search:` section or --search")
        rows: list[dict[str, Any]] = []
        paths: dict[str, Path] = {}
        if matrix:
            if workers > 1 or ray_address:
                from lightning_wm.benchmark.parallel import run_on_ray

                rows = run_on_ray(bench, workers, ray_address, gpus_per_cell)
            else:
                rows = bench.run()
            summary = {
                "schemes": sorted(schemes),
                "attacks": sorted(attacks or {}),
                "key_fingerprints": {r["scheme"]: r["key_fingerprint"] for r in rows},
                "embed_epochs": embed_epochs,
                "alpha": alpha,
                "accuracy_budget": accuracy_budget,
            }
            paths = write_reports(rows, output_dir, logger=self.logger, summary=summary)
        search_table = None
        if search is not None:
            from lightning_wm.benchmark.pareto import strongest_table
            from lightning_wm.benchmark.search import run_search

            search_rows, search_paths = run_search(bench, search, logger=self.logger)
            search_table = strongest_table(search_rows)
            paths = {**paths, **search_paths}
        if self.logger is not None:
            self.logger.finalize("success")
            experiment = getattr(self.logger, "experiment", None)
            if hasattr(experiment, "finish"):
                experiment.finish()
        if self.is_global_zero:
            if matrix:
                print(markdown_table(rows))
            if search_table is not None:
                print("\nstrongest attack within the accuracy budget (search):")
                print(search_table)
            print(f"written: {', '.join(str(p) for p in paths.values())}")
        return rows


def _log_verdict_to_wandb(
    logger: Any, verdict: Verdict, key_fingerprint: str, suspect: torch.nn.Module, ckpt_path: str
) -> None:
    """Put ``verdict`` in the W&B run's summary (``verify/<scheme>/outcome``, ``p_value``, ``log10_p``,
    ``statistic``) and log it as an artifact of type ``verdict``: the verdict JSON that ``verify`` prints, with the
    key's and the suspect's fingerprints as metadata. Nothing of the key but its fingerprint is in either."""
    import wandb

    run = logger.experiment
    run.summary.update(verdict.summary(f"verify/{verdict.scheme}"))
    metadata = {
        "scheme": verdict.scheme,
        "outcome": verdict.outcome.value,
        "p_value": float(verdict.p_value),
        "log10_p": float(verdict.log10_p),
        "key_fingerprint": key_fingerprint[:16],
        "suspect": str(ckpt_path),
        "suspect_fingerprint": model_fingerprint(suspect)[:16],
    }
    artifact = wandb.Artifact(
        re.sub(r"[^A-Za-z0-9_.-]", "-", f"verdict-{verdict.scheme}-{key_fingerprint[:12]}"),
        type="verdict",
        description=f"lightning-wm verify of {ckpt_path}: {verdict.outcome.value}",
        metadata=metadata,
    )
    with artifact.new_file("verdict.json") as f:
        f.write(json.dumps(verdict.as_dict(), default=str, indent=2))
    run.log_artifact(artifact)


def _wandb_settings(logger: Any, output_dir: str) -> dict[str, Any] | None:
    """The W&B settings (``project``, ``entity``, ``save_dir``, ``group``, ``mode``) the benchmark gives each cell's
    run, from the benchmark's ``WandbLogger``; None (no per-cell runs) for any other logger. The group is the
    logger's ``group``, else the name of ``output_dir``; the logger's own (summary) run joins it."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return None
    init = logger._wandb_init
    if logger._experiment is None:
        init["group"] = init.get("group") or Path(output_dir).resolve().name
        group = init["group"]
    else:
        group = logger.experiment.group or init.get("group") or Path(output_dir).resolve().name
    settings = {
        "project": init.get("project"),
        "entity": init.get("entity"),
        "save_dir": logger.save_dir,
        "group": group,
        "mode": init.get("mode") or ("offline" if logger._offline else None),
    }
    return {name: value for name, value in settings.items() if value is not None}


def public_config(config: Any) -> Any:
    """The resolved config as plain JSON-like values for a dashboard, with nothing that rebuilds a key: tensors are
    dropped, and the ``seed`` and ``message`` of every watermark scheme (and of what it is made of) are replaced by
    ``"<secret>"`` (a scheme's ``seed`` expands to its key); the key's fingerprint is logged beside it instead."""
    return _public(config, secret=False)


_SECRET_OPTIONS = ("seed", "message")


def _public(value: Any, secret: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return None
    if isinstance(value, dict):
        secret = secret or _is_watermark_class(value.get("class_path"))
        out = {}
        for name, item in value.items():
            if isinstance(item, torch.Tensor) or name.startswith("__"):
                continue
            hidden = secret and name in _SECRET_OPTIONS and item is not None and not isinstance(item, bool)
            out[name] = "<secret>" if hidden else _public(item, secret)
        return out
    if isinstance(value, (list, tuple)):
        return [_public(item, secret) for item in value if not isinstance(item, torch.Tensor)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _is_watermark_class(class_path: Any) -> bool:
    """Whether ``class_path`` names a watermark scheme or one of its parts (a trigger generator): lightning_wm's
    ``watermarks`` package, or any ``WatermarkScheme`` subclass (a plugin's)."""
    if not isinstance(class_path, str):
        return False
    if class_path.startswith("lightning_wm.watermarks"):
        return True
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, WatermarkScheme)


def _provenance_line(provenance: dict[str, Any]) -> str:
    derived = (
        "derived from its secret seed (checked)"
        if provenance["derived"]
        else "not checkable against a seed (user-supplied or trained pieces): it proves less"
    )
    committed = f"matches its commitment of {provenance['committed']}" if provenance["committed"] else "no commitment"
    return f"key: {derived}; {committed}"


def _verify_options(key: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against the key's ``verify`` signature, so a misspelt option is an error, not ignored."""
    accepted = set(inspect.signature(key.verify).parameters) - {"suspect", "alpha"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"{key.scheme} keys do not take the verify option(s) {unknown}; they take {sorted(accepted) or 'none'}"
        )
    return options


def load_weights(model: torch.nn.Module, ckpt_path: str | Path) -> None:
    """Load the ``state_dict`` of a Lightning checkpoint into ``model``, with a one-line error when it does not fit."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint.get("state_dict", checkpoint)
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path} does not fit the configured model: {first}") from None
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"checkpoint {path} does not load: {type(err).__name__}: {err}") from None


DESCRIPTION = (
    "lightning-wm: watermark neural networks on PyTorch Lightning. Embed a watermark while training (fit, with a "
    "scheme under watermarks:), attack it (fit an attack config), prove ownership of a suspect (verify), and "
    "measure every scheme against every attack (benchmark)."
)


def _add_watermarks_argument(parser: Any) -> None:
    parser.add_argument(
        "--watermarks",
        type=dict[str, WatermarkScheme] | None,
        default=None,
        help="Watermark schemes by name, added to the trainer's callbacks; each option is reachable as "
        "--watermarks.<name>.init_args.<option> (e.g. --watermarks.uchida.init_args.seed=3). The name labels the "
        "scheme's metrics and verdicts unless the scheme sets its own (verify reads the key file instead).",
    )


TRAINING_SUBCOMMANDS = ("fit", "validate", "test", "predict", "verify")


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
        parser_kwargs = dict(kwargs.get("parser_kwargs") or {})
        parser_kwargs.setdefault("exit_on_error", False)
        parser_kwargs.setdefault("description", DESCRIPTION)
        for subcommand in self.subcommands():
            parser_kwargs.setdefault(subcommand, {}).setdefault("exit_on_error", False)
        kwargs["parser_kwargs"] = parser_kwargs
        super().__init__(*args, **kwargs)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> Any:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in TRAINING_SUBCOMMANDS:
            _add_watermarks_argument(parser)
        return parser

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if not add_subcommands:
            _add_watermarks_argument(self.parser)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        schemes = self._get(self.config_init, "watermarks", default=None) or {}
        for label, scheme in schemes.items():
            if scheme.name == scheme.default_name():
                scheme.name = label
        if schemes:
            configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
            configured = configured if isinstance(configured, list) else [configured]
            kwargs["callbacks"] = [*configured, *(kwargs.pop("callbacks", None) or []), *schemes.values()]
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.log_config_to_wandb()

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand, then finish its W&B runs: one ``lightning-wm`` call is one run, also when a notebook
        or a test calls :func:`main` several times in one process (a later logger would reuse a live run)."""
        from lightning.pytorch.loggers import WandbLogger

        exit_code = 1
        try:
            super()._run_subcommand(subcommand)
            exit_code = 0
        finally:
            for logger in self.trainer.loggers:
                if isinstance(logger, WandbLogger) and logger._experiment is not None:
                    logger._experiment.finish(exit_code=exit_code)

    def log_config_to_wandb(self) -> None:
        """Put the full resolved config of the subcommand (trainer, data, model, schemes, seed, verify and benchmark
        options; :func:`public_config`: no key, no scheme seed) in the run config of every ``WandbLogger``.

        A new run gets ``job_type`` = the subcommand unless set (``fit``, ``verify``, ``benchmark``...); for
        ``benchmark`` also the group of its cells' runs (the output folder's name unless set) and the name
        ``summary``. A run resumed by ``id`` (``verify`` into the fit's run) keeps its job type, and another
        subcommand's config goes under its name (``verify: {...}``) instead of over the fit's."""
        from lightning.pytorch.loggers import WandbLogger

        trainer = getattr(self, "trainer", None)
        loggers = [logger for logger in (trainer.loggers if trainer else []) if isinstance(logger, WandbLogger)]
        if not loggers:
            return
        subcommand = self.subcommand
        config = self.config[subcommand] if subcommand else self.config
        public = public_config(config.as_dict())
        public.pop("config", None)
        for logger in loggers:
            init = logger._wandb_init
            resumed = bool(init.get("id")) or logger._experiment is not None
            if not resumed:
                init["job_type"] = init.get("job_type") or subcommand
                if subcommand == "benchmark":
                    init["group"] = init.get("group") or Path(str(config.get("output_dir"))).resolve().name
                    init["name"] = init.get("name") or "summary"
            nested = resumed and subcommand not in (None, "fit")
            logger.log_hyperparams({subcommand: public} if nested else {"subcommand": subcommand, **public})

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` first (a one-line error, not Lightning's traceback). ``verify`` keeps the config's
        architecture: the suspect's weights must fit it, which :func:`load_weights` checks; Lightning's default of
        overriding the config with the checkpoint's hyperparameters would verify another model than configured."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if subcommand == "verify" and not ckpt_path:
            raise ValueError("verify needs the suspect: give its checkpoint with --ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            check_checkpoint_file(ckpt_path)
        if subcommand != "verify":
            super()._parse_ckpt_path()

    def before_benchmark(self) -> None:
        options = self.config[self.subcommand].get("trainer")
        self.trainer.benchmark_trainer_kwargs = dict(options.as_dict() if options is not None else {})
        seed = self.config[self.subcommand].get("seed_everything")
        self.trainer.benchmark_seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands["verify"] = {"model", "datamodule"}
        commands["benchmark"] = {"model", "datamodule"}
        return commands


_USER_ERRORS = (
    ArgumentError,
    DatasetNotFoundError,
    KeyFileError,
    FileNotFoundError,
    NotApplicable,
    RegistryError,
    ValueError,
    TypeError,
)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-wm`` console script.

    Errors caused by the input (a missing dataset, a tampered key, a checkpoint that does not fit) are printed as
    one line; set ``LIGHTNING_WM_DEBUG=1`` for the traceback.
    """
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv[:1] == ["commit"]:
            commit_main(argv[1:])
            return
        with quiet_lightning(argv[:1] == ["benchmark"] and not _asks_verbose(argv)):
            WatermarkCLI(args=args)
    except _USER_ERRORS as err:
        if os.environ.get("LIGHTNING_WM_DEBUG"):
            raise
        print(f"lightning-wm: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def _asks_verbose(argv: list[str]) -> bool:
    """Whether a ``benchmark`` command line sets ``--verbose`` (to show Lightning's messages)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--verbose="):
            return arg.split("=", 1)[1].lower() in ("true", "1", "yes")
        if arg == "--verbose":
            return i + 1 >= len(argv) or argv[i + 1].lower() not in ("false", "0", "no")
    return False


def commit_main(args: list[str]) -> None:
    """``lightning-wm commit KEY [--ckpt_path CKPT] [--output FILE]``: the commitment record of an existing key."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="lightning-wm commit",
        description="Write the commitment record of a key (its fingerprint, a commitment to its secret seed, the "
        "date and the marked model's weight fingerprint): keyless, meant to be published.",
    )
    parser.add_argument("key", help="the key file")
    parser.add_argument("--ckpt_path", help="the marked model's checkpoint, whose weights the record fingerprints")
    parser.add_argument("--output", help="where to write the record (default: <key>.commitment.json)")
    options = parser.parse_args(args)
    key = load_key(options.key)
    weights = None
    if options.ckpt_path:
        check_checkpoint_file(options.ckpt_path)
        weights = torch.load(options.ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    record = commit(key, weights)
    path = record.save(options.output or f"{options.key}.commitment.json")
    print(f"commitment of {key.scheme} key {record.key_fingerprint[:12]} written to {path}")
    if weights is not None:
        print(f"marked weights: {model_fingerprint(weights)[:12]}")


_WRAPPERS = (
    "Parser key",
    "Does not validate against",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Problem with given class_path",
    "Expected a",
    "Not a valid subclass",
    "Validation failed:",
)


def _one_line(err: BaseException) -> str:
    """One line for an error: jsonargparse nests the cause of a bad config under "Parser key" / "Problem with given
    class_path" wrappers; keep the innermost message (for a union, the types expected and the value given),
    prefixed with the config keys it sits under."""
    text = str(err)
    lines = [line.strip().removeprefix("- ").strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    keys = re.findall(r'Parser key "([^"]+)"', text)
    where = f"{'.'.join(dict.fromkeys(keys))}: " if keys else ""
    expected = re.search(r"Expected a <class '([\w.]+)'>\. Got value: (.*)", text)
    if expected:
        return f"{where}expected {expected.group(1)}, got {expected.group(2)!r}"
    subtypes = re.search(r"Subtypes: \[(.*)\]", text)
    given = re.search(r"Given value: (.*)", text)
    if subtypes and given:
        names = [name.replace("NoneType", "null") for name in re.findall(r"<class '([\w.]+)'>", subtypes.group(1))]
        return f"{where}expected {' or '.join(names) or subtypes.group(1)}, got {given.group(1).strip()!r}"
    causes = [line for line in lines if not line.startswith(_WRAPPERS)]
    if len(lines) == 1 or not causes:
        return re.sub(r'Parser key "([^"]+)":\s*', r"\1: ", lines[0])
    return f"{where}{causes[0]}"


def check_checkpoint_file(path: str | Path) -> None:
    """Refuse, in one line, a ``--ckpt_path`` that is not a readable checkpoint (before Lightning loads it).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a directory, a lightning-wm key file, or a file ``torch.load`` cannot read (truncated, text).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"lightning-wm-key"):
        raise ValueError(f"{path} is a lightning-wm key file, not a checkpoint: give it with --key")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unreadable file is the same user error)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path} does not load ({type(err).__name__}: {reason[:120]})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (it has no state_dict)")


if __name__ == "__main__":
    main()
