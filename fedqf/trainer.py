"""Local training and evaluation of one institution's model, with or without DP-SGD."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedqf.config import TrainingSection
from fedqf.data import Dataset
from fedqf.model import get_arrays
from fedqf.privacy import PrivacyLedger, PrivateTraining, make_private


@dataclass(frozen=True)
class DpSgdSettings:
    """How DP-SGD runs this round: the calibrated noise, the clip norm, and the noise source."""

    noise_multiplier: float
    max_grad_norm: float
    secure_mode: bool


@dataclass(frozen=True)
class TrainResult:
    """What one local training round produced."""

    arrays: list[npt.NDArray[np.float32]]
    num_examples: int
    steps: int
    sample_rate: float
    loss: float
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


def _tensor_dataset(data: Dataset) -> TensorDataset:
    return TensorDataset(torch.from_numpy(data.features), torch.from_numpy(data.labels))


def steps_per_epoch(*, num_examples: int, batch_size: int) -> int:
    """Optimizer steps in one local epoch: ceil(n / B), also with Poisson sampling (expected batch B)."""
    return max(1, -(-num_examples // batch_size))


def train_local(
    model: nn.Module,
    data: Dataset,
    *,
    training: TrainingSection,
    dp: DpSgdSettings | None,
    generator: torch.Generator,
    ledger: PrivacyLedger | None = None,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Run `training.local_epochs` epochs of SGD (DP-SGD when `dp` is given) from the model's current weights.

    FedProx: after every optimizer step the weights move by -lr * mu * (w - w_global), the gradient of
    (mu/2)||w - w_global||^2. That term does not depend on the data, so under DP-SGD it is post-processing
    and costs no privacy; putting it in the loss instead would be dropped by Opacus's per-sample clipping.

    Under DP-SGD the steps taken are committed to `ledger` exactly once, after training.
    """
    if dp is not None and ledger is None:
        raise ValueError("DP-SGD training needs the institution's PrivacyLedger")
    start = time.perf_counter()
    model.train()
    global_params = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(
        _tensor_dataset(data), batch_size=training.batch_size, shuffle=True, generator=generator
    )
    optimizer: torch.optim.Optimizer = torch.optim.SGD(
        model.parameters(), lr=training.learning_rate, momentum=training.momentum
    )
    sample_rate = min(1.0, training.batch_size / len(data))
    train_module: nn.Module = model
    private: PrivateTraining | None = None
    if dp is not None:
        private = make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            generator=None if dp.secure_mode else generator,
            secure_mode=dp.secure_mode,
        )
        train_module, optimizer, loader = private.module, private.optimizer, private.data_loader
        sample_rate = private.sample_rate
    criterion = nn.CrossEntropyLoss()
    steps = 0
    total_loss = 0.0
    seen = 0
    for _ in range(training.local_epochs):
        for features, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(train_module(features), labels)
            loss.backward()
            optimizer.step()
            steps += 1
            if len(labels):
                total_loss += float(loss.detach()) * len(labels)
            seen += len(labels)
            if proximal_mu > 0.0:
                with torch.no_grad():
                    for param, anchor in zip(model.parameters(), global_params):
                        param.sub_(training.learning_rate * proximal_mu * (param - anchor))
    if private is not None:
        assert ledger is not None
        steps = private.commit(ledger=ledger)
        # Opacus wraps the module; strip its hooks so the plain model can be evaluated and reused.
        from opacus import GradSampleModule

        if isinstance(train_module, GradSampleModule):
            train_module.remove_hooks()
    return TrainResult(
        arrays=get_arrays(model),
        num_examples=len(data),
        steps=steps,
        sample_rate=sample_rate,
        loss=total_loss / max(seen, 1),
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, *, batch_size: int = 1024) -> EvalResult:
    """Mean cross-entropy and accuracy of `model` on `data`."""
    model.eval()
    if len(data) == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss = 0.0
    correct = 0
    for features, labels in DataLoader(_tensor_dataset(data), batch_size=batch_size):
        logits = model(features)
        total_loss += float(criterion(logits, labels))
        correct += int((logits.argmax(dim=1) == labels).sum())
    return EvalResult(loss=total_loss / len(data), accuracy=correct / len(data), num_examples=len(data))
