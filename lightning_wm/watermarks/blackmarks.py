"""Chen, Rouhani, Koushanfar: "BlackMarks: Blackbox Multibit Watermarking for Deep Neural Networks" (2019).

A multi-bit signature is carried by the model's top-1 labels. The owner splits the classes into two clusters by
k-means on the model's average output per class (the *encoding scheme*: a class decodes to bit 0 or 1); for each
signature bit a training image of the other cluster is moved by a targeted FGSM step toward a class of the bit's
cluster, and the model is fine-tuned to give each key image its target class (with the task's batches). The
suspect's answer on a key image decodes to the cluster of the class it gives; the bit error rate (BER) between the
decoded and the owner's signature is the statistic.

The paper compares the BER with a threshold from a binomial at 1/2, which no suspect-independent argument
supports: targeted adversarial examples transfer between models of one task, so a clean model decodes many key
bits right, and a model that favours one cluster decodes every bit of that value. Here, as for
:mod:`~lightning_wm.watermarks.frontier_stitching`, twice the signature's key images are made, and within each bit
value a uniformly random half (drawn from the key's secret) become the owner's signature; the others are null key
images, never trained on. For a suspect that never saw which half was embedded, owner and null key images of one
bit value are exchangeable, and the one-sided exact test of its correct bits on the owner's keys against the null
keys, stratified by bit value
(:func:`~lightning_wm.watermarks.frontier_stitching.stratified_fisher_log10_p_value`), is exact. Like frontier
samples, the key images follow the model's gradients when the key is made: the key is not derivable from its
secret, its verdicts say so, and it proves less than a derived key.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import Tensor

from lightning_wm.registry import SchemeSpec
from lightning_wm.verify.blackbox import Suspect, query_labels
from lightning_wm.verify.derive import DISPUTE_ALPHA
from lightning_wm.verify.stats import two_sample_queries_to_significance
from lightning_wm.verify.verdict import Verdict
from lightning_wm.watermarks.frontier_stitching import (
    FrontierStitchingKey,
    FrontierStitchingWatermark,
    _stratified_halves,
    strata_counts,
    stratified_fisher_log10_p_value,
    stratified_fisher_threshold,
)
from lightning_wm.watermarks.key_samples import KeySampleGenerator, KeySamples, training_tensors
from lightning_wm.watermarks.trigger_set import TriggerSetWatermark


def cluster_classes(mean_outputs: Tensor, seed: int) -> Tensor:
    """BlackMarks' encoding scheme: the bit (0 or 1) of each class, by 2-means on the classes' average outputs
    (``(K, K)``, one row per class); cluster 0 is the one holding class 0."""
    assignment = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(mean_outputs.double().numpy())
    bits = torch.as_tensor(assignment, dtype=torch.long)
    return bits if int(bits[0]) == 0 else 1 - bits


def mean_outputs_per_class(model: torch.nn.Module, inputs: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """The model's average logits over the training images of each class, ``(K, K)``."""
    param = next(model.parameters())
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    with torch.no_grad():
        for x, y in zip(inputs.split(512), labels.split(512), strict=True):
            logits = model(x.to(param.device, param.dtype)).double().cpu()[:, :num_classes]
            sums.index_add_(0, y.long(), logits)
            counts.index_add_(0, y.long(), torch.ones(len(y), dtype=torch.float64))
    return sums / counts.clamp_min(1)[:, None]


