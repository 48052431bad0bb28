"""The pure functions behind CSP and USP (lightning_wm.watermarks.functional)."""

from __future__ import annotations

import math

import torch

from lightning_wm.watermarks.functional import (
    class_centred_log_probs,
    detector_features,
    key_phase,
    make_detector,
    matched_filter,
    nasty_teacher_divergence,
    perturb,
    rank_p_value,
    smooth_projections,
    standardised_phase,
    tail_pattern_alignment,
    tail_pattern_z,
    tail_residuals,
)


def test_key_phase_is_the_normal_cdf_of_the_standardised_projection() -> None:
    x = torch.randn(200, 1, 8, 8)
    v = smooth_projections(3, (1, 8, 8), 4, torch.Generator().manual_seed(0))
    scores = x.flatten(1) @ v.T
    phases = key_phase(x, v, scores.mean(0), scores.std(0))
    assert phases.shape == (200, 3)
    assert float(phases.min()) >= 0.0
    assert float(phases.max()) <= 1.0
    assert torch.allclose(phases, standardised_phase(x, v), atol=1e-5)
    assert key_phase(x, v[0], float(scores[:, 0].mean()), float(scores[:, 0].std())).shape == (200,)


def test_smooth_projections_are_unit_and_constant_over_blocks() -> None:
    v = smooth_projections(5, (1, 8, 8), 4, torch.Generator().manual_seed(1))
    assert torch.allclose(v.norm(dim=1), torch.ones(5))
    image = v[0].view(8, 8)
    assert torch.equal(image[0, 0], image[1, 1])
    assert smooth_projections(2, (64,), 0, torch.Generator().manual_seed(1)).shape == (2, 64)


def test_perturb_keeps_distributions_and_moves_the_target_class_with_the_cosine() -> None:
    probs = torch.softmax(torch.randn(100, 10), -1)
    phases = torch.linspace(0, 1, 100)
    out = perturb(probs, phases, target=3, frequency=8.0, phase=0.5, amplitude=0.2)
    assert torch.allclose(out.sum(-1), torch.ones(100), atol=1e-6)
    assert float(out.min()) > 0
    lift = out[:, 3] * 1.4 - probs[:, 3]
    assert torch.allclose(lift, 0.2 * (1 + torch.cos(8.0 * phases + 0.5)), atol=1e-5)


def test_class_centred_residual_has_zero_mean_within_every_predicted_class() -> None:
    probs = torch.softmax(torch.randn(300, 4) * 3, -1)
    residual = class_centred_log_probs(probs, target=1)
    predicted = probs.argmax(-1)
    for c in predicted.unique():
        assert abs(float(residual[predicted == c].mean())) < 1e-9


def test_matched_filter_finds_the_keyed_cosine_and_not_other_phases() -> None:
    rng = torch.Generator().manual_seed(0)
    own = torch.rand(500, 1, generator=rng)
    others = torch.rand(500, 50, generator=rng)
    residual = torch.cos(8.0 * own[:, 0] + 1.0).double() + 0.5 * torch.randn(500, generator=rng).double()
    scores = matched_filter(residual - residual.mean(), torch.cat([own, others], 1), 8.0, 1.0)
    assert float(scores[0]) > 0.5
    assert float(scores[1:].abs().max()) < 0.25


def test_rank_p_value_is_the_permutation_tests_and_never_zero() -> None:
    null = torch.arange(99, dtype=torch.float64)
    assert rank_p_value(1000.0, null) == (0, 1 / 100)
    assert rank_p_value(-1.0, null) == (99, 1.0)
    exceed, p = rank_p_value(89.5, null)
    assert exceed == 9
    assert math.isclose(p, 10 / 100)


def test_rank_p_value_is_uniform_for_an_exchangeable_score() -> None:
    rng = torch.Generator().manual_seed(0)
    ps = [rank_p_value(float(torch.randn(1, generator=rng)), torch.randn(99, generator=rng))[1] for _ in range(2000)]
    assert abs(sum(p <= 0.1 for p in ps) / len(ps) - 0.1) < 0.03


def test_detector_features_do_not_depend_on_the_temperature() -> None:
    logits = torch.randn(20, 10)
    a = detector_features(torch.log_softmax(logits, -1))
    b = detector_features(torch.log_softmax(logits / 4.0, -1))
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(a.mean(-1), torch.zeros(20), atol=1e-5)


def test_make_detector_maps_k_features_to_one_logit() -> None:
    detector = make_detector(10, (16, 8))
    assert detector(torch.randn(5, 10)).shape == (5, 1)
    assert len([m for m in detector if isinstance(m, torch.nn.Linear)]) == 3


def test_nasty_teacher_divergence_is_zero_against_itself_and_positive_otherwise() -> None:
    z = torch.randn(8, 10)
    assert float(nasty_teacher_divergence(z, z, 4.0)) < 1e-6
    assert float(nasty_teacher_divergence(z, torch.randn(8, 10), 4.0)) > 0


def test_tail_residuals_leave_out_the_top_class_and_the_runner_up_and_are_centred() -> None:
    log_probs = torch.log_softmax(torch.randn(30, 10) * 3, -1)
    tails = tail_residuals(log_probs)
    two = log_probs.topk(2, dim=-1).indices
    assert torch.all(tails.gather(1, two) == 0)
    assert torch.allclose(tails.sum(-1), torch.zeros(30), atol=1e-5)
    assert torch.all((tails != 0).sum(-1) == 8)
    labels = torch.randint(0, 10, (30,))
    given = tail_residuals(log_probs, labels)
    assert torch.all(given.gather(1, labels.view(-1, 1)) == 0)


def test_tail_pattern_z_is_standard_normal_over_secrets_for_a_fixed_suspect() -> None:
    """USP's owner-specific null: whatever the suspect answers, z over draws of S is N(0, 1)."""
    generator = torch.Generator().manual_seed(0)
    suspects = {
        "skewed": torch.log_softmax(torch.randn(200, 10) * 3 + torch.arange(10.0), -1),
        "marked by another pattern": torch.log_softmax(_follows(torch.randn(10, 10), 200), -1),
    }
    for name, log_probs in suspects.items():
        z = torch.tensor([tail_pattern_z(log_probs, torch.randn(10, 10, generator=generator)) for _ in range(4000)])
        assert abs(float(z.mean())) < 0.06, name
        assert abs(float(z.std()) - 1.0) < 0.05, name
        assert float((z > 2.326).float().mean()) < 0.016, name
    assert tail_pattern_z(torch.full((50, 10), 0.1).log(), torch.randn(10, 10)) == 0.0


def test_a_model_whose_tails_follow_the_pattern_gets_a_large_z_and_alignment() -> None:
    torch.manual_seed(0)
    pattern = torch.randn(10, 10)
    log_probs = torch.log_softmax(_follows(pattern, 300), -1)
    assert tail_pattern_z(log_probs, pattern) > 6.0
    assert float(tail_pattern_alignment(log_probs, pattern).mean()) > 0.5
    assert abs(tail_pattern_z(log_probs, torch.randn(10, 10))) < 4.0


def _follows(pattern: torch.Tensor, rows: int) -> torch.Tensor:
    """Logits of ``rows`` inputs whose top class is random and whose other classes follow that class's row."""
    top = torch.randint(0, 10, (rows,))
    logits = torch.randn(rows, 10) + pattern[top]
    logits[torch.arange(rows), top] += 10.0
    return logits
