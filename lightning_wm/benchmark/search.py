"""The strongest attacker: per scheme × attack, an Optuna study over the attack's settings that looks for the one that
removes the watermark within the accuracy budget (the SoK's adaptive attacker, Lukas et al., S&P 2022).

A fixed robustness matrix tests one setting per attack; a watermark "kept" there may fall to the same attack at
another learning rate or pruning rate. Here every attack with a search space (:meth:`RemovalAttack.search_space`,
overridable per attack in the config's ``search.spaces``) is tuned: each trial trains the attack with the trial's
parameters on a copy of the marked model through :meth:`Benchmark.attack` (cells cached by their full
configuration), so an interrupted search resumes, and the study itself lives in ``<output_dir>/search.db``
(Optuna's SQLite storage, study ``<scheme>__<attack>__<mode>``), so finished trials are not run again.

The objective is the owner's verification statistic normalised so that the decision threshold sits at 0.5
(:func:`normalised_statistic`), minimised subject to the accuracy loss staying within the budget (a constraint of
every trial, which TPE steers by; the strongest setting is the best feasible trial for every sampler). Two
attackers:

- ``oracle: true``, the SoK's worst case: the attacker reads the owner's verdict of every trial.
- ``oracle: false``, the realistic attacker: it marks a proxy model of its own (the same scheme with another seed,
  embedded in a fresh copy of the architecture on the attacker's split), tunes against the proxy's statistic, and
  the owner's verdict of the setting it chose is what the report shows.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import torch
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, Trial, TrialState
from tqdm.auto import tqdm

from lightning_wm.attacks.base import RemovalAttack
from lightning_wm.benchmark.cache import cell_id
from lightning_wm.benchmark.matrix import AttackFactory, Benchmark, quiet_lightning
from lightning_wm.models.reinit import reinitialised_copy
from lightning_wm.registry import factory_class
from lightning_wm.verify.keys import WatermarkKey
from lightning_wm.verify.verdict import NotApplicable
from lightning_wm.watermarks.base import WatermarkScheme

TRAINING_PARAMS = ("lr", "optimizer", "epochs")
"""Trial parameters that are not constructor arguments: the optimizer factory's and the number of epochs."""

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adam": (torch.optim.Adam, {}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
}
"""The ``optimizer`` choices; SGD with momentum 0.9, as in Adi et al.'s fine-tuning."""

PROXY_SEED_OFFSET = 104_729
"""Added to the owner's scheme seed and the benchmark's seed for the realistic attacker's own proxy model and key."""

DISTRIBUTION_TYPES = ("float", "int", "categorical")

CONSTRAINT_API = hasattr(Trial, "set_constraint")
"""Optuna ≥ 5 records a trial's constraints with ``Trial.set_constraint`` (every sampler that models constraints
reads them); earlier versions take TPE's ``constraints_func``."""


class SearchError(ValueError):
    """A ``search:`` section that does not describe a search (unknown option, attack or distribution)."""


