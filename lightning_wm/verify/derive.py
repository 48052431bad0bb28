"""Keys derived from one secret seed, so that a key can be checked for not having been chosen after the fact.

A black-box ownership claim is only worth something if the claimant could not have picked the key after seeing the
suspect (the ambiguity attack of Fan et al., NeurIPS 2019). Every random piece of a key (projection, bits, labels,
stamp, perturbation, null secrets) is drawn from a ``torch.Generator`` whose seed is ``HMAC-SHA256(secret, purpose)``
(a keyed one-way function, one output block per purpose, the counter mode of NIST SP 800-108 reduced to one
block): the key file then is the expansion of its 32-byte secret, which :meth:`WatermarkKey.derivation_problems`
re-computes. A forger who cannot choose the pieces can still try many secrets until one fits; that is priced in
by the significance level (:data:`DISPUTE_ALPHA`, :func:`grinding_alpha`), and a published commitment to the
secret (:mod:`lightning_wm.verify.commitment`) fixes it before any suspect exists.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import torch

DERIVATION_VERSION = 1
DISPUTE_ALPHA = 1e-9
"""The significance level of a dispute: a forger trying a million secrets reaches it by luck with probability
at most 1e-3 (Bonferroni: 1e6 × 1e-9)."""


def seed_secret(seed: int | None) -> bytes:
    """The 32-byte secret a key is expanded from: fresh from the OS when ``seed`` is None; otherwise a hash of
    ``seed`` (a reproducible key, but anyone who knows the seed can rebuild it: not a secret)."""
    if seed is None:
        return secrets.token_bytes(32)
    return hashlib.sha256(b"lightning-wm seed %d" % seed).digest()


def derived_seed(secret: bytes, purpose: str) -> int:
    """A 63-bit seed for ``purpose`` (e.g. ``"uchida/projection"``): the first 8 bytes of HMAC-SHA256."""
    digest = hmac.new(secret, f"lightning-wm/{DERIVATION_VERSION}/{purpose}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def derived_rng(secret: bytes, purpose: str) -> torch.Generator:
    """A ``torch.Generator`` seeded with :func:`derived_seed`."""
    return torch.Generator().manual_seed(derived_seed(secret, purpose))


def seed_commitment(secret: bytes) -> str:
    """A hiding commitment to the secret (SHA-256 with a domain prefix), safe to publish before any dispute."""
    return hashlib.sha256(b"lightning-wm commitment " + secret).hexdigest()


def grinding_alpha(alpha: float, seeds_tried: int) -> float:
    """The per-key level that keeps a forger who tries ``seeds_tried`` secrets below ``alpha`` (Bonferroni)."""
    if seeds_tried < 1:
        raise ValueError(f"seeds_tried must be at least 1, got {seeds_tried}")
    return alpha / seeds_tried
