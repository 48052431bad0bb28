"""Retraining (model-extraction) removal attack: a fresh student trained on the victim's top-1 labels of the
attacker's data, in the victim's architecture or any other (the SoK's "retraining", Lukas et al., "SoK: How Robust
is Image Classification Deep Neural Network Watermarking?", S&P 2022).

The attacker labels each of its images once through the API: answers are cached by input, so later epochs cost no
queries, and ``query_budget`` caps the labelled images, not the epochs (the student keeps training on what it
bought). :class:`LabelCache` carries that bookkeeping for the other query-based attacks of this package.
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_wm.attacks.base import Victim
from lightning_wm.attacks.distillation import DistillationAttack
from lightning_wm.registry import AttackSpec

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


def input_digest(x: Tensor) -> bytes:
    """A 16-byte digest of one input row: the key under which its answer is cached."""
    return hashlib.blake2b(x.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()


class LabelCache:
    """Answers of the victim cached per input, under a query budget.

    A mixin for attacks that hold ``query_budget`` (None: no limit), ``queries`` (the black-box counter) and
    ``cost_per_input`` (queries one new input costs: 1, or ``samples`` for a smoothed label, or the number of
    victims of an ensemble), and implement :meth:`answer_new`. :meth:`answers` returns the answers of a batch,
    sending only inputs not seen before and, once the budget is spent, dropping the rows it could not buy.
    """

    query_budget: int | None
    cost_per_input: int = 1

    def answer_new(self, x: Tensor) -> Tensor:
        """The victim's answers on inputs not yet asked (spends queries)."""
        raise NotImplementedError

    def answers(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, y, answers)`` restricted to the rows already answered or still affordable."""
        cache: dict[bytes, Tensor] = self.__dict__.setdefault("_answer_cache", {})
        keys = [input_digest(row) for row in x]
        first = {k: i for i, k in reversed(list(enumerate(keys))) if k not in cache}
        new = sorted(first.values())
        if self.query_budget is not None:
            left = max(0, self.query_budget - self.queries) // self.cost_per_input  # type: ignore[attr-defined]
            new = new[:left]
        if new:
            fresh = self.answer_new(x[new]).detach().cpu()
            for i, answer in zip(new, fresh):
                cache[keys[i]] = answer
        keep = [i for i, k in enumerate(keys) if k in cache]
        if not keep:
            return x[:0], y[:0], x.new_zeros(0)
        index = torch.as_tensor(keep, device=x.device)
        return x[index], y[index], torch.stack([cache[keys[i]] for i in keep]).to(x.device)

    @property
    def labelled(self) -> int:
        """How many distinct inputs have been answered."""
        return len(self.__dict__.get("_answer_cache", {}))


class RetrainingAttack(LabelCache, DistillationAttack):
    """Train a fresh student on the victim's top-1 labels only (the SoK's retraining; with ``student`` of another
    architecture, cross-architecture retraining).

    The victim serves labels through a :class:`~lightning_wm.verify.BlackBoxModel`; each distinct training image is
    sent once (``attack.queries``) and its label cached. Loss: ``α·CE(z, victim label) + (1−α)·CE(z, y)``;
    ``α = soft_weight = 1`` uses no true labels.

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        student: the network to train (any ``nn.Module`` with as many outputs as the victim; a copy is trained);
            None: the victim's architecture, re-initialised.
        soft_weight: weight of the victim-label term.
        query_budget: the most images labelled by the victim; None: the whole training set.
        optimizer: optimizer factory.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        victim: Victim,
        student: nn.Module | None = None,
        soft_weight: float = 1.0,
        query_budget: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(
            victim,
            student=student,
            temperature=1.0,
            output="labels",
            soft_weight=soft_weight,
            query_budget=query_budget,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
        )

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """Epochs, learning rate and the weight of the victim's labels against the attacker's own."""
        from optuna.distributions import FloatDistribution, IntDistribution

        return {
            "epochs": IntDistribution(1, 20),
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
            "soft_weight": FloatDistribution(0.5, 1.0),
        }

    def answer_new(self, x: Tensor) -> Tensor:
        return self.query(x)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor] | None:
        x, y, labels = self.answers(batch[0], batch[1])
        if len(x) == 0:
            return None
        logits = self(x)
        loss = F.cross_entropy(logits, labels)
        if self.soft_weight < 1.0:
            loss = self.soft_weight * loss + (1.0 - self.soft_weight) * F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "logits": logits}


ATTACK = AttackSpec(
    name="retraining",
    attack=RetrainingAttack,
    threat_model="black-box",
    category="model extraction",
    example=lambda victim: RetrainingAttack(victim, query_budget=150, optimizer=partial(torch.optim.Adam, lr=3e-3)),
)
"""The registry entry (entry point ``retraining`` of ``lightning_wm.attacks``)."""