@dataclass
class SearchConfig:
    """The ``search:`` section of a benchmark config.

    Attributes:
        trials: trials per scheme × attack (× attacker).
        sampler: ``tpe`` (default), ``grid`` (``optuna.samplers.GridSampler`` over ``grid_points`` values of each
            numeric parameter) or ``random``.
        oracle: ``true`` (the attacker sees the owner's verdicts), ``false`` (it tunes on a proxy of its own), or a
            list of both to run the two attackers.
        accuracy_budget: accuracy points the attacker accepts to lose; default the benchmark's.
        seed: seed of the samplers.
        attacks: benchmark attacks to tune; default every one whose search space is not empty.
        schemes: benchmark schemes to attack; default every one (a subset splits one config's search across
            processes, each with its own ``output_dir``).
        spaces: attack name (the benchmark's, or the registered one) → parameter → ``{type: float | int |
            categorical, low, high, log, step, choices}``, replacing that parameter's distribution (null removes it).
        grid_points: values per numeric parameter of the grid sampler.
        startup_trials: random trials before TPE models the results (default Optuna's).
    """

    trials: int = 20
    sampler: Literal["tpe", "grid", "random"] = "tpe"
    oracle: bool | list[bool] = False
    accuracy_budget: float | None = None
    seed: int = 0
    attacks: list[str] | None = None
    schemes: list[str] | None = None
    spaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid_points: int = 3
    startup_trials: int | None = None

    @classmethod
    def from_dict(cls, options: dict[str, Any] | SearchConfig | None) -> SearchConfig:
        """The config of a ``search:`` mapping; an unknown option or a bad value is a one-line :class:`SearchError`.
        Strings are read as YAML, as ``--search.trials=3`` on the command line gives them."""
        if isinstance(options, SearchConfig):
            return options
        options = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in dict(options or {}).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SearchError(f"search: unknown option(s) {unknown}; known: {sorted(known)}")
        config = cls(**options)
        if config.sampler not in ("tpe", "grid", "random"):
            raise SearchError(f"search.sampler must be tpe, grid or random, got {config.sampler!r}")
        if config.trials < 1:
            raise SearchError(f"search.trials must be at least 1, got {config.trials}")
        return config

    @property
    def modes(self) -> list[bool]:
        """The attackers to run: True for the oracle, False for the proxy attacker."""
        modes = self.oracle if isinstance(self.oracle, list) else [self.oracle]
        return list(dict.fromkeys(bool(m) for m in modes))


def mode_name(oracle: bool) -> str:
    """``oracle`` or ``proxy``: the attacker's label in study names, tables and plots."""
    return "oracle" if oracle else "proxy"


def distribution(spec: dict[str, Any], where: str = "") -> BaseDistribution:
    """The Optuna distribution of a YAML spec: ``{type: float, low: 1e-4, high: 0.1, log: true}``, ``{type: int,
    low: 1, high: 10}`` or ``{type: categorical, choices: [adam, sgd]}``."""
    options = dict(spec)
    kind = options.pop("type", None)
    try:
        if kind == "float":
            return FloatDistribution(float(options.pop("low")), float(options.pop("high")), **options)
        if kind == "int":
            return IntDistribution(int(options.pop("low")), int(options.pop("high")), **options)
        if kind == "categorical":
            return CategoricalDistribution(list(options.pop("choices")))
    except (KeyError, TypeError, ValueError) as err:
        raise SearchError(f"search.spaces.{where}: {type(err).__name__}: {err}") from None
    raise SearchError(f"search.spaces.{where}.type must be one of {DISTRIBUTION_TYPES}, got {kind!r}")


def search_space(
    attack: type[RemovalAttack], overrides: dict[str, Any] | None = None, where: str = ""
) -> dict[str, BaseDistribution]:
    """The attack's own search space with the config's ``overrides`` (parameter → spec, None: left out)."""
    space = dict(attack.search_space())
    for name, spec in (overrides or {}).items():
        if spec is None:
            space.pop(name, None)
        else:
            space[name] = spec if isinstance(spec, BaseDistribution) else distribution(spec, f"{where}.{name}")
    return space


def grid(space: dict[str, BaseDistribution], points: int = 3) -> dict[str, list[Any]]:
    """The values of ``optuna.samplers.GridSampler``: the choices of a categorical parameter, ``points`` values
    spread evenly (geometrically where ``log``) over a numeric one."""
    import numpy as np

    values: dict[str, list[Any]] = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            values[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution):
            spread = np.geomspace if dist.log else np.linspace
            values[name] = sorted({int(round(v)) for v in spread(dist.low, dist.high, points)})
        elif isinstance(dist, FloatDistribution):
            spread = np.geomspace if dist.log else np.linspace
            values[name] = [float(v) for v in spread(dist.low, dist.high, points)]
        else:
            raise SearchError(f"no grid for {name}'s {type(dist).__name__}")
    return values


