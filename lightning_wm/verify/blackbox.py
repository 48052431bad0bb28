"""Query-only access to a suspect model, with a query counter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_wm.verify.verdict import NotApplicable

Suspect = nn.Module | Callable[[Tensor], Tensor]


class BlackBoxModel:
    """Wrap a module so that it can only be queried, and count the queries.

    The black-box threat model of trigger-set and output-distribution schemes and of the distillation and evasion
    attacks: the caller sees probabilities (``output="probs"``) or top-1 labels (``output="labels"``), never
    weights or logits. Each input row is one query.

    Args:
        model: the module to wrap (an ``ImageClassifier``, a backbone, any ``nn.Module`` returning logits), or a
            callable that already returns probabilities or labels.
        output: ``"probs"`` for the softmax distribution, ``"labels"`` for the argmax.
        temperature: softmax temperature of the probabilities an API would serve.
        batch_size: queries are sent in chunks of this size.
    """

    def __init__(
        self,
        model: Suspect,
        output: Literal["probs", "labels"] = "probs",
        temperature: float = 1.0,
        batch_size: int = 512,
    ) -> None:
        if output not in ("probs", "labels"):
            raise ValueError(f"output must be 'probs' or 'labels', got {output!r}")
        self.model = model
        self.output = output
        self.temperature = temperature
        self.batch_size = batch_size
        self.queries = 0

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        chunks = [self._query(chunk) for chunk in x.split(self.batch_size)]
        self.queries += len(x)
        return torch.cat(chunks)

    def _query(self, x: Tensor) -> Tensor:
        if isinstance(self.model, BlackBoxModel):
            out = self.model(x)
        elif isinstance(self.model, nn.Module):
            out = _forward_eval(self.model, x)
        else:
            out = self.model(x)
        if out.dtype in (torch.int64, torch.int32) or out.dim() == 1:
            if self.output == "probs":
                raise ValueError("the suspect returns labels only; query it with output='labels'")
            return out.long()
        if not isinstance(self.model, nn.Module) or isinstance(self.model, BlackBoxModel):
            probs = out.float()
        else:
            probs = torch.softmax(out.float() / self.temperature, dim=-1)
        return probs if self.output == "probs" else probs.argmax(dim=-1)


def _forward_eval(model: nn.Module, x: Tensor) -> Tensor:
    """Run ``model`` in eval mode on its own device and dtype, then restore its mode."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype if param.is_floating_point() else x.dtype)
        return model(x).cpu()
    finally:
        model.train(was_training)


def query_labels(suspect: Suspect, x: Tensor) -> tuple[Tensor, int]:
    """Top-1 labels of ``suspect`` on ``x`` and the number of queries spent."""
    box = suspect if isinstance(suspect, BlackBoxModel) else BlackBoxModel(suspect, output="labels")
    before = box.queries
    out = box(x)
    if out.dim() == 2:
        out = out.argmax(dim=-1)
    return out, box.queries - before


def query_probs(suspect: Suspect, x: Tensor) -> tuple[Tensor, int]:
    """Output distribution of ``suspect`` on ``x`` and the number of queries spent."""
    box = suspect if isinstance(suspect, BlackBoxModel) and suspect.output == "probs" else BlackBoxModel(suspect)
    before = box.queries
    out = box(x)
    return out, box.queries - before


def check_outputs(probs: Tensor, expected: int, scheme: str) -> None:
    """Refuse a suspect whose output distributions do not have the ``expected`` classes of the key's model.

    Raises:
        ValueError: a one-line message giving both numbers.
    """
    outputs = probs.shape[-1] if probs.dim() == 2 else None
    if outputs != expected:
        got = f"{outputs} outputs per query" if outputs is not None else f"outputs of shape {tuple(probs.shape)}"
        raise ValueError(
            f"the suspect returns {got}, the {scheme} key is for models with {expected} outputs: "
            "query the suspect's class probabilities over the same classes"
        )


def white_box_module(suspect: Suspect, scheme: str) -> nn.Module:
    """The suspect's module, for a scheme that reads weights.

    Raises:
        NotApplicable: the suspect is a callable, or a module that serves answers only (``exposes_weights`` False,
            as an attack that puts the stolen model behind an API does).
    """
    if not isinstance(suspect, nn.Module) or isinstance(suspect, BlackBoxModel):
        raise NotApplicable(f"white-box scheme {scheme}: the suspect is a query-only callable and exposes no weights")
    if not getattr(suspect, "exposes_weights", True):
        raise NotApplicable(
            f"white-box scheme {scheme}: the {type(suspect).__name__} serves an API and exposes no weights"
        )
    return suspect


def degenerate_reason(predicted: Tensor, labels: Tensor, num_classes: int) -> str | None:
    """Why a suspect's top-1 answers ``predicted`` on clean task inputs (true ``labels``) carry no information, or
    None when they do.

    A test can be exact and still say nothing about a suspect that answers one class for everything or guesses
    (verdicts.md, "Degenerate suspects"): its verdict is "undecidable". Near-constant means more than 80% of the
    answers in one class; chance-level means an accuracy below twice the chance rate ``1/K``.
    """
    if len(predicted) == 0:
        return None
    counts = torch.bincount(predicted.long().flatten().cpu(), minlength=num_classes)
    share = float(counts.max()) / len(predicted)
    accuracy = float((predicted.cpu() == labels.cpu()).float().mean())
    if share > DEGENERATE_SHARE:
        return f"the suspect answers class {int(counts.argmax())} to {share:.0%} of clean task inputs (near-constant)"
    if accuracy < DEGENERATE_ACCURACY_FACTOR / num_classes:
        return f"the suspect's accuracy on clean task inputs is {accuracy:.1%}, at chance level ({1 / num_classes:.0%})"
    return None


DEGENERATE_SHARE = 0.8
DEGENERATE_ACCURACY_FACTOR = 2.0


def probe(
    suspect: Suspect, inputs: Tensor | None, labels: Tensor | None, num_classes: int
) -> tuple[str | None, int, float | None]:
    """Query ``suspect`` on a key's clean probe inputs: why it is degenerate (or None), the queries spent and its
    accuracy on them; ``(None, 0, None)`` for a key without probes."""
    if inputs is None or labels is None:
        return None, 0, None
    predicted, queries = query_labels(suspect, inputs)
    accuracy = float((predicted.cpu() == labels).float().mean())
    return degenerate_reason(predicted, labels, num_classes), queries, accuracy
