"""USP: Unified Soft-label Perturbation (Chien & Shen, arXiv 2208.05477, 2022).

The paper's body is unavailable (papers.md §4.2). Its abstract says USP has "a detector paired with the model to
be watermarked"; the only re-implementation found (papers.md §4.3) builds it on Nasty Teacher (Ma et al., ICLR
2021, papers.md §5.4). This module follows papers.md §4.4:

* the model f_θ is trained with CE − ω·τ²·KL(σ(f_θ/τ) ‖ σ(f_A/τ)) + λ·(−log D(f_θ)): the Nasty-Teacher term
  pushes its soft labels away from a clean reference f_A, the detector term makes them carry one signature;
* a small detector D learns to tell f_θ's output distributions (label 1) from clean references' (label 0).

D is part of the owner's key: its weights are written to the key file, never to the model checkpoint. A student
distilled from f_θ's soft labels inherits the signature, so D flags its outputs; verification compares D's
positive rate on the suspect's outputs with a clean rate (binomial test) measured on held-out clean models.

Deviations (labelled, the paper's details being unknown): D reads the per-row standardised log-probabilities,
which equal the standardised logits, so its decision does not depend on the softmax temperature a suspect or a
student uses; the detector loss is back-propagated into f_θ (the re-implementation detaches it); D learns
against several clean references (and replayed earlier outputs of them), not one, and the clean rate of the test
is calibrated on held-out clean references (``USPWatermark``'s docstring says why).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_wm.models.reinit import reinitialised_copy
from lightning_wm.registry import SchemeSpec
from lightning_wm.verify.blackbox import Suspect, check_outputs, query_probs
from lightning_wm.verify.keys import WatermarkKey
from lightning_wm.verify.stats import binomial_log10_p_value, binomial_threshold
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
    """The detector's weights, the verification queries and the empirical null of clean models.

    Tensors: ``detector.<name>`` (the detector's state dict), ``queries`` (N, *input_shape). Config:
    ``num_classes``, ``hidden``, ``clean_rate`` (the detector's largest positive rate on the outputs of the clean
    references it was trained against), ``calibration_rates`` (its positive rates on the outputs of held-out clean
    references, trained like the others but never shown to the detector, at the end of every training epoch:
    an empirical null of independently trained clean models, early and late in their training) and
    ``null_rate``, the rate the binomial null assumes: the largest calibration rate plus the scheme's
    ``null_margin``, and at least its ``null_rate`` floor. A key without calibration rates (written before they
    existed) keeps its ``null_rate``.
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
        """The clean rate the binomial null assumes for a suspect of this accuracy on the queries.

        Suspects at least as accurate as ``calibration_accuracy`` are tested against the calibration snapshots
        that were; a less accurate suspect (or one whose accuracy is unknown) against every snapshot, barely
        trained ones included, which the detector may flag more often.
        """
        floor = float(self.config.get("calibration_accuracy", 0.0))
        if query_accuracy is not None and query_accuracy >= floor:
            return float(self.config["null_rate"])
        return float(self.config.get("null_rate_any_accuracy", self.config["null_rate"]))

    def verify(self, suspect: Suspect, alpha: float = 0.01, inputs: Tensor | None = None) -> Verdict:
        """Query ``suspect`` and test whether the detector flags its outputs more often than clean ones."""
        x = self.tensors["queries"] if inputs is None else inputs
        probs, queries = query_probs(suspect, x)
        check_outputs(probs, int(self.config["num_classes"]), "USP")
        flagged = self.flags(probs)
        hits, total = int(flagged.sum()), len(flagged)
        accuracy = None
        if inputs is None and "query_labels" in self.tensors:
            accuracy = float(probs.argmax(-1).eq(self.tensors["query_labels"]).float().mean())
        null_rate = self.null_rate(accuracy)
        return Verdict.decide(
            scheme=self.scheme,
            statistic=hits / total,
            statistic_name="detector_rate",
            log10_p=binomial_log10_p_value(hits, total, null_rate),
            alpha=alpha,
            threshold=binomial_threshold(total, null_rate, alpha) / total,
            queries=queries,
            null=f"a clean model's outputs are flagged with probability {null_rate:.3g} (binomial; the largest "
            "rate of held-out clean references of comparable accuracy plus a margin)",
            details={
                "flagged": hits,
                "query_accuracy": accuracy,
                "clean_rate": float(self.config["clean_rate"]),
                "calibration_max": max(self.config.get("calibration_rates") or [float("nan")]),
                "null_rate": null_rate,
            },
        )


class USPWatermark(WatermarkScheme):
    """Unified Soft-label Perturbation (Chien & Shen 2022) with a paired detector (module docstring).

    The loss term (added by :class:`~lightning_wm.mixin.WatermarkMixin`, inside the step, so DDP and AMP see
    it) is ``−ω·τ²·KL(σ(z_θ/τ) ‖ σ(z_A/τ)) + λ·BCE(D(z_θ), 1)`` with D's parameters detached and z_A the first
    reference's logits.

    The detector (and the on-the-fly references) are trained by this callback in ``on_train_batch_end`` on
    *detached* outputs, each with its own Adam optimizer, outside the LightningModule's graph: a ``backward()``
    that touches no DDP-wrapped parameter does not disturb DDP's reducer, and their gradients are averaged over
    ranks with ``trainer.strategy.reduce`` so every rank keeps the same detector. Why not a second optimizer of the
    module: the detector is a secret of the key, it must not enter the model's checkpoint or its parameters.

    Why several references and a calibrated null (deviation, labelled): a detector trained against one clean
    reference learns whatever tells the marked model from *that* model (which is itself still training), so other
    clean models were flagged at rates 0.4-0.6 against an assumed 0.25, and 2 of 10 independently trained digits
    models were declared at alpha 0.01. The detector now learns against ``references`` clean models (different
    initialisations) and the key's null comes from ``calibration_references`` more, trained the same way on the
    same batches but never shown to the detector: their rates on the queries at the end of every epoch (under the
    final detector) are stored in the key, and a suspect's rate is tested (binomial) against the largest of them
    plus ``null_margin``.

    Args:
        reference: the first clean reference f_A: a checkpoint of a clean ``ImageClassifier``, a module, or None to
            train it on the fly (a re-initialised copy of the model's backbone, trained with CE on the same
            batches by this callback; on resume the on-the-fly models start again from scratch).
        references: how many clean references the detector learns to reject (the given ``reference``, if any,
            counts as one; the others are trained on the fly).
        calibration_references: held-out clean references trained on the fly whose detector rates make the
            key's null (0: the null is the ``null_rate`` floor alone).
        divergence: ω, weight of the Nasty-Teacher term (0.04 in Nasty Teacher's CIFAR-10 setting).
        temperature: τ of the Nasty-Teacher term.
        detector_weight: λ, weight of the detector term.
        detector_hidden: hidden widths of the detector MLP.
        detector_lr: Adam learning rate of the detector (and of the on-the-fly references).
        null_rate: floor of the clean positive rate the binomial null assumes.
        null_margin: added to the largest calibration rate: independently trained clean models (other seeds,
            data orders, widths, numbers of epochs) vary more than the held-out references, which share the
            marked model's batches (measured on digits: a 3-epoch clean model at 0.23 where the calibration
            snapshots of its accuracy reached 0.08, hence 0.25).
        calibration_accuracy: calibration snapshots less accurate than this on the queries (barely trained
            models, which the detector may flag at any rate) only enter the null of suspects that are too.
        feature_noise: standard deviation of Gaussian noise added to the detector's (standardised) inputs while
            it trains (0: none; measured on digits, 0.3 made clean models' rates higher, not lower).
        num_queries: verification queries kept in the key.
        query_split: the DataModule split the queries come from.
        key_path, seed, alpha, name: see :class:`~lightning_wm.watermarks.base.WatermarkScheme`.
    """

    key_scheme = "usp"

    def __init__(
        self,
        reference: str | nn.Module | None = None,
        references: int = 3,
        calibration_references: int = 2,
        divergence: float = 0.0005,
        temperature: float = 4.0,
        detector_weight: float = 0.5,
        detector_hidden: Sequence[int] = (64, 64),
        detector_lr: float = 1e-3,
        null_rate: float = 0.05,
        null_margin: float = 0.25,
        calibration_accuracy: float = 0.5,
        feature_noise: float = 0.0,
        snapshot_negatives: bool = True,
        num_queries: int = 1000,
        query_split: str = "defender",
        key_path: str | None = None,
        seed: int | None = None,
        alpha: float = 0.01,
        name: str | None = None,
    ) -> None:
        super().__init__(key_path=key_path, seed=seed, alpha=alpha, name=name)
        if not 0.0 <= null_rate < 1.0:
            raise ValueError(f"null_rate must be in [0, 1), got {null_rate}")
        if not 0.0 <= null_margin < 1.0:
            raise ValueError(f"null_margin must be in [0, 1), got {null_margin}")
        if references < 1 or calibration_references < 0:
            raise ValueError(
                f"USPWatermark needs references >= 1 and calibration_references >= 0, got {references} and "
                f"{calibration_references}"
            )
        self.reference = reference
        self.references = references
        self.calibration_references = calibration_references
        self.divergence = divergence
        self.temperature = temperature
        self.detector_weight = detector_weight
        self.detector_hidden = list(detector_hidden)
        self.detector_lr = detector_lr
        self.null_rate = null_rate
        self.null_margin = null_margin
        self.calibration_accuracy = calibration_accuracy
        self.feature_noise = feature_noise
        self.snapshot_negatives = snapshot_negatives
        self.num_queries = num_queries
        self.query_split = query_split
        self._references: list[nn.Module] = []
        self._trained: list[bool] = []
        self._calibration: list[nn.Module] = []
        self._calibration_probs: list[Tensor] = []
        self._snapshots: list[Tensor] = []
        self._past: Tensor | None = None
        self._detector: nn.Sequential | None = None
        self._optimizers: dict[str, torch.optim.Optimizer] = {}

    @property
    def key(self) -> USPKey:
        return super().key  # type: ignore[return-value]

    def make_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> USPKey:
        datamodule = self.split_datamodule(trainer, "its data gives the queries")
        num_classes = int(getattr(datamodule, "num_classes", getattr(pl_module, "num_classes", 10)))
        rng = self.key_rng()
        query_x = datamodule.dataset(self.query_split).tensors[0]
        order = torch.randperm(len(query_x), generator=rng)[: self.num_queries]
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))
            detector = make_detector(num_classes, self.detector_hidden)
        config = {
            "num_classes": num_classes,
            "hidden": self.detector_hidden,
            "clean_rate": 0.0,
            "calibration_rates": [],
            "null_rate": self.null_rate,
        }
        tensors = {f"detector.{n}": t.clone() for n, t in detector.state_dict().items()}
        tensors["queries"] = query_x[order].clone()
        tensors["query_labels"] = datamodule.dataset(self.query_split).tensors[1][order].clone()
        return USPKey(config, tensors)

    def _fresh_copies(self, pl_module: L.LightningModule, count: int, salt: int) -> list[nn.Module]:
        """``count`` re-initialised copies of the backbone, seeded from the key (the same on every DDP rank)."""
        base = getattr(pl_module, "backbone", None)
        if base is None:
            base = getattr(pl_module, "model", None)
        if base is None:
            raise ValueError("USPWatermark trains copies of pl_module.backbone (or .model); the module has neither")
        root = int(self._identity()[:15], 16)
        copies = []
        for i in range(count):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(root + 1000 * salt + i)
                copies.append(reinitialised_copy(base))
        return copies

    def on_key_ready(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._detector = self.key.detector().train()
        given: list[nn.Module] = []
        if isinstance(self.reference, nn.Module):
            given = [self.reference]
        elif self.reference is not None:
            from lightning_wm.classifier import load_classifier

            given = [load_classifier(self.reference)]
        for module in given:
            module.requires_grad_(False).eval()
        fresh = self._fresh_copies(pl_module, self.references - len(given), salt=1)
        self._references = [*given, *fresh]
        self._trained = [False] * len(given) + [True] * len(fresh)
        self._calibration = self._fresh_copies(pl_module, self.calibration_references, salt=2)
        self._calibration_probs = []
        self._snapshots = []
        self._past = None
        self._replay_generator = torch.Generator().manual_seed(int(self._identity()[15:30], 16))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resumed_fingerprint is not None and self._resumed_fingerprint != self._identity():
            raise RuntimeError(
                f"USPWatermark: the checkpoint was trained with key {self._resumed_fingerprint[:12]}, the key now in "
                f"use is {self._identity()[:12]}; resume with the original key_path"
            )
        assert self._detector is not None
        self._detector.to(pl_module.device)
        self._optimizers = {"detector": torch.optim.Adam(self._detector.parameters(), lr=self.detector_lr)}
        for i, module in enumerate(self._references):
            module.to(pl_module.device)
            if self._trained[i]:
                self._optimizers[f"reference{i}"] = torch.optim.Adam(module.parameters(), lr=self.detector_lr)
        for i, module in enumerate(self._calibration):
            module.to(pl_module.device)
            self._optimizers[f"calibration{i}"] = torch.optim.Adam(module.parameters(), lr=self.detector_lr)

    def _identity(self) -> str:
        """SHA-256 of the queries: names the key across the detector's updates (a checkpoint stores only this)."""
        return hashlib.sha256(self.key.tensors["queries"].numpy().tobytes()).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        if self._key is None:
            return {}
        return {"fingerprint": self._identity(), "key_path": self.key_path}

    @staticmethod
    def _logits(module: nn.Module, x: Tensor) -> Tensor:
        was_training = module.training
        module.eval()
        with torch.no_grad():
            out = module(x)
        module.train(was_training)
        return out.float()

    def _query_probs(self, module: nn.Module) -> Tensor:
        """``module``'s output distributions on the key's queries (on the CPU)."""
        device = next(module.parameters()).device
        queries = self.key.tensors["queries"]
        return torch.cat([torch.softmax(self._logits(module, q.to(device)), -1).cpu() for q in queries.split(512)])

    def training_loss(self, pl_module: L.LightningModule, batch: Any, output: Any) -> Tensor:
        assert self._detector is not None
        x = batch[0]
        logits = output["logits"] if isinstance(output, dict) and "logits" in output else pl_module(x)
        reference = self._logits(self._references[0], x)
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
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        assert self._detector is not None
        x, y = batch[0], batch[1]
        logits = outputs["logits"].detach().float() if isinstance(outputs, dict) and "logits" in outputs else None
        if logits is None:
            with torch.no_grad():
                logits = pl_module(x).float()
        with torch.enable_grad():
            clean = [(f"reference{i}", m) for i, m in enumerate(self._references) if self._trained[i]]
            clean += [(f"calibration{i}", m) for i, m in enumerate(self._calibration)]
            for name, module in clean:
                module.train()
                self._step(trainer, name, module, F.cross_entropy(module(x), y))
            negatives = [self._logits(m, x) for m in self._references]
            if self._past is not None:
                pick = torch.randint(0, len(self._past), (len(x),), generator=self._replay_generator)
                negatives.append(self._past[pick.to(self._past.device)])
            negatives = torch.cat(negatives)
            features = detector_features(F.log_softmax(torch.cat([logits, negatives]), dim=-1))
            if self.feature_noise > 0:
                features = features + self.feature_noise * torch.randn_like(features)
            # positives and negatives weigh the same in total, however many references there are
            weights = torch.cat([torch.full((len(logits),), len(negatives) / len(logits)), torch.ones(len(negatives))])
            labels = torch.cat([torch.ones(len(logits)), torch.zeros(len(negatives))]).to(features)
            self._detector.train()
            loss = F.binary_cross_entropy_with_logits(
                self._detector(features).squeeze(-1), labels, weight=weights.to(features)
            ) * (2 * len(logits) / (len(logits) + len(negatives)))
            self._step(trainer, "detector", self._detector, loss)
        pl_module.log("wm/usp/detector_loss", loss.detach(), on_step=True, on_epoch=False)

    def _refresh_key(self) -> None:
        """Write the current detector, and its rates on the references' and the calibration outputs, into the key."""
        assert self._detector is not None
        tensors = {f"detector.{n}": t.detach().cpu().clone() for n, t in self._detector.state_dict().items()}
        tensors.update({n: t for n, t in self.key.tensors.items() if not n.startswith("detector.")})
        key = USPKey(self.key.config, tensors)
        clean_rate = max(float(key.flags(self._query_probs(m)).float().mean()) for m in self._references)
        calibration = [float(key.flags(p).float().mean()) for p in self._calibration_probs]
        labels = self.key.tensors.get("query_labels")
        accuracies = [
            float(p.argmax(-1).eq(labels).float().mean()) if labels is not None else 1.0
            for p in self._calibration_probs
        ]
        comparable = [r for r, a in zip(calibration, accuracies, strict=True) if a >= self.calibration_accuracy]

        def null(rates: list[float]) -> float:
            if not rates:
                return max(self.null_rate, clean_rate)
            return min(max(self.null_rate, max(rates) + self.null_margin), 0.99)

        config = {
            **self.key.config,
            "clean_rate": clean_rate,
            "calibration_rates": calibration,
            "calibration_accuracies": accuracies,
            "calibration_accuracy": self.calibration_accuracy,
            "null_rate": null(comparable if comparable else calibration),
            "null_rate_any_accuracy": null(calibration),
        }
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
        # the held-out references' outputs now: under the final detector they stand for clean models at this stage
        self._calibration_probs += [self._query_probs(m) for m in self._calibration]
        trained = [m for i, m in enumerate(self._references) if self._trained[i]]
        if self.snapshot_negatives and trained:
            self._snapshots += [self._query_probs(m).clamp_min(1e-30).log() for m in trained]
            self._past = torch.cat(self._snapshots).to(pl_module.device)
        self._save(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)


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
