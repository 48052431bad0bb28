"""Black-box trigger-set watermarks: Zhang et al., "Protecting Intellectual Property of Deep Neural Networks with
Watermarking" (AsiaCCS 2018), and Zhong et al., "A New Label Helps" (PAKDD 2020).

The owner trains the model to give secret key samples (made by a
:class:`~lightning_wm.watermarks.key_samples.KeySampleGenerator`) their key labels, by adding them to training
batches. Verification only needs the suspect's top-1 labels. With uniformly random key labels (the default, after
Adi et al. 2018) a suspect that never saw them hits each with probability exactly 1/K, so the binomial p-value is
valid for any suspect. So is the permutation test of the labels drawn, and the verdict takes the larger of the two:
one unlucky draw of labels that favours a class then accuses no model that favours that class. New-label keys,
whose label is fixed by design, are compared with never-embedded null keys by an exact conditional test. Clean task
inputs stored in the key tell degenerate suspects (near-constant answers, chance accuracy) apart: they are
undecidable, never watermarked.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from lightning_wm.registry import SchemeSpec
from lightning_wm.verify.blackbox import Suspect, probe, query_labels
from lightning_wm.verify.derive import DISPUTE_ALPHA
from lightning_wm.verify.keys import WatermarkKey
from lightning_wm.verify.stats import (
    binomial_log10_p_value,
    binomial_threshold,
    fisher_exact_log10_p_value,
    fisher_threshold,
    label_permutation_log10_p_value,
    queries_to_significance,
    two_sample_queries_to_significance,
)
from lightning_wm.verify.verdict import Verdict
from lightning_wm.watermarks.base import WatermarkScheme
from lightning_wm.watermarks.key_samples import (
    ContentTrigger,
    KeySampleGenerator,
    NoiseTrigger,
    UnrelatedTrigger,
    training_tensors,
)
from lightning_wm.watermarks.new_label import NewLabelTrigger


class TriggerSetKey(WatermarkKey):
    """The key samples (model inputs) and their labels, null keys, and clean probe inputs.

    ``embed_*`` were trained on; ``verify_*`` are the keys verification queries (the embedded keys themselves for
    memorised keys, held-out keys made alike otherwise, see ``config["verified_on"]``); ``null_*`` (new-label
    keys) are never-embedded keys of the same generator; ``probe_*`` are clean held-out task inputs with their
    true labels, to recognise degenerate suspects. Scheme name ``"trigger_set"`` for Zhang's keys and Zhong's
    new-label keys alike; ``config["label_kind"]`` and ``config["null_test"]`` say which null applies.
    """

    scheme = "trigger_set"

    def derivation_problems(self, datamodule: Any = None) -> list[str] | None:
        """Rebuild the key from its secret, its generator's settings and the owner's data (``datamodule``) and name
        the tensors that differ: key images cherry-picked to fit a model, or labels chosen to, differ from what the
        secret expands to. None (not checkable) without the data, or for a generator given images of the user's
        own (a logo ``patch``): such keys are not derived and prove less."""
        init = self.config.get("generator_init")
        generator_class = GENERATORS.get(str(self.config.get("generator")))
        if datamodule is None or init is None or generator_class is None or "scheme_options" not in self.config:
            return None
        if "source_used" in self.config and "source" in init:
            init = {**init, "source": self.config["source_used"]}
        if getattr(datamodule, "train_dataset", None) is None:
            datamodule.setup("fit")
        scheme = TriggerSetWatermark(generator_class(**init), **self.config["scheme_options"])
        scheme._secret = self.secret
        rebuilt = scheme.build_key(datamodule, int(self.config["num_classes"]))
        return differing_tensors(rebuilt.tensors, self.tensors)

    def probe_suspect(self, suspect: Suspect, details: dict[str, Any]) -> tuple[str | None, int]:
        """Query the suspect on the key's clean probes: why it is degenerate (or None) and the queries spent; its
        accuracy on them goes into ``details["probe_accuracy"]``."""
        t = self.tensors
        undecidable, queries, accuracy = probe(
            suspect, t.get("probe_inputs"), t.get("probe_labels"), int(self.config["num_classes"])
        )
        if accuracy is not None:
            details["probe_accuracy"] = accuracy
        return undecidable, queries

    def key_accuracy(
        self, suspect: Suspect, split: Literal["verify", "embed", "null"] = "verify"
    ) -> tuple[float, int, int]:
        """Share of ``split`` keys the suspect labels with their key labels, the hits and the queries spent."""
        predicted, queries = self.answers(suspect, split)
        labels = self.tensors[f"{split}_labels"]
        hits = int((predicted == labels).sum())
        return hits / len(labels), hits, queries

    def answers(self, suspect: Suspect, split: Literal["verify", "embed", "null"] = "verify") -> tuple[Tensor, int]:
        """The suspect's top-1 labels for the ``split`` keys (on the CPU) and the queries spent."""
        predicted, queries = query_labels(suspect, self.tensors[f"{split}_inputs"])
        return predicted.cpu(), queries

    def verify(self, suspect: Suspect, alpha: float = 0.01) -> Verdict:
        """Query the suspect (top-1 labels only) on the keys, and on the probes, and test its key accuracy.

        Random-label keys: Binomial(n, 1/K), exact for any suspect that never saw the labels. Fixed-class keys
        (Zhang et al.'s plain option): the same binomial, which assumes the suspect gives that class at the
        chance rate and is not valid for every suspect. New-label keys: one-sided Fisher exact test of the rate
        of answering K on the owner's keys against the rate on the null keys.

        Args:
            suspect: an ``nn.Module`` returning logits, or a callable returning probabilities or labels.
            alpha: significance level.
        """
        predicted, queries = self.answers(suspect)
        labels = self.tensors["verify_labels"]
        hits, total = int((predicted == labels).sum()), len(labels)
        accuracy = hits / total
        chance = float(self.config["chance"])
        details: dict[str, Any] = {
            "hits": hits,
            "keys": total,
            "label_kind": self.config["label_kind"],
            "generator": self.config["generator"],
            "verified_on": self.config.get("verified_on"),
        }
        if self.config.get("source_used") is not None:
            details["source"] = self.config["source_used"]
        if "null_inputs" in self.tensors:
            null_rate, null_hits, null_queries = self.key_accuracy(suspect, split="null")
            null_total = len(self.tensors["null_labels"])
            queries += null_queries
            log10_p = fisher_exact_log10_p_value(hits, total, null_hits, null_total)
            threshold = fisher_threshold(total, null_hits, null_total, alpha) / total
            null = (
                f"the owner's {total} keys and {null_total} never-embedded null keys of the same generator are "
                "exchangeable for a suspect that never saw the owner's perturbations (one-sided Fisher exact test)"
            )
            details |= {
                "null_hits": null_hits,
                "null_keys": null_total,
                "null_rate": null_rate,
                "queries_to_significance": two_sample_queries_to_significance(accuracy, null_rate, 1e-6),
                "queries_to_dispute": two_sample_queries_to_significance(accuracy, null_rate, DISPUTE_ALPHA),
            }
        else:
            log10_p = binomial_log10_p_value(hits, total, chance)
            threshold = binomial_threshold(total, chance, alpha) / total
            if self.config.get("random_labels"):
                log10_p_permutation = label_permutation_log10_p_value(*class_counts(predicted, labels), hits)
                details |= {"log10_p_binomial": log10_p, "log10_p_permutation": log10_p_permutation}
                log10_p = max(log10_p, log10_p_permutation)
                null = (
                    f"uniformly random key labels independent of the images: the larger of Binomial({total}, "
                    f"{chance:.4g}), exact over the labels' draw, and the permutation test of the labels drawn, exact "
                    "given them (a draw that favours a class accuses no model that favours it); both exact for any "
                    "suspect that never saw the labels"
                )
            else:
                null = (
                    f"a fixed key class: Binomial({total}, {chance:.4g}) assumes the suspect gives that class at the "
                    "chance rate, which is not valid for every suspect (a model favouring that class matches it)"
                )
            details |= {
                "chance": chance,
                "queries_to_significance": queries_to_significance(accuracy, chance, 1e-6),
                "queries_to_dispute": queries_to_significance(accuracy, chance, DISPUTE_ALPHA),
            }
        undecidable, probe_queries = self.probe_suspect(suspect, details)
        queries += probe_queries
        return Verdict.decide(
            scheme=self.scheme,
            statistic=accuracy,
            statistic_name="key_accuracy",
            log10_p=log10_p,
            alpha=alpha,
            threshold=threshold,
            undecidable=undecidable,
            queries=queries,
            null=null,
            details=details,
        )


