"""Chen, Rouhani, Fu, Zhao and Koushanfar, "DeepMarks: A Secure Fingerprinting Framework for Digital Rights
Management of Deep Learning Models", ICMR 2019.

A white-box fingerprint: each user's copy of the model carries that user's code vector, embedded like Uchida's
watermark (a regularizer λ·Σ BCE(σ(X·w̄), b) on the filter-averaged weights w̄ of one layer under a secret random
projection X). The codes are an anti-collusion code built on a balanced incomplete block design (Trappe et al.'s
AND-ACC, IEEE TSP 2003): for a (v, k, 1)-design with incidence matrix M (v points × v blocks here), user j's code
is ``1 − M[:, j]``. Users who average their copies' weights keep the bits on which they all agree; the bits that
come out as 1 are the AND of their codes, and for up to k − 1 colluders the users whose block avoids every such
bit are exactly the colluders. Each code bit is carried by ``repeat`` projection rows, so that one code position
is read as the share of its rows that come out 1 (a position the colluders disagree on gives a mixed share).

Threat model (the SoK's white-box setting): a dispute gives the owner the suspect's weights. X is a secret
Gaussian draw independent of the suspect, so for an unmarked suspect every row of ``X·w̄`` is an independent
symmetric normal: its bits are fair coins whatever the (public) code, and each user's match count is
Binomial(T, 1/2) exactly; the verdict takes the best user's p-value times the number of users (Bonferroni).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from lightning_wm.registry import SchemeSpec
from lightning_wm.verify.blackbox import Suspect, white_box_module
from lightning_wm.verify.derive import derived_rng
from lightning_wm.verify.keys import WatermarkKey
from lightning_wm.verify.stats import binomial_log10_p_value, binomial_threshold
from lightning_wm.verify.verdict import Verdict
from lightning_wm.watermarks.base import MissingLayerError, resolve_layer
from lightning_wm.watermarks.uchida import ProjectedWeightWatermark, filter_mean, make_projection

Design = Literal["fano", "pg2_3"]

DIFFERENCE_SETS: dict[str, tuple[int, tuple[int, ...]]] = {"fano": (7, (0, 1, 3)), "pg2_3": (13, (0, 1, 3, 9))}
"""Cyclic (v, k, 1) difference sets: the Fano plane (7 points, lines of 3: 2-resilient) and the projective plane
of order 3 (13 points, lines of 4: 3-resilient). Block j is ``{d + j mod v}``."""


def incidence_matrix(design: Design) -> Tensor:
    """M (v × v, 0/1): ``M[p, j] = 1`` iff point p lies on block j of the cyclic design."""
    if design not in DIFFERENCE_SETS:
        raise ValueError(f"design must be one of {sorted(DIFFERENCE_SETS)}, got {design!r}")
    v, base = DIFFERENCE_SETS[design]
    m = torch.zeros(v, v, dtype=torch.long)
    for j in range(v):
        m[[(d + j) % v for d in base], j] = 1
    return m


def and_acc_codes(design: Design) -> Tensor:
    """The AND-ACC code book (users × v): user j's code is the complement of block j."""
    return 1 - incidence_matrix(design).t()


def name_colluders(ones: Tensor, design: Design) -> list[int]:
    """The users whose block avoids every position in ``ones`` (bool, v): the AND-ACC decoding of averaged codes."""
    blocks = incidence_matrix(design).t().bool()
    return [j for j in range(len(blocks)) if not bool((blocks[j] & ones).any())]


