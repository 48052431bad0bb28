"""Szyller et al., "DAWN: Dynamic Adversarial Watermarking of Neural Networks", ACM MM 2021 (arXiv 1906.00830).

An API-side watermark against model extraction: the model is not changed at all. The serving API passes every
query through a keyed filter, HMAC-SHA256(secret, bytes of the input); a query whose digest falls below a
threshold (the paper: 0.5% of queries) is answered with a keyed wrong label instead of the model's. The API logs
those watermark queries and their changed answers; a surrogate trained on the API's answers learns some of them,
and verification queries the suspect on the logged inputs and counts agreement with the changed labels.

Threat model (the SoK's API-side and extraction setting): the attacker queries the API and trains a surrogate on
the answers; the owner holds the query log. The changed label is ``(c + 1 + u) mod K``, ``c`` the model's answer
and ``u`` uniform on ``{0, ..., K−2}`` from the digest, so it is uniform on the K−1 wrong classes and, for a
suspect that never saw the API's answers (the digest is a keyed one-way function of the input), agrees with its
answer with probability at most 1/(K−1) on each logged input, independently: the agreement count is bounded by
Binomial(n, 1/(K−1)), a valid p-value for any suspect. A suspect that answers near-constantly or at chance on clean
inputs is undecidable (:func:`~lightning_wm.verify.blackbox.degenerate_reason`).

Not in the registry: the conformance suite embeds a scheme by training a model with its callback and verifies
that model, but DAWN leaves the trained model untouched (an innocent model, by design); the marked artefact is
the served :class:`DAWNHead` and its query log. Making the callback swap the head into the trained module at fit
end would change that module's state-dict layout (which the suite's resume test reloads) and put the filter's
secret in the module the checkpoints save, so DAWN is tested in ``tests/test_whitebox_api_schemes.py`` instead.
Its key files (the log included) are read by :meth:`DAWNKey.load`, as ``load_key`` looks key classes up in the
registry.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import io
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_wm.verify.blackbox import Suspect, probe, query_labels
from lightning_wm.verify.derive import DERIVATION_VERSION, derived_rng, seed_secret
from lightning_wm.verify.keys import KEY_FORMAT_VERSION, KeyFileError, WatermarkKey
from lightning_wm.verify.stats import binomial_log10_p_value, binomial_threshold
from lightning_wm.verify.verdict import Verdict
from lightning_wm.watermarks.base import WatermarkScheme

_FILTER_PURPOSE = b"lightning-wm/dawn/filter"


def input_digest(secret: bytes, x: Tensor) -> bytes:
    """HMAC-SHA256 of one query's bytes (fp32, C order) under the filter key derived from ``secret``."""
    filter_key = hmac.new(secret, _FILTER_PURPOSE, hashlib.sha256).digest()
    data = x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hmac.new(filter_key, data, hashlib.sha256).digest()


def is_selected(digest: bytes, share: float) -> bool:
    """Whether ``digest``'s query is a watermark query: its first 8 bytes, as a fraction of 2⁶⁴, below ``share``."""
    return int.from_bytes(digest[:8], "big") < share * 2**64


def changed_label(digest: bytes, answer: int, num_classes: int) -> int:
    """The keyed wrong label ``(answer + 1 + u) mod K``, u from bytes 8..15 of the digest, uniform on K−1 values."""
    offset = int.from_bytes(digest[8:16], "big") % (num_classes - 1)
    return (answer + 1 + offset) % num_classes


