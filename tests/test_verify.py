"""Key files, verdict statistics and black-box queries (lightning_wm.verify)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy import stats
from torch import nn

from lightning_wm.verify import (
    BlackBoxModel,
    KeyFileError,
    WatermarkKey,
    binomial_p_value,
    binomial_threshold,
    empirical_p_value,
    load_key,
    normal_null_p_value,
    normal_null_threshold,
    queries_to_significance,
    query_labels,
)
from lightning_wm.verify.keys import KEY_FORMAT_VERSION
from lightning_wm.verify.stats import label_permutation_log10_p_value
from lightning_wm.watermarks.uchida import UchidaKey


def test_binomial_p_value_matches_hand_computed_tails():
    assert binomial_p_value(10, 10, 0.5) == pytest.approx(1 / 1024)
    assert binomial_p_value(9, 10, 0.5) == pytest.approx(11 / 1024)
    assert binomial_p_value(0, 10, 0.5) == 1.0
    assert binomial_p_value(3, 5, 0.1) == pytest.approx(
        sum(math.comb(5, i) * 0.1**i * 0.9 ** (5 - i) for i in (3, 4, 5))
    )
    assert binomial_p_value(256, 256, 0.5) == pytest.approx(0.5**256, rel=1e-9)
    assert binomial_p_value(60, 100, 0.1) == pytest.approx(stats.binom.sf(59, 100, 0.1))


def test_binomial_p_value_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one trial"):
        binomial_p_value(1, 0, 0.5)
    with pytest.raises(ValueError, match="probability"):
        binomial_p_value(1, 3, 1.5)


def test_binomial_threshold_is_the_first_significant_count():
    k = binomial_threshold(100, 0.1, 0.01)
    assert binomial_p_value(k, 100, 0.1) < 0.01 <= binomial_p_value(k - 1, 100, 0.1)


def test_queries_to_significance():
    assert queries_to_significance(1.0, 0.1, 1e-6) == 7  # 0.1**6 is not below 1e-6, 0.1**7 is
    assert queries_to_significance(1.0, 0.5, 1e-6) == 20
    assert queries_to_significance(0.05, 0.1) == -1


def _scanned(significant, most: int) -> int:
    return next((n for n in range(1, most + 1) if significant(n)), -1)


@pytest.mark.parametrize(("rate_a", "rate_b"), [(1.0, 0.0), (0.9, 0.1), (0.8, 0.2), (0.6, 0.1), (0.3, 0.2)])
def test_two_sample_queries_are_those_a_scan_finds(rate_a: float, rate_b: float) -> None:
    """Doubling and a short scan give a scan's answer for small counts; bisection keeps large ones within 3%."""
    from lightning_wm.verify.stats import fisher_exact_log10_p_value, two_sample_queries_to_significance

    def significant(n: int) -> bool:
        hits_a, hits_b = math.floor(rate_a * n + 1e-9), min(n, math.ceil(rate_b * n - 1e-9))
        return hits_a > hits_b and fisher_exact_log10_p_value(hits_a, n, hits_b, n) < -6

    scanned = 2 * _scanned(significant, 10_000)
    found = two_sample_queries_to_significance(rate_a, rate_b, 1e-6)
    assert found == scanned if scanned <= 512 else abs(found - scanned) <= 0.03 * scanned
    assert two_sample_queries_to_significance(0.31, 0.30, 1e-6) == -1, "more than the 20,000 allowed"


def test_empirical_and_normal_null():
    null = [0.10, 0.12, 0.08, 0.11, 0.09]
    assert empirical_p_value(0.95, null) == pytest.approx(1 / 6)
    assert empirical_p_value(0.10, null) == pytest.approx(4 / 6)
    threshold = normal_null_threshold(null, alpha=0.01)
    mean, std = sum(null) / 5, stats.tstd(null)
    assert threshold == pytest.approx(mean + stats.norm.isf(0.01) * std)
    assert normal_null_p_value(threshold, null) == pytest.approx(0.01)


def _key() -> UchidaKey:
    return UchidaKey(
        {"layer": "conv2", "weight_shape": [4, 2, 3, 3], "projection": "random"},
        {"projection": torch.randn(8, 18), "message": torch.randint(0, 2, (8,))},
    )


