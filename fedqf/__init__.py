"""fedqf: federated learning with CKKS secure aggregation and DP-SGD, built on Flower."""

from __future__ import annotations

__version__ = "0.1.0"
