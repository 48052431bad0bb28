"""Le Merrer, Pérez, Trédan: "Adversarial Frontier Stitching for Remote Neural Network Watermarking" (Neural
Computing and Applications 2019).

The key samples are adversarial examples near the owner's decision boundary, made by FGSM at ``epsilon`` from the
model being watermarked: *true adversaries* (correctly classified inputs whose label flips under the perturbation)
and *false adversaries* (perturbed inputs whose label does not flip). The model is fine-tuned to give all of them
their original, true labels, which "stitches" the boundary around them. Verification reads top-1 labels only: the
share of key samples answered with their key label.

The paper declares a suspect when the mismatches stay under a threshold derived from a binomial at 1/2. That null
does not hold for every suspect: the key labels are the true labels of inputs close to task images, so a clean
model agrees with many of them (all the false adversaries, some of the true ones), and a binomial at 1/K is no
better. Here the key also holds
as many *null* frontier samples, made the same way (same model, same ``epsilon``, other source images) and never
trained on: the whole frontier set is generated first, and within each kind (true and false adversaries, whose
agreement with a clean model differs widely) a uniformly random half, drawn from the key's secret, become the
owner's keys. For a suspect that never saw which half was trained on, owner and null samples of one kind are then
exchangeable, and the one-sided exact test of its agreement on the owner's keys against its agreement on the null
keys, stratified by kind (the owner's hits are a sum of independent hypergeometric counts, one per kind, given
each kind's total hits: a Fisher exact test per stratum, combined exactly) is exact. Stratifying matters: a
split that happens to give the owner more false adversaries would otherwise make every clean model agree more
with the owner's keys. The test is exact under that exchangeability only, and the key is not derivable from its
secret alone (it depends on the model's gradients at key time): its verdicts say that the key is not checkable,
and prove less than a derived key's.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from scipy import special, stats
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_wm.models.reinit import clone_module
from lightning_wm.registry import SchemeSpec
from lightning_wm.side_training import CleanModel, quiet_trainer
from lightning_wm.verify.blackbox import Suspect, query_labels
from lightning_wm.verify.derive import DISPUTE_ALPHA
from lightning_wm.verify.stats import two_sample_queries_to_significance
from lightning_wm.verify.verdict import Verdict
from lightning_wm.watermarks.key_samples import KeySampleGenerator, KeySamples, training_tensors
from lightning_wm.watermarks.trigger_set import TriggerSetKey, TriggerSetWatermark, _task_classes, probe_set


class FrontierTrigger(KeySampleGenerator):
    """Frontier samples made by FGSM from a model (not from data alone, so not a generator a key can be rebuilt
    with): correctly classified training images, each moved by ``epsilon · sign(∇x loss)`` in ``[0, 1]`` pixels,
    labelled with their true class.

    Args:
        epsilon: the FGSM step on ``[0, 1]`` pixels (the paper's ε).
        true_fraction: share of true adversaries in the frontier set (the paper: one half); fewer are taken when
            the model has fewer, and the key records how many.
    """

    label_kind: ClassVar[str] = "true_label"
    name: ClassVar[str] = "frontier_stitching"

    def __init__(self, epsilon: float = 0.25, true_fraction: float = 0.5) -> None:
        super().__init__(target_class=None)
        if not 0.0 < epsilon <= 1.0:
            raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
        if not 0.0 <= true_fraction <= 1.0:
            raise ValueError(f"true_fraction must be in [0, 1], got {true_fraction}")
        self.epsilon = epsilon
        self.true_fraction = true_fraction

    def memorised(self) -> bool:
        return True

    def null_keys(self) -> bool:
        return True

    def config(self) -> dict[str, Any]:
        return {"generator": type(self).__name__, "epsilon": self.epsilon, "true_fraction": self.true_fraction}

    def generate(self, datamodule: L.LightningDataModule, count: int, rng: torch.Generator) -> KeySamples:
        raise TypeError("frontier samples are made from a model: use FrontierTrigger.frontier(model, ...)")

    def frontier(
        self, model: torch.nn.Module, datamodule: Any, count: int, rng: torch.Generator, batch_size: int = 256
    ) -> tuple[KeySamples, Tensor]:
        """``count`` frontier samples of ``model`` from distinct training images in ``rng``'s order, and whether each
        is a true adversary; ``true_fraction`` of them are true adversaries when the model has enough."""
        inputs, labels = training_tensors(datamodule)
        wanted_true = round(self.true_fraction * count)
        found: dict[bool, list[tuple[Tensor, Tensor]]] = {True: [], False: []}
        order = torch.randperm(len(labels), generator=rng)
        param = next(model.parameters())
        was_training = model.training
        model.eval()
        try:
            for chunk in order.split(batch_size):
                pixels = datamodule.denormalize(inputs[chunk].float()).clamp(0.0, 1.0).to(param.device)
                y = labels[chunk].long().to(param.device)
                adversaries, flipped, correct = self._fgsm(model, datamodule, pixels, y)
                for is_true in (True, False):
                    keep = correct & (flipped if is_true else ~flipped)
                    found[is_true].append((adversaries[keep].cpu(), y[keep].cpu()))
                if (
                    sum(len(a) for a, _ in found[True]) >= wanted_true
                    and sum(len(a) for a, _ in found[False]) >= count - wanted_true
                ):
                    break
        finally:
            model.train(was_training)
        true_x, true_y = (torch.cat(t) for t in zip(*found[True], strict=True))
        false_x, false_y = (torch.cat(t) for t in zip(*found[False], strict=True))
        num_true = min(wanted_true, len(true_y), count)
        num_false = min(count - num_true, len(false_y))
        num_true = min(count - num_false, len(true_y))
        if num_true + num_false < count:
            raise ValueError(
                f"FrontierTrigger needs {count} frontier samples, the model gives {len(true_y)} true and "
                f"{len(false_y)} false adversaries at epsilon {self.epsilon} (from correctly classified images): "
                "lower num_keys, or make the key from a trained model (warmup_epochs, or ImageClassifier's pretrained)"
            )
        images = torch.cat([true_x[:num_true], false_x[:num_false]])
        targets = torch.cat([true_y[:num_true], false_y[:num_false]])
        is_true = torch.cat([torch.ones(num_true, dtype=torch.bool), torch.zeros(num_false, dtype=torch.bool)])
        return KeySamples(images, targets, {}), is_true

    def _fgsm(self, model: torch.nn.Module, datamodule: Any, pixels: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        pixels = pixels.clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(datamodule.normalize(pixels).to(next(model.parameters()).dtype))
            (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), y), pixels)
        adversaries = (pixels + self.epsilon * grad.sign()).clamp(0.0, 1.0).detach()
        with torch.no_grad():
            moved = model(datamodule.normalize(adversaries).to(logits.dtype)).argmax(-1)
        return adversaries, moved != y, logits.argmax(-1) == y


def strata_counts(
    owner_correct: Tensor, owner_strata: Tensor, null_correct: Tensor, null_strata: Tensor, values: tuple
) -> list[tuple[int, int, int, int]]:
    """``(owner hits, owner keys, null hits, null keys)`` for each stratum value in ``values``: the 2 × 2 tables
    the stratified exact test reads."""
    rows = []
    for value in values:
        owner, null = owner_strata == value, null_strata == value
        rows.append((int(owner_correct[owner].sum()), int(owner.sum()), int(null_correct[null].sum()), int(null.sum())))
    return rows


def stratified_fisher_log10_p_value(strata: list[tuple[int, int, int, int]]) -> float:
    """log10 of the one-sided exact test that sample a's hits exceed sample b's, stratified: ``strata`` holds
    ``(hits_a, trials_a, hits_b, trials_b)`` per stratum.

    ``P[X >= Σ hits_a]`` for ``X = Σ_s X_s``, ``X_s ~ Hypergeometric(trials_a + trials_b, hits_a + hits_b,
    trials_a)`` independent: given each stratum's total hits, the chance that sample a holds at least as many of
    them. Exact whenever, within each stratum, which trials are a's is a uniformly random choice the suspect does
    not depend on (with one stratum it is :func:`~lightning_wm.verify.stats.fisher_exact_log10_p_value`).
    """
    log_pmf, observed = _stratified_log_pmf(strata)
    return min(0.0, float(special.logsumexp(log_pmf[observed:])) / math.log(10.0)) if observed < len(log_pmf) else 0.0


def stratified_fisher_threshold(strata: list[tuple[int, int, int, int]], alpha: float) -> int:
    """Fewest total hits in sample a whose stratified p-value is below ``alpha``, each stratum's total hits held
    at the observed ones (``Σ trials_a + 1``: none suffices)."""
    log_pmf, _ = _stratified_log_pmf(strata)
    tails = [float(special.logsumexp(log_pmf[t:])) / math.log(10.0) for t in range(len(log_pmf))]
    return next((t for t, tail in enumerate(tails) if tail < math.log10(alpha)), sum(s[1] for s in strata) + 1)


def _stratified_log_pmf(strata: list[tuple[int, int, int, int]]) -> tuple[Tensor, int]:
    log_pmf = torch.zeros(1, dtype=torch.float64)
    observed = 0
    for hits_a, trials_a, hits_b, trials_b in strata:
        if not (0 <= hits_a <= trials_a and 0 <= hits_b <= trials_b):
            raise ValueError(f"hits ({hits_a}, {hits_b}) must lie within the trials ({trials_a}, {trials_b})")
        observed += hits_a
        if trials_a == 0:
            continue
        support = range(trials_a + 1)
        pmf = torch.as_tensor(
            stats.hypergeom.logpmf(support, trials_a + trials_b, hits_a + hits_b, trials_a), dtype=torch.float64
        )
        combined = torch.full((len(log_pmf) + trials_a,), -math.inf, dtype=torch.float64)
        for k in range(trials_a + 1):
            combined[k : k + len(log_pmf)] = torch.logaddexp(combined[k : k + len(log_pmf)], log_pmf + pmf[k])
        log_pmf = combined
    return log_pmf, observed


class FrontierStitchingKey(TriggerSetKey):
    """The owner's frontier samples (``embed_*``, also ``verify_*``) and as many null frontier samples
    (``null_*``) with their true labels, whether each is a true adversary (``*_true_adversary``), and clean probes.

    Verification: the suspect's top-1 agreement with the key labels on the owner's samples against the null
    samples, by the exact test stratified by kind (:func:`stratified_fisher_log10_p_value`), exact when owner and
    null samples of a kind are exchangeable for the suspect (a random half of the frontier set, which an innocent
    suspect cannot know). Not derivable from its secret: :meth:`derivation_problems` gives None.
    """

    scheme = "frontier_stitching"

    def derivation_problems(self, datamodule: Any = None) -> list[str] | None:
        """None: the frontier samples follow the model's gradients at key time, not the secret alone."""
        return None

    def strata(self, suspect: Suspect) -> tuple[list[tuple[int, int, int, int]], int]:
        """``(owner hits, owner keys, null hits, null keys)`` for true and for false adversaries, and the queries."""
        answers, queries = {}, 0
        for split in ("verify", "null"):
            predicted, spent = query_labels(suspect, self.tensors[f"{split}_inputs"])
            answers[split] = predicted.cpu() == self.tensors[f"{split}_labels"]
            queries += spent
        t = self.tensors
        rows = strata_counts(
            answers["verify"], t["embed_true_adversary"], answers["null"], t["null_true_adversary"], (True, False)
        )
        return rows, queries

    def verify(self, suspect: Suspect, alpha: float = 0.01) -> Verdict:
        """Query the suspect (top-1 labels) on the owner's and the null frontier samples and the probes.

        Args:
            suspect: an ``nn.Module`` returning logits, or a callable returning probabilities or labels.
            alpha: significance level.
        """
        rows, queries = self.strata(suspect)
        hits, total = sum(r[0] for r in rows), sum(r[1] for r in rows)
        null_hits, null_total = sum(r[2] for r in rows), sum(r[3] for r in rows)
        accuracy, null_rate = hits / total, null_hits / null_total
        details: dict[str, Any] = {
            "hits": hits,
            "keys": total,
            "null_hits": null_hits,
            "null_keys": null_total,
            "null_rate": null_rate,
            "strata": {
                kind: list(row) for kind, row in zip(("true_adversaries", "false_adversaries"), rows, strict=True)
            },
            "label_kind": self.config["label_kind"],
            "generator": self.config["generator"],
            "epsilon": self.config["epsilon"],
            "verified_on": self.config.get("verified_on"),
            "queries_to_significance": two_sample_queries_to_significance(accuracy, null_rate, 1e-6),
            "queries_to_dispute": two_sample_queries_to_significance(accuracy, null_rate, DISPUTE_ALPHA),
        }
        undecidable, probe_queries = self.probe_suspect(suspect, details)
        queries += probe_queries
        null = (
            f"the owner's {total} frontier samples are a random half of each kind (true / false adversaries) of a "
            f"frontier set whose other half ({null_total}) was never embedded: exchangeable for a suspect that never "
            "saw which half was trained on (one-sided exact test stratified by kind; the key is not derivable from "
            "its secret)"
        )
        return Verdict.decide(
            scheme=self.scheme,
            statistic=accuracy,
            statistic_name="key_accuracy",
            log10_p=stratified_fisher_log10_p_value(rows),
            alpha=alpha,
            threshold=stratified_fisher_threshold(rows, alpha) / total,
            undecidable=undecidable,
            queries=queries,
            null=null,
            details=details,
        )


class FrontierStitchingWatermark(TriggerSetWatermark):
    """Embed Le Merrer et al.'s frontier stitching: FGSM frontier samples of the model, with their true labels,
    injected into the training batches as :class:`~lightning_wm.watermarks.TriggerSetWatermark` injects keys.

    The key is made when ``fit`` starts, from the model as it is then: the paper's setting is fine-tuning a model
    already trained on the task (give it with ``ImageClassifier(pretrained=...)``, as
    ``configs/digits/frontier_stitching.yaml`` does). When embedding from scratch, ``warmup_epochs`` first trains
    the model in place on the owner's training data, so that the frontier is a trained model's: cross-entropy and
    Adam at 2e-3 (side training's :class:`~lightning_wm.side_training.CleanModel`) on a CPU Trainer at the fit's
    effective batch size, before the fit's own epochs (under DDP rank 0 warms up and DDP broadcasts its weights).

    ``2 · num_keys`` frontier samples are made (``true_fraction`` of them true adversaries), and a uniformly random
    half of each kind, drawn from the key's secret, become the owner's keys; the other half are null keys, never
    injected. Verification (:class:`FrontierStitchingKey`): the exact test, stratified by kind, of the suspect's
    agreement with the true labels on the owner's keys against its agreement on the null keys (see the module
    docstring for when it is exact); clean probes make degenerate suspects undecidable. The key is not derivable
    from its secret (``derivation_problems`` gives None).

    Args:
        epsilon, true_fraction: see :class:`FrontierTrigger`.
        num_keys: the owner's keys (as many null keys are made beside them).
        warmup_epochs: epochs of plain training before the key is made (0: the model as given).
        keys_per_batch, key_ratio, num_probes, key_path, seed, alpha, name: see
            :class:`~lightning_wm.watermarks.TriggerSetWatermark`.
    """

    key_scheme = "frontier_stitching"

    def __init__(
        self,
        epsilon: float = 0.25,
        true_fraction: float = 0.5,
        num_keys: int = 100,
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
        super().__init__(
            FrontierTrigger(epsilon=epsilon, true_fraction=true_fraction),
            num_keys=num_keys,
            keys_per_batch=keys_per_batch,
            key_ratio=key_ratio,
            num_probes=num_probes,
            key_path=key_path,
            seed=seed,
            alpha=alpha,
            name=name,
        )
        self.warmup_epochs = warmup_epochs

    def make_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> FrontierStitchingKey:
        datamodule, num_classes, rng = self.prepare_model(
            trainer, pl_module, "frontier samples are made from its training images"
        )
        generator: FrontierTrigger = self.generator  # type: ignore[assignment]
        samples, is_true = generator.frontier(pl_module, datamodule, 2 * self.num_keys, rng)
        owner, null = _stratified_halves(is_true, rng)
        config, tensors = self.key_contents(
            datamodule,
            samples,
            owner,
            null,
            rng,
            num_classes=num_classes,
            num_outputs=generator.num_outputs(num_classes),
            chance=1.0 / num_classes,
            null_test="fisher stratified by kind",
            true_adversaries={"embed": int(is_true[owner].sum()), "null": int(is_true[null].sum())},
            scheme_options={"num_keys": self.num_keys, "num_probes": self.num_probes},
        )
        tensors["embed_true_adversary"] = is_true[owner]
        tensors["null_true_adversary"] = is_true[null]
        return FrontierStitchingKey(config, tensors)

    def prepare_model(
        self, trainer: L.Trainer, pl_module: L.LightningModule, purpose: str
    ) -> tuple[Any, int, torch.Generator]:
        """The owner's datamodule (set up for fit), the task's classes and the key's random generator, after the
        warm-up epochs: the trained model whose frontier (or, for BlackMarks, whose class clusters) the key is
        made from."""
        datamodule = self.split_datamodule(trainer, purpose)
        if getattr(datamodule, "train_dataset", None) is None:
            datamodule.setup("fit")
        num_classes = _task_classes(pl_module, datamodule)
        rng = self.key_rng()
        if self.warmup_epochs:
            batch_size = int(getattr(datamodule, "batch_size", 64)) * trainer.world_size
            self._warm_up(pl_module, datamodule, batch_size, int(torch.randint(0, 2**62, (1,), generator=rng)))
        return datamodule, num_classes, rng

    def key_contents(
        self,
        datamodule: Any,
        samples: KeySamples,
        owner: Tensor,
        null: Tensor,
        rng: torch.Generator,
        **config: Any,
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The key's config and tensors: the ``owner`` samples embedded and verified, the ``null`` ones kept
        apart, and the clean probes drawn last from ``rng``; ``config`` adds the scheme's own entries."""
        inputs, _ = training_tensors(datamodule)
        keys = datamodule.normalize(samples.images.float()).to(inputs.dtype)
        generator = self.generator
        contents = {
            **generator.config(),
            "label_kind": generator.label_kind,
            "random_labels": False,
            "key_label": None,
            "input_shape": list(inputs.shape[1:]),
            "verified_on": "embedded keys",
            "generator_init": None,
            "warmup_epochs": self.warmup_epochs,
            **config,
        }
        tensors = {
            "embed_inputs": keys[owner],
            "embed_labels": samples.labels[owner],
            "verify_inputs": keys[owner],
            "verify_labels": samples.labels[owner],
            "null_inputs": keys[null],
            "null_labels": samples.labels[null],
        }
        if self.num_probes:
            tensors["probe_inputs"], tensors["probe_labels"] = probe_set(datamodule, self.num_probes, rng)
        return contents, tensors

    def _warm_up(self, pl_module: L.LightningModule, datamodule: Any, batch_size: int, seed: int) -> None:
        copy = CleanModel(clone_module(pl_module))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loader = DataLoader(datamodule.train_dataset, batch_size=batch_size, shuffle=True)
            quiet_trainer(max_epochs=self.warmup_epochs, limit_val_batches=0).fit(copy, train_dataloaders=loader)
        pl_module.load_state_dict(copy.backbone.state_dict())


def _stratified_halves(is_true: Tensor, rng: torch.Generator) -> tuple[Tensor, Tensor]:
    """Owner and null indices: a uniformly random half of the true and of the false adversaries each; an odd
    count's extra sample goes to the owner in one kind and to the null keys in the other (both are odd together,
    the set being even), which kind chosen at random, so that both halves have the same size."""
    kinds = [is_true.nonzero().flatten(), (~is_true).nonzero().flatten()]
    owner_first = bool(torch.randint(0, 2, (1,), generator=rng))
    owner, null = [], []
    for i, members in enumerate(kinds):
        members = members[torch.randperm(len(members), generator=rng)]
        extra = len(members) % 2 and (i == 0) == owner_first
        cut = len(members) // 2 + int(extra)
        owner.append(members[:cut])
        null.append(members[cut:])
    return torch.cat(owner), torch.cat(null)


def _example(seed: int | None = None, key_path: str | None = None) -> FrontierStitchingWatermark:
    return FrontierStitchingWatermark(
        epsilon=0.25, num_keys=50, warmup_epochs=3, keys_per_batch=32, seed=seed, key_path=key_path
    )


SCHEME = SchemeSpec(
    name="frontier_stitching",
    callback=FrontierStitchingWatermark,
    key=FrontierStitchingKey,
    higher_is_watermarked=True,
    access="labels",
    example=_example,
    example_epochs=5,
)
"""The registry entry: the example warms a width-8 network up for 3 epochs, makes 50 owner and 50 null frontier
samples from it, and stitches the owner's in 5 more epochs, 32 per batch."""
