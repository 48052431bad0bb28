"""Commitments: a small, publishable record that fixes a key before any dispute (Adi et al., USENIX Security 2018,
commit to the trigger set before it is needed).

A commitment names the scheme, the key's SHA-256 fingerprint, a hiding commitment to the key's secret seed, the
time it was made and the fingerprint of the marked model's weights. It never contains the key: publish it (a model
card, a W&B run, a timestamping service). What it proves: whoever holds a key matching a commitment dated before
the suspect existed did not choose that key to fit the suspect. What it does not prove: the date itself, unless a
third party (a timestamping service, a public log) vouches for when the record was published.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_wm.verify.derive import seed_commitment
from lightning_wm.verify.keys import KeyFileError, WatermarkKey

COMMITMENT_VERSION = 1


class CommitmentError(KeyFileError):
    """A commitment that does not match the key it is checked against, or that cannot be read."""


@dataclass(frozen=True)
class Commitment:
    """What is published: nothing of it reveals the key."""

    scheme: str
    key_fingerprint: str
    seed_commitment: str | None
    created: str
    model_fingerprint: str | None
    version: int = COMMITMENT_VERSION

    def save(self, path: str | Path) -> Path:
        """Write the record as JSON; the parent folder is created."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    def check(self, key: WatermarkKey) -> None:
        """Raise :class:`CommitmentError` unless ``key`` is the key this record commits to."""
        problems = []
        if key.scheme != self.scheme:
            problems.append(f"scheme {key.scheme!r} is not the committed {self.scheme!r}")
        if key.fingerprint() != self.key_fingerprint:
            problems.append("the key's fingerprint differs")
        secret = key.secret
        if self.seed_commitment is not None and (secret is None or seed_commitment(secret) != self.seed_commitment):
            problems.append("the key's secret seed differs")
        if problems:
            raise CommitmentError(f"the key does not match the commitment made {self.created}: {'; '.join(problems)}")


def model_fingerprint(model: nn.Module | dict[str, torch.Tensor]) -> str:
    """SHA-256 of a model's weights (names, dtypes, shapes and values of its ``state_dict``, in name order)."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def commit(key: WatermarkKey, model: nn.Module | dict[str, torch.Tensor] | None = None) -> Commitment:
    """The commitment record of ``key`` (and of the marked ``model``'s weights), dated now (UTC)."""
    secret = key.secret
    return Commitment(
        scheme=key.scheme,
        key_fingerprint=key.fingerprint(),
        seed_commitment=seed_commitment(secret) if secret is not None else None,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        model_fingerprint=None if model is None else model_fingerprint(model),
    )


def load_commitment(path: str | Path) -> Commitment:
    """Read a commitment record written by :meth:`Commitment.save`."""
    path = Path(path)
    if not path.is_file():
        raise CommitmentError(f"commitment {path} does not exist")
    try:
        fields: dict[str, Any] = json.loads(path.read_text())
        record = Commitment(**fields)
    except (ValueError, TypeError) as err:
        raise CommitmentError(f"{path} is not a lightning-wm commitment ({type(err).__name__})") from None
    if record.version > COMMITMENT_VERSION:
        raise CommitmentError(f"{path} has commitment version {record.version}; upgrade lightning-wm")
    return record
