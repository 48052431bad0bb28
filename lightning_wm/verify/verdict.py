"""The result of an ownership test."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Verdict:
    """Outcome of ``key.verify(suspect)``.

    Attributes:
        scheme: name of the scheme whose key was tested.
        statistic: the scheme's score of the suspect (bit error rate, key accuracy, detector rate, SNR...).
        statistic_name: what ``statistic`` is, e.g. ``"ber"`` or ``"key_accuracy"``.
        p_value: probability of a score at least this extreme under the stated null (an unmarked model).
        alpha: the significance level of the decision.
        threshold: the score at which the decision flips at ``alpha``.
        is_watermarked: ``p_value < alpha``.
        queries: number of suspect queries spent (0 for white-box reads).
        null: a short description of the null the p-value is computed under.
    """

    scheme: str
    statistic: float
    statistic_name: str
    p_value: float
    alpha: float
    threshold: float
    is_watermarked: bool
    queries: int = 0
    null: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        decision = "WATERMARKED" if self.is_watermarked else "not watermarked"
        return (
            f"{self.scheme}: {decision} ({self.statistic_name}={self.statistic:.4g}, p={self.p_value:.3g}, "
            f"alpha={self.alpha:g}, threshold={self.threshold:.4g}, queries={self.queries})"
        )