class DeepMarksKey(WatermarkKey):
    """The projection X (T × M), the code book (users × v) and the layer; T = v · repeat."""

    scheme = "deepmarks"

    @property
    def repeat(self) -> int:
        return int(self.config["repeat"])

    def targets(self, user: int) -> Tensor:
        """The T bits of ``user``'s copy: each code bit repeated over its ``repeat`` rows."""
        return self.tensors["codes"][user].repeat_interleave(self.repeat)

    def projections(self, suspect: Suspect, layer: str | None = None) -> Tensor:
        """``X·w̄`` of the suspect's layer (white-box)."""
        module = white_box_module(suspect, self.scheme)
        name = layer or self.config["layer"]
        weight = resolve_layer(module, name).weight
        expected = tuple(self.config["weight_shape"])
        if tuple(weight.shape[1:]) != expected[1:]:
            raise MissingLayerError(
                f"layer {name!r} of the suspect has weight shape {tuple(weight.shape)}, the key reads a layer of "
                f"shape (*, {', '.join(map(str, expected[1:]))}); name the matching layer with layer="
            )
        with torch.no_grad():
            return (self.tensors["projection"].to(weight.device) @ filter_mean(weight)).cpu()

    def extract(self, suspect: Suspect, layer: str | None = None) -> Tensor:
        """The T bits the suspect's layer carries."""
        return (self.projections(suspect, layer) >= 0).long()

    def position_shares(self, bits: Tensor) -> Tensor:
        """For each of the v code positions, the share of its rows that read 1."""
        return bits.float().view(-1, self.repeat).mean(dim=1)

    def name_users(self, bits: Tensor, agreement: float = 0.9) -> list[int]:
        """AND-ACC: the positions whose rows read 1 in at least ``agreement`` of cases are the bits every colluder
        has; the named users are those consistent with all of them."""
        return name_colluders(self.position_shares(bits) >= agreement, self.config["design"])

    def derivation_problems(self, datamodule: Any = None) -> list[str]:
        """X re-drawn from the key's secret; the code book rebuilt from the design."""
        rng = derived_rng(self.secret, f"{self.scheme}/key")  # type: ignore[arg-type]
        bits, size = self.tensors["projection"].shape
        problems = []
        if not torch.equal(make_projection("random", bits, size, rng), self.tensors["projection"]):
            problems.append("projection")
        if not torch.equal(and_acc_codes(self.config["design"]), self.tensors["codes"]):
            problems.append("codes")
        return problems

    def verify(self, suspect: Suspect, alpha: float = 0.01, layer: str | None = None) -> Verdict:
        """Each user's code against the suspect's bits (exact binomial), Bonferroni over the users; when the suspect
        is declared, ``details["users"]`` names the users (AND-ACC) whose copies it was made from."""
        bits = self.extract(suspect, layer)
        total = len(bits)
        codes = self.tensors["codes"]
        users = len(codes)
        matches = [int((bits == self.targets(j)).sum()) for j in range(users)]
        log10_ps = [binomial_log10_p_value(m, total, 0.5) for m in matches]
        best = min(range(users), key=lambda j: log10_ps[j])
        log10_p = min(0.0, log10_ps[best] + math.log10(users))
        watermarked = log10_p < math.log10(alpha)
        max_errors = total - binomial_threshold(total, 0.5, alpha / users)
        return Verdict.decide(
            scheme=self.scheme,
            statistic=1.0 - matches[best] / total,
            statistic_name="ber",
            log10_p=log10_p,
            alpha=alpha,
            threshold=max_errors / total,
            higher_is_watermarked=False,
            queries=0,
            null="X is secret and Gaussian: an unmarked layer's bits are fair coins (binomial), Bonferroni over users",
            details={
                "bits": total,
                "user": best if watermarked else None,
                "users": self.name_users(bits) if watermarked else [],
                "per_user_log10_p": log10_ps,
                "position_shares": self.position_shares(bits).tolist(),
                "layer": layer or self.config["layer"],
            },
        )


class DeepMarksWatermark(ProjectedWeightWatermark):
    """Embed ``user``'s anti-collusion code in one layer's weights (Chen et al., ICMR 2019).

    One key (projection and code book) serves every user: train each user's copy with the same ``seed`` or
    ``key_path`` (or :meth:`set_key`) and that user's index. The term is Uchida's, λ·Σ_t BCE(σ(X·w̄)_t, b_t) with
    b the user's code repeated ``repeat`` times, in fp32 outside autocast; logs ``wm/<name>/ber``.

    Args:
        user: the index of the user whose copy this fit trains (0 ≤ user < v).
        design: ``fano`` (7 users, 2 colluders traced) or ``pg2_3`` (13 users, 3 colluders traced).
        repeat: projection rows per code bit (T = v · repeat).
        layer: the layer to mark, a name from ``named_modules()``.
        strength: λ.
        key_path, seed, alpha, name: see :class:`~lightning_wm.watermarks.base.WatermarkScheme`.
    """

    key_scheme = "deepmarks"

    def __init__(
        self,
        user: int = 0,
        design: Design = "fano",
        repeat: int = 8,
        layer: str = "conv3",
        strength: float = 0.1,
        key_path: str | None = None,
        seed: int | None = None,
        alpha: float = 0.01,
        name: str | None = None,
    ) -> None:
        super().__init__(layer, strength, key_path, seed, alpha, name)
        users = len(incidence_matrix(design))
        if not 0 <= user < users:
            raise ValueError(f"user must be in [0, {users}) for design {design!r}, got {user}")
        if repeat < 1:
            raise ValueError(f"repeat must be positive, got {repeat}")
        self.user = user
        self.design = design
        self.repeat = repeat

    def make_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> DeepMarksKey:
        weight = resolve_layer(pl_module, self.layer).weight
        codes = and_acc_codes(self.design)
        projection = make_projection("random", codes.shape[1] * self.repeat, weight[0].numel(), self.key_rng())
        config = {
            "layer": self.layer,
            "weight_shape": list(weight.shape),
            "design": self.design,
            "repeat": self.repeat,
        }
        return DeepMarksKey(config, {"projection": projection, "codes": codes})

    def target_bits(self) -> Tensor:
        key: DeepMarksKey = self.key  # type: ignore[assignment]
        return key.targets(self.user)


SCHEME = SchemeSpec(
    name="deepmarks",
    callback=DeepMarksWatermark,
    key=DeepMarksKey,
    higher_is_watermarked=False,
    access="weights",
    example=lambda seed=None, key_path=None: DeepMarksWatermark(
        user=0, repeat=8, layer="conv3", strength=0.1, seed=seed, key_path=key_path
    ),
)
"""DeepMarks' registry entry (entry point ``deepmarks`` of ``lightning_wm.schemes``)."""