class DAWNKey(WatermarkKey):
    """The filter's secret (the key's derivation secret), its share, and the API's log of watermark queries.

    Tensors: ``inputs`` and ``labels`` (the watermark queries answered and their changed labels), ``answers`` (the
    model's own answers to them), ``probe_inputs``/``probe_labels`` (clean held-out inputs that tell a degenerate
    suspect). Config: ``share``, ``num_classes``.
    """

    scheme = "dawn"

    @classmethod
    def load(cls, path: str | Path) -> DAWNKey:
        """Read a DAWN key file (its log included). :func:`~lightning_wm.verify.load_key` finds a key's class in the
        registry, where DAWN is not (see the module's docstring), so this reads the same format with the same
        checks: header, SHA-256 of the payload, ``weights_only`` load, scheme name.

        Raises:
            KeyFileError: not a key file, edited or truncated, or a key of another scheme.
        """
        path = Path(path)
        if not path.is_file():
            raise KeyFileError(f"key file {path} does not exist")
        header, _, payload = path.read_bytes().partition(b"\n")
        parts = header.split(b" ")
        if len(parts) != 3 or parts[0] != b"lightning-wm-key" or int(parts[1]) > KEY_FORMAT_VERSION:
            raise KeyFileError(f"{path} is not a lightning-wm key file this version reads")
        if hashlib.sha256(payload).hexdigest().encode() != parts[2]:
            raise KeyFileError(f"{path} is corrupt: its SHA-256 does not match (the file was edited or truncated)")
        content = torch.load(io.BytesIO(payload), weights_only=True)
        if not isinstance(content, dict) or content.get("scheme") != cls.scheme:
            raise KeyFileError(f"{path} does not hold a {cls.scheme} key")
        return cls(content["config"], content["tensors"])

    def digest(self, x: Tensor) -> bytes:
        return input_digest(self.secret, x)  # type: ignore[arg-type]

    def selected(self, inputs: Tensor) -> Tensor:
        """Which rows of ``inputs`` the filter turns into watermark queries (a pure function of input and secret)."""
        share = float(self.config["share"])
        return torch.tensor([is_selected(self.digest(x), share) for x in inputs], dtype=torch.bool)

    def record(self, inputs: Tensor, answers: Tensor, labels: Tensor) -> int:
        """Add watermark queries to the log, once per distinct input; returns how many were new."""
        known = {self.digest(x) for x in self.tensors["inputs"]}
        new = []
        for i, x in enumerate(inputs):
            digest = self.digest(x)
            if digest not in known:
                known.add(digest)
                new.append(i)
        if new:
            index = torch.tensor(new)
            for name, values in (("inputs", inputs), ("answers", answers), ("labels", labels)):
                logged = self.tensors[name]
                self.tensors[name] = torch.cat([logged, values[index].detach().cpu().to(logged.dtype)])
        return len(new)

    def record_reference(self, model: nn.Module, inputs: Tensor) -> int:
        """Log the watermark queries among the owner's reference ``inputs`` as the API would answer them (the
        filter is a pure function of the input, so the owner recomputes them without a log)."""
        chosen = inputs[self.selected(inputs)]
        if len(chosen) == 0:
            return 0
        answers, _ = query_labels(model, chosen)
        labels = self.change(chosen, answers)
        return self.record(chosen, answers, labels)

    def change(self, inputs: Tensor, answers: Tensor) -> Tensor:
        """The keyed wrong labels of ``inputs`` whose model answers are ``answers``."""
        k = int(self.config["num_classes"])
        return torch.tensor([changed_label(self.digest(x), int(a), k) for x, a in zip(inputs, answers.tolist())])

    def serve(self, model: nn.Module) -> DAWNHead:
        """``model`` behind this key's filter, logging into this key."""
        return DAWNHead(model, self)

    def derivation_problems(self, datamodule: Any = None) -> list[str]:
        """Every logged input must pass the filter and carry the keyed wrong label of the logged answer. The logged
        answers themselves are the owner model's (checkable by querying it, :meth:`answers_match`)."""
        problems = []
        inputs = self.tensors["inputs"]
        if len(inputs) and not bool(self.selected(inputs).all()):
            problems.append("inputs")
        if len(inputs) and not torch.equal(self.change(inputs, self.tensors["answers"]), self.tensors["labels"]):
            problems.append("labels")
        rng = derived_rng(self.secret, f"{self.scheme}/probes")  # type: ignore[arg-type]
        if datamodule is not None and hasattr(datamodule, "dataset"):
            probes, _ = _probes(datamodule, len(self.tensors["probe_inputs"]), rng)
            if not torch.equal(probes, self.tensors["probe_inputs"]):
                problems.append("probe_inputs")
        return problems

    def answers_match(self, model: nn.Module) -> bool:
        """Whether the owner's ``model`` gives the logged answers (a check of the log against the served model)."""
        answers, _ = query_labels(model, self.tensors["inputs"])
        return torch.equal(answers.cpu(), self.tensors["answers"])

    def verify(self, suspect: Suspect, alpha: float = 0.01) -> Verdict:
        """Query ``suspect`` (top-1 labels) on the logged watermark queries and on the probes; exact binomial test
        of its agreement with the changed labels at the chance rate 1/(K−1)."""
        inputs, labels = self.tensors["inputs"], self.tensors["labels"].long()
        if len(inputs) == 0:
            raise ValueError("the DAWN key has logged no watermark queries: serve the model through DAWNHead first")
        k = int(self.config["num_classes"])
        predicted, queries = query_labels(suspect, inputs)
        undecidable, probe_queries, _ = probe(suspect, self.tensors["probe_inputs"], self.tensors["probe_labels"], k)
        hits, total, chance = int((predicted.cpu() == labels).sum()), len(labels), 1.0 / (k - 1)
        return Verdict.decide(
            scheme=self.scheme,
            statistic=hits / total,
            statistic_name="watermark_agreement",
            log10_p=binomial_log10_p_value(hits, total, chance),
            alpha=alpha,
            threshold=binomial_threshold(total, chance, alpha) / total,
            higher_is_watermarked=True,
            undecidable=undecidable,
            queries=queries + probe_queries,
            null="the changed label is keyed, uniform on the K-1 wrong classes: agreement <= 1/(K-1) (binomial)",
            details={"hits": hits, "watermark_queries": total, "chance": chance},
        )