class BlackMarksTrigger(KeySampleGenerator):
    """BlackMarks' key images: training images of the cluster opposite to a bit, moved by one targeted FGSM step
    of ``epsilon`` (``x − ε · sign(∇x CE(f(x), t))`` in ``[0, 1]`` pixels) toward a class ``t`` of the bit's
    cluster, labelled ``t``. Made from a model (not from data alone), so not a generator a key can be rebuilt with.

    Args:
        epsilon: the targeted FGSM step on ``[0, 1]`` pixels (the SoK toolbox's default: 0.1).
    """

    label_kind: ClassVar[str] = "cluster_bit"
    name: ClassVar[str] = "blackmarks"

    def __init__(self, epsilon: float = 0.1) -> None:
        super().__init__(target_class=None)
        if not 0.0 < epsilon <= 1.0:
            raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
        self.epsilon = epsilon

    def memorised(self) -> bool:
        return True

    def null_keys(self) -> bool:
        return True

    def config(self) -> dict[str, Any]:
        return {"generator": type(self).__name__, "epsilon": self.epsilon}

    def generate(self, datamodule: L.LightningDataModule, count: int, rng: torch.Generator) -> KeySamples:
        raise TypeError("BlackMarks key images are made from a model: use BlackMarksTrigger.key_images(model, ...)")

    def key_images(
        self, model: torch.nn.Module, datamodule: Any, bits: Tensor, class_bits: Tensor, rng: torch.Generator
    ) -> KeySamples:
        """One key image per signature bit: a distinct training image whose class decodes to the other bit,
        moved toward a uniformly random class of the bit's cluster (its label)."""
        inputs, labels = training_tensors(datamodule)
        order = torch.randperm(len(labels), generator=rng)
        sources = []
        taken = torch.zeros(len(labels), dtype=torch.bool)
        for bit in bits.tolist():
            pool = order[(class_bits[labels[order].long()] != bit) & ~taken[order]]
            if len(pool) == 0:
                raise ValueError(f"BlackMarks needs {len(bits)} distinct source images, the training set has fewer")
            taken[pool[0]] = True
            sources.append(pool[0])
        chosen = torch.stack(sources)
        targets = torch.empty(len(bits), dtype=torch.long)
        for bit in (0, 1):
            members = (class_bits == bit).nonzero().flatten()
            where = (bits == bit).nonzero().flatten()
            targets[where] = members[torch.randint(0, len(members), (len(where),), generator=rng)]
        pixels = datamodule.denormalize(inputs[chosen].float()).clamp(0.0, 1.0)
        return KeySamples(self._targeted_fgsm(model, datamodule, pixels, targets), targets, {})

    def _targeted_fgsm(self, model: torch.nn.Module, datamodule: Any, pixels: Tensor, targets: Tensor) -> Tensor:
        param = next(model.parameters())
        was_training = model.training
        model.eval()
        try:
            moved = []
            for x, t in zip(pixels.split(256), targets.split(256), strict=True):
                x = x.to(param.device).requires_grad_(True)
                with torch.enable_grad():
                    logits = model(datamodule.normalize(x).to(param.dtype))
                    (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), t.to(param.device)), x)
                moved.append((x - self.epsilon * grad.sign()).clamp(0.0, 1.0).detach().cpu())
        finally:
            model.train(was_training)
        return torch.cat(moved)


class BlackMarksKey(FrontierStitchingKey):
    """The owner's key images (``embed_*``, also ``verify_*``) with their target classes and signature bits
    (``embed_bits``), as many null key images (``null_*``, ``null_bits``), the encoding scheme (``class_bits``)
    and clean probes.

    Verification: the bits decoded from the suspect's top-1 labels (the cluster of each answer) against the
    signature; p-value by the exact test, stratified by bit value, of its correct bits on the owner's key images
    against the null key images (exact when the two are exchangeable for the suspect: a random half of each bit
    value, which an innocent suspect cannot know). Not derivable from its secret.
    """

    scheme = "blackmarks"

    def decoded_bits(self, suspect: Suspect, split: str) -> tuple[Tensor, int]:
        """The bits the suspect's answers on ``split``'s key images decode to, and the queries spent."""
        predicted, queries = query_labels(suspect, self.tensors[f"{split}_inputs"])
        class_bits = self.tensors["class_bits"]
        known = predicted.cpu().clamp(0, len(class_bits) - 1)
        decoded = torch.where(predicted.cpu() < len(class_bits), class_bits[known], -1)
        return decoded, queries

    def strata(self, suspect: Suspect) -> tuple[list[tuple[int, int, int, int]], int]:
        """``(owner hits, owner bits, null hits, null bits)`` for bit value 0 and 1, and the queries."""
        correct, queries = {}, 0
        for split, bits in (("verify", "embed_bits"), ("null", "null_bits")):
            decoded, spent = self.decoded_bits(suspect, split)
            correct[split] = decoded == self.tensors[bits]
            queries += spent
        t = self.tensors
        return strata_counts(correct["verify"], t["embed_bits"], correct["null"], t["null_bits"], (0, 1)), queries

    def verify(self, suspect: Suspect, alpha: float = 0.01) -> Verdict:
        """Query the suspect (top-1 labels) on the owner's and the null key images and the probes; the statistic
        is the bit error rate of the decoded signature (lower means watermarked).

        Args:
            suspect: an ``nn.Module`` returning logits, or a callable returning probabilities or labels.
            alpha: significance level.
        """
        rows, queries = self.strata(suspect)
        hits, total = sum(r[0] for r in rows), sum(r[1] for r in rows)
        null_hits, null_total = sum(r[2] for r in rows), sum(r[3] for r in rows)
        accuracy, null_rate = hits / total, null_hits / null_total
        details: dict[str, Any] = {
            "bits": total,
            "bit_errors": total - hits,
            "null_bits": null_total,
            "null_bit_error_rate": 1.0 - null_rate,
            "strata": {f"bit_{bit}": list(row) for bit, row in enumerate(rows)},
            "generator": self.config["generator"],
            "epsilon": self.config["epsilon"],
            "verified_on": self.config.get("verified_on"),
            "queries_to_significance": two_sample_queries_to_significance(accuracy, null_rate, 1e-6),
            "queries_to_dispute": two_sample_queries_to_significance(accuracy, null_rate, DISPUTE_ALPHA),
        }
        undecidable, probe_queries = self.probe_suspect(suspect, details)
        queries += probe_queries
        null = (
            f"the owner's {total}-bit signature is a random half of each bit value of {total + null_total} key "
            f"images whose other half ({null_total}) was never embedded: exchangeable for a suspect that never saw "
            "which half was trained on (one-sided exact test stratified by bit value; the key is not derivable "
            "from its secret)"
        )
        return Verdict.decide(
            scheme=self.scheme,
            statistic=1.0 - accuracy,
            statistic_name="bit_error_rate",
            higher_is_watermarked=False,
            log10_p=stratified_fisher_log10_p_value(rows),
            alpha=alpha,
            threshold=1.0 - stratified_fisher_threshold(rows, alpha) / total,
            undecidable=undecidable,
            queries=queries,
            null=null,
            details=details,
        )


