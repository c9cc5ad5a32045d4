"""Record-level DP-SGD for an institution: the budget plan, the persistent RDP ledger, and the one Opacus wrapper."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.ddpoptimizer_fast_gradient_clipping import DistributedDPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader

from fedqf.config import GradSampleMode, PrivacyMode
from fedqf.errors import ConfigError, FedqfError, PrivacyBudgetExceededError

__all__ = [
    "CALIBRATION_TOLERANCE",
    "GradSampleMode",
    "PrivacyLedger",
    "PrivacyMode",
    "PrivacyPlan",
    "PrivateTraining",
    "make_private",
    "plan_for",
]

# Binary-search tolerance handed to Opacus's get_noise_multiplier (its default too): the calibrated sigma spends
# an epsilon in [target - CALIBRATION_TOLERANCE, target], never above the target.
CALIBRATION_TOLERANCE = 0.01

_STATE_KEYS = ("noise_multiplier", "sample_rate", "steps")



def _check_real(name: str, value: object) -> float:
    """Return ``value`` as a finite float, or raise ConfigError (bools are refused: they are not amounts)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be finite, got {number!r}")
    return number


def _check_positive(name: str, value: object) -> float:
    number = _check_real(name, value)
    if number <= 0.0:
        raise ConfigError(f"{name} must be > 0, got {number!r}")
    return number


def _check_delta(value: object) -> float:
    delta = _check_real("delta", value)
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    return delta


def _check_sample_rate(value: object) -> float:
    rate = _check_real("sample_rate", value)
    if not 0.0 < rate <= 1.0:
        raise ConfigError(f"sample_rate must be in (0, 1], got {rate!r}")
    return rate


def _check_count(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _rdp_epsilon(history: list[tuple[float, float, int]], *, delta: float) -> float:
    """Epsilon at ``delta`` of the composed subsampled Gaussian mechanisms in ``history`` (Opacus's RDP accountant).

    For entries (sigma_j, q_j, T_j), the RDP at order alpha is sum_j T_j * RDP_alpha(q_j, sigma_j), converted to
    (epsilon, delta)-DP by eps = min_alpha [ RDP_alpha + log((alpha - 1) / alpha) - (log delta + log alpha) /
    (alpha - 1) ] over Opacus's default orders.
    """
    entries = [entry for entry in history if entry[2] > 0]
    if not entries:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = list(entries)
    return float(accountant.get_epsilon(delta=delta))


@dataclass(frozen=True)
class PrivacyPlan:
    """The privacy budget of one institution for a whole planned run, validated at construction.

    The run is ``rounds`` federated rounds of ``steps_per_round`` DP-SGD steps each, every step Poisson-sampling
    each record with probability ``sample_rate`` and clipping per-record gradients to L2 norm ``max_grad_norm``.
    The budget is (``target_epsilon``, ``delta``)-DP over all ``total_steps`` steps.

    Raises:
        ConfigError: a field has the wrong type or is out of range.
    """

    target_epsilon: float
    delta: float
    max_grad_norm: float
    sample_rate: float
    steps_per_round: int
    rounds: int

    def __post_init__(self) -> None:
        # Normalise ints to floats so that an attribute has one type whatever the caller passed.
        object.__setattr__(self, "target_epsilon", _check_positive("target_epsilon", self.target_epsilon))
        object.__setattr__(self, "delta", _check_delta(self.delta))
        object.__setattr__(self, "max_grad_norm", _check_positive("max_grad_norm", self.max_grad_norm))
        object.__setattr__(self, "sample_rate", _check_sample_rate(self.sample_rate))
        _check_count("steps_per_round", self.steps_per_round, minimum=1)
        _check_count("rounds", self.rounds, minimum=1)

    @property
    def total_steps(self) -> int:
        """T = rounds * steps_per_round, the DP-SGD steps of the whole run."""
        return self.rounds * self.steps_per_round

    def calibrate(self) -> float:
        """Return the smallest noise multiplier sigma (to ``CALIBRATION_TOLERANCE``) that keeps the run in budget.

        sigma is found by Opacus's binary search (``get_noise_multiplier``, RDP accountant) such that
        eps_RDP(sigma, q, T) at delta lies in [target_epsilon - CALIBRATION_TOLERANCE, target_epsilon], with q the
        sample rate and T the total steps. The Gaussian noise added to a step's summed clipped gradients is then
        N(0, (sigma * max_grad_norm)^2 I).

        Raises:
            ConfigError: the budget is too small for any sigma Opacus searches (sigma > 1e6), or the calibrated
                sigma would exceed the target (never expected; checked so that it can never pass silently).
        """
        try:
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=self.target_epsilon,
                    target_delta=self.delta,
                    sample_rate=self.sample_rate,
                    steps=self.total_steps,
                    accountant="rdp",
                    epsilon_tolerance=CALIBRATION_TOLERANCE,
                )
            )
        except ValueError as exc:
            raise ConfigError(
                f"privacy budget epsilon={self.target_epsilon} at delta={self.delta} is too small for "
                f"{self.total_steps} steps at sample rate {self.sample_rate}"
            ) from exc
        planned = self.planned_epsilon(noise_multiplier=sigma)
        if planned > self.target_epsilon:
            raise ConfigError(f"calibrated noise {sigma} spends epsilon {planned} > target {self.target_epsilon}")
        return sigma

    def planned_epsilon(self, *, noise_multiplier: float) -> float:
        """Epsilon at ``delta`` after the whole run with noise multiplier sigma: eps_RDP(sigma, q, T).

        Raises:
            ConfigError: ``noise_multiplier`` is not a positive finite number.
        """
        sigma = _check_positive("noise_multiplier", noise_multiplier)
        return _rdp_epsilon([(sigma, self.sample_rate, self.total_steps)], delta=self.delta)


