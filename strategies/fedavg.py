"""FedAvg and FedProx, in plaintext and under CKKS secure aggregation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedqf.aggregation import (
    AggregationSetup,
    aggregate_evaluate_replies,
    aggregate_train_replies,
    finish_train,
    no_separate_evaluation,
    record_evaluation,
    weighted_mean_arrays,
    with_catch_up,
)
from fedqf.config import FederationConfig, SecureAggregationMode


class FedAvg(FlowerFedAvg):
    """Federated Averaging (McMahan et al., 2017): w_{t+1} = sum_k n_k w_k / sum_k n_k.

    Under CKKS the coordinator adds the institutions' encrypted weighted deltas, sum_k a_k d_k, and sends the
    encrypted sum with sum_k a_k back; each institution decrypts and applies w_t + sum_k a_k d_k / sum_k a_k.
    Plaintext: the usual weighted mean of the returned weights.
    """

    needs_individual_updates: ClassVar[bool] = False
    configure_evaluate = no_separate_evaluation

    def __init__(self, *, setup: AggregationSetup, min_institutions: int) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=min_institutions,
            min_evaluate_nodes=min_institutions,
            min_available_nodes=min_institutions,
        )
        self.setup = setup
        self.global_arrays: ArrayRecord | None = None

    @classmethod
    def from_config(cls, config: FederationConfig, *, setup: AggregationSetup) -> FedAvg:
        return cls(setup=setup, min_institutions=config.federation.required_institutions)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        absolute = server_round + self.setup.round_offset
        self.global_arrays = arrays  # the reference the round's plaintext updates are checked against
        begin = getattr(grid, "begin_sampling", None)
        if callable(begin):  # fedqf's StreamingGrid bounds Flower's wait for this round's sample
            begin(fraction=self.fraction_train, min_train=self.min_train_nodes, min_available=self.min_available_nodes)
        return with_catch_up(self.setup, absolute, super().configure_train(absolute, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        absolute = server_round + self.setup.round_offset
        outcome = aggregate_train_replies(absolute, replies, self.setup, reference=self.global_arrays)
        arrays = outcome.arrays
        if outcome.accepted and self.setup.mode is SecureAggregationMode.NONE:
            arrays = weighted_mean_arrays(outcome.accepted, self.setup.layout)
        finish_train(self.setup, absolute, outcome, arrays)
        return arrays, outcome.metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return record_evaluation(self.setup, server_round, aggregate_evaluate_replies(server_round, replies))


class FedProx(FedAvg):
    """FedProx (Li et al., 2020): FedAvg whose institutions add (mu/2)||w - w_t||^2 to their local objective."""

    def __init__(self, *, setup: AggregationSetup, min_institutions: int, proximal_mu: float) -> None:
        super().__init__(setup=setup, min_institutions=min_institutions)
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = proximal_mu

    @classmethod
    def from_config(cls, config: FederationConfig, *, setup: AggregationSetup) -> FedProx:
        return cls(
            setup=setup,
            min_institutions=config.federation.required_institutions,
            proximal_mu=config.strategy.proximal_mu,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["proximal-mu"] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)
