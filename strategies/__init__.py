"""Aggregation strategies for fedqf, built on Flower's `flwr.serverapp.strategy` and fedqf's public API."""

from __future__ import annotations

from strategies.fedavg import FedAvg, FedProx
from strategies.robust import FedMedian, FedTrimmedAvg, Krum

__all__ = ["FedAvg", "FedMedian", "FedProx", "FedTrimmedAvg", "Krum"]
