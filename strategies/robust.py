"""Byzantine-robust rules (median, trimmed mean, Krum): plaintext only, since each needs every single update."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import FedMedian as FlowerFedMedian
from flwr.serverapp.strategy import FedTrimmedAvg as FlowerFedTrimmedAvg
from flwr.serverapp.strategy import Krum as FlowerKrum

from fedqf.aggregation import (
    AggregationSetup,
    aggregate_evaluate_replies,
    aggregate_train_replies,
    finish_train,
    no_separate_evaluation,
    record_evaluation,
)
from fedqf.config import FederationConfig, SecureAggregationMode
from fedqf.errors import ConfigError


def _plain_only(name: str, setup: AggregationSetup) -> None:
    if setup.mode is SecureAggregationMode.CKKS:
        raise ConfigError(f"strategy '{name}' must see each update and cannot run under CKKS")


Rule = Callable[[int, Iterable[Message]], tuple[ArrayRecord | None, MetricRecord | None]]


def _aggregate(
    setup: AggregationSetup, server_round: int, replies: Iterable[Message], rule: Rule, reference: ArrayRecord | None
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """Check every reply with fedqf (against the round's global model), then hand the accepted ones to Flower's rule."""
    absolute = server_round + setup.round_offset
    outcome = aggregate_train_replies(absolute, replies, setup, reference=reference)
    arrays = None
    if outcome.accepted:
        # Only checked updates reach Flower's rule; its metrics aggregation needs identical keys, which they have.
        arrays, _ = rule(server_round, list(outcome.accepted))
    finish_train(setup, absolute, outcome, arrays)
    return arrays, outcome.metrics


class _CheckedRule(FlowerFedAvg):
    """What the three rules share: fedqf checks every update (against the round's global model) before Flower's rule
    sees it, rounds count on after a coordinator restart, and validation arrives with the next train replies."""

    setup: AggregationSetup
    global_arrays: ArrayRecord | None
    configure_evaluate = no_separate_evaluation

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return _aggregate(self.setup, server_round, replies, super().aggregate_train, self.global_arrays)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = arrays
        begin = getattr(grid, "begin_sampling", None)
        if callable(begin):  # fedqf's StreamingGrid bounds Flower's wait for this round's sample
            begin(fraction=self.fraction_train, min_train=self.min_train_nodes, min_available=self.min_available_nodes)
        return super().configure_train(server_round + self.setup.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return record_evaluation(self.setup, server_round, aggregate_evaluate_replies(server_round, replies))


class FedMedian(_CheckedRule, FlowerFedMedian):
    """Coordinate-wise median of the institutions' weights (Yin et al., 2018)."""

    needs_individual_updates: ClassVar[bool] = True

    def __init__(self, *, setup: AggregationSetup, min_institutions: int) -> None:
        _plain_only("fedmedian", setup)
        super().__init__(min_train_nodes=min_institutions, min_evaluate_nodes=min_institutions,
                         min_available_nodes=min_institutions)
        self.setup = setup
        self.global_arrays: ArrayRecord | None = None

    @classmethod
    def from_config(cls, config: FederationConfig, *, setup: AggregationSetup) -> FedMedian:
        return cls(setup=setup, min_institutions=config.federation.required_institutions)


class FedTrimmedAvg(_CheckedRule, FlowerFedTrimmedAvg):
    """Coordinate-wise trimmed mean, dropping the `beta` fraction at each end (Yin et al., 2018)."""

    needs_individual_updates: ClassVar[bool] = True

    def __init__(self, *, setup: AggregationSetup, min_institutions: int, beta: float) -> None:
        _plain_only("fedtrimmedavg", setup)
        super().__init__(min_train_nodes=min_institutions, min_evaluate_nodes=min_institutions,
                         min_available_nodes=min_institutions, beta=beta)
        self.setup = setup
        self.global_arrays: ArrayRecord | None = None

    @classmethod
    def from_config(cls, config: FederationConfig, *, setup: AggregationSetup) -> FedTrimmedAvg:
        return cls(setup=setup, min_institutions=config.federation.required_institutions,
                   beta=config.strategy.trim_fraction)


class Krum(_CheckedRule, FlowerKrum):
    """Krum (Blanchard et al., 2017): the update closest to its n - f - 2 nearest neighbours."""

    needs_individual_updates: ClassVar[bool] = True

    def __init__(self, *, setup: AggregationSetup, min_institutions: int, num_malicious_nodes: int) -> None:
        _plain_only("krum", setup)
        super().__init__(min_train_nodes=min_institutions, min_evaluate_nodes=min_institutions,
                         min_available_nodes=min_institutions, num_malicious_nodes=num_malicious_nodes)
        self.setup = setup
        self.global_arrays: ArrayRecord | None = None

    @classmethod
    def from_config(cls, config: FederationConfig, *, setup: AggregationSetup) -> Krum:
        return cls(setup=setup, min_institutions=config.federation.required_institutions,
                   num_malicious_nodes=config.strategy.krum_byzantine)
