"""Local training and evaluation of one institution's model, with or without DP-SGD."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedqf.bookkeeping import BookkeepingClipper
from fedqf.config import Device, GradSampleMode, TrainingSection
from fedqf.data import Dataset
from fedqf.errors import ConfigError
from fedqf.model import get_arrays
from fedqf.privacy import PoissonBatches, PrivacyLedger, make_private, make_private_bookkeeping


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


@dataclass(frozen=True)
class WorkerContext:
    """This process's place in the institution's training group (rank 0 of 1 when training alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def select_device(preference: Device | str, local_rank: int) -> tuple[torch.device, str]:
    """The worker's device and the collective backend: one GPU per worker with NCCL, else CPU with gloo."""
    preference = Device(preference)
    if preference is Device.CUDA and not torch.cuda.is_available():
        raise ConfigError("training.device = 'cuda' but this machine has no CUDA GPU; expected 'cpu' or 'auto'")
    if preference is not Device.CPU and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"worker {local_rank} has no GPU: this node has {torch.cuda.device_count()}; expected --workers <= "
                "the number of GPUs (or training.device = 'cpu')"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def _sampling_seed(seed: int, rank: int) -> int:
    # Every worker Poisson-samples its own shard with its own stream; rank 0 alone draws the DP noise.
    return (seed * 1_000_003 + 7919 * rank) % (2**63 - 1)


def train_local(
    model: nn.Module,
    data: Dataset,
    *,
    training: TrainingSection,
    dp: DpSgdSettings | None,
    seed: int,
    ledger: PrivacyLedger | None = None,
    proximal_mu: float = 0.0,
    workers: WorkerContext | None = None,
) -> TrainResult:
    """Run `training.local_epochs` epochs of SGD (DP-SGD when `dp` is given) from the model's current weights.

    With several workers every worker of the group calls this with the same arguments and its WorkerContext
    (torch.distributed initialised). The institution's batch stays `training.batch_size` whatever the number of
    workers, so one worker and N workers train the same way:
    - without DP, every step takes the next B records of one permutation drawn from `seed`, and worker r computes
      the loss of every N-th of them (r, r + N, ...); DDP averages the gradients, scaled so that the result is the
      mean over the B records, as with one worker;
    - with DP-SGD, Opacus's distributed mode (DPDDP): each worker Poisson-samples its shard of the records with
      the same rate q = B / n, so the union is a Poisson sample of rate q of all records; each worker clips its
      records' gradients, rank 0 alone adds the noise, and the all-reduced sum is divided by the expected batch
      q * n. Steps per epoch, noise multiplier and sample rate are those of one worker, and so is the epsilon.

    FedProx: after every optimizer step the weights move by -lr * mu * (w - w_global), the gradient of
    (mu/2)||w - w_global||^2. That term does not depend on the data, so under DP-SGD it is post-processing
    and costs no privacy; putting it in the loss instead would be dropped by Opacus's per-sample clipping.

    Under DP-SGD the steps taken are committed to `ledger` exactly once, after training (rank 0 passes the ledger;
    the other workers pass none, their steps are rank 0's steps).
    """
    ctx = workers or WorkerContext(device=select_device(training.device, 0)[0])
    if dp is not None and ledger is None and ctx.rank == 0:
        raise ValueError("DP-SGD training needs the institution's PrivacyLedger")
    start = time.perf_counter()
    model.to(ctx.device)
    model.train()
    global_params = [p.detach().clone() for p in model.parameters()]
    dataset = _tensor_dataset(data)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(
        model.parameters(), lr=training.learning_rate, momentum=training.momentum
    )
    if dp is None:
        steps, loss_sum, seen = _train_plain(model, dataset, optimizer, training=training, seed=seed, ctx=ctx,
                                             global_params=global_params, proximal_mu=proximal_mu)
        sample_rate = min(1.0, training.batch_size / len(data))
    else:
        steps, loss_sum, seen, sample_rate = _train_private(
            model, dataset, optimizer, training=training, dp=dp, seed=seed, ctx=ctx, ledger=ledger,
            global_params=global_params, proximal_mu=proximal_mu)
    if ctx.distributed:
        totals = torch.tensor([loss_sum, float(seen)], dtype=torch.float64, device=ctx.device)
        torch.distributed.all_reduce(totals)
        loss_sum, seen = float(totals[0]), int(totals[1])
    arrays = get_arrays(model)
    model.to("cpu")
    return TrainResult(
        arrays=arrays,
        num_examples=len(data),
        steps=steps,
        sample_rate=sample_rate,
        loss=loss_sum / max(seen, 1),
        seconds=time.perf_counter() - start,
    )


def _on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The training records on the GPU once, when they take under a quarter of its free memory (no copy per step);
    otherwise in pinned host memory, copied batch by batch."""
    if device.type != "cuda":
        return tensor
    free, _ = torch.cuda.mem_get_info(device)
    if tensor.element_size() * tensor.nelement() < free // 4:
        return tensor.to(device)
    return tensor.pin_memory()


def _proximal_step(model: nn.Module, global_params: list[torch.Tensor], *, lr: float, mu: float) -> None:
    if mu > 0.0:
        with torch.no_grad():
            for param, anchor in zip(model.parameters(), global_params):
                param.sub_(lr * mu * (param - anchor))


def _shuffled_epochs(num_records: int, *, seed: int, epochs: int) -> Iterator[torch.Tensor]:
    """Per epoch, the permutation of record indices that `DataLoader(range(n), shuffle=True,
    generator=torch.Generator().manual_seed(seed))` walks through, epoch after epoch, drawn from the generator in
    the same order as torch 2.x's DataLoader does: the iterator's base seed, then RandomSampler's permutation, then
    the one more permutation RandomSampler draws for its (empty) remainder. tests/test_workers.py checks the
    batches against a real DataLoader."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        permutation = torch.randperm(num_records, generator=generator)
        torch.randperm(num_records, generator=generator)
        yield permutation


def _train_plain(model: nn.Module, dataset: TensorDataset, optimizer: torch.optim.Optimizer, *,
                 training: TrainingSection, seed: int, ctx: WorkerContext, global_params: list[torch.Tensor],
                 proximal_mu: float) -> tuple[int, float, int]:
    features, labels = (_on_device(t, ctx.device) for t in dataset.tensors)
    train_module: nn.Module = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # Every parameter is used in every step: a static graph, and gradients that live in DDP's buckets (no
        # copy between them).
        train_module = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True,
                                               static_graph=True)
    steps, seen = 0, 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    batch = training.batch_size
    # No host round trip per step: one permutation per epoch goes where the records are, and the loss is summed
    # on the device.
    for permutation in _shuffled_epochs(len(labels), seed=seed, epochs=training.local_epochs):
        permutation = permutation.to(features.device)
        for start in range(0, len(permutation), batch):
            records = permutation[start : start + batch]
            mine = records[ctx.rank :: ctx.world_size]
            x = features[mine].to(ctx.device, non_blocking=True)
            y = labels[mine].to(ctx.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            total = nn.functional.cross_entropy(train_module(x), y, reduction="sum")
            # DDP averages over workers: scaling by N / |batch| makes the result the mean over the whole batch.
            scaled = total * (ctx.world_size / len(records))
            scaled.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            _proximal_step(model, global_params, lr=training.learning_rate, mu=proximal_mu)
            steps += 1
            loss_sum += total.detach()
            seen += len(mine)
    return steps, float(loss_sum), seen


def _train_private(model: nn.Module, dataset: TensorDataset, optimizer: torch.optim.Optimizer, *,
                   training: TrainingSection, dp: DpSgdSettings, seed: int, ctx: WorkerContext,
                   ledger: PrivacyLedger | None, global_params: list[torch.Tensor],
                   proximal_mu: float) -> tuple[int, float, int, float]:
    if training.grad_sample_mode is GradSampleMode.BOOKKEEPING:
        return _train_bookkeeping(model, dataset, optimizer, training=training, dp=dp, seed=seed, ctx=ctx,
                                  ledger=ledger, global_params=global_params, proximal_mu=proximal_mu)
    module: nn.Module = model
    if ctx.distributed:
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel

        module = DifferentiallyPrivateDistributedDataParallel(model)
    sampler = torch.Generator().manual_seed(_sampling_seed(seed, ctx.rank))
    noise = torch.Generator(device=ctx.device).manual_seed(seed)
    loader = DataLoader(dataset, batch_size=training.batch_size, shuffle=True, generator=sampler)
    ghost = training.grad_sample_mode is GradSampleMode.GHOST
    private = make_private(
        module=module,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        generator=None if dp.secure_mode else noise,
        secure_mode=dp.secure_mode,
        grad_sample_mode=training.grad_sample_mode,
        criterion=nn.CrossEntropyLoss() if ghost else None,
    )
    criterion: Any = private.criterion if private.criterion is not None else nn.CrossEntropyLoss()
    # Opacus's distributed Poisson sampler skips a worker's step when its local sample is empty, and that worker's
    # all-reduces then pair with the others' next step (or never). With several workers, sample the same shards at
    # the same rate from the same generator (the CSPRNG in secure mode), but with an empty local batch still a step.
    poisson = PoissonBatches(num_records=len(dataset), sample_rate=private.sample_rate,
                             generator=getattr(private.data_loader.batch_sampler, "generator", None) or sampler,
                             rank=ctx.rank, world_size=ctx.world_size) if ctx.distributed else None
    features, labels = dataset.tensors

    def epoch_batches() -> Any:
        if poisson is None:
            return private.data_loader
        return ((features[index], labels[index]) for index in poisson)

    steps, loss_sum, seen = 0, 0.0, 0
    try:
        for _ in range(training.local_epochs):
            for x, y in epoch_batches():
                x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
                private.optimizer.zero_grad(set_to_none=True)
                loss = criterion(private.module(x), y)
                loss.backward()
                private.optimizer.step()
                _proximal_step(model, global_params, lr=training.learning_rate, mu=proximal_mu)
                steps += 1
                if len(y):
                    loss_sum += float(loss.detach()) * len(y)
                seen += len(y)
    finally:
        # Opacus wraps the module (a GradSampleModule, or its ghost-clipping variant, which is not a subclass);
        # strip its hooks so that the plain model can be evaluated and trained again.
        remove_hooks = getattr(private.module, "remove_hooks", None)
        if callable(remove_hooks):
            remove_hooks()
    if ledger is not None:
        steps = private.commit(ledger=ledger)
    return steps, loss_sum, seen, private.sample_rate


def _train_bookkeeping(model: nn.Module, dataset: TensorDataset, optimizer: torch.optim.Optimizer, *,
                       training: TrainingSection, dp: DpSgdSettings, seed: int, ctx: WorkerContext,
                       ledger: PrivacyLedger | None, global_params: list[torch.Tensor],
                       proximal_mu: float) -> tuple[int, float, int, float]:
    """DP-SGD with book-keeping clipping (fedqf.bookkeeping): Opacus's Poisson sampling, noise and accounting,
    the clipped sum in one backward pass. With several workers no DDP wrapper: the clipped sums are all-reduced
    in one flat buffer by the optimizer after the noise (rank 0's) is added, as Opacus's distributed mode does."""
    clipper = BookkeepingClipper(model, max_grad_norm=dp.max_grad_norm)
    try:
        if ctx.distributed:
            with torch.no_grad():
                for param in model.parameters():
                    torch.distributed.broadcast(param.data, src=0)
        features, labels = (_on_device(t, ctx.device) for t in dataset.tensors)
        sampler = torch.Generator().manual_seed(_sampling_seed(seed, ctx.rank))
        noise = torch.Generator(device=ctx.device).manual_seed(seed)
        private = make_private_bookkeeping(
            model=model, optimizer=optimizer, num_records=len(labels), batch_size=training.batch_size,
            noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            generator=None if dp.secure_mode else noise, sampler=sampler, secure_mode=dp.secure_mode,
            rank=ctx.rank, world_size=ctx.world_size)
        steps, seen = 0, 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for _ in range(training.local_epochs):
            for indices in private.batches:
                count = len(indices)
                private.optimizer.zero_grad(set_to_none=True)
                with clipper.step():
                    if count:
                        where = indices.pin_memory().to(features.device, non_blocking=True) \
                            if features.device.type == "cuda" else indices
                        x = features[where].to(ctx.device, non_blocking=True)
                        y = labels[where].to(ctx.device, non_blocking=True)
                        total = nn.functional.cross_entropy(model(x), y, reduction="sum")
                        loss_sum += total.detach()
                    else:
                        total = torch.zeros((), device=ctx.device)
                    clipper.backward(total, batch_size=count)
                private.optimizer.step()
                _proximal_step(model, global_params, lr=training.learning_rate, mu=proximal_mu)
                steps += 1
                seen += count
    finally:
        clipper.close()
    if ledger is not None:
        steps = private.commit(ledger=ledger)
    return steps, float(loss_sum), seen, private.sample_rate


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
