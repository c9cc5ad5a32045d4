"""Book-keeping clipping (fedqf.bookkeeping): the clipped sums equal a record-by-record reference, and DP-SGD with it
trains exactly as Opacus's hooks mode does with the same seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedqf.bookkeeping import BookkeepingClipper
from fedqf.config import GradSampleMode, ModelName, ModelSection, TrainingSection
from fedqf.data import Dataset
from fedqf.errors import ConfigError
from fedqf.model import ResNet18, build_model
from fedqf.privacy import PoissonBatches, PrivacyLedger
from fedqf.trainer import DpSgdSettings, train_local


class Mixed(nn.Module):
    """Every layer kind and both norm methods: a wide conv on many positions (materialised), a conv on 2x2
    positions (ghost norm), dilation, stride, biases on and off, GroupNorm, LayerNorm on a sequence, a Linear on
    a sequence and one on flat features."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.n1 = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 32, 3, stride=2, padding=2, dilation=2, bias=False)
        self.c3 = nn.Conv2d(32, 32, 3, stride=2, padding=1)  # 2x2 output: T (d + p) < d p, the ghost norm
        self.seq = nn.Linear(32, 12)
        self.ln = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.n1(self.c1(x)))
        x = torch.tanh(self.c3(torch.tanh(self.c2(x))))  # batch x 32 x 2 x 2
        tokens = x.flatten(2).transpose(1, 2)  # batch x 4 positions x 32
        tokens = self.ln(torch.tanh(self.seq(tokens)))
        out: torch.Tensor = self.fc(tokens.mean(1))
        return out


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               clip: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sum over records of each record's gradient clipped to norm `clip`, one record at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(y)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum"), params)
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for total, grad in zip(sums, grads):
            total += grad * factor
    return sums, torch.stack(norms)


def _clipped(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> tuple[list[torch.Tensor],
                                                                                       torch.Tensor]:
    clipper = BookkeepingClipper(model, max_grad_norm=clip)
    try:
        with clipper.step():
            clipper.backward(F.cross_entropy(model(x), y, reduction="sum"), batch_size=len(y))
    finally:
        clipper.close()
    assert clipper.last_norms is not None
    return [p.grad.clone() for p in model.parameters() if p.requires_grad], clipper.last_norms  # type: ignore[union-attr]


@pytest.mark.parametrize("clip", [1e-3, 0.5, 1e6])  # every record clipped, some, none
def test_clipped_sum_equals_record_by_record_reference(clip: float) -> None:
    torch.manual_seed(0)
    model = Mixed().double()
    x = torch.randn(7, 3, 9, 9, dtype=torch.float64)
    y = torch.randint(0, 5, (7,))
    want, want_norms = _reference(model, x, y, clip)
    got, norms = _clipped(model, x, y, clip)
    torch.testing.assert_close(norms.double(), want_norms, rtol=1e-6, atol=1e-9)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)
    # The model is a plain module again: parameters train, no hook left behind.
    assert all(p.requires_grad for p in model.parameters())
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_clipped_sum_on_resnet18_and_frozen_parameters() -> None:
    torch.manual_seed(1)
    model = ResNet18(num_classes=10)
    model.stem.weight.requires_grad_(False)  # a frozen layer gets no gradient and no share of the norm
    x = torch.randn(3, 3 * 32 * 32)
    y = torch.tensor([1, 4, 9])
    want, want_norms = _reference(model, x, y, 1.0)
    got, norms = _clipped(model, x, y, 1.0)
    torch.testing.assert_close(norms.double(), want_norms.double(), rtol=1e-4, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert model.stem.weight.grad is None and not model.stem.weight.requires_grad


def test_empty_batch_gives_zero_gradients() -> None:
    model = Mixed()
    clipper = BookkeepingClipper(model, max_grad_norm=1.0)
    with clipper.step():
        clipper.backward(torch.zeros(()), batch_size=0)
    clipper.close()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_unsupported_layer_is_refused_by_name() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ConfigError, match=r"layer '1' \(BatchNorm1d\).*expected only Linear, Conv2d"):
        BookkeepingClipper(model, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="groups=2"):
        BookkeepingClipper(nn.Conv2d(4, 4, 3, groups=2), max_grad_norm=1.0)


def test_layer_used_twice_is_refused() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.fc(self.fc(x))
            return out

    model = Twice()
    clipper = BookkeepingClipper(model, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="'fc' runs twice"), clipper.step():
        model(torch.randn(2, 3))
    clipper.close()
    assert all(p.requires_grad for p in model.parameters())


def test_poisson_batches_follow_opacus_sampler() -> None:
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    ours = PoissonBatches(num_records=50, sample_rate=0.1, generator=torch.Generator().manual_seed(3))
    theirs = UniformWithReplacementSampler(num_samples=50, sample_rate=0.1, generator=torch.Generator().manual_seed(3))
    torch.empty((), dtype=torch.int64).random_(generator=theirs.generator)  # the DataLoader iterator's base seed
    assert [b.tolist() for b in ours] == list(theirs)
    assert len(ours) == 10


def test_poisson_batches_split_records_between_workers() -> None:
    shards = [PoissonBatches(num_records=101, sample_rate=1.0, generator=torch.Generator().manual_seed(r), rank=r,
                             world_size=3) for r in range(3)]
    first = [next(iter(shard)).tolist() for shard in shards]
    assert sorted(i for batch in first for i in batch) == list(range(101))  # rate 1: the shards partition all


def _train(mode: GradSampleMode, *, momentum: float = 0.9) -> tuple[list[np.ndarray], PrivacyLedger, float]:
    rng = np.random.default_rng(0)
    data = Dataset(features=rng.standard_normal((600, 20), dtype=np.float32),
                   labels=rng.integers(0, 3, 600).astype(np.int64))
    model = build_model(ModelSection(name=ModelName.MLP, hidden=(32,)), num_features=20, num_classes=3,
                        generator=torch.Generator().manual_seed(1))
    training = TrainingSection(local_epochs=2, batch_size=50, learning_rate=0.1, momentum=momentum,
                               grad_sample_mode=mode)
    ledger = PrivacyLedger()
    result = train_local(model, data, training=training, seed=3, ledger=ledger,
                         dp=DpSgdSettings(noise_multiplier=1.1, max_grad_norm=0.7, secure_mode=False))
    assert result.steps == 24
    return result.arrays, ledger, result.loss


def test_training_with_bookkeeping_equals_opacus_hooks() -> None:
    """Same seeds: the same Poisson batches, the same noise, the same clipped sums, so the same model and budget."""
    hooks, hooks_ledger, hooks_loss = _train(GradSampleMode.HOOKS)
    ours, ours_ledger, ours_loss = _train(GradSampleMode.BOOKKEEPING)
    for a, b in zip(hooks, ours):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert ours_loss == pytest.approx(hooks_loss, rel=1e-6)
    assert ours_ledger.to_state() == hooks_ledger.to_state()


def test_a_parameter_shared_by_two_layers_is_refused() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encode = nn.Linear(4, 4)
            self.decode = nn.Linear(4, 4)
            self.decode.weight = self.encode.weight  # one parameter, two layers: per-layer norms would not add up

    with pytest.raises(ConfigError, match="'encode' and 'decode': they share a parameter"):
        BookkeepingClipper(Tied(), max_grad_norm=1.0)
