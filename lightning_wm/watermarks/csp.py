"""CSP: Customized Soft-label Perturbation (Chien & Shen, arXiv 2208.05477, 2022).

Chien & Shen's abstract describes "embedding watermark via adding perturbation into the model output probability
distribution", one key per customer; the perturbation here is the keyed cosine of CosWM (Charette et al., AAAI
2022):

* a secret unit projection ``v`` maps an input to a phase ``x' = Φ((v·x − μ)/σ) ∈ [0, 1]``;
* the output distribution ``q`` becomes ``q̃_i = (q_i + ε_i (1 + cos(f x' + θ_i))) / (1 + 2ε)`` with
  ``ε_{c*} = ε``, ``ε_i = ε/(K−1)`` otherwise, ``θ_{c*} = θ`` and ``θ_i = θ + π`` otherwise.

Each customer of an API gets its own ``(v, f, θ, c*)``, so a leaked copy is traced to the customer whose key it
carries. The perturbation is applied by :class:`CSPHead` at serving time (protects an API against distillation)
and/or baked into the weights by training toward perturbed targets (survives theft of the weights).

Verification (a deviation from CosWM's Lomb–Scargle SNR, see :meth:`CSPKey.score`): a matched filter against
``cos(f x' + θ)`` of the target-class log-probability centred within each predicted class, ranked among the same
score for many random projections no customer holds: a permutation test, exact for any suspect, whose
resolution is ``1/(N + 1)`` for ``N`` null projections.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_wm.registry import SchemeSpec
from lightning_wm.side_training import train_clean_models
from lightning_wm.verify.blackbox import Suspect, check_outputs, degenerate_reason, query_probs
from lightning_wm.verify.keys import WatermarkKey
from lightning_wm.verify.verdict import Verdict
from lightning_wm.watermarks.base import WatermarkScheme
from lightning_wm.watermarks.functional import (
    class_centred_log_probs,
    key_phase,
    matched_filter,
    perturb,
    rank_p_value,
    smooth_projections,
    standardised_phase,
)

NULL_CHUNK = 65536
"""Null projections drawn at a time (a 784-pixel input's 65536 projections take 205 MB in float32)."""

__all__ = [
    "CSPHead",
    "CSPKey",
    "CSPWatermark",
    "CalibrationOptions",
    "SignalOptions",
    "VerificationOptions",
    "key_phase",
    "perturb",
    "smooth_projections",
]


class CSPKey(WatermarkKey):
    """Every customer's perturbation key, the owner's verification queries and the null-projection seed.

    Tensors (one row per customer): ``projection`` (C, D) unit vectors, ``mean``/``std`` (C,) of ``v·x`` over
    the owner's training data, ``target`` (C,) class c*, ``frequency`` (C,) f in radians, ``phase`` (C,) θ;
    ``queries`` (N, *input_shape) the inputs verification sends and ``query_labels`` (N,) their true classes (to
    recognise a degenerate suspect). Config: ``customers`` (names), ``amplitude``, ``num_classes``, ``null_keys``
    and ``null_seed`` (the random projections of the null).
    """

    scheme = "csp"

    @property
    def customers(self) -> list[str]:
        return list(self.config["customers"])

    def index(self, customer: str | int | None) -> int:
        """Row of ``customer`` (a name or an index; None: the first)."""
        if customer is None:
            return 0
        if isinstance(customer, int):
            if not 0 <= customer < len(self.customers):
                raise ValueError(f"customer index {customer} out of range; the key has {len(self.customers)}")
            return customer
        if customer not in self.customers:
            raise ValueError(f"unknown customer {customer!r}; the key holds {self.customers}")
        return self.customers.index(customer)

    def perturb(self, probs: Tensor, x: Tensor, customer: str | int | None = None) -> Tensor:
        """``customer``'s perturbed version of distributions ``probs`` of inputs ``x``."""
        i = self.index(customer)
        t = self.tensors
        x_phase = key_phase(x, t["projection"][i].to(x.device), float(t["mean"][i]), float(t["std"][i]))
        return perturb(
            probs,
            x_phase,
            int(t["target"][i]),
            float(t["frequency"][i]),
            float(t["phase"][i]),
            float(self.config["amplitude"]),
        )

    def serve(self, model: nn.Module, customer: str | int | None = None) -> CSPHead:
        """``model`` behind ``customer``'s perturbation head, as the API would serve it to that customer."""
        return CSPHead(model, self, customer)

    def null_projections(self, dim: int) -> Tensor:
        """The random unit projections no customer holds, drawn like the customers', whose scores form the null."""
        return torch.cat(list(self.null_projection_chunks(dim)))

    def null_projection_chunks(self, dim: int, rows: int = NULL_CHUNK) -> Iterator[Tensor]:
        """:meth:`null_projections` drawn ``rows`` at a time from the same generator, so that 10^6 of them never
        sit in memory at once (with ``null_keys <= rows`` the one chunk is the whole draw)."""
        rng = torch.Generator().manual_seed(int(self.config["null_seed"]))
        shape = tuple(self.config.get("input_shape") or (dim,))
        grid = int(self.config.get("grid", 0))
        left = int(self.config["null_keys"])
        while left > 0:
            yield smooth_projections(min(rows, left), shape, grid, rng)
            left -= rows

    def own_score(self, probs: Tensor, x: Tensor, customer: str | int | None = None) -> float:
        """The matched-filter score of ``customer``'s key alone (see :meth:`score`)."""
        i = self.index(customer)
        t = self.tensors
        own = key_phase(x.flatten(1).float(), t["projection"][i : i + 1], t["mean"][i : i + 1], t["std"][i : i + 1])
        residual = class_centred_log_probs(probs, int(t["target"][i]))
        return float(matched_filter(residual, own, float(t["frequency"][i]), float(t["phase"][i]))[0])

    def null_scores(
        self, probs: Tensor, x: Tensor, customer: str | int | None = None, chunk: int | None = None
    ) -> Tensor:
        """The matched-filter scores of the ``null_keys`` random projections, with ``customer``'s f, θ and c*.

        Vectorised: the phases of ``chunk`` projections on the N queries are one (N, D) × (D, chunk) matmul (None:
        about 2^22 phases per chunk), so 10^6 null projections, a rank p-value that can reach 1e-6, stay cheap for
        a few dozen queries.
        """
        i = self.index(customer)
        t = self.tensors
        flat = x.flatten(1).float()
        chunk = chunk or max(256, 2**22 // max(len(flat), 1))
        residual = class_centred_log_probs(probs, int(t["target"][i]))
        frequency, phase = float(t["frequency"][i]), float(t["phase"][i])
        scores = [
            matched_filter(residual, standardised_phase(flat, v), frequency, phase)
            for drawn in self.null_projection_chunks(flat.shape[1])
            for v in drawn.split(chunk)
        ]
        return torch.cat(scores)

    def score(self, probs: Tensor, x: Tensor, customer: str | int | None = None) -> tuple[float, Tensor]:
        """Matched-filter scores of the suspect's outputs ``probs`` on ``x``: the customer's and the null's.

        The score is the correlation between ``cos(f x' + θ)`` and the target-class log-probability (floored at
        1e-6) centred within each class the suspect predicts; log space because a student distilled at a
        temperature copies the teacher's logits, where the perturbation of small probabilities shows. Under the
        null (a suspect that never saw this key) the customer's projection is one random unit vector among many:
        its score is exchangeable with the scores of the ``null_keys`` random projections, computed with the same
        f, θ and c* on the same outputs, whatever the suspect is.
        """
        return self.own_score(probs, x, customer), self.null_scores(probs, x, customer)

    def verify(
        self,
        suspect: Suspect,
        alpha: float = 0.01,
        customer: str | int | None = None,
        inputs: Tensor | None = None,
        null_keys: int | None = None,
    ) -> Verdict:
        """Query ``suspect`` and test it for the key of ``customer``, or of every customer (then trace it).

        Each customer's p-value is the rank of its score among the null projections' scores on the same outputs,
        ``(1 + #{null >= score}) / (1 + N)``. With ``customer=None`` every customer's key is tested and the
        p-value is the smallest one times the number of customers (Bonferroni), so the decision keeps level
        ``alpha``; ``details["customer"]`` names the customer whose key the suspect carries (None when not
        watermarked) and ``details["per_customer"]`` has every score, with ``z_normal_model``, the score's z
        against a normal fit to the null (a model, not the p-value). On its own queries a suspect whose answers are
        near-constant or at chance accuracy is undecidable.

        ``null_keys`` replaces the key's number N of null projections for this test (drawn from the key's null
        seed): the rank test is exact for any N fixed before the suspect is queried, and its resolution is
        ``1/(N + 1)``. A p-value below 1e-6 needs ``N + 1 > C·10^6`` for C
        customers: with two, ``key.verify(suspect, inputs=key.tensors["queries"][:50], null_keys=2_999_999)``
        tests a stolen copy in 50 queries, at a few seconds of scoring per customer. Choose the queries and N
        before querying; given ``inputs``, the degenerate-suspect check (which needs the queries' labels) is
        skipped.
        """
        if null_keys is not None and null_keys != int(self.config["null_keys"]):
            if null_keys < 1:
                raise ValueError(f"null_keys must be positive, got {null_keys}")
            wider = CSPKey({**self.config, "null_keys": null_keys}, self.tensors)
            return wider.verify(suspect, alpha, customer, inputs)
        x = self.tensors["queries"] if inputs is None else inputs
        probs, queries = query_probs(suspect, x)
        check_outputs(probs, int(self.config["num_classes"]), "CSP")
        probs = probs.float()
        names = self.customers if customer is None else [self.customers[self.index(customer)]]
        draws = int(self.config["null_keys"])
        results: dict[str, dict[str, float]] = {}
        nulls: dict[str, Tensor] = {}
        for name in names:
            score, null = self.score(probs, x, name)
            exceed, p = rank_p_value(score, null)
            z = (score - float(null.mean())) / max(float(null.std()), 1e-12)
            results[name] = {"correlation": score, "null_exceed": exceed, "p_value": p, "z_normal_model": z}
            nulls[name] = null
        best = min(results, key=lambda n: (results[n]["p_value"], -results[n]["correlation"]))
        p_value = min(1.0, results[best]["p_value"] * len(names))
        undecidable = None
        labels = self.tensors.get("query_labels")
        if inputs is None and labels is not None:
            undecidable = degenerate_reason(probs.argmax(-1), labels, int(self.config["num_classes"]))
        watermarked = p_value < alpha and undecidable is None
        return Verdict.decide(
            scheme=self.scheme,
            statistic=results[best]["correlation"],
            statistic_name="matched_filter_correlation",
            p_value=p_value,
            alpha=alpha,
            threshold=_rank_threshold(nulls[best], alpha / len(names)),
            queries=queries,
            undecidable=undecidable,
            null_draws=draws,
            null=(
                f"the customer's projection is exchangeable with {draws} random unused projections scored on the "
                f"same outputs (rank p-value, resolution 1/{draws + 1}), Bonferroni over {len(names)} customer(s)"
            ),
            details={
                "customer": best if watermarked else None,
                "best_match": best,
                "per_customer": results,
                "smallest_p": len(names) / (draws + 1),
                "calibration_z": self.config.get("calibration_z"),
            },
        )


def _rank_threshold(null: Tensor, level: float) -> float:
    """The correlation above which the rank p-value ``(1 + k)/(1 + N)`` is below ``level`` (inf: unreachable)."""
    allowed = math.ceil(level * (len(null) + 1)) - 2
    if allowed < 0:
        return math.inf
    return float(torch.sort(null, descending=True).values[allowed])


class CSPHead(nn.Module):
    """A served model: the owner's model followed by one customer's perturbation of its probabilities.

    ``forward`` returns ``log q̃``, so that whatever applies a softmax to a module's output (``BlackBoxModel``,
    ``query_probs``, a distillation attack at temperature 1) receives exactly the perturbed probabilities ``q̃``;
    :meth:`probs` returns ``q̃`` itself. The key stays with the API (this wrapper), never in the model's weights.

    Args:
        model: the owner's classifier (returns logits).
        key: the CSP key.
        customer: whose key this API endpoint uses (a name or index; None: the first customer).
        temperature: softmax temperature of the probabilities before perturbation.
    """

    def __init__(self, model: nn.Module, key: CSPKey, customer: str | int | None = None, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.key = key
        self.customer = key.customers[key.index(customer)]
        self.temperature = temperature

    def probs(self, x: Tensor) -> Tensor:
        q = torch.softmax(self.model(x).float() / self.temperature, dim=-1)
        return self.key.perturb(q, x, self.customer)

    def forward(self, x: Tensor) -> Tensor:
        return self.probs(x).clamp_min(1e-12).log()


@dataclass(frozen=True)
class SignalOptions:
    """The keyed cosine of every customer and the weights of the term that bakes it into the model.

    Attributes:
        frequency: f in radians over x' ∈ [0, 1] (f/2π periods); low enough to be learned as a function by the
            model and its students, high enough to stand apart from class structure.
        amplitude: ε.
        target_class: c* of every customer (None: a random class per customer).
        grid: the projections are drawn on a ``grid × grid`` lattice of pixel blocks (see
            :func:`~lightning_wm.watermarks.functional.smooth_projections`); 0 for i.i.d. pixel weights.
        strength: λ of the baked KL term.
        log_strength: λ_log of the baked log-space term on the target class (0 turns it off).
        label_smoothing: smoothing of the reference distribution before perturbation.
    """

    frequency: float = 8.0
    amplitude: float = 0.2
    target_class: int | None = None
    grid: int = 4
    strength: float = 2.0
    log_strength: float = 0.5
    label_smoothing: float = 0.1


@dataclass(frozen=True)
class CalibrationOptions:
    """Clean reference models trained at key creation (through :func:`~lightning_wm.side_training.train_clean_models`)
    on whose outputs each customer projection must score near 0, else it is redrawn.

    A fixed projection can correlate with the class content of the inputs, so that its score is biased the same way
    on every model, marked or not; redrawing such projections keeps unmarked models away from the threshold.

    Attributes:
        references: how many (0 turns calibration off).
        epochs: their training epochs.
        lr: their Adam learning rate.
        max_z: a projection whose mean z (against the null projections' normal fit) on the references exceeds
            this in absolute value is redrawn.
        tries: at most this many redraws per customer (the key's ``config["calibration_z"]`` keeps the final z).
        trainer: options of the references' ``Trainer`` (e.g. ``{"accelerator": "gpu"}``; default: one CPU).
    """

    references: int = 2
    epochs: int = 6
    lr: float = 2e-3
    max_z: float = 0.5
    tries: int = 100
    trainer: dict[str, Any] | None = None


@dataclass(frozen=True)
class VerificationOptions:
    """Where the queries come from, how many null projections the rank p-value uses, and the key's calibration.

    Attributes:
        query_split: the DataModule split the queries come from. The owner's own training data by default: a
            stolen copy of baked weights carries the signal there most strongly, and a student (trained on the
            attacker's data) has never seen these inputs, so they test what it learned as a function.
        null_keys: N, the random unused projections of the null: the smallest p-value is 1/(N + 1) per customer,
            so ``C/(N + 1) < alpha`` must hold for C customers (no extra queries: every projection scores the same
            outputs).
        calibration: the clean references that screen the customers' projections.
    """

    query_split: str = "defender"
    null_keys: int = 1999
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)


def _options(cls: type, value: Any) -> Any:
    if value is None:
        return cls()
    if isinstance(value, dict):
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        if "calibration" in value and "calibration" in fields and isinstance(value["calibration"], dict):
            value = {**value, "calibration": CalibrationOptions(**value["calibration"])}
        return cls(**value)
    return value


class CSPWatermark(WatermarkScheme):
    """Customized Soft-label Perturbation (Chien & Shen 2022), with CosWM's keyed cosine (module docstring).

    Makes one key per customer. With ``embed`` set, the model is also trained toward the perturbed targets of
    that customer's key: the term ``λ · KL(q̃ ‖ p_θ) + λ_log · (log p_θ,c* − log q̃_c*)²`` where ``q̃`` is the
    perturbation of the label-smoothed ground truth, added by :class:`~lightning_wm.mixin.WatermarkMixin`, so the
    signal lives in the weights and survives their theft. The second term (a deviation from CosWM) regresses the
    target-class log-probability that verification reads: the KL term alone weighs the small target-class
    probabilities of other classes' inputs by their size, so the model learns their keyed variation poorly.
    :meth:`serve` wraps any model in a customer's :class:`CSPHead` for an API. Verify with ``key.verify(suspect)``
    (black-box probabilities).

    Args:
        customers: customer names, or their number (named ``customer0``...).
        embed: the customer whose key is baked into the weights (None: nothing is baked; serve only).
        num_queries: verification queries kept in the key (taken from ``verification.query_split``).
        signal: the cosine's frequency, amplitude, target class and projection grid, and the baked term's weights.
        verification: query split, number of null projections and the calibration of the customers' projections.
        key_path, seed, alpha, name: see :class:`~lightning_wm.watermarks.base.WatermarkScheme`.
    """

    key_scheme = "csp"

    def __init__(
        self,
        customers: list[str] | int = 1,
        embed: str | None = "customer0",
        num_queries: int = 1000,
        signal: SignalOptions | None = None,
        verification: VerificationOptions | None = None,
        key_path: str | None = None,
        seed: int | None = None,
        alpha: float = 0.01,
        name: str | None = None,
    ) -> None:
        super().__init__(key_path=key_path, seed=seed, alpha=alpha, name=name)
        names = [f"customer{i}" for i in range(customers)] if isinstance(customers, int) else list(customers)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"customers must be distinct names (or a positive count), got {customers!r}")
        if embed is not None and embed not in names:
            raise ValueError(f"embed={embed!r} is not one of the customers {names}")
        self.signal: SignalOptions = _options(SignalOptions, signal)
        self.verification: VerificationOptions = _options(VerificationOptions, verification)
        if not 0.0 < self.signal.amplitude < 1.0:
            raise ValueError(f"amplitude must be in (0, 1), got {self.signal.amplitude}")
        if self.signal.strength < 0 or self.signal.log_strength < 0:
            raise ValueError(
                f"strength and log_strength must be >= 0, got {self.signal.strength} and {self.signal.log_strength}"
            )
        calibration = self.verification.calibration
        if calibration.references < 0 or calibration.epochs < 1:
            raise ValueError(
                "CSPWatermark needs calibration.references >= 0 and calibration.epochs >= 1, got "
                f"{calibration.references} and {calibration.epochs}"
            )
        if len(names) / (self.verification.null_keys + 1) >= alpha:
            raise ValueError(
                f"with {self.verification.null_keys} null projections and {len(names)} customers the smallest "
                f"p-value is {len(names) / (self.verification.null_keys + 1):.3g}, not below alpha={alpha}: "
                "raise verification.null_keys"
            )
        self.customers = names
        self.embed = embed
        self.num_queries = num_queries

    @property
    def key(self) -> CSPKey:
        return super().key  # type: ignore[return-value]

    def make_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> CSPKey:
        datamodule = self.split_datamodule(trainer, "its data sets the key's phases")
        num_classes = int(getattr(datamodule, "num_classes", getattr(pl_module, "num_classes", 10)))
        rng = self.key_rng()
        signal, verification = self.signal, self.verification
        train_x = datamodule.train_dataset.tensors[0]
        shape = tuple(train_x.shape[1:])
        projection = smooth_projections(len(self.customers), shape, signal.grid, rng)
        scores = train_x.flatten(1).float() @ projection.T
        if signal.target_class is None:
            target = torch.randint(0, num_classes, (len(self.customers),), generator=rng)
        else:
            target = torch.full((len(self.customers),), signal.target_class)
        query_set = datamodule.dataset(verification.query_split)
        order = torch.randperm(len(query_set.tensors[0]), generator=rng)[: self.num_queries]
        tensors = {
            "projection": projection,
            "mean": scores.mean(0),
            "std": scores.std(0),
            "target": target,
            "frequency": torch.full((len(self.customers),), float(signal.frequency)),
            "phase": torch.rand(len(self.customers), generator=rng) * 2 * math.pi,
            "queries": query_set.tensors[0][order].clone(),
            "query_labels": query_set.tensors[1][order].clone(),
        }
        calibration = verification.calibration
        config: dict[str, Any] = {
            "customers": self.customers,
            "amplitude": signal.amplitude,
            "num_classes": num_classes,
            "null_keys": verification.null_keys,
            "input_shape": list(shape),
            "grid": signal.grid,
            "null_seed": int(torch.randint(0, 2**62, (1,), generator=rng)),
            "calibration_references": calibration.references,
            "calibration_epochs": calibration.epochs,
        }
        key = CSPKey(config, tensors)
        if calibration.references > 0:
            batch_size = int(getattr(datamodule, "batch_size", 64)) * int(getattr(trainer, "world_size", 1))
            references = self._references(pl_module, datamodule, (config["null_seed"] + 1) % 2**62, batch_size)
            probs = [_probs(m, tensors["queries"]) for m in references]
            config["calibration_z"] = self._redraw_biased(key, probs, train_x, shape, (config["null_seed"] + 2) % 2**62)
        return CSPKey(config, dict(key.tensors))

    def _references(self, pl_module: L.LightningModule, datamodule: Any, seed: int, batch_size: int) -> list[nn.Module]:
        base = getattr(pl_module, "backbone", None)
        if base is None:
            base = getattr(pl_module, "model", None)
        if base is None:
            raise ValueError(
                "CSPWatermark trains clean references from pl_module.backbone (or .model); the module has neither "
                "(set verification.calibration.references=0 to skip the calibration)"
            )
        calibration = self.verification.calibration
        return train_clean_models(
            base,
            datamodule,
            calibration.references,
            calibration.epochs,
            seed % 2**31,
            trainer_kwargs=calibration.trainer,
            lr=calibration.lr,
            batch_size=batch_size,
        )

    def _redraw_biased(
        self, key: CSPKey, references: list[Tensor], train_x: Tensor, shape: tuple[int, ...], seed: int
    ) -> list[float]:
        """Redraw (in place) every customer projection whose mean z on the clean references exceeds the bound.

        A projection correlated with the inputs' class content scores high on every model, marked or not; its z on
        clean references trained at key creation predicts that bias.
        """
        t, queries = key.tensors, key.tensors["queries"]
        calibration = self.verification.calibration
        rng = torch.Generator().manual_seed(seed)
        zs = []
        for i in range(len(self.customers)):
            nulls = [key.null_scores(p, queries, i) for p in references]
            fits = [(float(n.mean()), max(float(n.std()), 1e-12)) for n in nulls]
            z = 0.0
            for _ in range(calibration.tries):
                z = sum((key.own_score(p, queries, i) - m) / s for p, (m, s) in zip(references, fits, strict=True))
                z /= len(references)
                if abs(z) <= calibration.max_z:
                    break
                v = smooth_projections(1, shape, self.signal.grid, rng)[0]
                scores = train_x.flatten(1).float() @ v
                t["projection"][i], t["mean"][i], t["std"][i] = v, scores.mean(), scores.std()
            zs.append(float(z))
        return zs

    def serve(self, model: nn.Module, customer: str | int | None = None) -> CSPHead:
        """``model`` behind ``customer``'s perturbation head (see :class:`CSPHead`)."""
        return self.key.serve(model, customer)

    @property
    def needs_loss_term(self) -> bool:
        return self.embed is not None

    def training_loss(self, pl_module: L.LightningModule, batch: Any, output: Any) -> Tensor | None:
        if self.embed is None:
            return None
        x, y = batch[0], batch[1]
        logits = output["logits"] if isinstance(output, dict) and "logits" in output else pl_module(x)
        k = logits.shape[-1]
        signal = self.signal
        with torch.autocast(logits.device.type, enabled=False):
            reference = F.one_hot(y, k).float() * (1.0 - signal.label_smoothing) + signal.label_smoothing / k
            target = self.key.perturb(reference, x.float(), self.embed)
            log_p = F.log_softmax(logits.float(), dim=-1)
            loss = signal.strength * F.kl_div(log_p, target, reduction="batchmean")
            if signal.log_strength > 0:
                c = int(self.key.tensors["target"][self.key.index(self.embed)])
                loss = loss + signal.log_strength * F.mse_loss(log_p[:, c], target[:, c].log())
        return loss


@torch.no_grad()
def _probs(model: nn.Module, x: Tensor) -> Tensor:
    device = next(model.parameters()).device
    return torch.cat([torch.softmax(model(q.to(device)).float(), -1).cpu() for q in x.split(512)])


SCHEME = SchemeSpec(
    name="csp",
    callback=CSPWatermark,
    key=CSPKey,
    higher_is_watermarked=True,
    access="probabilities",
    example=lambda seed=None, key_path=None: CSPWatermark(customers=2, seed=seed, num_queries=500, key_path=key_path),
    example_epochs=12,
)
"""CSP's registry entry (entry point ``csp`` of ``lightning_wm.schemes``)."""