def class_counts(predicted: Tensor, labels: Tensor) -> tuple[list[int], list[int]]:
    """How many keys the suspect answers with each class, and how many keys carry each label, over one range of
    classes."""
    classes = int(max(predicted.max(), labels.max())) + 1 if len(labels) else 0
    return (
        torch.bincount(predicted.long(), minlength=classes).tolist(),
        torch.bincount(labels.long(), minlength=classes).tolist(),
    )


def differing_tensors(rebuilt: dict[str, Tensor], stored: dict[str, Tensor]) -> list[str]:
    """The names of the tensors a key rebuilt from its secret and the stored key do not share exactly."""
    return [
        name
        for name in sorted(set(rebuilt) | set(stored))
        if name not in rebuilt
        or name not in stored
        or rebuilt[name].shape != stored[name].shape
        or not torch.equal(rebuilt[name], stored[name])
    ]


def probe_set(datamodule: L.LightningDataModule, count: int, rng: torch.Generator) -> tuple[Tensor, Tensor]:
    """``count`` clean task inputs with their true labels, held out from training where the datamodule has a
    validation (or test) split, chosen by ``rng``."""
    splits = [datamodule.dataset(name) for name in ("val", "test")] if hasattr(datamodule, "dataset") else []
    held_out = [split for split in splits if len(split) > 0]
    inputs, labels = held_out[0].tensors[:2] if held_out else training_tensors(datamodule)
    chosen = torch.randperm(len(labels), generator=rng)[:count]
    return inputs[chosen], labels[chosen].long()


