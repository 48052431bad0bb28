"""The registry of watermark schemes and removal attacks: the one place the CLI, the benchmark and the conformance
suite look them up.

A leaf module: it imports nothing of the schemes or attacks. They arrive through the entry-point groups
``lightning_wm.schemes`` and ``lightning_wm.attacks`` (this package's own are declared in its ``pyproject.toml``; a
user's plugin package declares its own the same way), each entry point naming a :class:`SchemeSpec` or
:class:`AttackSpec`, or in-process through :func:`register_scheme` / :func:`register_attack`. A key file names
only its scheme; which class reads it is decided here, never by the file (loading a key executes nothing the file
chooses).

Like timm's model registry, one class may serve several registered names (``content``, ``noise``, ``unrelated``
and ``new_label`` are all :class:`~lightning_wm.watermarks.TriggerSetWatermark` with another generator), and every
entry carries a small ``example`` that ``tests/test_conformance.py`` runs: registering is all it takes to be held
to the suite.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Literal

Access = Literal["weights", "labels", "probabilities"]
"""What verification reads of a suspect: its weights (white-box), its top-1 labels or its probabilities."""

ThreatModel = Literal["white-box", "black-box", "api-side"]
"""What the attacker holds: the stolen weights, query access to the victim, or the serving API itself."""

Category = Literal["input preprocessing", "model modification", "model extraction", "api-side", "combined"]
"""The SoK's families of removal attacks (Lukas et al., S&P 2022); ``combined`` for a chain of them."""

SCHEME_GROUP = "lightning_wm.schemes"
ATTACK_GROUP = "lightning_wm.attacks"


class RegistryError(ValueError):
    """An unknown or duplicate scheme or attack name, or an entry point that does not name a spec."""


@dataclass(frozen=True)
class SchemeSpec:
    """A registered watermark scheme.

    Attributes:
        name: the registered name (``uchida``, ``content``...).
        callback: the :class:`~lightning_wm.watermarks.base.WatermarkScheme` subclass.
        key: the :class:`~lightning_wm.verify.keys.WatermarkKey` subclass; its ``scheme`` is the name key files carry.
        higher_is_watermarked: whether a higher statistic means "watermarked" (False for a bit error rate).
        access: what verification reads of the suspect.
        example: ``example(seed=..., key_path=...)`` builds a small instance for the digits conformance suite.
        example_outputs: outputs the example's model needs beyond the task's classes (1 for a new label).
        example_epochs: epochs the example needs to embed on digits with a width-8 SmallCNN.
    """

    name: str
    callback: type
    key: type
    higher_is_watermarked: bool
    access: Access
    example: Callable[..., Any]
    example_outputs: int = 0
    example_epochs: int = 3


@dataclass(frozen=True)
class AttackSpec:
    """A registered removal attack.

    Attributes:
        name: the registered name (``fine_tune``, ``prune``...).
        attack: the :class:`~lightning_wm.attacks.base.RemovalAttack` subclass.
        threat_model: what the attacker holds.
        category: the SoK family it belongs to.
        example: ``example(victim)`` builds a small instance for the conformance suite.
        example_epochs: epochs the example trains (0: none).
    """

    name: str
    attack: type
    threat_model: ThreatModel
    category: Category
    example: Callable[..., Any]
    example_epochs: int = 1


_SCHEMES: dict[str, SchemeSpec] = {}
_ATTACKS: dict[str, AttackSpec] = {}
_loaded: set[str] = set()


def register_scheme(spec: SchemeSpec) -> SchemeSpec:
    """Add ``spec``; a second, different spec of the same name is refused."""
    _register(_SCHEMES, spec, "scheme", SchemeSpec)
    return spec


def register_attack(spec: AttackSpec) -> AttackSpec:
    """Add ``spec``; a second, different spec of the same name is refused."""
    _register(_ATTACKS, spec, "attack", AttackSpec)
    return spec


