"""Ownership verification: key files, verdicts, statistics and black-box queries, shared by every scheme."""

from lightning_wm.verify.blackbox import BlackBoxModel, query_labels, query_probs
from lightning_wm.verify.keys import KEY_FORMAT_VERSION, KeyFileError, WatermarkKey, load_key
from lightning_wm.verify.stats import (
    binomial_p_value,
    binomial_threshold,
    empirical_p_value,
    normal_null_p_value,
    normal_null_threshold,
    queries_to_significance,
)
from lightning_wm.verify.verdict import Verdict

__all__ = [
    "KEY_FORMAT_VERSION",
    "BlackBoxModel",
    "KeyFileError",
    "Verdict",
    "WatermarkKey",
    "binomial_p_value",
    "binomial_threshold",
    "empirical_p_value",
    "load_key",
    "normal_null_p_value",
    "normal_null_threshold",
    "queries_to_significance",
    "query_labels",
    "query_probs",
]