def plan_for(
    *,
    dataset_size: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    target_epsilon: float,
    delta: float,
    max_grad_norm: float,
) -> PrivacyPlan:
    """Plan the budget of an institution with ``dataset_size`` records, following Opacus's Poisson sampling exactly.

    Opacus turns a DataLoader of n records and batch size B into Poisson sampling at q = 1 / ceil(n / B) (the
    inverse of the original loader's length; q = B / n when B divides n) and int(1 / q) steps per epoch, so:
    sample_rate = 1 / ceil(n / B), steps_per_round = local_epochs * int(1 / sample_rate). These are the values
    that ``make_private`` trains with, so the plan and the ledger account for the same mechanism.

    Raises:
        ConfigError: a count is not a positive integer, or the budget fields are out of range.
    """
    size = _check_count("dataset_size", dataset_size, minimum=1)
    batch = _check_count("batch_size", batch_size, minimum=1)
    epochs = _check_count("local_epochs", local_epochs, minimum=1)
    sample_rate = 1 / math.ceil(size / batch)
    return PrivacyPlan(
        target_epsilon=target_epsilon,
        delta=delta,
        max_grad_norm=max_grad_norm,
        sample_rate=sample_rate,
        steps_per_round=epochs * int(1 / sample_rate),
        rounds=rounds,
    )