def shard_indices(num_keys: int, rank: int, world_size: int) -> Tensor:
    """The embedding keys one DDP rank injects: indices ``rank::world_size``, so ranks never share a key."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if num_keys < world_size:
        raise ValueError(f"{num_keys} embedding keys cannot be shared among {world_size} ranks; make more keys")
    return torch.arange(rank, num_keys, world_size)


class KeyCycler:
    """Hands out a rank's key indices in seeded random order, a full pass over the shard before any repeat."""

    def __init__(self, shard: Tensor, seed: int) -> None:
        self.shard = shard
        self.rng = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)

    def take(self, count: int) -> Tensor:
        while len(self._order) < count:
            self._order = torch.cat([self._order, self.shard[torch.randperm(len(self.shard), generator=self.rng)]])
        taken, self._order = self._order[:count], self._order[count:]
        return taken


class TriggerSetWatermark(WatermarkScheme):
    """Embed a trigger set by adding key samples to every training batch (Zhang et al. 2018; Zhong et al. 2020).

    The callback changes neither the DataModule nor the LightningModule: in ``on_train_batch_start`` it appends
    key samples to the batch in place (``batch[0]``, ``batch[1]`` of the ``[x, y, ...]`` list that
    ``default_collate`` gives for ``(x, y)`` samples; other elements are left alone), on the batch's device and
    dtype. Under DDP each rank cycles through its own shard of the embedding keys (indices ``rank::world_size``),
    so a key is never injected twice per pass; under gradient accumulation every micro-batch gets its keys. Key
    samples only enter training batches, never validation or test metrics.

    Unlike the papers, which add the trigger set to the training set once, keys are oversampled (``key_ratio`` of
    every batch by default), so that a few epochs embed them.

    ``num_keys`` embedding keys and, for keys whose rule carries over to fresh keys (a fixed target class),
    ``num_verify`` held-out verification keys are made with the same key, from distinct source images; memorised
    keys (random labels, new-label keys) are verified on the embedded keys. New-label keys also get as many
    never-embedded null keys, and the generator's negatives (perturbed training images with their true labels)
    join the batches beside the keys. The key file (``key_path``) holds the keys with their labels and
    ``num_probes`` clean held-out task inputs with their true labels (from the datamodule's validation split),
    which verification queries to call a degenerate suspect undecidable. For
    :class:`~lightning_wm.watermarks.NewLabelTrigger` the model must output K+1 classes: this is checked with one
    forward pass before training.

    Args:
        generator: the key-sample generator (``ContentTrigger``, ``NoiseTrigger``, ``UnrelatedTrigger``,
            ``NewLabelTrigger``), given by ``class_path`` in YAML.
        num_keys: embedding keys (``NewLabelTrigger(alpha_fraction=...)`` overrides it).
        num_verify: held-out verification keys (fixed-class keys only).
        keys_per_batch: key samples added to each training batch; None uses ``key_ratio``.
        key_ratio: key samples added per batch as a fraction of the batch size (at least one).
        num_probes: clean task inputs stored in the key to recognise degenerate suspects.
        key_path, seed, alpha, name: see :class:`~lightning_wm.watermarks.base.WatermarkScheme`.
    """

    key_scheme = "trigger_set"

    def __init__(
        self,
        generator: KeySampleGenerator,
        num_keys: int = 100,
        num_verify: int = 100,
        keys_per_batch: int | None = None,
        key_ratio: float = 0.1,
        num_probes: int = 100,
        key_path: str | None = None,
        seed: int | None = None,
        alpha: float = 0.01,
        name: str | None = None,
    ) -> None:
        if not isinstance(generator, KeySampleGenerator):
            raise TypeError(f"generator must be a KeySampleGenerator, got {type(generator).__name__}")
        self.generator = generator
        super().__init__(key_path=key_path, seed=seed, alpha=alpha, name=name)
        if num_keys < 1 or num_verify < 1:
            raise ValueError(f"num_keys and num_verify must be positive, got {num_keys} and {num_verify}")
        if keys_per_batch is not None and keys_per_batch < 1:
            raise ValueError(f"keys_per_batch must be positive, got {keys_per_batch}")
        if not 0.0 < key_ratio <= 1.0:
            raise ValueError(f"key_ratio must be in (0, 1], got {key_ratio}")
        if num_probes < 0:
            raise ValueError(f"num_probes must be non-negative, got {num_probes}")
        self.num_keys = num_keys
        self.num_verify = num_verify
        self.keys_per_batch = keys_per_batch
        self.key_ratio = key_ratio
        self.num_probes = num_probes
        self._cycler: KeyCycler | None = None
        self._negative_rng: torch.Generator | None = None
        self._device_keys: tuple[Tensor, Tensor] | None = None

    def default_name(self) -> str:
        """The generator's name: ``content``, ``noise``, ``unrelated``, ``new_label``."""
        return self.generator.name

    def make_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> TriggerSetKey:
        return self.build_key(trainer.datamodule, _task_classes(pl_module, trainer.datamodule))

    def build_key(self, datamodule: Any, num_classes: int) -> TriggerSetKey:
        """The key drawn from :meth:`key_rng` and the owner's data: what :meth:`TriggerSetKey.derivation_problems`
        re-computes from the key's secret."""
        inputs, _ = training_tensors(datamodule)
        rng = self.key_rng()
        num_embed = self.generator.num_keys(len(inputs), self.num_keys)
        memorised = self.generator.memorised()
        if not self.generator.random_labels:
            self.generator.key_label(num_classes)
        num_held_out = 0 if memorised else self.num_verify
        num_null = (num_embed if memorised else num_held_out) if self.generator.null_keys() else 0
        samples = self.generator.generate(datamodule, num_embed + num_held_out + num_null, rng)
        if samples.images.shape[1:] != inputs.shape[1:]:
            raise ValueError(
                f"{type(self.generator).__name__} made keys of shape {tuple(samples.images.shape[1:])}, the model's "
                f"inputs are {tuple(inputs.shape[1:])}"
            )
        keys = datamodule.normalize(samples.images.float()).to(inputs.dtype)
        labels = samples.labels.to(torch.long)
        outputs = self.generator.num_outputs(num_classes)
        if int(labels.min()) < 0 or int(labels.max()) >= outputs:
            raise ValueError(f"{type(self.generator).__name__} made labels outside the model's {outputs} outputs")
        config = {
            **self.generator.config(),
            "label_kind": self.generator.label_kind,
            "random_labels": self.generator.random_labels,
            "num_classes": num_classes,
            "num_outputs": outputs,
            "key_label": None if self.generator.random_labels else int(labels[0]),
            "chance": self.generator.chance(num_classes),
            "input_shape": list(inputs.shape[1:]),
            "verified_on": "embedded keys" if memorised else "held-out keys",
            "null_test": "fisher" if num_null else "binomial",
            "generator_init": generator_init(self.generator),
            "scheme_options": {"num_keys": self.num_keys, "num_verify": self.num_verify, "num_probes": self.num_probes},
        }
        verify = slice(0, num_embed) if memorised else slice(num_embed, num_embed + num_held_out)
        null = slice(num_embed + num_held_out, None)
        tensors = {
            "embed_inputs": keys[:num_embed],
            "embed_labels": labels[:num_embed],
            "verify_inputs": keys[verify],
            "verify_labels": labels[verify],
            **({"null_inputs": keys[null], "null_labels": labels[null]} if num_null else {}),
            **{f"generator_{name}": t for name, t in samples.secrets.items()},
        }
        if self.num_probes:
            tensors["probe_inputs"], tensors["probe_labels"] = probe_set(datamodule, self.num_probes, rng)
        return TriggerSetKey(config, tensors)

    def on_key_ready(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._device_keys = None
        self._cycler = None
        sample = self.key.tensors["embed_inputs"][:1]
        param = next(pl_module.parameters(), None)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                if param is not None:
                    sample = sample.to(param.device, param.dtype)
                outputs = pl_module(sample).shape[-1]
        finally:
            pl_module.train(was_training)
        expected = int(self.key.config["num_outputs"])
        if outputs == expected:
            return
        k = int(self.key.config["num_classes"])
        if self.key.config["label_kind"] == "new_label":
            raise ValueError(
                f"NewLabelTrigger needs a model with K+1 = {expected} outputs (the new class is index {k}), the "
                f"model has {outputs}: set the backbone's num_classes to {expected} "
                f"(model.init_args.backbone.init_args.num_classes: {expected}) and keep ImageClassifier's "
                f"num_classes at the task's {k}"
            )
        raise ValueError(
            f"{self.key.config['generator']} keys are for a model with {expected} outputs (the task's classes), "
            f"the model has {outputs}; set the backbone's num_classes to {expected}"
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        shard = shard_indices(len(self.key.tensors["embed_labels"]), trainer.global_rank, trainer.world_size)
        self._cycler = KeyCycler(shard, seed=(self.seed or 0) * 1_000_003 + trainer.global_rank)
        self._negative_rng = torch.Generator().manual_seed((self.seed or 0) * 1_000_003 + 7_919 + trainer.global_rank)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, list) or len(batch) < 2 or not all(isinstance(t, Tensor) for t in batch[:2]):
            raise TypeError(
                "TriggerSetWatermark adds key samples to the training batch in place and needs it to be a list "
                f"[x, y, ...] of tensors (what default_collate gives for (x, y) samples); got {_describe(batch)}. "
                "Make the DataLoader's collate_fn return a list"
            )
        x, y = batch[0], batch[1]
        if self._cycler is None:
            self.on_train_start(trainer, pl_module)
        count = self.keys_per_batch or max(1, round(self.key_ratio * len(x)))
        index = self._cycler.take(count)  # type: ignore[union-attr]
        keys, labels = self._keys_on(x.device)
        index = index.to(x.device)
        extra_x, extra_y = [keys[index].to(dtype=x.dtype)], [labels[index].to(dtype=y.dtype)]
        if self.generator.trains_negatives:
            negatives = self._negatives(trainer.datamodule, x[:count])
            extra_x.append(negatives.to(dtype=x.dtype))
            extra_y.append(y[: len(negatives)])
        batch[0] = torch.cat([x, *extra_x])
        batch[1] = torch.cat([y, *extra_y])

    def _negatives(self, datamodule: Any, inputs: Tensor) -> Tensor:
        if self._negative_rng is None:
            self._negative_rng = torch.Generator().manual_seed((self.seed or 0) * 1_000_003 + 7_919)
        pixels = datamodule.denormalize(inputs.float()).clamp(0.0, 1.0)
        return datamodule.normalize(self.generator.negatives(pixels, self._negative_rng))

    def _keys_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._device_keys is None or self._device_keys[0].device != device:
            self._device_keys = (
                self.key.tensors["embed_inputs"].to(device),
                self.key.tensors["embed_labels"].to(device),
            )
        return self._device_keys

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        if self._key is not None and not trainer.sanity_checking:
            accuracy, _, _ = self.key.key_accuracy(pl_module, split="embed")
            pl_module.log(f"wm/{self.name}/embed_key_accuracy", accuracy, sync_dist=True)


GENERATORS: dict[str, type[KeySampleGenerator]] = {
    cls.__name__: cls for cls in (ContentTrigger, NoiseTrigger, UnrelatedTrigger, NewLabelTrigger)
}
"""The generators a key can be rebuilt with (a key file names one; nothing else is ever imported for it)."""


def register_generator(cls: type[KeySampleGenerator]) -> type[KeySampleGenerator]:
    """Add ``cls`` (a generator defined in another module, e.g. Adi et al.'s abstract images) to
    :data:`GENERATORS`, so that its keys are rebuilt from their secret; usable as a class decorator."""
    GENERATORS[cls.__name__] = cls
    return cls


def generator_init(generator: KeySampleGenerator) -> dict[str, Any] | None:
    """The generator's constructor arguments, JSON-able, so the key can be rebuilt from its secret; None for a
    generator holding images of the user's own (a ``patch``), or one of a class the key cannot rebuild."""
    if type(generator).__name__ not in GENERATORS or getattr(generator, "patch", None) is not None:
        return None
    init = {}
    for name in list(inspect.signature(type(generator).__init__).parameters)[1:]:
        if not hasattr(generator, name):
            return None
        value = getattr(generator, name)
        init[name] = list(value) if isinstance(value, tuple) else value
    try:
        json.dumps(init)
    except TypeError:
        return None
    return init


def _task_classes(pl_module: nn.Module, datamodule: Any) -> int:
    classes = getattr(pl_module, "num_classes", None) or getattr(datamodule, "num_classes", None)
    if not isinstance(classes, int):
        raise ValueError("TriggerSetWatermark needs the task's number of classes: set num_classes on the module")
    return classes


def _describe(batch: Any) -> str:
    if isinstance(batch, (list, tuple)):
        return f"a {type(batch).__name__} of {len(batch)} " + ", ".join(type(b).__name__ for b in batch[:3])
    return f"a {type(batch).__name__}"


def _trigger_example(make_generator: Callable[[], KeySampleGenerator]) -> Callable[..., TriggerSetWatermark]:
    def example(seed: int | None = None, key_path: str | None = None) -> TriggerSetWatermark:
        return TriggerSetWatermark(
            make_generator(), num_keys=20, num_verify=40, key_ratio=0.5, seed=seed, key_path=key_path
        )

    return example


def _spec(
    name: str, make_generator: Callable[[], KeySampleGenerator], extra_outputs: int = 0, epochs: int = 3
) -> SchemeSpec:
    return SchemeSpec(
        name=name,
        callback=TriggerSetWatermark,
        key=TriggerSetKey,
        higher_is_watermarked=True,
        access="labels",
        example=_trigger_example(make_generator),
        example_outputs=extra_outputs,
        example_epochs=epochs,
    )


CONTENT = _spec("content", lambda: ContentTrigger())
NOISE = _spec("noise", lambda: NoiseTrigger(sigma=0.5))
UNRELATED = _spec("unrelated", lambda: UnrelatedTrigger())
NEW_LABEL = _spec("new_label", lambda: NewLabelTrigger(beta=0.2), extra_outputs=1, epochs=10)
"""The registry entries of Zhang et al.'s three key types and Zhong et al.'s new label (one callback, four
generators, as timm registers several variants of one architecture)."""
