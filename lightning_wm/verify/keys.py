"""Key files: the owner's secret, kept out of every model checkpoint.

A key file is one header line ``lightning-wm-key <version> <sha256>`` followed by a ``torch.save`` payload of
``{"scheme", "config", "tensors"}``. The SHA-256 covers the payload, so an edited or truncated file is refused
with an error naming the file, and the payload only holds tensors and plain values so that it loads with
``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_wm import registry
from lightning_wm.verify.blackbox import Suspect
from lightning_wm.verify.verdict import Verdict

KEY_FORMAT_VERSION = 1
_MAGIC = b"lightning-wm-key"


class KeyFileError(ValueError):
    """A key file that is missing, tampered with, truncated, of another scheme or of an unknown version."""


class ForgedKeyError(KeyFileError):
    """A key whose content is not the expansion of its secret seed: it may have been chosen to fit a model."""


class WatermarkKey:
    """A scheme's secret: its configuration and tensors, and the test that reads the watermark back.

    Subclasses set ``scheme`` (the name key files carry) and implement :meth:`verify`; the class that reads a key
    file is the one a registered scheme (:mod:`lightning_wm.registry`) names for that ``scheme``.
    """

    scheme: ClassVar[str] = ""

    def __init__(self, config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        self.config = dict(config)
        self.tensors = {name: t.detach().cpu() for name, t in tensors.items()}

    def verify(self, suspect: Suspect, alpha: float = 0.01) -> Verdict:
        """Test ``suspect`` for this key's watermark at significance level ``alpha``."""
        raise NotImplementedError

    @property
    def secret(self) -> bytes | None:
        """The 32-byte secret the key was expanded from (:mod:`lightning_wm.verify.derive`), or None."""
        derivation = self.config.get("derivation") or {}
        return bytes.fromhex(derivation["secret"]) if "secret" in derivation else None

    def derivation_problems(self, datamodule: Any = None) -> list[str] | None:
        """The pieces of the key that differ from what its secret expands to (empty: derived), or None when the
        scheme's key cannot be re-derived from its secret alone (its verdicts then prove less: see the README's
        threat model). Keys override this for the pieces they draw from :meth:`WatermarkScheme.key_rng`; a key
        drawn partly from the owner's data (trigger images) needs that ``datamodule``."""
        return None

    def check_derivation(self, datamodule: Any = None) -> bool:
        """True when the key is checked to be the expansion of its secret, False when it cannot be checked.

        Raises:
            ForgedKeyError: a piece differs from its derivation.
        """
        problems = self.derivation_problems(datamodule) if self.secret is not None else None
        if problems:
            raise ForgedKeyError(
                f"this {self.scheme} key was not generated from its seed ({', '.join(problems)} differ): "
                "it may have been chosen to fit a model"
            )
        return problems is not None

    def fingerprint(self) -> str:
        """SHA-256 of the key's content: safe to log (it reveals nothing of the key), used to name it."""
        return hashlib.sha256(_payload_bytes(self)).hexdigest()

    def save_key(self, path: str | Path) -> Path:
        """Write the key file; the parent folder is created."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = _payload_bytes(self)
        digest = hashlib.sha256(payload).hexdigest()
        partial = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.partial")
        partial.write_bytes(b"%s %d %s\n" % (_MAGIC, KEY_FORMAT_VERSION, digest.encode()) + payload)
        partial.replace(path)
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fingerprint={self.fingerprint()[:12]})"


def _payload_bytes(key: WatermarkKey) -> bytes:
    buffer = io.BytesIO()
    config = json.loads(json.dumps(key.config))
    torch.save({"scheme": key.scheme, "config": config, "tensors": key.tensors}, buffer)
    return buffer.getvalue()


def load_key(path: str | Path, scheme: str | None = None) -> WatermarkKey:
    """Read a key file written by ``save_key`` and return the scheme's key object.

    Args:
        path: the key file.
        scheme: when given, a key of another scheme is refused.

    Raises:
        KeyFileError: the file is missing, not a key file, of a newer format, tampered with or truncated.
    """
    path = Path(path)
    if path.is_dir():
        raise KeyFileError(f"{path} is a directory, not a key file")
    if not path.is_file():
        raise KeyFileError(f"key file {path} does not exist")
    raw = path.read_bytes()
    header, _, payload = raw.partition(b"\n")
    parts = header.split(b" ")
    if len(parts) != 3 or parts[0] != _MAGIC:
        raise KeyFileError(f"{path} is not a lightning-wm key file")
    try:
        version = int(parts[1])
    except ValueError:
        raise KeyFileError(f"{path} has an unreadable format version {parts[1]!r}") from None
    if version > KEY_FORMAT_VERSION:
        raise KeyFileError(
            f"{path} has key format version {version}, newer than this lightning-wm reads ({KEY_FORMAT_VERSION}); "
            "upgrade lightning-wm"
        )
    if hashlib.sha256(payload).hexdigest().encode() != parts[2]:
        raise KeyFileError(f"{path} is corrupt: its SHA-256 does not match (the file was edited or truncated)")
    try:
        content = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as err:  # noqa: BLE001  (a payload that matches its digest yet does not load)
        raise KeyFileError(f"{path} is corrupt: its payload does not load ({type(err).__name__})") from None
    if not isinstance(content, dict) or not {"scheme", "config", "tensors"} <= set(content):
        raise KeyFileError(f"{path} is corrupt: its payload lacks the scheme, config and tensors of a key")
    name = content["scheme"]
    if scheme is not None and name != scheme:
        raise KeyFileError(f"{path} holds a key of scheme {name!r}, expected {scheme!r}")
    try:
        key_class = registry.key_class(str(name))
    except registry.RegistryError as err:
        raise KeyFileError(f"{path} holds a key of unknown scheme {name!r}: {err}") from None
    return key_class(content["config"], content["tensors"])