def factory_parts(factory: Any) -> tuple[type | None, dict[str, Any]]:
    """The class and keyword arguments of a factory: a ``functools.partial`` of a class (Python) or of
    jsonargparse's instantiator (a config's ``class_path``/``init_args``), or a bare class; ``(None, {})`` for
    anything else."""
    cls = factory_class(factory)
    if cls is None:
        return None, {}
    return cls, dict(factory.keywords) if isinstance(factory, functools.partial) else {}


def attack_from_params(
    cls: type[RemovalAttack], params: dict[str, Any], base_init_args: dict[str, Any]
) -> tuple[AttackFactory, int | None]:
    """The attack factory and epochs of one trial: how a trial's parameters map to the attack.

    ``epochs`` is the number of training epochs (None when the trial does not set it: the benchmark's epochs of the
    attack). ``optimizer`` (``adam`` or ``sgd``, see ``OPTIMIZERS``) and ``lr`` make the optimizer factory: a new
    optimizer class starts from its own defaults, the configured class keeps its configured options, and ``lr``
    replaces the learning rate. Every other parameter is a constructor argument, replacing the configured one.
    """
    init_args = {k: v for k, v in base_init_args.items() if k != "victim"}
    init_args.update({k: v for k, v in params.items() if k not in TRAINING_PARAMS})
    if "lr" in params or "optimizer" in params:
        init_args["optimizer"] = _optimizer(cls, params, base_init_args.get("optimizer"))
    epochs = params.get("epochs")
    return functools.partial(cls, **init_args), None if epochs is None else int(epochs)


def _optimizer(cls: type[RemovalAttack], params: dict[str, Any], configured: Any) -> functools.partial:
    if configured is None:
        configured = inspect.signature(cls).parameters["optimizer"].default
    optimizer, options = factory_parts(configured)
    if "optimizer" in params:
        chosen, defaults = OPTIMIZERS[params["optimizer"]]
        if chosen is not optimizer:
            optimizer, options = chosen, dict(defaults)
    if optimizer is None:
        raise SearchError(f"{cls.__name__}'s optimizer {configured!r} is not a class or a partial of one")
    if "lr" in params:
        options["lr"] = float(params["lr"])
    return functools.partial(optimizer, **options)


def normalised_statistic(
    statistic: float,
    threshold: float,
    higher_is_watermarked: bool = True,
    log10_p: float | None = None,
    alpha: float = 0.01,
) -> float:
    """The verification statistic on one scale for every scheme: 0.5 at the decision threshold, below it not
    declared. ``statistic / (2·threshold)`` for a higher-is-watermarked statistic, mirrored (``1 - statistic /
    (2·threshold)``) for a lower-is-watermarked one (a bit error rate). Where the threshold is not positive (a
    statistic centred on 0), ``log10 p / (2·log10 alpha)``, which is 0.5 at ``p = alpha``. A statistic that could
    not be read (NaN: a white-box mark on a student without its layer) is 0, as far from declared as it gets."""
    if math.isnan(statistic):
        return 0.0
    if math.isfinite(threshold) and threshold > 0:
        ratio = statistic / (2.0 * threshold)
        return ratio if higher_is_watermarked else 1.0 - ratio
    if log10_p is None:
        raise ValueError(f"threshold {threshold} cannot normalise the statistic and no log10 p was given")
    return log10_p / (2.0 * math.log10(alpha))


def outcome_status(watermarked: bool, undecidable: bool, acc_drop: float, budget: float) -> str:
    """The benchmark's outcome words: kept, removed, removed over budget, undecidable."""
    if watermarked:
        return "kept"
    if acc_drop > budget:
        return "removed, over budget"
    return "undecidable" if undecidable else "removed"