class PrivacyLedger:
    """The persistent RDP accountant of one institution, kept across rounds and serialised between them.

    Its history is a list of (noise_multiplier sigma, sample_rate q, steps T) entries; consecutive entries with the
    same (sigma, q) are merged, as Opacus's RDPAccountant does, which is exact because RDP composes additively.
    Anyone can re-derive its epsilon from ``to_state()`` with an independent RDP accountant.
    """

    def __init__(self) -> None:
        self._accountant = RDPAccountant()

    @property
    def history(self) -> tuple[tuple[float, float, int], ...]:
        """The recorded (noise_multiplier, sample_rate, steps) entries, oldest first."""
        return tuple((float(s), float(q), int(t)) for s, q, t in self._accountant.history)

    @property
    def total_steps(self) -> int:
        """The number of DP-SGD steps recorded so far."""
        return sum(entry[2] for entry in self.history)

    def _extended(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> list[tuple[float, float, int]]:
        sigma = _check_positive("noise_multiplier", noise_multiplier)
        rate = _check_sample_rate(sample_rate)
        count = _check_count("steps", steps, minimum=0)
        history = list(self.history)
        if count == 0:
            return history
        if history and history[-1][0] == sigma and history[-1][1] == rate:
            history[-1] = (sigma, rate, history[-1][2] + count)
        else:
            history.append((sigma, rate, count))
        return history

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Record ``steps`` DP-SGD steps of noise multiplier sigma at Poisson sample rate q (0 steps: no change).

        Raises:
            ConfigError: sigma is not > 0, q is not in (0, 1], or steps is not an integer >= 0.
        """
        self._accountant.history = self._extended(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
        )

    def epsilon(self, *, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (RDP composition of the history, see ``_rdp_epsilon``); 0.0 if empty.

        Raises:
            ConfigError: delta is not in (0, 1).
        """
        return _rdp_epsilon(list(self.history), delta=_check_delta(delta))

    def would_spend(self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """Epsilon at ``delta`` after recording these steps too, without recording them.

        Raises:
            ConfigError: an argument is out of range (see ``record`` and ``epsilon``).
        """
        history = self._extended(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return _rdp_epsilon(history, delta=_check_delta(delta))

    def ensure_within_budget(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, target_epsilon: float, delta: float
    ) -> float:
        """Return the epsilon these steps would bring the ledger to, if it is <= ``target_epsilon``; record nothing.

        Call it before training: an institution refuses the round instead of spending beyond its budget.

        Raises:
            PrivacyBudgetExceededError: would_spend(...) > target_epsilon; the message gives the epsilon spent so
                far, the epsilon it would reach and the target.
            ConfigError: an argument is out of range.
        """
        target = _check_positive("target_epsilon", target_epsilon)
        after = self.would_spend(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta)
        if after > target:
            spent = self.epsilon(delta=delta)
            raise PrivacyBudgetExceededError(
                f"training {steps} more steps (noise multiplier {noise_multiplier}, sample rate {sample_rate}) would "
                f"bring epsilon from {spent:.6g} to {after:.6g}, above the target {target:.6g} at delta {delta:g}"
            )
        return after

    def to_state(self) -> dict[str, list[float] | list[int]]:
        """The history as three parallel plain lists (Flower ConfigRecord / JSON friendly); ``from_state`` inverts it."""
        history = self.history
        return {
            "noise_multiplier": [entry[0] for entry in history],
            "sample_rate": [entry[1] for entry in history],
            "steps": [entry[2] for entry in history],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PrivacyLedger:
        """Rebuild a ledger from ``to_state()``'s output, validating it entry by entry.

        Raises:
            ConfigError: ``state`` is not a mapping with exactly the keys noise_multiplier, sample_rate and steps,
                holding lists of one length, with sigma > 0, q in (0, 1] and integer steps >= 1.
        """
        if not isinstance(state, Mapping):
            raise ConfigError(f"privacy ledger state must be a mapping, got {type(state).__name__}")
        keys = set(state.keys())
        if keys != set(_STATE_KEYS):
            raise ConfigError(
                f"privacy ledger state must have keys {sorted(_STATE_KEYS)}, got {sorted(map(str, keys))}"
            )
        columns: list[list[object]] = []
        for key in _STATE_KEYS:
            column = state[key]
            if not isinstance(column, (list, tuple)):
                raise ConfigError(f"privacy ledger state {key!r} must be a list, got {type(column).__name__}")
            columns.append(list(column))
        if len({len(column) for column in columns}) != 1:
            raise ConfigError(f"privacy ledger state lists differ in length: {[len(column) for column in columns]}")
        history: list[tuple[float, float, int]] = []
        for index, (sigma, rate, steps) in enumerate(zip(*columns)):
            try:
                history.append(
                    (
                        _check_positive("noise_multiplier", sigma),
                        _check_sample_rate(rate),
                        _check_count("steps", steps, minimum=1),
                    )
                )
            except ConfigError as exc:
                raise ConfigError(f"privacy ledger state entry {index}: {exc}") from exc
        ledger = cls()
        ledger._accountant.history = history
        return ledger


@dataclass(frozen=True)
class PrivateTraining:
    """The Opacus-wrapped module, optimizer and Poisson data loader of one round, and the steps they took.

    Steps are counted exactly once: Opacus's step hook counts every noised optimizer step into a private pending
    RDP accountant (never reported), and ``commit`` moves those steps into the institution's ledger and empties it.
    ``criterion`` is the ghost-clipping loss wrapper (use it instead of the plain loss) and None in other modes.
    """

    module: nn.Module
    optimizer: DPOptimizer
    data_loader: DataLoader[Any]
    sample_rate: float
    noise_multiplier: float
    criterion: DPLossFastGradientClipping | None = None
    _pending: RDPAccountant = field(default_factory=RDPAccountant, repr=False, compare=False)

    @property
    def steps_per_epoch(self) -> int:
        """Batches one pass over ``data_loader`` yields: int(1 / sample_rate) with Opacus's Poisson sampler."""
        return len(self.data_loader)

    @property
    def steps_pending(self) -> int:
        """Noised optimizer steps taken and not yet committed to a ledger."""
        return sum(int(entry[2]) for entry in self._pending.history)

    def commit(self, *, ledger: PrivacyLedger) -> int:
        """Record the pending steps into ``ledger`` (with the noise multiplier and sample rate Opacus stepped with),
        empty the pending count and return how many steps were recorded.

        Raises:
            ConfigError: the pending history is out of range (cannot happen with a positive noise multiplier).
        """
        return _commit(self._pending, ledger)


def _commit(pending_accountant: RDPAccountant, ledger: PrivacyLedger) -> int:
    pending = list(pending_accountant.history)
    pending_accountant.history = []
    for sigma, rate, steps in pending:
        ledger.record(noise_multiplier=float(sigma), sample_rate=float(rate), steps=int(steps))
    return sum(int(entry[2]) for entry in pending)


def _privacy_engine(secure_mode: bool) -> tuple[PrivacyEngine, RDPAccountant]:
    """Opacus's engine with an RDP accountant (the pending count of one round's steps), and that accountant.

    Raises:
        ConfigError: secure mode is asked without torchcsprng installed.
    """
    with warnings.catch_warnings():
        # fedqf's config chooses secure_mode explicitly, so Opacus's reminder would only be noise in the logs.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        try:
            engine = PrivacyEngine(accountant="rdp", secure_mode=secure_mode)
        except ImportError as exc:
            raise ConfigError("secure_mode needs torchcsprng installed (Opacus's secure RNG)") from exc
    pending = engine.accountant
    if not isinstance(pending, RDPAccountant):  # pragma: no cover - Opacus contract
        raise FedqfError(f"Opacus built a {type(pending).__name__}, expected an RDPAccountant")
    return engine, pending


def make_private(
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator | None,
    secure_mode: bool,
    grad_sample_mode: GradSampleMode | str = GradSampleMode.HOOKS,
    criterion: nn.Module | None = None,
) -> PrivateTraining:
    """Wrap a model, optimizer and data loader for DP-SGD with Opacus; the one place fedqf calls Opacus's engine.

    Each step Poisson-samples every record with probability q = 1 / len(data_loader), clips each per-record
    gradient g_i to g_i * min(1, C / ||g_i||) with C = ``max_grad_norm``, and sets the gradient to
    (sum_i clip(g_i) + z) / B with z ~ N(0, (sigma * C)^2 I), sigma = ``noise_multiplier`` and B = int(n * q) the
    expected batch size (loss_reduction "mean").

    Randomness: noise comes from ``generator`` (a seeded torch.Generator for reproducible runs), or from Opacus's
    CSPRNG when ``secure_mode`` is True, in which case ``generator`` is not used (Opacus prohibits a seed there).
    Poisson sampling draws from ``data_loader.generator`` (seed it), or from the CSPRNG in secure mode.

    Accounting: Opacus attaches its accountant's hook to ``optimizer.step``; that accountant stays private to the
    returned PrivateTraining as its pending count, and only ``PrivateTraining.commit`` reports steps, to a
    PrivacyLedger, emptying the count. Nothing else records steps, so each is counted exactly once.

    ``grad_sample_mode`` GHOST (ghost clipping) needs ``criterion`` (e.g. nn.CrossEntropyLoss()), and the returned
    ``criterion`` must compute the loss: ``loss = training.criterion(output, target); loss.backward()``.

    Raises:
        ConfigError: sigma or C is not positive and finite, the mode is unknown, ghost clipping lacks a criterion,
            the module is not supported by Opacus, its parameters are not the optimizer's, or secure mode is
            asked without torchcsprng installed.
    """
    sigma = _check_positive("noise_multiplier", noise_multiplier)
    clip = _check_positive("max_grad_norm", max_grad_norm)
    try:
        mode = GradSampleMode(grad_sample_mode)
    except ValueError as exc:
        allowed = [member.value for member in GradSampleMode]
        raise ConfigError(f"grad_sample_mode must be one of {allowed}, got {grad_sample_mode!r}") from exc
    if mode is GradSampleMode.BOOKKEEPING:
        raise ConfigError("grad_sample_mode 'bookkeeping' is set up by make_private_bookkeeping, not Opacus's engine")
    if mode is GradSampleMode.GHOST and criterion is None:
        raise ConfigError("grad_sample_mode 'ghost' needs a criterion (the loss to wrap)")

    engine, pending = _privacy_engine(secure_mode)

    try:
        wrapped: tuple[Any, ...] = engine.make_private(
            module=module,
            optimizer=optimizer,
            criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=clip,
            poisson_sampling=True,
            clipping="flat",
            noise_generator=None if secure_mode else generator,
            grad_sample_mode=mode.value,
        )
    except ValueError as exc:  # Opacus's validators raise ValueError subclasses
        raise ConfigError(f"Opacus cannot make this training private: {exc}") from exc

    dp_criterion: DPLossFastGradientClipping | None = None
    if mode is GradSampleMode.GHOST:
        dp_module, dp_optimizer, dp_criterion, dp_loader = wrapped
    else:
        dp_module, dp_optimizer, dp_loader = wrapped
    return PrivateTraining(
        module=cast(nn.Module, dp_module),
        optimizer=cast(DPOptimizer, dp_optimizer),
        data_loader=cast("DataLoader[Any]", dp_loader),
        sample_rate=1 / len(data_loader),
        noise_multiplier=sigma,
        criterion=dp_criterion,
        _pending=pending,
    )


class PoissonBatches:
    """Opacus's Poisson sampling as index tensors, one per step, for a trainer that indexes its records itself.

    One worker: every record is in the step's batch with probability q, independently, drawn as Opacus's
    UniformWithReplacementSampler draws it (``torch.rand(n, generator) < q``), ``int(1 / q)`` steps per epoch.
    Worker r of N: Opacus's DistributedUniformWithReplacementSampler: the records are split by a permutation from
    seed 0 into N shards, and every worker samples its shard at rate q, so the union is a Poisson sample of rate q of
    all records. Unlike Opacus's, an empty local batch is still a step (its gradient is zero): every worker takes
    the same number of steps, so their all-reduces stay paired.
    """

    def __init__(self, *, num_records: int, sample_rate: float, generator: torch.Generator | None, rank: int = 0,
                 world_size: int = 1) -> None:
        self.sample_rate = _check_sample_rate(sample_rate)
        self.generator = generator
        self.steps = int(1 / self.sample_rate)
        if world_size > 1:
            shuffle = torch.Generator().manual_seed(0)
            self.records: torch.Tensor | None = torch.randperm(num_records, generator=shuffle)[rank::world_size]
            self.size = len(self.records)
        else:
            self.records = None
            self.size = num_records

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.generator is not None:
            # Opacus's DPDataLoader is a DataLoader on the same generator, whose iterator first draws a base seed:
            # draw it too, so that the same generator gives the same batches as Opacus's hooks mode.
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        for _ in range(self.steps):
            chosen = (torch.rand(self.size, generator=self.generator) < self.sample_rate).nonzero().reshape(-1)
            yield chosen if self.records is None else self.records[chosen]


@dataclass(frozen=True)
class BookkeepingTraining:
    """The optimizer and Poisson batches of one round of DP-SGD with book-keeping clipping (fedqf.bookkeeping):
    the trainer puts the clipped sum in every ``p.grad``; the optimizer adds the noise, divides by the expected
    batch, all-reduces across workers and counts the step. ``commit`` works as PrivateTraining's."""

    optimizer: DPOptimizer
    batches: PoissonBatches
    sample_rate: float
    noise_multiplier: float
    _pending: RDPAccountant = field(default_factory=RDPAccountant, repr=False, compare=False)

    def commit(self, *, ledger: PrivacyLedger) -> int:
        return _commit(self._pending, ledger)


class _BookkeepingOptimizer(DPOptimizerFastGradientClipping):  # type: ignore[misc]
    """Opacus's fast-clipping optimizer for one clipped sum per step: it takes ``p.grad`` as the sum instead of a
    deep copy (Opacus copies to allow several backward passes per step, which book-keeping never does), and
    divides by the expected batch in one foreach kernel. Noise is Opacus's, drawn per parameter as it draws it."""

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad = p.grad

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            torch._foreach_div_([p.grad for p in self.params], self.expected_batch_size * self.accumulated_iterations)


class _FlatAllReduceOptimizer(_BookkeepingOptimizer, DistributedDPOptimizerFastGradientClipping):  # type: ignore[misc]
    """The distributed variant: rank 0 alone adds noise (Opacus's), and every gradient is all-reduced in one flat
    buffer (one collective per step instead of one per parameter); the sums are the same."""

    def reduce_gradients(self) -> None:
        params = self.params  # Opacus's list: the trainable parameters
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        if self.loss_reduction == "mean":
            flat /= self.world_size
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()


def make_private_bookkeeping(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    num_records: int,
    batch_size: int,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator | None,
    sampler: torch.Generator | None,
    secure_mode: bool,
    rank: int = 0,
    world_size: int = 1,
) -> BookkeepingTraining:
    """DP-SGD with book-keeping clipping, set up exactly as ``make_private`` sets up Opacus's ghost mode: sample
    rate q = 1 / ceil(n / B), expected batch int(n q) (per worker: divided by the number of workers, the all-reduce
    averages), Opacus's DPOptimizerFastGradientClipping (rank 0 alone adds noise when distributed) and an RDP
    accountant hook counting every step into the pending count.

    Randomness: noise from ``generator`` and sampling from ``sampler``, or both from Opacus's CSPRNG in secure
    mode (then neither may be given).

    Raises:
        ConfigError: sigma or C is not positive and finite, there are no records, or secure mode is asked without
            torchcsprng installed.
    """
    sigma = _check_positive("noise_multiplier", noise_multiplier)
    clip = _check_positive("max_grad_norm", max_grad_norm)
    if num_records <= 0 or batch_size <= 0:
        raise ConfigError(f"DP-SGD needs records and a positive batch size, got {num_records} and {batch_size}")
    model_params = set(model.parameters())
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p not in model_params:
                raise ConfigError("Opacus cannot make this training private: the optimizer's parameters are not "
                                  "the model's")
    engine, pending = _privacy_engine(secure_mode)
    if secure_mode:
        generator = sampler = engine.secure_rng
    sample_rate = 1 / (-(-num_records // batch_size))
    expected_batch: float = int(num_records * sample_rate)
    batches = PoissonBatches(num_records=num_records, sample_rate=sample_rate, generator=sampler, rank=rank,
                             world_size=world_size)
    kind = _FlatAllReduceOptimizer if world_size > 1 else _BookkeepingOptimizer
    if world_size > 1:
        expected_batch /= world_size
    dp_optimizer = kind(optimizer, noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=expected_batch,
                        loss_reduction="mean", generator=generator, secure_mode=secure_mode)
    dp_optimizer.attach_step_hook(pending.get_optimizer_hook_fn(sample_rate=sample_rate))
    return BookkeepingTraining(optimizer=dp_optimizer, batches=batches, sample_rate=sample_rate,
                               noise_multiplier=sigma, _pending=pending)
