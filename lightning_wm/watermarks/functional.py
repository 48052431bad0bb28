"""Pure functions behind CSP and USP (Chien & Shen 2022) and EWE (Jia et al. 2021), kept apart from the callbacks
the torchmetrics way.

CSP's keyed cosine follows CosWM (Charette et al., AAAI 2022); USP's detector follows the paired-detector reading
of Chien & Shen's abstract built on Nasty Teacher (Ma et al., ICLR 2021); EWE entangles with Frosst et al.'s soft
nearest neighbour loss (ICML 2019). Nothing here holds state or trains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_FLOOR = math.log(1e-12)


def key_phase(x: Tensor, projection: Tensor, mean: Tensor | float, std: Tensor | float) -> Tensor:
    """CosWM's phase x' = Φ((v·x − μ)/σ) ∈ [0, 1] for every row of ``x`` (flattened) and projection row of ``v``.

    Returns ``(N,)`` for one projection ``(D,)``, ``(N, P)`` for ``P`` projections ``(P, D)``.
    """
    z = (x.flatten(1).float() @ projection.float().t() - mean) / std
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def standardised_phase(x: Tensor, projections: Tensor) -> Tensor:
    """(N, P) phases of ``projections`` (P, D) standardised over the rows of ``x`` themselves (the null keys')."""
    proj = x.flatten(1).float() @ projections.float().t()
    z = (proj - proj.mean(0)) / proj.std(0).clamp_min(1e-12)
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def perturb(probs: Tensor, x_phase: Tensor, target: int, frequency: float, phase: float, amplitude: float) -> Tensor:
    """CosWM's perturbation q̃_i = (q_i + ε_i (1 + cos(f x' + θ_i))) / (1 + 2ε) of ``probs`` (N, K) at ``x_phase``.

    ``ε_{c*} = ε`` and ``θ_{c*} = θ`` on the target class, ``ε/(K−1)`` and ``θ + π`` elsewhere, so rows still sum
    to 1.
    """
    k = probs.shape[-1]
    eps = torch.full((k,), amplitude / (k - 1), dtype=probs.dtype, device=probs.device)
    eps[target] = amplitude
    theta = torch.full((k,), phase + math.pi, dtype=probs.dtype, device=probs.device)
    theta[target] = phase
    signal = torch.cos(frequency * x_phase.to(probs).unsqueeze(-1) + theta)
    return (probs + eps * (1.0 + signal)) / (1.0 + 2.0 * amplitude)


def smooth_projections(count: int, shape: tuple[int, ...], grid: int, rng: torch.Generator) -> Tensor:
    """``count`` random unit projections of inputs of ``shape``, flattened.

    With ``grid > 0`` each is drawn on a ``grid × grid`` lattice and upsampled (nearest) to the image size: a
    projection constant over pixel blocks is a smooth image feature that a CNN with pooling, and a student of any
    architecture, can learn as a function (CosWM's signal must be learnable to survive distillation). ``grid = 0``
    draws i.i.d. pixel weights.
    """
    if grid > 0 and len(shape) == 3:
        coarse = torch.randn(count, shape[0], grid, grid, generator=rng)
        v = F.interpolate(coarse, size=tuple(shape[1:]), mode="nearest").flatten(1)
    else:
        v = torch.randn(count, math.prod(shape), generator=rng)
    return v / v.norm(dim=1, keepdim=True)


def class_centred_log_probs(probs: Tensor, target: int) -> Tensor:
    """log q_{c*} (floored at 1e-6) centred within each class the suspect predicts, then overall (float64).

    Centring within predicted classes removes what class structure puts into the target-class probability, so a
    matched filter sees the keyed variation only.
    """
    y = probs[:, target].double().clamp_min(1e-6).log()
    predicted = probs.argmax(dim=-1)
    counts = torch.bincount(predicted, minlength=probs.shape[-1]).double()
    sums = torch.zeros(probs.shape[-1], dtype=torch.float64, device=y.device).index_add_(0, predicted, y)
    residual = y - (sums / counts.clamp_min(1.0))[predicted]
    return residual - residual.mean()


def matched_filter(residual: Tensor, phases: Tensor, frequency: float, phase: float) -> Tensor:
    """Correlations of ``residual`` (N,) with ``cos(f x' + θ)`` at every column of ``phases`` (N, P): (P,)."""
    signal = torch.cos(frequency * phases.double() + phase)
    signal = signal - signal.mean(dim=0)
    denom = signal.norm(dim=0) * residual.norm()
    return (residual @ signal) / denom.clamp_min(1e-12)


def rank_p_value(score: float, null: Tensor) -> tuple[int, float]:
    """The permutation test's ``(#{null >= score}, (1 + #{null >= score}) / (1 + N))``: exact when ``score`` is
    drawn like the ``N`` null scores, with resolution ``1/(N + 1)`` (Good, Permutation Tests)."""
    exceed = int((null >= score).sum())
    return exceed, (1 + exceed) / (1 + len(null))


def detector_features(log_probs: Tensor) -> Tensor:
    """What USP's detector reads: log-probabilities floored at log 1e-12 and standardised over the classes.

    Standardising removes the additive log-normaliser and the temperature (log_softmax(z/T) standardised is z
    standardised), so outputs served, or students distilled, at any temperature look alike.
    """
    lp = log_probs.float().clamp_min(LOG_FLOOR)
    lp = lp - lp.mean(dim=-1, keepdim=True)
    return lp / lp.std(dim=-1, keepdim=True).clamp_min(1e-6)


def tail_residuals(log_probs: Tensor, top: Tensor | None = None) -> Tensor:
    """Each row's :func:`detector_features` without its top class (``top``, default the argmax) and its runner-up,
    centred over the other K − 2 (those two set to 0).

    The tail of an output distribution carries almost no probability mass, so a model can shape it at almost no
    cost to its top-1 accuracy, and a student distilled on soft labels copies it. The runner-up is left free: it is
    the class an input near a decision boundary leans to, which a fixed pattern must not dictate.
    """
    features = detector_features(log_probs)
    return _centred_tail(features, _tail_mask(features, top))


def tail_pattern_alignment(log_probs: Tensor, pattern: Tensor, top: Tensor | None = None) -> Tensor:
    """Per row, the cosine between its :func:`tail_residuals` and the secret pattern's row of its top class (``top``,
    e.g. the training label; default the argmax) over the same classes: what USP's loss term raises."""
    top = log_probs.detach().argmax(-1) if top is None else top
    features = detector_features(log_probs)
    mask = _tail_mask(features, top)
    rows = _centred_tail(pattern.to(features)[top], mask)
    return F.cosine_similarity(_centred_tail(features, mask), rows, dim=-1)


def _tail_mask(features: Tensor, top: Tensor | None) -> Tensor:
    top = features.detach().argmax(-1, keepdim=True) if top is None else top.view(-1, 1)
    runner_up = features.detach().scatter(1, top, -math.inf).argmax(-1, keepdim=True)
    return torch.ones_like(features).scatter(1, top, 0.0).scatter(1, runner_up, 0.0)


def _centred_tail(values: Tensor, mask: Tensor) -> Tensor:
    kept = values * mask
    return (kept - kept.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)) * mask