@dataclass
class Target:
    """A marked model an attack is tuned or evaluated on: the owner's, or the proxy attacker's own."""

    bench: Benchmark
    scheme_name: str
    scheme: WatermarkScheme
    marked: Any
    key: WatermarkKey
    embed_cell: str
    acc_before: float


class _CellError(RuntimeError):
    """A trial whose attack cell failed (traceback in the benchmark's logs): the trial fails, the study goes on."""


class AttackSearch:
    """Per scheme × attack (× attacker), an Optuna study of the attack's settings on a benchmark's marked models.

    Args:
        bench: the benchmark whose schemes, attacks, data, epochs and cache the search uses (its matrix need not
            have run: embedding cells are computed or loaded as the matrix does).
        config: the ``search:`` section (a mapping or a :class:`SearchConfig`).
    """

    def __init__(self, bench: Benchmark, config: dict[str, Any] | SearchConfig | None = None) -> None:
        self.bench = bench
        self.config = SearchConfig.from_dict(config)
        self.budget = float(
            bench.accuracy_budget if self.config.accuracy_budget is None else self.config.accuracy_budget
        )
        self.spaces = self._spaces()
        self.scheme_names = self._scheme_names()
        self._storage: optuna.storages.RDBStorage | None = None
        self._proxies: dict[str, Target] = {}

    def _scheme_names(self) -> list[str]:
        """The benchmark's schemes to attack, in the benchmark's order."""
        if self.config.schemes is None:
            return list(self.bench.schemes)
        unknown = sorted(set(self.config.schemes) - set(self.bench.schemes))
        if unknown:
            known = sorted(self.bench.schemes)
            raise SearchError(f"search.schemes {unknown} are not schemes of the benchmark: {known}")
        return [name for name in self.bench.schemes if name in self.config.schemes]

    def _spaces(self) -> dict[str, tuple[type[RemovalAttack], dict[str, Any], dict[str, BaseDistribution]]]:
        """Attack name → (class, configured arguments, search space) of every attack to tune."""
        from lightning_wm import registry

        names = self.config.attacks if self.config.attacks is not None else list(self.bench.attacks)
        unknown = sorted(set(names) - set(self.bench.attacks))
        if unknown:
            known = sorted(self.bench.attacks)
            raise SearchError(f"search.attacks {unknown} are not attacks of the benchmark: {known}")
        spaces = {}
        for name in names:
            cls, init_args = factory_parts(self.bench.attacks[name])
            if cls is None or not issubclass(cls, RemovalAttack):
                if self.config.attacks is not None:
                    raise SearchError(f"attack {name}'s factory is not a RemovalAttack class with its options")
                continue
            spec = registry.attack_of(cls)
            overrides = self.config.spaces.get(name, self.config.spaces.get(spec.name if spec else "", {}))
            space = search_space(cls, overrides, where=name)
            if space:
                spaces[name] = (cls, init_args, space)
        if not spaces:
            raise SearchError("no attack of the benchmark has a search space to tune")
        return spaces

    @property
    def storage(self) -> optuna.storages.RDBStorage:
        """``<output_dir>/search.db``. A trial a killed run left running stays so and is not counted: a rerun runs
        the missing trials, whose cells (cached) cost nothing when they repeat a finished setting."""
        if self._storage is None:
            self.bench.output_dir.mkdir(parents=True, exist_ok=True)
            self._storage = optuna.storages.RDBStorage(f"sqlite:///{self.bench.output_dir.resolve() / 'search.db'}")
        return self._storage

    def sampler(self, space: dict[str, BaseDistribution]) -> optuna.samplers.BaseSampler:
        """The configured sampler; TPE steers away from settings over the accuracy budget (the trials' constraint:
        accuracy loss minus budget, feasible at ≤ 0)."""
        if self.config.sampler == "grid":
            return optuna.samplers.GridSampler(grid(space, self.config.grid_points), seed=self.config.seed)
        if self.config.sampler == "random":
            return optuna.samplers.RandomSampler(seed=self.config.seed)
        options: dict[str, Any] = {"seed": self.config.seed}
        if self.config.startup_trials is not None:
            options["n_startup_trials"] = self.config.startup_trials
        if not CONSTRAINT_API:
            options["constraints_func"] = self._constraints
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(**options)

    def _constraints(self, trial: FrozenTrial) -> list[float]:
        return [float(trial.user_attrs.get("acc_drop", math.inf)) - self.budget]

    def study(self, scheme: str, attack: str, oracle: bool) -> optuna.Study:
        """The (resumed) study ``<scheme>__<attack>__<oracle|proxy>``."""
        return optuna.create_study(
            study_name=f"{scheme}__{attack}__{mode_name(oracle)}",
            storage=self.storage,
            sampler=self.sampler(self.spaces[attack][2]),
            direction="minimize",
            load_if_exists=True,
        )

    def owner(self, scheme_name: str) -> Target:
        """The owner's marked model, key and accuracy (the matrix's embedding cell)."""
        scheme = self.bench.schemes[scheme_name]
        template = self.bench.scheme_models.get(scheme_name, self.bench.model)
        marked, key, row = self.bench.embed(scheme_name, scheme, template, tqdm(disable=True))
        return Target(self.bench, scheme_name, scheme, marked, key, row["cell"], float(row["acc"]))

    def proxy(self, scheme_name: str) -> Target:
        """The realistic attacker's own marked model: the owner's scheme under another seed (so another key),
        embedded in a fresh copy of the architecture on the attacker's split, named ``<scheme>-proxy``."""
        if scheme_name in self._proxies:
            return self._proxies[scheme_name]
        bench = self.bench
        scheme = copy.deepcopy(bench.schemes[scheme_name])
        scheme.key_path = None
        scheme.seed = None if scheme.seed is None else scheme.seed + PROXY_SEED_OFFSET
        scheme._key = None
        name = f"{scheme_name}-proxy"
        scheme.name = f"{scheme.name}-proxy"
        torch.manual_seed(bench.seed + PROXY_SEED_OFFSET)
        fresh = reinitialised_copy(bench.scheme_models.get(scheme_name, bench.model))
        proxy_bench = Benchmark(
            fresh,
            bench.attacker_datamodule,
            schemes={name: scheme},
            attacks=bench.attacks,
            embed_epochs=bench.embed_epochs,
            attack_epochs=bench.attack_epochs,
            alpha=bench.alpha,
            accuracy_budget=self.budget,
            output_dir=bench.output_dir,
            seed=bench.seed + PROXY_SEED_OFFSET,
            trainer_kwargs=bench.trainer_kwargs,
            progress=False,
            verbose=bench.verbose,
            wandb_settings=bench.wandb_settings,
        )
        marked, key, row = proxy_bench.embed(name, scheme, fresh, tqdm(disable=True))
        target = Target(proxy_bench, name, scheme, marked, key, row["cell"], float(row["acc"]))
        self._proxies[scheme_name] = target
        return target

    def evaluate(self, target: Target, attack: str, params: dict[str, Any], label: str) -> dict[str, Any]:
        """Run ``attack`` with ``params`` on ``target``'s marked model and verify it with ``target``'s key; the
        result (accuracy, statistic, threshold, normalised statistic, p, outcome) is cached beside the cell."""
        cls, init_args, _ = self.spaces[attack]
        factory, epochs = attack_from_params(cls, params, init_args)
        epochs = target.bench.epochs_of(attack) if epochs is None else epochs
        bench = target.bench
        own = cell_id("search", target.embed_cell, factory, epochs, bench.seed, bench.trainer_id, self.budget)
        saved = bench.cache.load_row(own)
        if saved is not None:
            return saved
        runner = copy.copy(bench)
        runner.attack_epochs = {label: epochs}
        row = runner.attack(target.embed_cell, label, factory, target.marked, target.key, target.scheme, rerun=True)
        result: dict[str, Any] = {"attack": attack, "params": dict(params), "epochs": epochs}
        if row.get("status") in ("n/a", "error"):
            return {**result, "status": row.get("status", "error"), "reason": row.get("reason", "")}
        drop = 100.0 * (target.acc_before - float(row["acc"]))
        higher = bool(row["higher_is_watermarked"])
        undecidable = row["outcome"] == "undecidable"
        result.update(
            acc_before=target.acc_before,
            acc=float(row["acc"]),
            acc_drop=drop,
            statistic_name=row["statistic_name"],
            statistic=float(row["statistic"]),
            threshold=float(row["threshold"]),
            higher_is_watermarked=higher,
            p_value=float(row["p_value"]),
            log10_p=float(row["log10_p"]),
            normalised=normalised_statistic(
                row["statistic"], row["threshold"], higher, row["log10_p"], float(row["alpha"])
            ),
            watermarked=bool(row["is_watermarked"]),
            status=outcome_status(bool(row["is_watermarked"]), undecidable, drop, self.budget),
            reason=row.get("reason", ""),
            key_fingerprint=target.key.fingerprint()[:12],
            cell=own,
        )
        bench.cache.save_row(own, result)
        return result

    def objective(self, target: Target, attack: str) -> Callable[[Trial], float]:
        """The study's objective: the normalised statistic of the attacked model (minimised); the trial's result is
        in its user attributes."""
        space = self.spaces[attack][2]

        def run_trial(trial: Trial) -> float:
            params = {name: suggest(trial, name, dist) for name, dist in space.items()}
            result = self.evaluate(target, attack, params, f"{attack}#{trial.number}")
            for name, value in result.items():
                if name != "params":
                    trial.set_user_attr(name, value)
            if result["status"] == "n/a":
                raise NotApplicable(result.get("reason", ""))
            if result["status"] == "error":
                raise _CellError(result.get("reason", ""))
            if CONSTRAINT_API:
                trial.set_constraint("accuracy_loss", float(result["acc_drop"]) - self.budget)
            return float(result["normalised"])

        return run_trial

    def strongest_trial(self, study: optuna.Study) -> FrozenTrial | None:
        """The best trial within the accuracy budget (lowest normalised statistic, then highest accuracy); when
        none is within it, the trial that cost the least accuracy."""
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            return None
        feasible = [t for t in done if t.user_attrs["acc_drop"] <= self.budget]
        if feasible:
            return min(feasible, key=lambda t: (t.value, -t.user_attrs["acc"], t.number))
        return min(done, key=lambda t: (t.user_attrs["acc_drop"], t.number))

    def run(self) -> list[dict[str, Any]]:
        """Run (or resume) every study; return one row per attacker × scheme × attack: the chosen setting, the
        attacker's view of it (``tuned_*``) and the owner's verdict of it, with ``trials`` (every trial's result)."""
        level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.INFO if self.bench.verbose else optuna.logging.WARNING)
        try:
            with quiet_lightning(not self.bench.verbose):
                return self._run()
        finally:
            optuna.logging.set_verbosity(level)

    def _run(self) -> list[dict[str, Any]]:
        studies = len(self.config.modes) * len(self.scheme_names) * len(self.spaces)
        bar = tqdm(total=studies * self.config.trials, desc="search", unit="trial", disable=not self.bench.progress)
        rows = []
        for oracle in self.config.modes:
            for scheme_name in self.scheme_names:
                try:
                    owner = self.owner(scheme_name)
                    tuned = owner if oracle else self.proxy(scheme_name)
                except Exception as err:  # noqa: BLE001  (the scheme's rows are errors; the search goes on)
                    reason = f"embedding failed: {type(err).__name__}: {str(err).strip()[:200]}"
                    for attack in self.spaces:
                        rows.append(
                            {
                                "mode": mode_name(oracle),
                                "scheme": scheme_name,
                                "attack": attack,
                                "status": "error",
                                "reason": reason,
                                "params": {},
                                "trials": [],
                            }
                        )
                    bar.update(len(self.spaces) * self.config.trials)
                    continue
                for attack in self.spaces:
                    bar.set_postfix_str(f"{mode_name(oracle)}: {scheme_name} × {attack}")
                    rows.append(self._search(owner, tuned, attack, oracle, bar))
        bar.close()
        return rows

    def _search(self, owner: Target, tuned: Target, attack: str, oracle: bool, bar: tqdm) -> dict[str, Any]:
        study = self.study(owner.scheme_name, attack, oracle)
        base = {
            "mode": mode_name(oracle),
            "scheme": owner.scheme_name,
            "attack": attack,
            "acc_before": owner.acc_before,
            "tuned_key": tuned.key.fingerprint()[:12],
            "owner_key": owner.key.fingerprint()[:12],
        }
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        bar.update(min(done, self.config.trials))
        remaining = self.config.trials - done
        if remaining > 0:
            try:
                study.optimize(
                    self.objective(tuned, attack),
                    n_trials=remaining,
                    catch=(_CellError,),
                    callbacks=[lambda _study, _trial: bar.update()],
                )
            except NotApplicable as err:
                return {**base, "status": "n/a", "reason": str(err), "trials": []}
        trials = [
            {**t.user_attrs, "params": t.params, "number": t.number}
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        ]
        best = self.strongest_trial(study)
        if best is None:
            return {**base, "status": "error", "reason": "no trial completed (see the benchmark's logs/)", "trials": []}
        tuned_view = {
            "tuned_value": best.value,
            "tuned_acc_drop": best.user_attrs["acc_drop"],
            "tuned_feasible": best.user_attrs["acc_drop"] <= self.budget,
            "tuned_status": best.user_attrs["status"],
            "trial": best.number,
        }
        verdict = best.user_attrs if oracle else self.evaluate(owner, attack, best.params, f"{attack}@chosen")
        fields = {k: v for k, v in verdict.items() if k not in ("attack", "params", "cell")}
        return {**base, **fields, **tuned_view, "params": dict(best.params), "trials": trials}