class DAWNHead(nn.Module):
    """The served API: the owner's model whose answers to the filter's watermark queries are changed and logged.

    ``forward`` returns logits whose argmax is the served label (the model's, or the keyed wrong label on a
    watermark query), so a label-only client (``BlackBoxModel(output="labels")``, a distillation attack) receives
    exactly the API's answers. ``queries`` counts every row answered, ``watermark_queries`` the changed ones. A
    copy of the head (``copy.deepcopy``, as an attack copies its victim) copies the model but keeps logging into
    the same key: the log is the API's storage, not part of the model.

    Args:
        model: the owner's classifier (returns logits).
        key: the DAWN key (filter secret, share, log).
        record: whether watermark queries are logged into ``key``.
    """

    exposes_weights = False

    def __init__(self, model: nn.Module, key: DAWNKey, record: bool = True) -> None:
        super().__init__()
        self.model = model
        self.key = key
        self.record = record
        self.queries = 0
        self.watermark_queries = 0

    def __deepcopy__(self, memo: dict) -> DAWNHead:
        head = DAWNHead(copy.deepcopy(self.model, memo), self.key, self.record)
        head.queries, head.watermark_queries = self.queries, self.watermark_queries
        return head

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        self.queries += len(x)
        chosen = self.key.selected(x).to(logits.device)
        if not bool(chosen.any()):
            return logits
        answers = logits.argmax(dim=-1)
        labels = self.key.change(x[chosen], answers[chosen]).to(logits.device)
        self.watermark_queries += len(labels)
        if self.record:
            self.key.record(x[chosen], answers[chosen], labels)
        served = logits.detach().clone()
        top = logits.max(dim=-1).values[chosen] + 10.0
        served[chosen.nonzero().flatten(), labels] = top.to(served.dtype)
        return served


class DAWNWatermark(WatermarkScheme):
    """The DAWN scheme as a callback: ``make_key`` draws the filter's secret and the probes; no training term.

    After ``fit``, :meth:`serve` puts the trained model behind its :class:`DAWNHead`; :meth:`log_reference` fills
    the log from the owner's own data when the API's log is not at hand.

    Args:
        share: the fraction of queries changed (the paper: 0.005).
        probes: clean held-out inputs kept to recognise a degenerate suspect.
        key_path, seed, alpha, name: see :class:`~lightning_wm.watermarks.base.WatermarkScheme`.
    """

    key_scheme = "dawn"

    def __init__(
        self,
        share: float = 0.005,
        probes: int = 200,
        key_path: str | None = None,
        seed: int | None = None,
        alpha: float = 0.01,
        name: str | None = None,
    ) -> None:
        super().__init__(key_path=key_path, seed=seed, alpha=alpha, name=name)
        if not 0.0 < share < 1.0:
            raise ValueError(f"share must be in (0, 1), got {share}")
        self.share = share
        self.probes = probes

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._key is None and self.key_path and Path(self.key_path).is_file():
            self._key = DAWNKey.load(self.key_path)
        super().setup(trainer, pl_module, stage)

    def make_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> DAWNKey:
        datamodule = self.split_datamodule(trainer, "probes to recognise a degenerate suspect")
        num_classes = int(getattr(pl_module, "num_classes", 0) or getattr(datamodule, "num_classes", 10))
        return build_key(self._secret or seed_secret(self.seed), self.share, num_classes, datamodule, self.probes)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing to log while training: the watermark exists only once the model is served."""

    def serve(self, model: nn.Module) -> DAWNHead:
        """``model`` behind this scheme's API filter."""
        return self.key.serve(model)  # type: ignore[attr-defined]

    def log_reference(self, model: nn.Module, inputs: Tensor) -> int:
        """Log the watermark queries among ``inputs`` as served by ``model``; returns how many were new."""
        return self.key.record_reference(model, inputs)  # type: ignore[attr-defined]


def _probes(datamodule: Any, count: int, rng: torch.Generator) -> tuple[Tensor, Tensor]:
    inputs, labels = datamodule.dataset("val").tensors[:2]
    index = torch.randperm(len(inputs), generator=rng)[: min(count, len(inputs))].sort().values
    return inputs[index], labels[index]


def build_key(secret: bytes, share: float, num_classes: int, datamodule: Any, probes: int = 200) -> DAWNKey:
    """A DAWN key of ``secret`` with an empty log and ``probes`` clean inputs of ``datamodule``'s validation split."""
    if num_classes < 3:
        raise ValueError(f"DAWN needs at least 3 classes (a wrong label chosen among K-1 >= 2), got {num_classes}")
    probe_inputs, probe_labels = _probes(datamodule, probes, derived_rng(secret, "dawn/probes"))
    shape = tuple(probe_inputs.shape[1:])
    config = {
        "share": share,
        "num_classes": num_classes,
        "derivation": {"version": DERIVATION_VERSION, "secret": secret.hex()},
    }
    tensors = {
        "inputs": torch.empty((0, *shape), dtype=probe_inputs.dtype),
        "answers": torch.empty(0, dtype=torch.long),
        "labels": torch.empty(0, dtype=torch.long),
        "probe_inputs": probe_inputs,
        "probe_labels": probe_labels,
    }
    return DAWNKey(config, tensors)
