"""Jia, Choquette-Choo, Chandrasekaran, Papernot: "Entangled Watermarks as a Defense against Model Extraction"
(USENIX Security 2021), EWE.

The watermark is a trigger (a small stamp) on images of a source class, labelled with a target class. Besides the
cross-entropy that teaches the trigger, training *maximises* the soft nearest neighbour loss (SNNL, Frosst et al.
2019) between the watermarked images and the target class's clean images at a few hidden layers, so that the two
share features: a thief who extracts the task (distillation, fine-tuning) carries the watermark along. The trigger
rule generalises, so verification queries fresh source images with the trigger (held out from training).

How often a suspect sends triggered source images to the target class depends on the suspect (a clean model that
confuses the two classes, another owner's EWE model), so no fixed rate is a valid null. Here the stamp (random
black-and-white pixels at a random position) and, unless fixed, the target class are secrets of the key, and the
p-value ranks the suspect's hits under the owner's trigger among its hits under ``null_triggers`` null triggers
drawn the same way, on the same images and the same suspect: ``(1 + #{null ≥ owner}) / (1 + N)``. For a suspect
that never saw the owner's secret the owner's trigger is one more draw of the same distribution, so the rank
p-value is exact (verdicts.md), with resolution ``1 / (N + 1)``: EWE verdicts cannot go below it (the default
N = 499 gives p ≥ 0.002), and reaching p < 1e-6 would need 10^6 null triggers. The key is the expansion of its
secret over the owner's data, so ``verify --datamodule`` re-derives it.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_wm.registry import SchemeSpec
from lightning_wm.verify.blackbox import Suspect, query_labels
from lightning_wm.verify.stats import empirical_p_value
from lightning_wm.verify.verdict import Verdict
from lightning_wm.watermarks.base import logs_this_step
from lightning_wm.watermarks.functional import soft_nearest_neighbor_loss
from lightning_wm.watermarks.key_samples import ContentTrigger, training_tensors
from lightning_wm.watermarks.trigger_set import (
    TriggerSetKey,
    TriggerSetWatermark,
    _task_classes,
    differing_tensors,
    probe_set,
)


def stamp_normalized(inputs: Tensor, bits: Tensor, mask: Tensor, pixel_range: Tensor) -> Tensor:
    """Stamp 0/1 pixels ``bits`` where ``mask`` is set onto model inputs ``inputs`` ``(N, C, H, W)``, in the model's
    input space: ``pixel_range`` ``(2, C)`` holds the normalised values of pixels 0 and 1 (normalisation being
    affine per channel, a stamp in pixel space is this blend in input space)."""
    low, high = (pixel_range[i][:, None, None].to(inputs) for i in (0, 1))
    stamp = low + bits.to(inputs) * (high - low)
    return inputs * (1 - mask.to(inputs)) + stamp * mask.to(inputs)


class EWEKey(TriggerSetKey):
    """The owner's trigger (``stamp_bits``, ``stamp_mask``), source and target class, the embedding keys
    (``embed_*``), fresh held-out source images (``verify_sources``) with the trigger (``verify_*``), and clean
    probes.

    Verification: the suspect's hits (answers of the target class) on the triggered held-out images, ranked among
    its hits under ``null_triggers`` null triggers drawn like the owner's from ``null_seed`` and stamped on the
    same images (exact rank p-value, resolution ``1 / (N + 1)``).
    """

    scheme = "ewe"

    def derivation_problems(self, datamodule: Any = None) -> list[str] | None:
        """Rebuild the key from its secret and the owner's data and name the tensors that differ (None without
        the data)."""
        options = self.config.get("scheme_options")
        if datamodule is None or options is None:
            return None
        if getattr(datamodule, "train_dataset", None) is None:
            datamodule.setup("fit")
        scheme = EWEWatermark(**options)
        scheme._secret = self.secret
        rebuilt = scheme.build_key(datamodule, int(self.config["num_classes"]))
        return differing_tensors(rebuilt.tensors, self.tensors)

    def null_triggers(self) -> list[tuple[Tensor, Tensor, int]]:
        """The null triggers: ``(bits, mask, target class)`` each, drawn like the owner's from ``null_seed``."""
        rng = torch.Generator().manual_seed(int(self.config["null_seed"]))
        shape = tuple(self.config["input_shape"])
        stamper = ContentTrigger(size=float(self.config["stamp_size"]))
        source, classes = int(self.config["source_class"]), int(self.config["num_classes"])
        triggers = []
        for _ in range(int(self.config["null_triggers"])):
            bits, mask = stamper.stamp(shape, rng)
            target = (
                draw_target(source, classes, rng) if self.config["target_drawn"] else int(self.config["target_class"])
            )
            triggers.append((bits, mask, target))
        return triggers

    def null_hits(self, suspect: Suspect) -> tuple[list[int], int]:
        """The suspect's hits under every null trigger on the held-out source images, and the queries spent."""
        sources = self.tensors["verify_sources"]
        triggers = self.null_triggers()
        hits, queries = [], 0
        per_chunk = max(1, 8192 // len(sources))
        for start in range(0, len(triggers), per_chunk):
            chunk = triggers[start : start + per_chunk]
            stamped = torch.cat(
                [stamp_normalized(sources, bits, mask, self.tensors["pixel_range"]) for bits, mask, _ in chunk]
            )
            predicted, spent = query_labels(suspect, stamped)
            queries += spent
            for answers, (_, _, target) in zip(predicted.cpu().split(len(sources)), chunk, strict=True):
                hits.append(int((answers == target).sum()))
        return hits, queries

    def verify(self, suspect: Suspect, alpha: float = 0.01) -> Verdict:
        """Query the suspect (top-1 labels) on the owner's triggered images, the null triggers' and the probes.

        Args:
            suspect: an ``nn.Module`` returning logits, or a callable returning probabilities or labels.
            alpha: significance level (below ``1 / (N + 1)`` no suspect can be declared).
        """
        accuracy, hits, queries = self.key_accuracy(suspect)
        null, null_queries = self.null_hits(suspect)
        queries += null_queries
        draws = len(null)
        total = len(self.tensors["verify_labels"])
        p_value = empirical_p_value(hits, null)
        fewest = next((h for h in range(total + 1) if empirical_p_value(h, null) < alpha), total + 1)
        details: dict[str, Any] = {
            "hits": hits,
            "keys": total,
            "source_class": int(self.config["source_class"]),
            "null_mean_hits": sum(null) / draws,
            "null_max_hits": max(null),
            "smallest_p": 1.0 / (draws + 1),
            "label_kind": self.config["label_kind"],
            "verified_on": self.config["verified_on"],
            "queries_to_significance": -1,
        }
        undecidable, probe_queries = self.probe_suspect(suspect, details)
        queries += probe_queries
        return Verdict.decide(
            scheme=self.scheme,
            statistic=accuracy,
            statistic_name="trigger_accuracy",
            p_value=p_value,
            alpha=alpha,
            threshold=fewest / total,
            undecidable=undecidable,
            queries=queries,
            null_draws=draws,
            null=(
                f"the owner's secret trigger is exchangeable with {draws} null triggers drawn the same way and "
                f"stamped on the same {total} held-out source images of the same suspect (rank p-value, "
                f"resolution 1/{draws + 1})"
            ),
            details=details,
        )


def restamped(pixels: Tensor, stamper: ContentTrigger, rng: torch.Generator) -> Tensor:
    """``pixels`` (``(N, C, H, W)`` in ``[0, 1]``), each under a fresh random stamp of ``stamper`` from ``rng``."""
    stamped = []
    for image in pixels:
        bits, mask = stamper.stamp(tuple(image.shape), rng)
        stamped.append(image * (1 - mask.to(image)) + bits.to(image) * mask.to(image))
    return torch.stack(stamped)


MIN_VERIFY = 10
"""Fewest fresh source images an EWE key is verified on."""


def shares_of_source_images(available: int, num_keys: int, num_verify: int, source: int) -> tuple[int, int]:
    """``(num_keys, num_verify)`` within the ``available`` training images of the source class: as asked when there
    are enough, else scaled down in proportion (an attacker overwriting with its own key on its smaller split),
    with a warning; an error below ``MIN_VERIFY`` verification images and one key."""
    if available >= num_keys + num_verify:
        return num_keys, num_verify
    verify = max(MIN_VERIFY, round(available * num_verify / (num_keys + num_verify)))
    if available - verify < 1:
        raise ValueError(
            f"EWE needs {num_keys + num_verify} training images of its source class {source} (num_keys + "
            f"num_verify), at least {MIN_VERIFY + 1}; the training set has {available}: lower num_keys or num_verify"
        )
    rank_zero_warn(
        f"EWE: the training set has {available} images of source class {source}, fewer than num_keys + num_verify "
        f"= {num_keys + num_verify}: {available - verify} keys and {verify} verification images"
    )
    return available - verify, verify


def draw_target(source: int, num_classes: int, rng: torch.Generator) -> int:
    """A uniformly random class other than ``source``."""
    target = int(torch.randint(0, num_classes - 1, (1,), generator=rng))
    return target + int(target >= source)


class EWEWatermark(TriggerSetWatermark):
    """Embed Jia et al.'s entangled watermark: triggered source-class images labelled with the target class join
    every training batch (as :class:`~lightning_wm.watermarks.TriggerSetWatermark` injects keys), and the loss
    gains ``−snnl_weight · Σ_layers SNNL`` between those images and the batch's clean target-class images at
    ``layers`` (a loss term through :class:`~lightning_wm.WatermarkMixin`; features are read by forward hooks on
    the training forward pass, so no extra forward is run).

    The paper's settings (MNIST / Fashion-MNIST): source class 1 (here drawn from the key's secret unless given),
    target class 7, SNNL at three hidden layers, a watermark-to-task batch ratio and a temperature per layer that
    the paper learns (its code: initial temperatures 1, ``t_lr`` 0.1, cosine distance): with ``temperature_lr > 0``
    each layer's temperature takes a gradient step on that layer's SNNL after every step, T ← T − η_T ∂SNNL/∂T, so
    the model is entangled at the temperature where the two groups look most apart (the step is averaged over the
    processes of a distributed fit, so they keep one temperature per layer). The features are L2-normalised (the
    paper's cosine metric; maximising the SNNL of raw features also pushes the watermarked images apart without
    bound, which destabilised training on digits; see
    :func:`~lightning_wm.watermarks.functional.soft_nearest_neighbor_loss`), and the keys are mixed into each
    batch. The stamp is ``stamp_size`` of the image width, its pixels and position secret (the paper picks the
    position by saliency on a trained model).

    Args:
        source_class: the class whose images carry the trigger; None draws it from the key's secret.
        target_class: the class the trigger sends them to; None draws it (uniform over the other classes), and
            the null triggers then draw theirs the same way.
        layers: names of the modules whose outputs are entangled; None takes the last three ``Conv2d``/``Linear``
            layers before the output layer.
        snnl_weight: weight of the SNNL term (the paper's "factors").
        temperature: the SNNL temperature (every layer's initial one when ``temperature_lr > 0``).
        temperature_lr: η_T of the learned temperatures (the paper's code: 0.1); 0 keeps ``temperature`` fixed.
        stamp_size: width of the secret stamp as a fraction of the image width.
        null_triggers: null triggers the rank p-value uses (its resolution is ``1 / (N + 1)``).
        move_target: let the SNNL term move the target class's features too, as the paper does; by default they
            are held (detached) and only the watermarked images' features move toward them, which costs the task
            less.
        num_keys, num_verify, keys_per_batch, key_ratio, num_probes, key_path, seed, alpha, name: see
            :class:`~lightning_wm.watermarks.TriggerSetWatermark` (``num_verify`` fresh source images).
    """

    key_scheme = "ewe"

    def __init__(
        self,
        source_class: int | None = None,
        target_class: int | None = None,
        layers: list[str] | None = None,
        snnl_weight: float = 0.1,
        temperature: float = 1.0,
        temperature_lr: float = 0.0,
        stamp_size: float = 0.25,
        null_triggers: int = 499,
        move_target: bool = False,
        num_keys: int = 100,
        num_verify: int = 50,
        keys_per_batch: int | None = None,
        key_ratio: float = 0.1,
        num_probes: int = 100,
        key_path: str | None = None,
        seed: int | None = None,
        alpha: float = 0.01,
        name: str | None = None,
    ) -> None:
        if source_class is not None and source_class == target_class:
            raise ValueError(f"source_class and target_class are both {source_class}")
        if temperature <= 0 or snnl_weight < 0 or temperature_lr < 0:
            raise ValueError(
                "temperature must be positive and snnl_weight and temperature_lr non-negative, got "
                f"{temperature}, {snnl_weight}, {temperature_lr}"
            )
        if null_triggers < 1:
            raise ValueError(f"null_triggers must be positive, got {null_triggers}")
        super().__init__(
            ContentTrigger(size=stamp_size),
            num_keys=num_keys,
            num_verify=num_verify,
            keys_per_batch=keys_per_batch,
            key_ratio=key_ratio,
            num_probes=num_probes,
            key_path=key_path,
            seed=seed,
            alpha=alpha,
            name=name,
        )
        self.source_class = source_class
        self.target_class = target_class
        self.layers = list(layers) if layers is not None else None
        self.snnl_weight = snnl_weight
        self.temperature = temperature
        self.temperature_lr = temperature_lr
        self.temperatures: dict[str, float] = {}
        self._temperature_grads: dict[str, Tensor] = {}
        self._entangled: list[str] = []
        self.stamp_size = stamp_size
        self.null_triggers = null_triggers
        self.move_target = move_target
        self._handles: list[RemovableHandle] = []
        self._features: dict[str, Tensor] = {}
        self._key_rows: tuple[int, int] | None = None

    def default_name(self) -> str:
        return "ewe"

    def make_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> EWEKey:
        datamodule = self.split_datamodule(trainer, "the trigger is stamped on its training images")
        if getattr(datamodule, "train_dataset", None) is None:
            datamodule.setup("fit")
        return self.build_key(datamodule, _task_classes(pl_module, datamodule))

    def build_key(self, datamodule: Any, num_classes: int) -> EWEKey:
        """The key drawn from :meth:`key_rng` and the owner's data (what :meth:`EWEKey.derivation_problems`
        re-computes)."""
        inputs, labels = training_tensors(datamodule)
        rng = self.key_rng()
        source = self.source_class
        if source is None:
            source = int(torch.randint(0, num_classes, (1,), generator=rng))
        target = self.target_class if self.target_class is not None else draw_target(source, num_classes, rng)
        if not (0 <= source < num_classes and 0 <= target < num_classes):
            raise ValueError(f"source_class {source} and target_class {target} must be among the {num_classes} classes")
        pool = (labels == source).nonzero().flatten()
        num_keys, num_verify = shares_of_source_images(len(pool), self.num_keys, self.num_verify, source)
        count = num_keys + num_verify
        chosen = pool[torch.randperm(len(pool), generator=rng)[:count]]
        shape = tuple(inputs.shape[1:])
        bits, mask = ContentTrigger(size=self.stamp_size).stamp(shape, rng)
        channels = shape[0]
        pixel_range = datamodule.normalize(torch.stack([torch.zeros(channels), torch.ones(channels)])[:, :, None, None])
        pixel_range = pixel_range[:, :, 0, 0].to(inputs.dtype)
        sources = inputs[chosen]
        stamped = stamp_normalized(sources, bits, mask, pixel_range).to(inputs.dtype)
        target_labels = torch.full((count,), target, dtype=torch.long)
        config = {
            "generator": "EWE",
            "label_kind": "target",
            "random_labels": False,
            "num_classes": num_classes,
            "num_outputs": num_classes,
            "key_label": target,
            "source_class": source,
            "target_class": target,
            "target_drawn": self.target_class is None,
            "stamp_size": self.stamp_size,
            "null_triggers": self.null_triggers,
            "null_seed": int(torch.randint(0, 2**62, (1,), generator=rng)),
            "chance": 1.0 / num_classes,
            "input_shape": list(shape),
            "verified_on": "held-out keys",
            "null_test": "rank among null triggers",
            "scheme_options": {
                "source_class": self.source_class,
                "target_class": self.target_class,
                "stamp_size": self.stamp_size,
                "null_triggers": self.null_triggers,
                "num_keys": self.num_keys,
                "num_verify": self.num_verify,
                "num_probes": self.num_probes,
            },
        }
        tensors = {
            "embed_inputs": stamped[:num_keys],
            "embed_labels": target_labels[:num_keys],
            "verify_inputs": stamped[num_keys:],
            "verify_labels": target_labels[num_keys:],
            "verify_sources": sources[num_keys:],
            "stamp_bits": bits,
            "stamp_mask": mask,
            "pixel_range": pixel_range,
        }
        if self.num_probes:
            tensors["probe_inputs"], tensors["probe_labels"] = probe_set(datamodule, self.num_probes, rng)
        return EWEKey(config, tensors)

    def entangled_modules(self, pl_module: nn.Module) -> dict[str, nn.Module]:
        """The modules whose outputs the SNNL term entangles (``layers``, or the last three ``Conv2d``/``Linear``
        layers before the output layer)."""
        named = dict(pl_module.named_modules())
        if self.layers is not None:
            missing = [name for name in self.layers if name not in named]
            if missing:
                layers = [n for n, m in named.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
                raise ValueError(f"EWE: no module named {missing}; Conv2d/Linear modules: {', '.join(layers)}")
            return {name: named[name] for name in self.layers}
        layers = [(n, m) for n, m in named.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
        if len(layers) < 2:
            raise ValueError("EWE needs hidden Conv2d/Linear layers to entangle: give layers")
        return dict(layers[-4:-1])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._remove_hooks()
        entangled = self.entangled_modules(pl_module)
        self._entangled = list(entangled)
        for name, module in entangled.items():
            self._handles.append(module.register_forward_hook(self._keep_features(name)))

    def _keep_features(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            if module.training:
                self._features[name] = output

        return hook

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._features = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        x, y = (batch[0], batch[1]) if isinstance(batch, list) and len(batch) > 1 else (None, None)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if x is None or y is None or self._negative_rng is None:
            return
        self._key_rows = (len(x), len(batch[0]))
        sources = (y == int(self.key.config["source_class"])).nonzero().flatten()
        if len(sources) == 0:
            return
        count = self._key_rows[1] - self._key_rows[0]
        pick = sources[torch.randint(0, len(sources), (count,), generator=self._negative_rng).to(sources.device)]
        datamodule = trainer.datamodule
        pixels = datamodule.denormalize(x[pick].float()).clamp(0.0, 1.0)
        negatives = datamodule.normalize(restamped(pixels, self.generator, self._negative_rng))  # type: ignore[arg-type]
        batch[0] = torch.cat([batch[0], negatives.to(x.dtype)])
        batch[1] = torch.cat([batch[1], y[pick]])

    def _anchored(self, features: Tensor, is_key: Tensor) -> Tensor:
        """The features, the target class's detached unless ``move_target``: the key images are pulled into the
        target class's region, which stays where the task put it."""
        if self.move_target:
            return features
        mask = is_key.view(-1, *([1] * (features.dim() - 1)))
        return torch.where(mask, features, features.detach())

    def training_loss(self, pl_module: L.LightningModule, batch: Any, output: Any) -> Tensor | None:
        if self._key_rows is None or not self._features or self.snnl_weight == 0:
            return None
        start, end = self._key_rows
        labels = batch[1]
        is_key = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
        is_key[start:end] = True
        rows = is_key | (labels == int(self.key.config["target_class"]))
        if int((rows & ~is_key).sum()) < 1:
            return None
        terms = [
            self._layer_snnl(pl_module, name, self._anchored(features, is_key)[rows], is_key[rows])
            for name, features in self._features.items()
            if len(features) == len(labels)
        ]
        self._features = {}
        return -self.snnl_weight * torch.stack(terms).sum() if terms else None

    def _layer_snnl(self, pl_module: L.LightningModule, layer: str, features: Tensor, is_key: Tensor) -> Tensor:
        """The layer's SNNL at its temperature; with ``temperature_lr``, also its gradient in the temperature."""
        if self.temperature_lr == 0:
            return soft_nearest_neighbor_loss(features, is_key, self.temperature)
        temperature = torch.tensor(
            self.temperatures.get(layer, self.temperature), device=features.device, requires_grad=True
        )
        term = soft_nearest_neighbor_loss(features, is_key, temperature)
        (self._temperature_grads[layer],) = torch.autograd.grad(term, temperature, retain_graph=True)
        return term

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.temperature_lr > 0:
            self._step_temperatures(trainer, pl_module)

    def _step_temperatures(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """T ← T − η_T · (mean over the processes that took the layer's SNNL this step of ∂SNNL/∂T).

        Every process reaches this hook at every step, and all reduce one tensor of fixed size (a batch without a
        target-class image takes no SNNL, so the term's own code path would not be reached by all of them).
        """
        layers, grads = self._entangled, self._temperature_grads
        zero = torch.zeros((), device=pl_module.device)
        took = [torch.ones_like(zero) if n in grads else zero for n in layers]
        local = torch.stack([grads.get(n, zero).to(zero) for n in layers] + took)
        self._temperature_grads = {}
        total = trainer.strategy.reduce(local, reduce_op="sum").tolist()  # one transfer to the host per step
        sums, counts = total[: len(layers)], total[len(layers) :]
        for layer, grad_sum, count in zip(layers, sums, counts, strict=True):
            if count > 0:
                stepped = self.temperatures.get(layer, self.temperature) - self.temperature_lr * grad_sum / count
                self.temperatures[layer] = min(max(stepped, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])
                if logs_this_step(pl_module):
                    pl_module.log(f"wm/ewe/temperature/{layer}", self.temperatures[layer], on_step=True, on_epoch=False)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.temperatures = {}  # a fresh fit starts from ``temperature``; a resumed one reads its own back
        super().setup(trainer, pl_module, stage)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return {**state, "temperatures": dict(self.temperatures)} if state and self.temperatures else state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.temperatures = dict(state_dict.get("temperatures") or {})


TEMPERATURE_RANGE = (1e-2, 1e2)
"""Bounds of a learned temperature: the distances of L2-normalised features lie in [0, 4]."""


def _example(seed: int | None = None, key_path: str | None = None) -> EWEWatermark:
    return EWEWatermark(num_keys=30, num_verify=40, key_ratio=0.25, null_triggers=499, seed=seed, key_path=key_path)


SCHEME = SchemeSpec(
    name="ewe",
    callback=EWEWatermark,
    key=EWEKey,
    higher_is_watermarked=True,
    access="labels",
    example=_example,
    example_epochs=5,
)
"""The registry entry: 30 triggered images of a secret source class, a quarter of each batch, embedded in 5 epochs
of a width-8 network, verified on 40 fresh ones against 499 null triggers (p ≥ 0.002)."""
