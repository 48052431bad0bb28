"""Knockoff Nets (model-extraction) removal attack: a student trained on the victim's answers to images of another
distribution than its training data, drawn at random or by an adaptive bandit (Orekondy, Schiele and Fritz,
"Knockoff Nets: Stealing Functionality of Black-Box Models", CVPR 2019).

The thief holds no task data: its queries come from a transfer set (patches of scikit-learn's sample photographs,
offline, or Fashion-MNIST for a digits victim). Watermarks whose key lives near the owner's data or in its
trigger patterns are rarely queried, so the knockoff learns the task without them.
"""

from __future__ import annotations

import copy
import math
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_wm.attacks.base import RemovalAttack, Victim, load_victim
from lightning_wm.attacks.distillation import ApiOutput, _check_outputs, _output_size
from lightning_wm.models.reinit import reinitialised_copy
from lightning_wm.registry import AttackSpec

Selection = Literal["random", "adaptive"]
Reward = Literal["certainty", "diversity", "loss"]
TransferSet = Literal["photos", "fashion_mnist"]

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


def kmeans(points: Tensor, k: int, generator: torch.Generator, iterations: int = 20) -> Tensor:
    """Cluster index of each row of ``points`` (``(n, d)``) among ``k`` clusters: Lloyd's algorithm from a k-means++
    start (Arthur and Vassilvitskii 2007), in torch; an emptied cluster restarts at the farthest point."""
    k = min(k, len(points))
    centres = points[torch.randint(len(points), (1,), generator=generator)]
    for _ in range(1, k):
        distance = torch.cdist(points, centres).min(dim=1).values.square()
        weights = distance if float(distance.sum()) > 0 else torch.ones_like(distance)
        centres = torch.cat([centres, points[torch.multinomial(weights, 1, generator=generator)]])
    assignment = torch.cdist(points, centres).argmin(dim=1)
    for _ in range(iterations):
        for j in range(k):
            members = points[assignment == j]
            if len(members):
                centres[j] = members.mean(dim=0)
            else:
                centres[j] = points[torch.cdist(points, centres).min(dim=1).values.argmax()]
        updated = torch.cdist(points, centres).argmin(dim=1)
        if torch.equal(updated, assignment):
            break
        assignment = updated
    return assignment


def transfer_pixels(
    source: TransferSet | Tensor, count: int, shape: tuple[int, ...], seed: int, data_dir: str = "data"
) -> Tensor:
    """``count`` transfer images in ``[0, 1]`` of ``shape`` (C, H, W): sample-photo patches, Fashion-MNIST training
    images (resized), or rows of a given tensor of pixels."""
    channels, size = int(shape[0]), (int(shape[1]), int(shape[2]))
    rng = torch.Generator().manual_seed(seed)
    if isinstance(source, Tensor):
        images = source[torch.randperm(len(source), generator=rng)[:count]].float()
    elif source == "photos":
        from lightning_wm.data.sample_photos import sample_photo_patches

        return sample_photo_patches(count, size, rng, channels=channels)
    elif source == "fashion_mnist":
        from lightning_wm.data import FashionMNISTDataModule

        train = FashionMNISTDataModule(data_dir=data_dir, download=False).load()[0]
        images = train[torch.randperm(len(train), generator=rng)[:count]]
    else:
        raise ValueError(f"transfer_set must be 'photos', 'fashion_mnist' or a tensor of images, got {source!r}")
    if tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="area")
    if images.shape[1] != channels:
        images = images.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1)
    return images.clamp(0, 1).contiguous()


class GradientBandit:
    """The gradient bandit of Knockoff's adaptive strategy (Sutton and Barto, *Reinforcement Learning*, §2.8): a
    preference per arm, arms drawn from ``softmax(preferences)``, and each reward ``r`` of arm ``a`` moving
    ``H_a += lr·(r − r̄)·(1 − π_a)`` and every other ``H_b −= lr·(r − r̄)·π_b`` against the mean reward ``r̄``."""

    def __init__(self, arms: int, lr: float, generator: torch.Generator) -> None:
        self.preferences = torch.zeros(arms)
        self.lr = lr
        self.generator = generator
        self.mean_reward = 0.0
        self.rewards = 0

    @property
    def policy(self) -> Tensor:
        return torch.softmax(self.preferences, dim=0)

    def draw(self, n: int) -> Tensor:
        return torch.multinomial(self.policy, n, replacement=True, generator=self.generator)

    def update(self, arm: int, reward: float) -> None:
        self.rewards += 1
        self.mean_reward += (reward - self.mean_reward) / self.rewards
        step = self.lr * (reward - self.mean_reward) * self.policy
        self.preferences -= step
        self.preferences[arm] += self.lr * (reward - self.mean_reward)