def tail_pattern_z(log_probs: Tensor, pattern: Tensor) -> float:
    """USP's owner-specific statistic: z = ⟨M, S⟩ / ‖M‖ with M[c] the sum of the tails of the rows whose top class
    is c and S the secret (K, K) pattern of independent standard normals.

    Given the suspect's outputs, ⟨M, S⟩ is normal with variance ‖M‖² over the draw of S, so z is exactly N(0, 1)
    for any suspect that never saw S (a constant predictor gives M = 0, and z = 0).
    """
    tails = tail_residuals(log_probs.float())
    totals = torch.zeros(pattern.shape, dtype=tails.dtype).index_add_(0, log_probs.argmax(-1), tails)
    norm = float(totals.norm())
    return 0.0 if norm == 0.0 else float((totals * pattern.float()).sum()) / norm


def make_detector(num_classes: int, hidden: Sequence[int]) -> nn.Sequential:
    """USP's detector D: an MLP from the K standardised log-probabilities to one logit (positive: watermarked)."""
    layers: list[nn.Module] = []
    width = num_classes
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def nasty_teacher_divergence(logits: Tensor, reference_logits: Tensor, temperature: float) -> Tensor:
    """KL(σ(z/τ) ‖ σ(z_A/τ)), batch mean: the divergence Nasty Teacher (Ma et al., ICLR 2021) maximises."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(reference_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def soft_nearest_neighbor_loss(features: Tensor, labels: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """Frosst et al.'s soft nearest neighbour loss (SNNL) of ``features`` ``(N, ...)`` under ``labels`` ``(N,)``:
    ``−mean_i log(Σ_{j≠i, y_j=y_i} e^{−d_ij/T} / Σ_{k≠i} e^{−d_ik/T})``.

    High when the classes are entangled (a point's neighbours are as often of the other class), low when they are
    apart. ``d`` is the squared Euclidean distance between L2-normalised features (``2 − 2 cos``, in ``[0, 4]``):
    maximising the raw loss (as EWE does) also pushes each class's points apart, which on raw features grows them
    without bound; on the unit sphere it cannot, and ``temperature`` keeps one meaning at every layer. Rows without
    a neighbour of their own class are left out. Computed in log space; ``temperature`` may be a 0-d tensor to
    differentiate with respect to (EWE learns it).
    """
    flat = F.normalize(features.flatten(1).float(), dim=1)
    distances = (2.0 - 2.0 * flat @ flat.t()).clamp_min(0.0)
    logits = -distances / temperature
    eye = torch.eye(len(flat), dtype=torch.bool, device=flat.device)
    same = (labels[:, None] == labels[None, :]) & ~eye
    keep = same.any(dim=1)
    if not bool(keep.any()):
        return flat.new_zeros(())
    numerator = torch.logsumexp(logits.masked_fill(~same, -math.inf), dim=1)
    denominator = torch.logsumexp(logits.masked_fill(eye, -math.inf), dim=1)
    return -(numerator - denominator)[keep].mean()