class BlackMarksWatermark(FrontierStitchingWatermark):
    """Embed BlackMarks: a ``bits``-bit signature as targeted adversarial key images of the model, injected into
    the training batches with their target classes (as
    :class:`~lightning_wm.watermarks.TriggerSetWatermark` injects keys).

    The key is made when ``fit`` starts, from the model as it is then (the paper fine-tunes a trained model: give
    it with ``ImageClassifier(pretrained=...)``, or let ``warmup_epochs`` train it first, as frontier stitching
    does). The encoding scheme is computed on the owner's training data; the signature is ``bits`` random bits
    drawn from the key's secret. The paper's fine-tuning loss adds a term pulling each key image's output mass
    into its bit's cluster; the cross-entropy toward the key image's target class (a class of that cluster) used
    here implies it. ``2 · bits`` key images are made; a random half of each bit value is the owner's signature,
    the rest null key images, never injected (see the module docstring for the exact test).

    Args:
        bits: signature length (the SoK toolbox: 200 on CIFAR-10).
        epsilon: see :class:`BlackMarksTrigger`.
        warmup_epochs: epochs of plain training before the key is made (0: the model as given).
        keys_per_batch, key_ratio, num_probes, key_path, seed, alpha, name: see
            :class:`~lightning_wm.watermarks.TriggerSetWatermark`.
    """

    key_scheme = "blackmarks"

    def __init__(
        self,
        bits: int = 100,
        epsilon: float = 0.1,
        warmup_epochs: int = 0,
        keys_per_batch: int | None = None,
        key_ratio: float = 0.1,
        num_probes: int = 100,
        key_path: str | None = None,
        seed: int | None = None,
        alpha: float = 0.01,
        name: str | None = None,
    ) -> None:
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be non-negative, got {warmup_epochs}")
        TriggerSetWatermark.__init__(
            self,
            BlackMarksTrigger(epsilon=epsilon),
            num_keys=bits,
            keys_per_batch=keys_per_batch,
            key_ratio=key_ratio,
            num_probes=num_probes,
            key_path=key_path,
            seed=seed,
            alpha=alpha,
            name=name,
        )
        self.warmup_epochs = warmup_epochs

    def make_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> BlackMarksKey:
        datamodule, num_classes, rng = self.prepare_model(
            trainer, pl_module, "key images are made from its training images"
        )
        inputs, labels = training_tensors(datamodule)
        was_training = pl_module.training
        pl_module.eval()
        try:
            averages = mean_outputs_per_class(pl_module, inputs, labels, num_classes)
        finally:
            pl_module.train(was_training)
        class_bits = cluster_classes(averages, int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
        bits = torch.randint(0, 2, (2 * self.num_keys,), generator=rng)
        generator: BlackMarksTrigger = self.generator  # type: ignore[assignment]
        samples = generator.key_images(pl_module, datamodule, bits, class_bits, rng)
        owner, null = _stratified_halves(bits.bool(), rng)
        config, tensors = self.key_contents(
            datamodule,
            samples,
            owner,
            null,
            rng,
            num_classes=num_classes,
            num_outputs=num_classes,
            chance=0.5,
            null_test="fisher stratified by bit value",
            scheme_options={"bits": self.num_keys, "num_probes": self.num_probes},
        )
        tensors.update(embed_bits=bits[owner], null_bits=bits[null], class_bits=class_bits)
        return BlackMarksKey(config, tensors)


def _example(seed: int | None = None, key_path: str | None = None) -> BlackMarksWatermark:
    return BlackMarksWatermark(bits=50, epsilon=0.1, warmup_epochs=3, keys_per_batch=32, seed=seed, key_path=key_path)


SCHEME = SchemeSpec(
    name="blackmarks",
    callback=BlackMarksWatermark,
    key=BlackMarksKey,
    higher_is_watermarked=False,
    access="labels",
    example=_example,
    example_epochs=5,
)
"""The registry entry: the example warms a width-8 network up for 3 epochs, clusters its classes, makes a 50-bit
signature and 50 null key images, and embeds the signature in 5 more epochs, 32 key images per batch."""