def test_key_file_round_trip(tmp_path):
    key = _key()
    path = key.save_key(tmp_path / "sub" / "owner.key")
    loaded = load_key(path)
    assert isinstance(loaded, UchidaKey)
    assert loaded.config == key.config
    assert torch.equal(loaded.tensors["projection"], key.tensors["projection"])
    assert loaded.fingerprint() == key.fingerprint()


def test_key_file_tampered_truncated_foreign_and_future_are_refused(tmp_path):
    path = _key().save_key(tmp_path / "owner.key")
    raw = path.read_bytes()
    tampered = bytearray(raw)
    tampered[-20] ^= 0xFF
    (tmp_path / "tampered.key").write_bytes(bytes(tampered))
    with pytest.raises(KeyFileError, match="tampered.key is corrupt"):
        load_key(tmp_path / "tampered.key")
    (tmp_path / "truncated.key").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(KeyFileError, match="truncated.key is corrupt"):
        load_key(tmp_path / "truncated.key")
    header, _, payload = raw.partition(b"\n")
    future = header.replace(b" %d " % KEY_FORMAT_VERSION, b" %d " % (KEY_FORMAT_VERSION + 1))
    (tmp_path / "future.key").write_bytes(future + b"\n" + payload)
    with pytest.raises(KeyFileError, match="newer than this lightning-wm"):
        load_key(tmp_path / "future.key")
    (tmp_path / "other.txt").write_text("hello\n")
    with pytest.raises(KeyFileError, match="not a lightning-wm key file"):
        load_key(tmp_path / "other.txt")
    with pytest.raises(KeyFileError, match="does not exist"):
        load_key(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match="expected 'trigger_set'"):
        load_key(path, scheme="trigger_set")


def test_unknown_scheme_is_refused(tmp_path):
    class OrphanKey(WatermarkKey):
        scheme = ""

    orphan = OrphanKey({}, {})
    orphan.scheme = "no-such-scheme"
    path = orphan.save_key(tmp_path / "orphan.key")
    with pytest.raises(KeyFileError, match="unknown scheme 'no-such-scheme'"):
        load_key(path)


def test_black_box_counts_queries_and_hides_logits():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    box = BlackBoxModel(model, output="probs", batch_size=3)
    probs = box(torch.randn(7, 4))
    assert probs.shape == (7, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(7))
    assert box.queries == 7
    labels, spent = query_labels(box, torch.randn(5, 4))
    assert labels.shape == (5,)
    assert spent == 5
    assert box.queries == 12
    assert model.training, "querying must restore the module's train mode"


def test_black_box_of_a_label_only_callable():
    labels, spent = query_labels(lambda x: torch.zeros(len(x), dtype=torch.long), torch.randn(4, 2))
    assert labels.tolist() == [0, 0, 0, 0]
    assert spent == 4
    with pytest.raises(ValueError, match="labels only"):
        BlackBoxModel(lambda x: torch.zeros(len(x), dtype=torch.long))(torch.randn(2, 2))


@pytest.mark.parametrize("seed", range(6))
def test_label_permutation_p_value_is_the_share_of_label_orders_with_as_many_matches(seed: int) -> None:
    """Exact against enumerating every order of the labels drawn (7 keys, 3 classes)."""
    rng = torch.Generator().manual_seed(seed)
    answers, labels = (torch.randint(0, 3, (7,), generator=rng).tolist() for _ in range(2))
    orders = list(itertools.permutations(labels))
    counts = ([answers.count(c) for c in range(3)], [labels.count(c) for c in range(3)])
    for matches in range(1, 8):
        share = sum(sum(a == b for a, b in zip(answers, order)) >= matches for order in orders) / len(orders)
        log10_p = label_permutation_log10_p_value(*counts, matches)
        assert (10**log10_p if share else 0.0) == pytest.approx(share, abs=1e-12)


def test_label_permutation_p_value_of_a_constant_answer_is_one() -> None:
    """A suspect answering one class to every key matches exactly the keys of that label in every order."""
    assert label_permutation_log10_p_value([100, 0, 0], [30, 40, 30], 30) == 0.0
    assert label_permutation_log10_p_value([100, 0, 0], [30, 40, 30], 31) == -math.inf
    with pytest.raises(ValueError, match="same keys"):
        label_permutation_log10_p_value([3, 0], [1, 1], 1)