class KnockoffAttack(RemovalAttack):
    """Train a student of any architecture on the victim's answers to a transfer set of another distribution.

    At ``fit`` the transfer set is built (``transfer_size`` images of ``transfer_set``, normalised like the
    Trainer's :class:`~lightning_wm.data.base.SplitDataModule`); the DataModule's batches only pace training
    (their size and number): their images are never sent. Each training step draws as many transfer images as the
    batch holds, ``random``\\ ly (without replacement, reshuffled when exhausted) or ``adaptive``\\ ly, sends them to
    the black-box victim (one query each, ``attack.queries``) and trains on the answers. Once ``query_budget`` is
    spent, training goes on over the answers bought (the paper's transfer set of ``B`` images), with no queries.

    Adaptive selection: images carry no labels, so the paper's hierarchy is reduced to ``arms`` clusters of the
    transfer set (k-means on 4 × 4 downsampled pixels); a :class:`GradientBandit` picks a cluster per image and
    an image within it, rewarded by the paper's ``reward``: ``certainty`` (top-1 minus top-2 probability of the
    answer), ``diversity`` (how far the answer exceeds, class by class, the running mean of answers) or ``loss``
    (the student's cross-entropy on the answer before the step: what it has yet to learn; the default).

    Args:
        victim: a ``lightning-wm fit`` checkpoint path, an ``ImageClassifier`` or a backbone.
        student: the network to train; None: the victim's architecture, re-initialised.
        transfer_set: ``photos`` (sample-photograph patches), ``fashion_mnist`` (read from ``data_dir``, or
            Debian's copy) or a tensor of images in ``[0, 1]``.
        transfer_size: images in the transfer set.
        selection: ``random`` or ``adaptive``.
        arms: clusters of the adaptive strategy.
        reward: the adaptive strategy's reward.
        bandit_lr: step size of the bandit's preferences.
        output: what the API serves: ``probs`` (the paper's setting) or top-1 ``labels`` (one-hot targets).
        temperature: softmax temperature of the served probabilities.
        query_budget: the most queries; None: a new query for every training image.
        seed: seed of the transfer set, the clusters and the selection.
        data_dir: where Fashion-MNIST is looked for.
        optimizer: optimizer factory.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        victim: Victim,
        student: nn.Module | None = None,
        transfer_set: TransferSet | Tensor = "photos",
        transfer_size: int = 5000,
        selection: Selection = "random",
        arms: int = 10,
        reward: Reward = "loss",
        bandit_lr: float = 0.01,
        output: ApiOutput = "probs",
        temperature: float = 1.0,
        query_budget: int | None = None,
        seed: int = 0,
        data_dir: str = "data",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if selection not in ("random", "adaptive"):
            raise ValueError(f"selection must be 'random' or 'adaptive', got {selection!r}")
        if reward not in ("certainty", "diversity", "loss"):
            raise ValueError(f"reward must be 'certainty', 'diversity' or 'loss', got {reward!r}")
        if transfer_size < 1 or arms < 1:
            raise ValueError(f"transfer_size and arms must be positive, got {transfer_size} and {arms}")
        if query_budget is not None and query_budget < 1:
            raise ValueError(f"query_budget must be positive, got {query_budget}")
        teacher = load_victim(victim)
        if student is None:
            student = reinitialised_copy(teacher)
        _check_outputs(student, teacher)
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["victim", "student", "transfer_set", "optimizer", "lr_scheduler"])
        self.transfer_set = transfer_set
        self.transfer_size = transfer_size
        self.selection = selection
        self.arms = arms
        self.reward = reward
        self.bandit_lr = bandit_lr
        self.output = output
        self.query_budget = query_budget
        self.seed = seed
        self.data_dir = data_dir
        self.num_classes = _output_size(teacher)
        self.model = copy.deepcopy(student)
        self.black_box(teacher, output=output, temperature=temperature)
        self.transfer_inputs: Tensor | None = None
        self.clusters: Tensor | None = None
        self.bandit: GradientBandit | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._order: list[Tensor] = []
        self._next: list[int] = []
        self._bought_x: list[Tensor] = []
        self._bought_y: list[Tensor] = []
        self._mean_answer: Tensor | None = None

    @classmethod
    def search_space(cls) -> dict[str, BaseDistribution]:
        """Selection strategy and reward, epochs and learning rate."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        return {
            "selection": CategoricalDistribution(["random", "adaptive"]),
            "reward": CategoricalDistribution(["certainty", "diversity", "loss"]),
            "epochs": IntDistribution(1, 20),
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
        }

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.transfer_inputs is None:
            datamodule = getattr(self._trainer, "datamodule", None)
            shape = tuple(getattr(datamodule, "input_shape", ()))
            if len(shape) != 3:
                raise ValueError("KnockoffAttack needs a lightning_wm SplitDataModule to learn the input shape")
            self.build_transfer_set(shape, getattr(datamodule, "normalize", None))

    def build_transfer_set(self, shape: tuple[int, ...], normalize: Any = None) -> Tensor:
        """Draw the transfer set (model inputs, normalised by ``normalize`` when given) and, for the adaptive
        strategy, cluster it into arms."""
        pixels = transfer_pixels(self.transfer_set, self.transfer_size, shape, self.seed, self.data_dir)
        self.transfer_inputs = normalize(pixels) if normalize is not None else pixels
        coarse = F.adaptive_avg_pool2d(pixels, 4).flatten(1)
        arms = self.arms if self.selection == "adaptive" else 1
        self.clusters = (
            kmeans(coarse, arms, self._generator) if arms > 1 else torch.zeros(len(pixels), dtype=torch.long)
        )
        count = int(self.clusters.max()) + 1
        self._order = [torch.nonzero(self.clusters == a).flatten() for a in range(count)]
        self._order = [members[torch.randperm(len(members), generator=self._generator)] for members in self._order]
        self._next = [0] * count
        if self.selection == "adaptive":
            self.bandit = GradientBandit(count, self.bandit_lr, self._generator)
        return self.transfer_inputs

    def _take(self, arm: int) -> int:
        """The next image of ``arm``, without replacement until the arm is exhausted, then reshuffled."""
        members = self._order[arm]
        if self._next[arm] >= len(members):
            self._order[arm] = members[torch.randperm(len(members), generator=self._generator)]
            self._next[arm] = 0
        self._next[arm] += 1
        return int(self._order[arm][self._next[arm] - 1])

    def _draw(self, n: int) -> tuple[Tensor, Tensor]:
        arms = self.bandit.draw(n) if self.bandit is not None else torch.zeros(n, dtype=torch.long)
        return torch.as_tensor([self._take(int(a)) for a in arms], dtype=torch.long), arms

    def _targets(self, answer: Tensor) -> Tensor:
        if self.output == "labels":
            return F.one_hot(answer.long(), num_classes=self.num_classes or -1).float()
        return answer.float()

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor] | None:
        assert self.transfer_inputs is not None
        n = len(batch[0])
        left = n if self.query_budget is None else min(n, self.query_budget - self.queries)
        if left > 0:
            index, arms = self._draw(left)
            x = self.transfer_inputs[index].to(self.device)
            target = self._targets(self.query(x))
            if self.query_budget is not None:
                self._bought_x.append(x.cpu())
                self._bought_y.append(target.cpu())
        else:
            bought_x, bought_y = torch.cat(self._bought_x), torch.cat(self._bought_y)
            pick = torch.randint(len(bought_x), (min(n, len(bought_x)),), generator=self._generator)
            x, target, arms = bought_x[pick].to(self.device), bought_y[pick].to(self.device), None
        logits = self(x)
        per_row = -(target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
        loss = per_row.mean()
        if arms is not None and self.bandit is not None:
            self._reward(arms, target.detach().cpu(), per_row.detach().cpu())
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "logits": logits}

    def _reward(self, arms: Tensor, target: Tensor, loss: Tensor) -> None:
        assert self.bandit is not None
        if self.reward == "certainty":
            top = target.topk(min(2, target.shape[-1]), dim=-1).values
            rewards = top[:, 0] - (top[:, 1] if top.shape[-1] > 1 else 0.0)
        elif self.reward == "diversity":
            mean = self._mean_answer if self._mean_answer is not None else target.mean(dim=0)
            rewards = (target - mean).clamp_min(0).sum(dim=-1)
            self._mean_answer = 0.9 * mean + 0.1 * target.mean(dim=0)
        else:
            rewards = loss
        for arm, r in zip(arms.tolist(), rewards.tolist()):
            if math.isfinite(r):
                self.bandit.update(arm, r)
        self.log("knockoff/reward", float(rewards.mean()))


ATTACK = AttackSpec(
    name="knockoff",
    attack=KnockoffAttack,
    threat_model="black-box",
    category="model extraction",
    example=lambda victim: KnockoffAttack(
        victim,
        transfer_size=256,
        selection="adaptive",
        arms=4,
        query_budget=128,
        optimizer=partial(torch.optim.Adam, lr=3e-3),
    ),
)
"""The registry entry (entry point ``knockoff`` of ``lightning_wm.attacks``)."""
