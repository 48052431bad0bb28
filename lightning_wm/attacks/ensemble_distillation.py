"""Ensemble distillation (model-extraction) removal attack: one student learns the averaged outputs of several
victims (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015, distil an ensemble into one model; the
SoK's threat of a thief who holds several models of the task, Lukas et al., S&P 2022).

Averaging dilutes what any one victim's watermark adds to its answers: a key sample's owner label is out-voted by
the victims that never learned it, while the task, on which they agree, survives.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_wm.attacks.base import RemovalAttack, Victim, copy_victim, load_victim
from lightning_wm.attacks.distillation import (
    ApiOutput,
    _check_outputs,
    _output_size,
    check_distillation_options,
    distillation_search_space,
)
from lightning_wm.attacks.retraining import LabelCache
from lightning_wm.models.hidden import HiddenModule
from lightning_wm.models.reinit import reinitialised_copy
from lightning_wm.registry import AttackSpec
from lightning_wm.verify.blackbox import BlackBoxModel

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


class EnsembleDistillationAttack(LabelCache, RemovalAttack):
    """Distil one student from the average of several black-box victims' answers.

    Each victim is held as its own query-only API (:class:`~lightning_wm.verify.BlackBoxModel`, outside the
    attack's parameters and checkpoints); an image sent to the ensemble is one query per victim, and
    ``attack.queries`` is their sum. The target is the mean of the victims' probabilities at temperature ``T``
    (``output="probs"``) or their vote shares (``output="labels"``: the mean of one-hot top-1 labels); the loss is
    ``T²·KL(target ‖ softmax(z/T))``, mixed with the true labels' cross-entropy by ``soft_weight``. Answers are
    cached per image (:class:`~lightning_wm.attacks.retraining.LabelCache`).

    Args:
        victims: checkpoint paths, ``ImageClassifier``\\ s or backbones (at least one), all with the same outputs;
            a single one is a list of one (how the benchmark and the search hand over the marked model).
        student: the network to train; None: the first victim's architecture, re-initialised.
        extra_victims: more victims after ``victims`` (other models of the task held by the thief).
        temperature: T of the served probabilities and of the student's softmax.
        output: what each API serves, ``probs`` or ``labels``.
        soft_weight: weight of the distillation term; ``1 - soft_weight`` goes to the true labels.
        query_budget: the most queries, all victims together; None: no limit.
        optimizer: optimizer factory.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        victims: Victim | list[Victim],
        student: nn.Module | None = None,
        extra_victims: list[Victim] | None = None,
        temperature: float = 3.0,
        output: ApiOutput = "probs",
        soft_weight: float = 1.0,
        query_budget: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        victims = [victims] if isinstance(victims, (str, nn.Module)) else list(victims)
        victims += list(extra_victims or [])
        if not victims:
            raise ValueError("victims must be a checkpoint path, a module or a non-empty list of them")
        check_distillation_options(output, soft_weight, temperature, query_budget)
        teachers = [load_victim(v) for v in victims]
        if student is None:
            student = reinitialised_copy(teachers[0])
        for teacher in teachers:
            _check_outputs(student, teacher)
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["victims", "student", "extra_victims", "optimizer", "lr_scheduler"])
        self.temperature = temperature
        self.output = output
        self.soft_weight = soft_weight
        self.query_budget = query_budget
        self.cost_per_input = len(teachers)
        self.model = copy.deepcopy(student)
        self._victims = nn.ModuleList(HiddenModule(copy_victim(t)) for t in teachers)
        self.num_classes = _output_size(teachers[0])
        self._apis = [BlackBoxModel(v.module, output=output, temperature=temperature) for v in self._victims]  # type: ignore[arg-type]

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """Temperature, epochs, learning rate and what the APIs serve."""
        return distillation_search_space()

    @property
    def queries(self) -> int:
        """Queries sent to all victims together."""
        return sum(api.queries for api in self._apis)

    def answer_new(self, x: Tensor) -> Tensor:
        """The ensemble's target on ``x``: the mean of the victims' probabilities or one-hot labels."""
        answers = []
        for api in self._apis:
            out = api(x).to(x.device)
            if self.output == "labels":
                out = F.one_hot(out.long(), num_classes=self.num_classes or -1).float()
            answers.append(out.float())
        return torch.stack(answers).mean(dim=0)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor] | None:
        x, y, target = self.answers(batch[0], batch[1])
        if len(x) == 0:
            return None
        logits = self(x)
        t = self.temperature
        kd = F.kl_div(F.log_softmax(logits.float() / t, dim=-1), target, reduction="batchmean") * t * t
        w = self.soft_weight
        loss = kd if w == 1.0 else w * kd + (1.0 - w) * F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "logits": logits}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["attack_cost"]["victim_queries"] = [api.queries for api in self._apis]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        for api, spent in zip(self._apis, checkpoint.get("attack_cost", {}).get("victim_queries", [])):
            api.queries = int(spent)


ATTACK = AttackSpec(
    name="ensemble_distillation",
    attack=EnsembleDistillationAttack,
    threat_model="black-box",
    category="model extraction",
    example=lambda victim: EnsembleDistillationAttack(
        [victim, victim], query_budget=300, optimizer=partial(torch.optim.Adam, lr=3e-3)
    ),
)
"""The registry entry (entry point ``ensemble_distillation`` of ``lightning_wm.attacks``); its example serves the
one victim it is given twice (two copies, each its own API)."""
