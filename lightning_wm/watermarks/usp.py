"""USP: Unified Soft-label Perturbation (Chien & Shen, arXiv 2208.05477, 2022).

The paper's body is unavailable (papers.md §4.2). Its abstract says USP has "a detector paired with the model to
be watermarked"; the only re-implementation found (papers.md §4.3) builds it on Nasty Teacher (Ma et al., ICLR
2021, papers.md §5.4). This module follows papers.md §4.4:

* the model f_θ is trained with CE − ω·τ²·KL(σ(f_θ/τ) ‖ σ(f_A/τ)) + λ·(−log D(f_θ)): the Nasty-Teacher term
  pushes its soft labels away from a clean reference f_A, the detector term makes them carry one signature;
* a small detector D learns to tell f_θ's output distributions (label 1) from f_A's (label 0).

D is part of the owner's key: its weights are written to the key file, never to the model checkpoint. A student
distilled from f_θ's soft labels inherits the signature, so D flags its outputs; verification compares D's
positive rate on the suspect's outputs with a clean rate (binomial test).

Deviations (labelled, the paper's details being unknown): D reads the per-row standardised log-probabilities,
which equal the standardised logits, so its decision does not depend on the softmax temperature a suspect or a
student uses; the detector loss is back-propagated into f_θ (the re-implementation detaches it).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_wm.models.reinit import reinitialised_copy
from lightning_wm.verify.blackbox import Suspect, check_outputs, query_probs
from lightning_wm.verify.keys import WatermarkKey
from lightning_wm.verify.stats import binomial_p_value, binomial_threshold
from lightning_wm.verify.verdict import Verdict
from lightning_wm.watermarks.base import WatermarkScheme

_LOG_FLOOR = math.log(1e-12)


def detector_features(log_probs: Tensor) -> Tensor:
    """What the detector reads: log-probabilities floored at log 1e-12 and standardised over the classes.

    Standardising removes the additive log-normaliser and the temperature (log_softmax(z/T) standardised is z
    standardised), so outputs served at any temperature, and students distilled at any temperature, look alike.
    """
    lp = log_probs.float().clamp_min(_LOG_FLOOR)
    lp = lp - lp.mean(dim=-1, keepdim=True)
    return lp / lp.std(dim=-1, keepdim=True).clamp_min(1e-6)


def make_detector(num_classes: int, hidden: Sequence[int]) -> nn.Sequential:
    """The detector D: an MLP from the K standardised log-probabilities to one logit (positive: watermarked)."""
    layers: list[nn.Module] = []
    width = num_classes
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class USPKey(WatermarkKey):
    """The detector's weights, the verification queries and the clean rate.

    Tensors: ``detector.<name>`` (the detector's state dict), ``queries`` (N, *input_shape). Config:
    ``num_classes``, ``hidden``, ``clean_rate`` (the detector's positive rate on the clean reference's outputs
    on the queries, measured when training ended) and ``null_rate`` (the rate the binomial null assumes:
    the larger of ``clean_rate`` and the scheme's ``null_rate`` floor, since the reference was one of the
    detector's training negatives and other clean models may score a little higher).
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

    def verify(self, suspect: Suspect, alpha: float = 0.01, inputs: Tensor | None = None) -> Verdict:
        """Query ``suspect`` and test whether the detector flags its outputs more often than clean ones."""
        x = self.tensors["queries"] if inputs is None else inputs
        probs, queries = query_probs(suspect, x)
        check_outputs(probs, int(self.config["num_classes"]), "USP")
        flagged = self.flags(probs)
        hits, total = int(flagged.sum()), len(flagged)
        null_rate = float(self.config["null_rate"])
        p_value = binomial_p_value(hits, total, null_rate)
        return Verdict(
            scheme=self.scheme,
            statistic=hits / total,
            statistic_name="detector_rate",
            p_value=p_value,
            alpha=alpha,
            threshold=binomial_threshold(total, null_rate, alpha) / total,
            is_watermarked=p_value < alpha,
            queries=queries,
            null=f"a clean model's outputs are flagged with probability {null_rate:.3g} (binomial)",
            details={"flagged": hits, "clean_rate": float(self.config["clean_rate"]), "null_rate": null_rate},
        )


class USPWatermark(WatermarkScheme):
    """Unified Soft-label Perturbation (Chien & Shen 2022) with a paired detector (module docstring).

    The loss term (added by :class:`~lightning_wm.mixin.WatermarkMixin`, inside the step, so DDP and AMP see
    it) is ``−ω·τ²·KL(σ(z_θ/τ) ‖ σ(z_A/τ)) + λ·BCE(D(z_θ), 1)`` with D's parameters detached.

    The detector (and an on-the-fly reference) are trained by this callback in ``on_train_batch_end`` on
    *detached* outputs, each with its own Adam optimizer, outside the LightningModule's graph: a ``backward()``
    that touches no DDP-wrapped parameter does not disturb DDP's reducer, and their gradients are averaged over
    ranks with ``trainer.strategy.reduce`` so every rank keeps the same detector. Why not a second optimizer of the
    module: the detector is a secret of the key, it must not enter the model's checkpoint or its parameters.

    Args:
        reference: the clean reference f_A: a checkpoint of a clean ``ImageClassifier``, a module, or None to
            train one on the fly (a re-initialised copy of the model's backbone, trained with CE on the same
            batches by this callback; on resume it starts again from scratch).
        divergence: ω, weight of the Nasty-Teacher term (0.04 in Nasty Teacher's CIFAR-10 setting).
        temperature: τ of the Nasty-Teacher term.
        detector_weight: λ, weight of the detector term.
        detector_hidden: hidden widths of the detector MLP.
        detector_lr: Adam learning rate of the detector (and of an on-the-fly reference).
        null_rate: floor of the clean positive rate the binomial null assumes. The reference is one of the
            detector's training negatives, so its own rate (~0) understates other clean models': measured rates
            of independently trained clean models and of students of clean teachers were up to 0.15 (digits and
            Fashion-MNIST), hence 0.25; students of the marked model score ~1.0.
        feature_noise: standard deviation of Gaussian noise added to the detector's (standardised) inputs while
            it trains (0: none; measured on digits, 0.3 made clean models' rates higher, not lower).
        num_queries: verification queries kept in the key.
        query_split: the DataModule split the queries come from.
        key_path, seed, alpha: see :class:`~lightning_wm.watermarks.base.WatermarkScheme`.
    """

    name = "usp"

    def __init__(
        self,
        reference: str | nn.Module | None = None,
        divergence: float = 0.0005,
        temperature: float = 4.0,
        detector_weight: float = 0.1,
        detector_hidden: Sequence[int] = (64, 64),
        detector_lr: float = 1e-3,
        null_rate: float = 0.25,
        feature_noise: float = 0.0,
        num_queries: int = 1000,
        query_split: str = "defender",
        key_path: str | None = None,
        seed: int | None = None,
        alpha: float = 0.01,
    ) -> None:
        super().__init__(key_path=key_path, seed=seed, alpha=alpha)
        if not 0.0 <= null_rate < 1.0:
            raise ValueError(f"null_rate must be in [0, 1), got {null_rate}")
        self.reference = reference
        self.divergence = divergence
        self.temperature = temperature
        self.detector_weight = detector_weight
        self.detector_hidden = list(detector_hidden)
        self.detector_lr = detector_lr
        self.null_rate = null_rate
        self.feature_noise = feature_noise
        self.num_queries = num_queries
        self.query_split = query_split
        self._reference: nn.Module | None = None
        self._train_reference = False
        self._detector: nn.Sequential | None = None
        self._optimizers: dict[str, torch.optim.Optimizer] = {}

    @property
    def key(self) -> USPKey:
        return super().key  # type: ignore[return-value]

    def make_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> USPKey:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "dataset"):
            raise ValueError("USPWatermark needs a lightning_wm SplitDataModule (its data gives the queries)")
        num_classes = int(getattr(datamodule, "num_classes", getattr(pl_module, "num_classes", 10)))
        generator = torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        query_x = datamodule.dataset(self.query_split).tensors[0]
        order = torch.randperm(len(query_x), generator=generator)[: self.num_queries]
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            detector = make_detector(num_classes, self.detector_hidden)
        config = {
            "num_classes": num_classes,
            "hidden": self.detector_hidden,
            "clean_rate": 0.0,
            "null_rate": self.null_rate,
        }
        tensors = {f"detector.{n}": t.clone() for n, t in detector.state_dict().items()}
        tensors["queries"] = query_x[order].clone()
        return USPKey(config, tensors)

    def on_key_ready(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._detector = self.key.detector().train()
        if self.reference is None:
            base = getattr(pl_module, "backbone", None)
            if base is None:
                base = getattr(pl_module, "model", None)
            if base is None:
                raise ValueError("reference=None trains a copy of pl_module.backbone (or .model); give a reference")
            self._reference = reinitialised_copy(base)
            self._train_reference = True
        elif isinstance(self.reference, nn.Module):
            self._reference = self.reference
        else:
            from lightning_wm.classifier import load_classifier

            self._reference = load_classifier(self.reference)
        self._reference.requires_grad_(self._train_reference)
        self._reference.eval()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resumed_fingerprint is not None and self._resumed_fingerprint != self._identity():
            raise RuntimeError(
                f"USPWatermark: the checkpoint was trained with key {self._resumed_fingerprint[:12]}, the key now in "
                f"use is {self._identity()[:12]}; resume with the original key_path"
            )
        assert self._detector is not None
        assert self._reference is not None
        self._detector.to(pl_module.device)
        self._reference.to(pl_module.device)
        self._optimizers = {"detector": torch.optim.Adam(self._detector.parameters(), lr=self.detector_lr)}
        if self._train_reference:
            self._optimizers["reference"] = torch.optim.Adam(self._reference.parameters(), lr=self.detector_lr)

    def _identity(self) -> str:
        """SHA-256 of the queries: names the key across the detector's updates (a checkpoint stores only this)."""
        return hashlib.sha256(self.key.tensors["queries"].numpy().tobytes()).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        if self._key is None:
            return {}
        return {"fingerprint": self._identity(), "key_path": self.key_path}

    def _reference_logits(self, x: Tensor) -> Tensor:
        assert self._reference is not None
        was_training = self._reference.training
        self._reference.eval()
        with torch.no_grad():
            out = self._reference(x)
        self._reference.train(was_training)
        return out.float()

    def training_loss(self, pl_module: L.LightningModule, batch: Any, output: Any) -> Tensor:
        assert self._detector is not None
        x = batch[0]
        logits = output["logits"] if isinstance(output, dict) and "logits" in output else pl_module(x)
        reference = self._reference_logits(x)
        tau = self.temperature
        with torch.autocast(logits.device.type, enabled=False):
            log_p = F.log_softmax(logits.float() / tau, dim=-1)
            kl = (log_p.exp() * (log_p - F.log_softmax(reference / tau, dim=-1))).sum(-1).mean()
            params = {n: p.detach() for n, p in self._detector.named_parameters()}
            score = functional_call(self._detector, params, (detector_features(F.log_softmax(logits.float(), -1)),))
            detect = F.binary_cross_entropy_with_logits(score, torch.ones_like(score))
        pl_module.log("wm/usp/kl", kl.detach(), on_step=True, on_epoch=False)
        return -self.divergence * tau**2 * kl + self.detector_weight * detect

    def _step(self, trainer: L.Trainer, name: str, module: nn.Module, loss: Tensor) -> None:
        optimizer = self._optimizers[name]
        optimizer.zero_grad()
        loss.backward()
        params = [p for p in module.parameters() if p.grad is not None]
        grads = torch.nn.utils.parameters_to_vector([p.grad for p in params])
        grads = trainer.strategy.reduce(grads, reduce_op="mean")
        torch.nn.utils.vector_to_parameters(grads, [p.grad for p in params])
        optimizer.step()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self._detector is not None
        assert self._reference is not None
        x, y = batch[0], batch[1]
        logits = outputs["logits"].detach().float() if isinstance(outputs, dict) and "logits" in outputs else None
        if logits is None:
            with torch.no_grad():
                logits = pl_module(x).float()
        with torch.enable_grad():
            if self._train_reference:
                self._reference.train()
                self._step(trainer, "reference", self._reference, F.cross_entropy(self._reference(x), y))
            negatives = self._reference_logits(x)
            features = detector_features(F.log_softmax(torch.cat([logits, negatives]), dim=-1))
            if self.feature_noise > 0:
                features = features + self.feature_noise * torch.randn_like(features)
            labels = torch.cat([torch.ones(len(logits)), torch.zeros(len(negatives))]).to(features)
            self._detector.train()
            loss = F.binary_cross_entropy_with_logits(self._detector(features).squeeze(-1), labels)
            self._step(trainer, "detector", self._detector, loss)
        pl_module.log("wm/usp/detector_loss", loss.detach(), on_step=True, on_epoch=False)

    def _refresh_key(self) -> None:
        """Write the current detector, and its rate on the reference's outputs, into the key."""
        assert self._detector is not None
        assert self._reference is not None
        queries = self.key.tensors["queries"]
        device = next(self._detector.parameters()).device
        with torch.no_grad():
            reference_probs = torch.cat(
                [torch.softmax(self._reference_logits(q.to(device)), -1).cpu() for q in queries.split(512)]
            )
        tensors = {f"detector.{n}": t.detach().cpu().clone() for n, t in self._detector.state_dict().items()}
        tensors["queries"] = queries
        key = USPKey(self.key.config, tensors)
        clean_rate = float(key.flags(reference_probs).float().mean())
        config = {**self.key.config, "clean_rate": clean_rate, "null_rate": max(clean_rate, self.null_rate)}
        self._key = USPKey(config, tensors)

    def verify(self, suspect: Suspect, alpha: float | None = None) -> Verdict:
        if self._detector is not None:
            self._refresh_key()
        return super().verify(suspect, alpha)

    def _save(self, trainer: L.Trainer) -> None:
        self._refresh_key()
        if self.key_path and trainer.is_global_zero:
            self.key.save_key(Path(self.key_path))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)
