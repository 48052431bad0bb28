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
better. Here the key also holds as many *null* frontier samples, made the same way (same model, same ``epsilon``,
other source images) and never trained on: the whole frontier set is generated first, and the owner's keys are a
uniformly random half of it (drawn from the key's secret). For a suspect that never saw which half was trained on,
owner and null samples are then exchangeable, and the one-sided Fisher exact test of its agreement on the owner's
keys against its agreement on the null keys is exact. It is exact under that exchangeability only, and the key is
not derivable from its secret alone (it depends on the model's gradients at key time): its verdicts say that the
key is not checkable, and prove less than a derived key's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_wm.models.reinit import clone_module
from lightning_wm.registry import SchemeSpec
from lightning_wm.side_training import CleanModel, quiet_trainer
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
                f"{len(false_y)} false adversaries at epsilon {self.epsilon}; lower num_keys"
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


class FrontierStitchingWatermark(TriggerSetWatermark):
    """Embed Le Merrer et al.'s frontier stitching: FGSM frontier samples of the model, with their true labels,
    injected into the training batches as :class:`~lightning_wm.watermarks.TriggerSetWatermark` injects keys.

    The key is made when ``fit`` starts, from the model as it is then: the paper's setting is fine-tuning a model
    already trained on the task (give it with ``ImageClassifier(pretrained=...)``, as
    ``configs/digits/frontier_stitching.yaml`` does). When embedding from scratch, ``warmup_epochs`` first trains
    the model in place on the owner's training data (cross-entropy and Adam at 2e-3 by side training's
    :class:`~lightning_wm.side_training.CleanModel` on a CPU Trainer, before the fit's own epochs; under DDP
    rank 0 warms up and DDP broadcasts its weights) so that the frontier is a trained model's. ``2 · num_keys``
    frontier samples are made (``true_fraction`` of them true adversaries), and a uniformly random half, drawn from
    the key's secret, become the owner's keys; the other half are null keys, never injected. Verification: the
    one-sided Fisher exact test of the suspect's agreement with the true labels on the owner's keys against its
    agreement on the null keys (see the module docstring for when it is exact); clean probes make degenerate
    suspects undecidable. The key is not derivable from its secret (``derivation_problems`` gives None).

    Args:
        epsilon, true_fraction: see :class:`FrontierTrigger`.
        num_keys: the owner's keys (as many null keys are made beside them).
        warmup_epochs: epochs of plain training before the key is made (0: the model as given).
        keys_per_batch, key_ratio, num_probes, key_path, seed, alpha, name: see
            :class:`~lightning_wm.watermarks.TriggerSetWatermark`.
    """

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

    def make_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> TriggerSetKey:
        datamodule = self.split_datamodule(trainer, "frontier samples are made from its training images")
        if getattr(datamodule, "train_dataset", None) is None:
            datamodule.setup("fit")
        num_classes = _task_classes(pl_module, datamodule)
        rng = self.key_rng()
        if self.warmup_epochs:
            self._warm_up(pl_module, datamodule, int(torch.randint(0, 2**62, (1,), generator=rng)))
        generator: FrontierTrigger = self.generator  # type: ignore[assignment]
        samples, is_true = generator.frontier(pl_module, datamodule, 2 * self.num_keys, rng)
        inputs, _ = training_tensors(datamodule)
        keys = datamodule.normalize(samples.images.float()).to(inputs.dtype)
        owner, null = torch.randperm(len(keys), generator=rng).split(self.num_keys)
        outputs = generator.num_outputs(num_classes)
        config = {
            **generator.config(),
            "label_kind": generator.label_kind,
            "random_labels": False,
            "num_classes": num_classes,
            "num_outputs": outputs,
            "key_label": None,
            "chance": 1.0 / num_classes,
            "input_shape": list(inputs.shape[1:]),
            "verified_on": "embedded keys",
            "null_test": "fisher",
            "generator_init": None,
            "true_adversaries": {"embed": int(is_true[owner].sum()), "null": int(is_true[null].sum())},
            "warmup_epochs": self.warmup_epochs,
            "scheme_options": {"num_keys": self.num_keys, "num_probes": self.num_probes},
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
        return TriggerSetKey(config, tensors)

    def _warm_up(self, pl_module: L.LightningModule, datamodule: Any, seed: int) -> None:
        copy = CleanModel(clone_module(pl_module))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            quiet_trainer(max_epochs=self.warmup_epochs, limit_val_batches=0).fit(
                copy, train_dataloaders=datamodule.train_dataloader()
            )
        pl_module.load_state_dict(copy.backbone.state_dict())


def _example(seed: int | None = None, key_path: str | None = None) -> FrontierStitchingWatermark:
    return FrontierStitchingWatermark(
        epsilon=0.25, num_keys=50, warmup_epochs=3, keys_per_batch=32, seed=seed, key_path=key_path
    )


SCHEME = SchemeSpec(
    name="frontier_stitching",
    callback=FrontierStitchingWatermark,
    key=TriggerSetKey,
    higher_is_watermarked=True,
    access="labels",
    example=_example,
    example_epochs=5,
)
"""The registry entry: the example warms a width-8 network up for 3 epochs, makes 50 owner and 50 null frontier
samples from it, and stitches the owner's in 5 more epochs, 32 per batch."""