def unregister(name: str) -> None:
    """Remove a scheme or an attack registered in this process (for tests registering a plugin of their own)."""
    _SCHEMES.pop(name, None)
    _ATTACKS.pop(name, None)


def schemes() -> dict[str, SchemeSpec]:
    """Every registered scheme, by name."""
    _load(SCHEME_GROUP, _SCHEMES, SchemeSpec)
    return dict(_SCHEMES)


def attacks() -> dict[str, AttackSpec]:
    """Every registered attack, by name."""
    _load(ATTACK_GROUP, _ATTACKS, AttackSpec)
    return dict(_ATTACKS)


def scheme(name: str) -> SchemeSpec:
    """The scheme registered as ``name``."""
    known = schemes()
    if name not in known:
        raise RegistryError(f"no scheme named {name!r}; registered: {', '.join(sorted(known))}")
    return known[name]


def attack(name: str) -> AttackSpec:
    """The attack registered as ``name``."""
    known = attacks()
    if name not in known:
        raise RegistryError(f"no attack named {name!r}; registered: {', '.join(sorted(known))}")
    return known[name]


def scheme_of(obj: Any) -> SchemeSpec:
    """The spec of a scheme callback or key (or their class): the first registered spec of its class."""
    cls = obj if isinstance(obj, type) else type(obj)
    for spec in schemes().values():
        if cls in (spec.callback, spec.key):
            return spec
    for spec in schemes().values():
        if issubclass(cls, (spec.callback, spec.key)):
            return spec
    raise RegistryError(f"{cls.__name__} is not a registered scheme or key class")


def attack_of(obj: Any) -> AttackSpec | None:
    """The spec of an attack (or its class), or None for an unregistered one."""
    cls = obj if isinstance(obj, type) else type(obj)
    return next((spec for spec in attacks().values() if spec.attack is cls), None)


def factory_class(factory: Any) -> type | None:
    """The class a factory builds: a class, a ``functools.partial`` of a class (Python), or of jsonargparse's
    instantiator with the class among its arguments (a config's ``class_path``/``init_args``); None otherwise."""
    if inspect.isclass(factory):
        return factory
    if isinstance(factory, functools.partial):
        return next((c for c in [factory.func, *factory.args] if inspect.isclass(c)), None)
    return None


def key_class(scheme_name: str) -> type:
    """The key class that reads key files of ``scheme_name`` (the name a key file carries)."""
    for spec in schemes().values():
        if spec.key.scheme == scheme_name:
            return spec.key
    known = sorted({spec.key.scheme for spec in schemes().values()})
    raise RegistryError(f"no registered scheme reads keys of {scheme_name!r}; known: {', '.join(known)}")


def _register(table: dict[str, Any], spec: Any, kind: str, spec_type: type) -> None:
    if not isinstance(spec, spec_type):
        raise RegistryError(f"a {kind} is registered with a {spec_type.__name__}, got {type(spec).__name__}")
    existing = table.get(spec.name)
    if existing is not None and existing != spec:
        raise RegistryError(
            f"a {kind} named {spec.name!r} is already registered ({_where(existing)}); choose another name"
        )
    table[spec.name] = spec


def _where(spec: Any) -> str:
    cls = getattr(spec, "callback", None) or getattr(spec, "attack", None)
    return f"{cls.__module__}.{cls.__qualname__}" if cls is not None else repr(spec)


def _load(group: str, table: dict[str, Any], spec_type: type) -> None:
    if group in _loaded:
        return
    _loaded.add(group)
    for point in sorted(entry_points(group=group), key=lambda p: p.name):
        spec = point.load()
        if not isinstance(spec, spec_type):
            raise RegistryError(f"entry point {point.name} = {point.value} of {group} is not a {spec_type.__name__}")
        if spec.name != point.name:
            raise RegistryError(f"entry point {point.name} of {group} names a spec called {spec.name!r}")
        _register(table, spec, spec_type.__name__.removesuffix("Spec").lower(), spec_type)
