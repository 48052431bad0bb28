"""The result of an ownership test, and the one decision rule every scheme uses."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class Outcome(str, Enum):
    """What an ownership test concludes."""

    WATERMARKED = "watermarked"
    NOT_WATERMARKED = "not watermarked"
    UNDECIDABLE = "undecidable"


class NotApplicable(Exception):
    """A key or an attack whose threat model does not fit the other (a white-box key against a served API).

    The message says why, in words a reader of the benchmark understands; the benchmark shows the cell as "n/a".
    """


@dataclass(frozen=True)
class Verdict:
    """Outcome of ``key.verify(suspect)``; build it with :meth:`decide`, which holds the decision rule.

    Attributes:
        scheme: name of the scheme whose key was tested.
        statistic: the scheme's score of the suspect (bit error rate, key accuracy, detector rate, z...).
        statistic_name: what ``statistic`` is, e.g. ``"ber"`` or ``"key_accuracy"``.
        p_value: probability of a score at least this extreme under the stated null; never 0 (see ``log10_p``).
        log10_p: log10 of the p-value, exact where ``p_value`` would underflow.
        alpha: the significance level of the decision.
        threshold: the score at which the decision flips at ``alpha``.
        outcome: watermarked, not watermarked, or undecidable (a suspect that carries no information).
        higher_is_watermarked: the statistic's direction.
        queries: number of suspect queries spent (0 for white-box reads).
        null: a short description of the null the p-value is computed under.
        null_draws: for an empirical null, the number of null draws N (its resolution is 1/(N+1)); None if exact.
        reason: why the outcome is undecidable, or why the mark could not be read at all ("" otherwise).
    """

    scheme: str
    statistic: float
    statistic_name: str
    p_value: float
    alpha: float
    threshold: float
    outcome: Outcome
    higher_is_watermarked: bool = True
    queries: int = 0
    null: str = ""
    null_draws: int | None = None
    reason: str = ""
    log10_p: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def decide(
        cls,
        *,
        scheme: str,
        statistic: float,
        statistic_name: str,
        alpha: float,
        threshold: float,
        higher_is_watermarked: bool = True,
        p_value: float | None = None,
        log10_p: float | None = None,
        undecidable: str | None = None,
        **fields: Any,
    ) -> Verdict:
        """The verdict at level ``alpha``: watermarked iff ``p < alpha``, unless the suspect is ``undecidable``.

        Give ``p_value`` or (where it underflows) ``log10_p``. ``undecidable`` is the reason a suspect cannot be
        judged (degenerate answers); it overrides any p-value, so such a suspect is never declared.
        """
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if log10_p is None:
            if p_value is None:
                raise ValueError("Verdict.decide needs p_value or log10_p")
            log10_p = math.log10(p_value) if p_value > 0 else -math.inf
        if log10_p == -math.inf:
            raise ValueError("a p-value of 0 is not a measurement: give its log10 or a bound")
        log10_p = min(0.0, log10_p)
        p = 10.0**log10_p
        if p == 0.0:
            p = math.ulp(0.0)
        if undecidable:
            outcome = Outcome.UNDECIDABLE
        else:
            outcome = Outcome.WATERMARKED if log10_p < math.log10(alpha) else Outcome.NOT_WATERMARKED
        return cls(
            scheme=scheme,
            statistic=float(statistic),
            statistic_name=statistic_name,
            p_value=p,
            alpha=alpha,
            threshold=float(threshold),
            outcome=outcome,
            higher_is_watermarked=higher_is_watermarked,
            reason=undecidable or "",
            log10_p=log10_p,
            **fields,
        )

    @property
    def is_watermarked(self) -> bool:
        """Whether the suspect is declared watermarked at ``alpha``."""
        return self.outcome is Outcome.WATERMARKED

    @property
    def is_undecidable(self) -> bool:
        return self.outcome is Outcome.UNDECIDABLE

    def summary(self, prefix: str) -> dict[str, Any]:
        """The verdict's scalars under ``prefix`` (``<prefix>/outcome``, ``p_value``, ``log10_p``...): what a run
        summary or a dashboard row shows; nothing of the key."""
        fields = {
            "outcome": self.outcome.value,
            "statistic_name": self.statistic_name,
            "statistic": float(self.statistic),
            "p_value": float(self.p_value),
            "log10_p": float(self.log10_p),
            "threshold": float(self.threshold),
            "alpha": float(self.alpha),
            "queries": int(self.queries or 0),
        }
        if self.reason:
            fields["reason"] = self.reason
        return {f"{prefix}/{name}": value for name, value in fields.items()}

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["outcome"] = self.outcome.value
        out["is_watermarked"] = self.is_watermarked
        return out

    def __str__(self) -> str:
        decision = {
            Outcome.WATERMARKED: "WATERMARKED",
            Outcome.NOT_WATERMARKED: "not watermarked",
            Outcome.UNDECIDABLE: "UNDECIDABLE",
        }[self.outcome]
        p = f"{self.p_value:.3g}" if self.log10_p > -300 else f"10^{self.log10_p:.1f}"
        resolution = f", {self.null_draws} null draws" if self.null_draws else ""
        why = f": {self.reason}" if self.reason else ""
        return (
            f"{self.scheme}: {decision}{why} ({self.statistic_name}={self.statistic:.4g}, p={p}{resolution}, "
            f"alpha={self.alpha:g}, threshold={self.threshold:.4g}, queries={self.queries})"
        )
