"""Distillation (model-extraction) removal attack: a student trained from the victim's API answers only
(Hinton et al. 2015's loss; settings of the SoK toolbox and Nasty Teacher in papers.md §6.3)."""

from __future__ import annotations

import copy
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_wm.attacks.base import RemovalAttack, Victim, last_linear, load_victim
from lightning_wm.models.reinit import reinitialised_copy
from lightning_wm.registry import AttackSpec
from lightning_wm.verify.verdict import NotApplicable

ApiOutput = Literal["probs", "labels"]

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


def _output_size(model: nn.Module, example: Tensor | None = None) -> int | None:
    """Logits of ``model``: measured on ``example`` when given, else its last linear layer's width (None if none)."""
    if example is None:
        try:
            return last_linear(model).out_features
        except ValueError:
            return None
    param = next(model.parameters(), None)
    if param is not None:
        example = example.to(param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(model(example).shape[-1])
    finally:
        model.train(was_training)


def check_distillation_options(output: str, soft_weight: float, temperature: float, query_budget: int | None) -> None:
    """Raise ``ValueError`` on an API output other than probabilities or labels, a soft weight outside [0, 1], a
    non-positive temperature or query budget."""
    if output not in ("probs", "labels"):
        raise ValueError(f"output must be 'probs' or 'labels', got {output!r}")
    if not 0.0 <= soft_weight <= 1.0:
        raise ValueError(f"soft_weight must be in [0, 1], got {soft_weight}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if query_budget is not None and query_budget < 1:
        raise ValueError(f"query_budget must be positive, got {query_budget}")


def distillation_search_space() -> dict[str, BaseDistribution]:
    """What a distilling thief tunes: the temperature, the epochs, the learning rate and what the API serves."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    return {
        "temperature": FloatDistribution(1.0, 10.0),
        "epochs": IntDistribution(1, 10),
        "lr": FloatDistribution(1e-4, 1e-1, log=True),
        "output": CategoricalDistribution(["probs", "labels"]),
    }


class DistillationAttack(RemovalAttack):
    """Train a student of any architecture from black-box queries of the victim.

    The victim is an API (:class:`~lightning_wm.verify.BlackBoxModel`) serving softmax probabilities at
    temperature ``T`` (``output="probs"``) or only its top-1 label (``output="labels"``); the student never
    sees the victim's weights, and checkpoints never hold them. Every training batch is sent to the API (each
    row is one query, ``attack.queries``). The query data is the training data of ``fit``: the attacker split
    (``train_split: attacker``) or any other DataModule (surrogate data).

    Loss: ``α·T²·KL(p_victim^T ‖ softmax(z/T)) + (1−α)·CE(z, y)`` for probabilities, ``α·CE(z, victim label) +
    (1−α)·CE(z, y)`` for labels; ``α = 1`` uses no true labels (the realistic theft setting; the SoK toolbox uses
    T = 3, α = 1; Nasty Teacher T = 4, α = 0.9).

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        student: the network to train, any architecture with as many outputs as the victim; a copy is trained
            (``attack.model``), so one student configuration serves many attacks. ``None``: the victim's own
            architecture, re-initialised (the attacker knows the architecture, not the weights).
        temperature: T of the served probabilities and of the student's softmax.
        output: ``probs`` (soft labels) or ``labels`` (top-1 only).
        soft_weight: weight of the distillation term; ``1 - soft_weight`` goes to the true-label cross-entropy.
        query_budget: stop training once this many queries were spent (per process under DDP); None: no limit.
        optimizer: optimizer factory.
        lr_scheduler: optional scheduler factory.

    Raises:
        ValueError: the student's output size differs from the victim's, or the victim does not load.
    """

    def __init__(
        self,
        victim: Victim,
        student: nn.Module | None = None,
        temperature: float = 3.0,
        output: ApiOutput = "probs",
        soft_weight: float = 1.0,
        query_budget: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        check_distillation_options(output, soft_weight, temperature, query_budget)
        teacher = load_victim(victim)
        if student is None:
            student = reinitialised_copy(teacher)
        _check_outputs(student, teacher)
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["victim", "student", "optimizer", "lr_scheduler"])
        self.temperature = temperature
        self.output = output
        self.soft_weight = soft_weight
        self.query_budget = query_budget
        self.model = copy.deepcopy(student)
        self.black_box(teacher, output=output, temperature=temperature)

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """Temperature, epochs, learning rate and what the API serves (soft labels or top-1 labels)."""
        return distillation_search_space()

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "train_dataset", None) if stage == "fit" else None
        if dataset is not None and len(dataset) > 0:
            example = dataset[0][0].unsqueeze(0)
            _check_outputs(self.model, self._victim.module, example)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor] | None:
        x, y = batch[0], batch[1]
        if self.query_budget is not None:
            left = self.query_budget - self.queries
            if left <= len(x):
                self.trainer.should_stop = True
            if left <= 0:
                return None
            x, y = x[:left], y[:left]
        answer = self.query(x)
        logits = self(x)
        if self.output == "probs":
            t = self.temperature
            kd = F.kl_div(F.log_softmax(logits.float() / t, dim=-1), answer, reduction="batchmean") * t * t
        else:
            kd = F.cross_entropy(logits, answer)
        w = self.soft_weight
        loss = kd if w == 1.0 else w * kd + (1.0 - w) * F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "logits": logits}


class OutputMismatchError(ValueError, NotApplicable):
    """The configured student's outputs differ from the victim's (e.g. a K-class student against the K+1 outputs of
    the new-label scheme): the attack as configured does not fit this victim, so the benchmark shows the cell as
    n/a with the reason instead of an error."""


def _check_outputs(student: nn.Module, victim: nn.Module, example: Tensor | None = None) -> None:
    student_size, victim_size = _output_size(student, example), _output_size(victim, example)
    if student_size is not None and victim_size is not None and student_size != victim_size:
        raise OutputMismatchError(
            f"the student ({type(student).__name__}) outputs {student_size} logits but the victim outputs "
            f"{victim_size}: build the student with num_classes={victim_size}"
        )


ATTACK = AttackSpec(
    name="distillation",
    attack=DistillationAttack,
    threat_model="black-box",
    category="model extraction",
    example=lambda victim: DistillationAttack(victim, temperature=3.0, optimizer=partial(torch.optim.Adam, lr=1e-3)),
)
"""The registry entry (entry point ``distillation`` of ``lightning_wm.attacks``)."""