def strongest_per_scheme(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per attacker × scheme, the attack the attacker would pick: its tuned setting within the budget with the
    lowest normalised statistic as the attacker saw it (the owner's in oracle mode, its proxy's otherwise)."""
    best: dict[tuple[str, str], tuple[tuple[bool, float], dict[str, Any]]] = {}
    for row in rows:
        if "tuned_value" not in row:
            continue
        feasible = bool(row["tuned_feasible"])
        rank = (not feasible, float(row["tuned_value"] if feasible else row["tuned_acc_drop"]))
        group = (row["mode"], row["scheme"])
        if group not in best or rank < best[group][0]:
            best[group] = (rank, row)
    return [row for _, row in best.values()]


def run_search(
    bench: Benchmark, config: dict[str, Any] | SearchConfig | None = None, logger: Any = None
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Search the strongest setting of every tunable attack against every scheme of ``bench``, and write the
    reports beside ``results.csv`` (``strongest.md``/``.csv``, ``search.csv``, a Pareto PNG per scheme and
    attacker; logged to W&B when ``logger`` is a ``WandbLogger``). Returns the rows and the written paths."""
    from lightning_wm.benchmark.pareto import write_search_reports

    search = AttackSearch(bench, config)
    rows = search.run()
    paths = write_search_reports(rows, bench.output_dir, search.budget, logger=logger)
    return rows, paths


def suggest(trial: Trial, name: str, dist: BaseDistribution) -> Any:
    """``trial.suggest_*`` of the distribution's kind."""
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    raise SearchError(f"parameter {name}: unsupported distribution {type(dist).__name__}")
