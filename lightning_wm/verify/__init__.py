"""Ownership verification: key files, verdicts, statistics and black-box queries, shared by every scheme."""

from lightning_wm.verify.blackbox import (
    BlackBoxModel,
    degenerate_reason,
    query_labels,
    query_probs,
    white_box_module,
)
from lightning_wm.verify.keys import KEY_FORMAT_VERSION, KeyFileError, WatermarkKey, load_key
from lightning_wm.verify.stats import (
    binomial_log10_p_value,
    binomial_p_value,
    binomial_threshold,
    empirical_p_value,
    normal_null_p_value,
    normal_null_threshold,
    queries_to_significance,
)
from lightning_wm.verify.verdict import NotApplicable, Outcome, Verdict

__all__ = [
    "KEY_FORMAT_VERSION",
    "BlackBoxModel",
    "degenerate_reason",
    "KeyFileError",
    "NotApplicable",
    "Outcome",
    "Verdict",
    "WatermarkKey",
    "binomial_log10_p_value",
    "binomial_p_value",
    "binomial_threshold",
    "empirical_p_value",
    "load_key",
    "normal_null_p_value",
    "normal_null_threshold",
    "queries_to_significance",
    "query_labels",
    "query_probs",
    "white_box_module",
]
