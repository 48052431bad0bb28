"""USP: Unified Soft-label Perturbation (Chien & Shen, arXiv 2208.05477, 2022).

Chien & Shen's abstract says USP has "a detector paired with the model to be watermarked". This module builds it
on Nasty Teacher (Ma et al., ICLR 2021):

* the model f_θ is trained with CE − ω·τ²·KL(σ(f_θ/τ) ‖ σ(f_A/τ)) + λ·(−log D(f_θ)): the Nasty-Teacher term
  pushes its soft labels away from a clean reference f_A, the detector term makes them carry one signature;
* a small detector D learns to tell f_θ's output distributions (label 1) from clean models' (label 0);
* a term μ·(1 − cos(tail(f_θ), S[y])) writes the owner's secret: S is a (K, K) matrix of independent standard
  normals, and the model's standardised log-probabilities outside the training label y follow S's row y (outside
  the top class c, S's row c, at verification).

D and S are the owner's key: written to the key file, never to the model checkpoint. A student distilled from
f_θ's soft labels inherits both, so D flags its outputs and its tails follow S. Verification is an
intersection-union test of two p-values, the larger one the verdict's: D's positive rate on the suspect's outputs
against the largest rate of held-out clean models (binomial), and z = ⟨M, S⟩ / ‖M‖, M[c] the sum of the tails of
the queries answered c (:func:`~lightning_wm.watermarks.functional.tail_pattern_z`). Over the draw of S, z is
exactly N(0, 1) given any suspect that never saw S: a constant predictor, an untrained network, or a model marked
with another owner's USP key, whose detector signature D flags as readily as the owner's (README, Guarantees).
D alone says that a suspect carries a USP mark; S says whose.

Deviations (the paper's details being unknown): D reads the per-row standardised log-probabilities, which equal
the standardised logits, so its decision does not depend on the softmax temperature a suspect or a student uses.
The clean models D learns to reject, and the held-out ones that set the null, are trained before embedding and
include every stage of their training (the untrained network first) and magnitude-pruned copies, so that an
untrained or a collapsed network is among what D has learned to call clean.

The secret pattern S is this implementation's (the paper's detector details being unknown): D's signature is
shared by every owner's USP models (the easiest departure from clean outputs is the same for every detector), so
without a secret drawn independently of everything a suspect could depend on, no null holds for another owner's
model (verdicts.md).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader

from lightning_wm.registry import SchemeSpec
from lightning_wm.side_training import quiet_trainer, train_clean_models
from lightning_wm.verify.blackbox import Suspect, check_outputs, degenerate_reason, query_probs
from lightning_wm.verify.keys import WatermarkKey
from lightning_wm.verify.stats import binomial_log10_p_value, binomial_threshold, normal_log10_sf
from lightning_wm.verify.verdict import Verdict
from lightning_wm.watermarks.base import WatermarkScheme, logs_this_step
from lightning_wm.watermarks.functional import (
    detector_features,
    make_detector,
    nasty_teacher_divergence,
    tail_pattern_alignment,
    tail_pattern_z,
)

__all__ = [
    "EmbeddingOptions",
    "ReferenceOptions",
    "USPKey",
    "USPWatermark",
    "VerificationOptions",
    "detector_features",
    "make_detector",
]


class USPKey(WatermarkKey):
    """The detector's weights, the secret pattern, the verification queries and the null of clean models.

    Tensors: ``detector.<name>`` (the detector's state dict), ``pattern`` (K, K: the secret S, independent
    standard normals), ``queries`` (N, *input_shape) and ``query_labels`` (N,). Config: ``num_classes``,
    ``hidden``, ``clean_rate`` (the detector's largest positive rate on the references it was trained against),
    ``calibration_rates`` and ``calibration_accuracies`` (its rates on, and the accuracies of, held-out clean
    references at every stage of their training and pruned), ``null_rate`` (the rate the binomial null assumes
    for a suspect at least as accurate as ``calibration_accuracy``: the largest rate of comparable calibration
    models plus a margin) and ``null_rate_any_accuracy`` (the same over every calibration model, for less
    accurate suspects).
    """

    scheme = "usp"

    def detector(self) -> nn.Sequential:
        """The detector network, rebuilt from the key."""
        net = make_detector(int(self.config["num_classes"]), self.config["hidden"])
        state = {n.removeprefix("detector."): t for n, t in self.tensors.items() if n.startswith("detector.")}
        net.load_state_dict(state)
        return net.eval()

    @torch.no_grad()
    def flags(self, probs: Tensor) -> Tensor:
        """Which of the output distributions ``probs`` (N, K) the detector declares watermarked."""
        return self.detector()(detector_features(probs.float().clamp_min(1e-30).log())).squeeze(-1) > 0

    def null_rate(self, query_accuracy: float | None) -> float:
        """The clean rate the binomial null assumes for a suspect of this accuracy on the queries (None: unknown)."""
        floor = float(self.config.get("calibration_accuracy", 0.0))
        if query_accuracy is not None and query_accuracy >= floor:
            return float(self.config["null_rate"])
        return float(self.config.get("null_rate_any_accuracy", self.config["null_rate"]))

    def verify(self, suspect: Suspect, alpha: float = 0.01, inputs: Tensor | None = None) -> Verdict:
        """Query ``suspect`` and test whether the detector flags its outputs more often than clean ones.

        On the key's own queries a suspect whose answers are near-constant or at chance accuracy is undecidable.
        """
        x = self.tensors["queries"] if inputs is None else inputs
        probs, queries = query_probs(suspect, x)
        num_classes = int(self.config["num_classes"])
        check_outputs(probs, num_classes, "USP")
        flagged = self.flags(probs)
        hits, total = int(flagged.sum()), len(flagged)
        accuracy, undecidable = None, None
        if inputs is None and "query_labels" in self.tensors:
            predicted, labels = probs.argmax(-1), self.tensors["query_labels"]
            accuracy = float(predicted.eq(labels).float().mean())
            undecidable = degenerate_reason(predicted, labels, num_classes)
        null_rate = self.null_rate(accuracy)
        detector_log10_p = binomial_log10_p_value(hits, total, null_rate)
        null = (
            f"detector: a clean model's outputs are flagged with probability {null_rate:.3g} (binomial; the largest "
            "rate of held-out clean references, trained, untrained or pruned, of comparable accuracy, plus a margin)"
        )
        details: dict[str, Any] = {
            "flagged": hits,
            "query_accuracy": accuracy,
            "clean_rate": float(self.config["clean_rate"]),
            "calibration_max": max(self.config.get("calibration_rates") or [float("nan")]),
            "null_rate": null_rate,
            "detector_log10_p": detector_log10_p,
        }
        log10_p = detector_log10_p
        if "pattern" in self.tensors:
            z = tail_pattern_z(probs.float().clamp_min(1e-30).log(), self.tensors["pattern"])
            details.update(pattern_z=z, pattern_log10_p=normal_log10_sf(z))
            log10_p = max(detector_log10_p, details["pattern_log10_p"])
            null += (
                "; and pattern: z = <M, S>/|M| is N(0, 1) over the draw of the secret S for any suspect that never "
                "saw it (exact, another owner's USP model included); p is the larger of the two"
            )
        else:
            null += "; a key without a secret pattern: another owner's USP-marked model is not in this null"
        return Verdict.decide(
            scheme=self.scheme,
            statistic=hits / total,
            statistic_name="detector_rate",
            log10_p=log10_p,
            alpha=alpha,
            threshold=binomial_threshold(total, null_rate, alpha) / total,
            queries=queries,
            undecidable=undecidable,
            null=null,
            details=details,
        )


@dataclass(frozen=True)
class ReferenceOptions:
    """The clean models trained before embedding (by :func:`~lightning_wm.side_training.train_clean_models`).

    Attributes:
        count: references the detector learns to reject (a given ``reference`` counts as one).
        calibration: held-out references, never shown to the detector, whose rates make the key's null.
        epochs: their training epochs; every epoch's state (and the untrained network) is a clean model.
        lr: their Adam learning rate.
        prune_rates: each final reference is also kept magnitude-pruned (global, unstructured) at these rates.
        max_inputs: training inputs on which the detector references' outputs are recorded.
        trainer: options of their ``Trainer`` (e.g. ``{"accelerator": "gpu", "limit_train_batches": 50}``: side
            training runs on one CPU device over all the training data unless told otherwise).
        cache: keep what the references give (their recorded outputs and the first reference) in a pool of this
            process keyed by (architecture, training data, seed, these options, inputs, queries), so that another
            run with the same key and data (a benchmark's repeats, a rerun in a notebook) skips their training.
            The references are deterministic in those, so a cached run gives the verdicts of a fresh one.
    """

    count: int = 3
    calibration: int = 2
    epochs: int = 6
    lr: float = 2e-3
    prune_rates: tuple[float, ...] = (0.5, 0.8, 0.9)
    max_inputs: int = 4096
    trainer: dict[str, Any] | None = None
    cache: bool = True


@dataclass(frozen=True)
class EmbeddingOptions:
    """The loss terms of the marked model and the detector they are trained against.

    Attributes:
        divergence: ω, weight of the Nasty-Teacher term (0.04 in Nasty Teacher's CIFAR-10 setting; 0 skips the
            reference's forward pass).
        temperature: τ of the Nasty-Teacher term.
        detector_weight: λ, weight of the detector term.
        detector_hidden: hidden widths of the detector MLP.
        detector_lr: Adam learning rate of the detector.
        detector_steps: detector steps at every fit, on the last epoch's outputs of the marked model against the
            clean references' outputs.
        detector_batch_size: their batch size.
        detector_every: D is fitted at the end of every ``detector_every``-th epoch and at the end of training
            (if the last epoch was not one of them), so the key's detector always matches the final model; a
            nested fit costs as much as several of a small model's steps, so fitting less often amortises it.
        divergence_rows: the Nasty-Teacher term is taken on the first ``divergence_rows`` rows of a batch (0: all
            rows): an unbiased estimate of the batch mean that spares part of the reference's forward pass.
        divergence_every: the Nasty-Teacher term is taken at every ``divergence_every``-th step only, with its
            weight multiplied by ``divergence_every``: the same expected gradient, at a fraction of the reference's
            forward passes (with ``divergence_rows``, a sixteenth of them on batches of 64).
        pattern_weight: μ, weight of the term that writes the secret pattern S into the tails (the owner-specific
            half of the verdict: 0 embeds none, and such a model is never declared).
    """

    divergence: float = 0.0005
    temperature: float = 4.0
    detector_weight: float = 0.5
    detector_hidden: tuple[int, ...] = (64, 64)
    detector_lr: float = 1e-3
    detector_steps: int = 15
    detector_batch_size: int = 2048
    detector_every: int = 3
    divergence_rows: int = 16
    divergence_every: int = 4
    pattern_weight: float = 1.0


@dataclass(frozen=True)
class VerificationOptions:
    """Where the queries come from and the binomial null's clean rate.

    Attributes:
        query_split: the DataModule split the queries come from.
        null_rate: floor of the clean positive rate the binomial null assumes.
        null_margin: added to the largest calibration rate: independently trained clean models (other seeds,
            data orders, widths, numbers of epochs) vary more than the held-out references.
        calibration_accuracy: calibration models less accurate than this on the queries (barely trained or
            pruned ones) only enter the null of suspects that are too.
    """

    query_split: str = "defender"
    null_rate: float = 0.05
    null_margin: float = 0.25
    calibration_accuracy: float = 0.5


def _options(cls: type, value: Any) -> Any:
    if value is None:
        return cls()
    return cls(**value) if isinstance(value, dict) else value


class DetectorModule(L.LightningModule):
    """USP's detector, fitted by a nested ``Trainer`` on cached output features (weighted BCE, Adam)."""

    def __init__(self, detector: nn.Module, lr: float) -> None:
        super().__init__()
        self.detector = detector
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        features, labels, weights = batch
        return F.binary_cross_entropy_with_logits(self.detector(features).squeeze(-1), labels, weight=weights)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.detector.parameters(), lr=self.lr)


class USPWatermark(WatermarkScheme):
    """Unified Soft-label Perturbation (Chien & Shen 2022) with a paired detector (module docstring).

    Before training, ``references.count`` clean references (re-initialised copies of the backbone, or the given
    ``reference`` and copies) and ``references.calibration`` held-out ones are trained through Lightning; their
    outputs at every epoch (the untrained network first) and pruned, are the detector's negatives and the null.
    The loss term (added by :class:`~lightning_wm.mixin.WatermarkMixin`, inside the step, so DDP and AMP see it)
    is ``−ω·τ²·KL(σ(z_θ/τ) ‖ σ(z_A/τ)) + λ·BCE(D(z_θ), 1) + μ·(1 − cos(tail(z_θ), S[y]))`` with D's
    parameters detached and z_A the first reference's logits. At the end of every epoch rank 0 fits D
    (:class:`DetectorModule`, a nested ``Trainer``) on that epoch's detached outputs of the model against the
    references' outputs and broadcasts it. D and S are secrets of the key: they never enter the model's parameters
    or checkpoint.

    Args:
        reference: the first clean reference f_A: a checkpoint of a clean ``ImageClassifier``, a module, or None to
            train it with the others.
        num_queries: verification queries kept in the key.
        references: how many clean references, and how they are trained.
        embedding: the loss terms' weights and the detector's training.
        verification: query split and the binomial null's clean rate.
        key_path, seed, alpha, name: see :class:`~lightning_wm.watermarks.base.WatermarkScheme`.
    """

    key_scheme = "usp"

    def __init__(
        self,
        reference: str | nn.Module | None = None,
        num_queries: int = 1000,
        references: ReferenceOptions | None = None,
        embedding: EmbeddingOptions | None = None,
        verification: VerificationOptions | None = None,
        key_path: str | None = None,
        seed: int | None = None,
        alpha: float = 0.01,
        name: str | None = None,
    ) -> None:
        super().__init__(key_path=key_path, seed=seed, alpha=alpha, name=name)
        self.references: ReferenceOptions = _options(ReferenceOptions, references)
        self.embedding: EmbeddingOptions = _options(EmbeddingOptions, embedding)
        self.verification: VerificationOptions = _options(VerificationOptions, verification)
        if not 0.0 <= self.verification.null_rate < 1.0:
            raise ValueError(f"null_rate must be in [0, 1), got {self.verification.null_rate}")
        if not 0.0 <= self.verification.null_margin < 1.0:
            raise ValueError(f"null_margin must be in [0, 1), got {self.verification.null_margin}")
        embedding = self.embedding
        if embedding.detector_every < 1 or embedding.divergence_every < 1 or embedding.divergence_rows < 0:
            raise ValueError(
                "USPWatermark needs embedding.detector_every >= 1, embedding.divergence_every >= 1 and "
                "embedding.divergence_rows >= 0, "
                f"got {self.embedding}"
            )
        if self.references.count < 1 or self.references.calibration < 0 or self.references.epochs < 1:
            raise ValueError(
                "USPWatermark needs references.count >= 1, references.calibration >= 0 and references.epochs >= 1, "
                f"got {self.references}"
            )
        self.reference = reference
        self.num_queries = num_queries
        self._reference: nn.Module | None = None
        self._reference_rates: list[Tensor] = []
        self._negatives: Tensor | None = None
        self._calibration_probs: list[Tensor] = []
        self._positives: list[Tensor] = []
        self._detector: nn.Sequential | None = None
        self._frozen_detector: nn.Sequential | None = None
        self._negative_features: Tensor | None = None
        self._fits = 0

    @property
    def key(self) -> USPKey:
        return super().key  # type: ignore[return-value]

    def make_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> USPKey:
        datamodule = self.split_datamodule(trainer, "its data gives the queries")
        num_classes = int(getattr(datamodule, "num_classes", getattr(pl_module, "num_classes", 10)))
        rng = self.key_rng()
        query_set = datamodule.dataset(self.verification.query_split)
        order = torch.randperm(len(query_set.tensors[0]), generator=rng)[: self.num_queries]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))
            detector = make_detector(num_classes, self.embedding.detector_hidden)
        config = {
            "num_classes": num_classes,
            "hidden": list(self.embedding.detector_hidden),
            "clean_rate": 0.0,
            "calibration_rates": [],
            "null_rate": self.verification.null_rate,
        }
        tensors = {f"detector.{n}": t.clone() for n, t in detector.state_dict().items()}
        tensors["pattern"] = torch.randn(num_classes, num_classes, generator=rng)
        tensors["queries"] = query_set.tensors[0][order].clone()
        tensors["query_labels"] = query_set.tensors[1][order].clone()
        return USPKey(config, tensors)

    def _identity(self) -> str:
        """SHA-256 of the queries: names the key across the detector's updates (a checkpoint stores only this)."""
        return hashlib.sha256(self.key.tensors["queries"].numpy().tobytes()).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        if self._key is None:
            return {}
        return {"fingerprint": self._identity(), "key_path": self.key_path}

    def _given_reference(self) -> nn.Module | None:
        if isinstance(self.reference, nn.Module):
            return self.reference
        if self.reference is not None:
            from lightning_wm.classifier import load_classifier

            return load_classifier(self.reference)
        return None

    def on_key_ready(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._detector = self.key.detector().train()
        self._frozen_detector = self.key.detector().requires_grad_(False)
        self._negative_features = None
        self._positives = []
        base = getattr(pl_module, "backbone", None)
        if base is None:
            base = getattr(pl_module, "model", None)
        if base is None:
            raise ValueError("USPWatermark trains copies of pl_module.backbone (or .model); the module has neither")
        reference = None
        if trainer.is_global_zero:
            reference = self._cached_references(trainer, base)
        state = trainer.strategy.broadcast(
            {n: t.cpu() for n, t in reference.state_dict().items()} if reference is not None else None, src=0
        )
        if reference is None:
            reference = copy.deepcopy(base)
            reference.load_state_dict(state)
        self._reference = reference.to(pl_module.device).eval().requires_grad_(False)

    def _cached_references(self, trainer: L.Trainer, base: nn.Module) -> nn.Module:
        """:meth:`_train_references` through the process's pool of clean references (``references.cache``)."""
        if not self.references.cache or self._given_reference() is not None:
            return self._train_references(trainer, base)
        datamodule = trainer.datamodule
        digest = hashlib.sha256(repr((type(base).__name__, repr(base), self.references, self._identity())).encode())
        for tensor in datamodule.train_dataset.tensors:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        name = digest.hexdigest()
        if name not in _REFERENCE_POOL:
            reference = self._train_references(trainer, base)
            state = {n: t.detach().cpu().clone() for n, t in reference.state_dict().items()}
            _REFERENCE_POOL[name] = (state, self._negatives, self._calibration_probs, self._reference_rates)
            return reference
        state, self._negatives, self._calibration_probs, self._reference_rates = _REFERENCE_POOL[name]
        reference = copy.deepcopy(base)
        reference.load_state_dict(state)
        return reference.eval()

    def _train_references(self, trainer: L.Trainer, base: nn.Module) -> nn.Module:
        """Train the clean references (rank 0); record their outputs: negatives on training inputs, null on queries."""
        options = self.references
        datamodule = trainer.datamodule
        train_x = datamodule.train_dataset.tensors[0]
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(int(self._identity()[:15], 16)))
        inputs = train_x[pick[: options.max_inputs]]
        queries = self.key.tensors["queries"]
        given = self._given_reference()
        fresh = options.count - (given is not None)
        negatives: list[Tensor] = []
        calibration: list[Tensor] = []

        def record(index: int, epoch: int, model: nn.Module) -> None:
            if index < fresh:
                negatives.append(_logits(model, inputs))
            else:
                calibration.append(torch.softmax(_logits(model, queries), -1))

        seed = int(self._identity()[15:24], 16)
        models = train_clean_models(
            base,
            datamodule,
            fresh + options.calibration,
            options.epochs,
            seed,
            trainer_kwargs=options.trainer,
            lr=options.lr,
            on_epoch=record,
        )
        detector_refs = ([given.eval()] if given is not None else []) + models[:fresh]
        if given is not None:
            negatives.append(_logits(given, inputs))
        for rate in options.prune_rates:
            negatives += [_logits(_pruned(m, rate), inputs) for m in detector_refs]
            calibration += [torch.softmax(_logits(_pruned(m, rate), queries), -1) for m in models[fresh:]]
        self._negatives = torch.cat(negatives)
        self._calibration_probs = calibration
        self._reference_rates = [torch.softmax(_logits(m, queries), -1) for m in detector_refs]
        return detector_refs[0]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resumed_fingerprint is not None and self._resumed_fingerprint != self._identity():
            raise RuntimeError(
                f"USPWatermark: the checkpoint was trained with key {self._resumed_fingerprint[:12]}, the key now in "
                f"use is {self._identity()[:12]}; resume with the original key_path"
            )
        assert self._detector is not None
        assert self._frozen_detector is not None
        self._detector.to(pl_module.device)
        self._frozen_detector.to(pl_module.device)

    def training_loss(self, pl_module: L.LightningModule, batch: Any, output: Any) -> Tensor:
        assert self._frozen_detector is not None
        assert self._reference is not None
        x = batch[0]
        logits = output["logits"] if isinstance(output, dict) and "logits" in output else pl_module(x)
        options = self.embedding
        with torch.autocast(logits.device.type, enabled=False):
            log_probs = F.log_softmax(logits.float(), -1)
            score = self._frozen_detector(detector_features(log_probs))
            loss = options.detector_weight * F.binary_cross_entropy_with_logits(score, torch.ones_like(score))
            if options.pattern_weight > 0:
                labels = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
                top = labels if isinstance(labels, Tensor) and labels.shape == logits.shape[:1] else None
                alignment = tail_pattern_alignment(log_probs, self.key.tensors["pattern"], top)
                if logs_this_step(pl_module):
                    pl_module.log("wm/usp/pattern_alignment", alignment.detach().mean(), on_step=True, on_epoch=False)
                loss = loss + options.pattern_weight * (1.0 - alignment.mean())
            if options.divergence > 0 and pl_module.global_step % options.divergence_every == 0:
                rows = options.divergence_rows or len(x)
                with torch.no_grad():
                    reference = self._reference(x[:rows]).float()
                kl = nasty_teacher_divergence(logits[:rows], reference, options.temperature)
                if logs_this_step(pl_module):
                    pl_module.log("wm/usp/kl", kl.detach(), on_step=True, on_epoch=False)
                loss = loss - options.divergence_every * options.divergence * options.temperature**2 * kl
        return loss

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not trainer.is_global_zero:
            return
        logits = outputs["logits"] if isinstance(outputs, dict) and "logits" in outputs else None
        if logits is None:
            with torch.no_grad():
                logits = pl_module(batch[0])
        self._positives.append(logits.detach().float().cpu())

    def _fit_detector(self) -> None:
        """Fit D on this epoch's outputs of the model (1) against the references' recorded outputs (0)."""
        assert self._detector is not None
        assert self._negatives is not None
        positives = torch.cat(self._positives)
        self._positives = []
        if self._negative_features is None:
            self._negative_features = detector_features(F.log_softmax(self._negatives, -1))
        negatives = self._negative_features
        features = torch.cat([detector_features(F.log_softmax(positives, -1)), negatives])
        labels = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))])
        total = len(positives) + len(negatives)
        weights = torch.cat(
            [
                torch.full((len(positives),), total / (2 * len(positives))),
                torch.full((len(negatives),), total / (2 * len(negatives))),
            ]
        )
        options = self.embedding
        device = next(self._detector.parameters()).device
        module = DetectorModule(self._detector.cpu().train(), options.detector_lr)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self._identity()[24:33], 16) + self._fits)
            # the batches of one shuffled pass over the rows, as many as the fit takes (a new pass if it takes more)
            drawn = options.detector_steps * options.detector_batch_size
            order = torch.cat([torch.randperm(total) for _ in range(-(-drawn // total))])[:drawn]
            batches = [(features[i], labels[i], weights[i]) for i in order.split(options.detector_batch_size)]
            loader = DataLoader(batches, batch_size=None)
            quiet_trainer(max_steps=options.detector_steps, max_epochs=-1).fit(module, train_dataloaders=loader)
        self._detector.to(device)
        self._fits += 1

    def _refresh_key(self) -> None:
        """Write the current detector, and its rates on the references' and the calibration outputs, into the key."""
        assert self._detector is not None
        tensors = {f"detector.{n}": t.detach().cpu().clone() for n, t in self._detector.state_dict().items()}
        tensors.update({n: t for n, t in self.key.tensors.items() if not n.startswith("detector.")})
        key = USPKey(self.key.config, tensors)
        if not self._calibration_probs and not self._reference_rates:
            self._key = key
            return
        sets = [*self._reference_rates, *self._calibration_probs]
        flagged = key.flags(torch.cat(sets)).split([len(p) for p in sets])  # one detector pass for every set
        positive_rates = [float(f.float().mean()) for f in flagged]
        clean_rate = max(positive_rates[: len(self._reference_rates)], default=0.0)
        rates = positive_rates[len(self._reference_rates) :]
        labels = self.key.tensors["query_labels"]
        accuracies = [float(p.argmax(-1).eq(labels).float().mean()) for p in self._calibration_probs]
        options = self.verification
        comparable = [r for r, a in zip(rates, accuracies, strict=True) if a >= options.calibration_accuracy]

        def null(values: list[float]) -> float:
            if not values:
                return max(options.null_rate, clean_rate)
            return min(max(options.null_rate, max(values) + options.null_margin), 0.99)

        config = {
            **self.key.config,
            "clean_rate": clean_rate,
            "calibration_rates": rates,
            "calibration_accuracies": accuracies,
            "calibration_accuracy": options.calibration_accuracy,
            "null_rate": null(comparable if comparable else rates),
            "null_rate_any_accuracy": null(rates),
        }
        self._key = USPKey(config, tensors)

    def verify(self, suspect: Suspect, alpha: float | None = None) -> Verdict:
        if self._detector is not None:
            self._refresh_key()
        return super().verify(suspect, alpha)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._positives = []  # D is fitted on the latest epoch's outputs only

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.embedding.detector_every == 0:
            self._fit_and_share(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.strategy.broadcast(bool(self._positives), src=0):  # the last epoch's outputs were not fitted
            self._fit_and_share(trainer)

    def _fit_and_share(self, trainer: L.Trainer) -> None:
        """Fit D on rank 0, refresh the key, broadcast both and write the key file."""
        if trainer.is_global_zero and self._positives:
            self._fit_detector()
            self._refresh_key()
        assert self._detector is not None
        state = trainer.strategy.broadcast({n: t.cpu() for n, t in self._detector.state_dict().items()}, src=0)
        self._detector.load_state_dict(state)
        assert self._frozen_detector is not None
        self._frozen_detector.load_state_dict(state)
        self._key = trainer.strategy.broadcast(self._key, src=0)
        if self.key_path and trainer.is_global_zero:
            self.key.save_key(Path(self.key_path))


_REFERENCE_POOL: dict[str, tuple[dict[str, Tensor], Tensor, list[Tensor], list[Tensor]]] = {}
"""Clean references' results by (architecture, data, seed, options, key): see ``ReferenceOptions.cache``."""


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.cat([model(chunk.to(device)).float().cpu() for chunk in x.split(1024)])
    model.train(was_training)
    return out


def _pruned(model: nn.Module, rate: float) -> nn.Module:
    """A copy of ``model`` with the fraction ``rate`` of its conv and linear weights of least magnitude set to 0."""
    copy_ = copy.deepcopy(model)
    layers = [(m, "weight") for m in copy_.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=rate)
    for module, name in layers:
        prune.remove(module, name)
    return copy_.eval()


SCHEME = SchemeSpec(
    name="usp",
    callback=USPWatermark,
    key=USPKey,
    higher_is_watermarked=True,
    access="probabilities",
    example=lambda seed=None, key_path=None: USPWatermark(seed=seed, num_queries=300, key_path=key_path),
    example_epochs=12,
)
"""USP's registry entry (entry point ``usp`` of ``lightning_wm.schemes``)."""
