"""Flower SecAgg+ (legacy API: SecAggPlusWorkflow + secaggplus_mod) on fedqf's model and data: issue 4's baseline."""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import NDArrays, Scalar, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedqf.config import FederationConfig, load_config
from fedqf.data import Dataset, SimulatedFederationData, simulate_federation_data
from fedqf.model import build_model

# Run-config keys (set by benchmarks/secure_aggregation.py through `flwr run --run-config`).
CONFIG_KEY = "bench-config"
OUT_KEY = "bench-out"
WIRE_KEY = "bench-wire"  # a directory: one JSON line per reply an institution sends, with its payload bytes
SHARES_KEY = "bench-num-shares"
THRESHOLD_KEY = "bench-threshold"


@functools.lru_cache(maxsize=2)
def _config(path: str) -> FederationConfig:
    return load_config(Path(path))


@functools.lru_cache(maxsize=2)
def _shares(path: str) -> SimulatedFederationData:
    config = _config(path)
    return simulate_federation_data(config.data, institutions=config.federation.institutions, seed=config.federation.seed)


def _model(config: FederationConfig, shares: SimulatedFederationData) -> nn.Module:
    return build_model(config.model, num_features=shares.num_features, num_classes=shares.num_classes,
                       generator=torch.Generator().manual_seed(config.federation.seed))


def _get(model: nn.Module) -> NDArrays:
    return [t.detach().cpu().numpy() for t in model.state_dict().values()]


def _set(model: nn.Module, arrays: NDArrays) -> None:
    keys = list(model.state_dict().keys())
    model.load_state_dict({k: torch.from_numpy(np.asarray(a, dtype=np.float32)) for k, a in zip(keys, arrays)})


def _loader(data: Dataset, *, batch_size: int, shuffle: bool, generator: torch.Generator | None = None) -> DataLoader:
    dataset = TensorDataset(torch.from_numpy(data.features), torch.from_numpy(data.labels))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


@torch.no_grad()
def _evaluate(model: nn.Module, data: Dataset) -> tuple[float, float]:
    if len(data) == 0:
        return 0.0, 0.0
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss, correct = 0.0, 0
    for features, labels in _loader(data, batch_size=1024, shuffle=False):
        logits = model(features)
        loss += float(criterion(logits, labels))
        correct += int((logits.argmax(dim=1) == labels).sum())
    return loss / len(data), correct / len(data)


# --- ClientApp: plain SGD for one local epoch, wrapped by Flower's secaggplus_mod ------------------------------


class Institution(NumPyClient):
    def __init__(self, path: str, index: int) -> None:
        self.config = _config(path)
        self.shares = _shares(path)
        self.index = index
        torch.set_num_threads(self.config.simulation.torch_threads)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        data = self.shares.institutions[self.index].train
        model = _model(self.config, self.shares)
        _set(model, parameters)
        server_round = int(config.get("server-round", 0))
        generator = torch.Generator().manual_seed(self.config.federation.seed * 1_000_003 + self.index * 1009
                                                  + server_round)
        training = self.config.training
        optimizer = torch.optim.SGD(model.parameters(), lr=training.learning_rate, momentum=training.momentum)
        criterion = nn.CrossEntropyLoss()
        model.train()
        for _ in range(training.local_epochs):
            for features, labels in _loader(data, batch_size=training.batch_size, shuffle=True, generator=generator):
                optimizer.zero_grad(set_to_none=True)
                criterion(model(features), labels).backward()
                optimizer.step()
        return _get(model), len(data), {}

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        data = self.shares.institutions[self.index].validation
        model = _model(self.config, self.shares)
        _set(model, parameters)
        loss, accuracy = _evaluate(model, data)
        # The large_model sandbox has no validation split; Flower's weighted average needs a positive count.
        return loss, max(len(data), 1), {"accuracy": accuracy}


def _payload_bytes(content: RecordDict) -> int:
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
        elif isinstance(record, ConfigRecord):
            for value in record.values():
                items = value if isinstance(value, list) else [value]
                for item in items:
                    if isinstance(item, (bytes, str)):
                        total += len(item)
                    else:
                        total += 8  # int, float or bool
    return total


def wire_mod(message: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
    """Outermost mod: log the payload bytes of every reply (after secaggplus_mod has masked it)."""
    stage = ""
    configs = message.content.config_records.get("secaggplus_configs")
    if configs is not None and "stage" in configs:
        stage = str(configs["stage"])
    reply = call_next(message, context)
    directory = Path(str(context.run_config[WIRE_KEY]))
    line = {"node": int(context.node_id), "type": message.metadata.message_type, "stage": stage,
            "bytes": _payload_bytes(reply.content) if reply.has_content() else 0}
    with (directory / f"{os.getpid()}.jsonl").open("a") as handle:
        handle.write(json.dumps(line) + "\n")
    return reply


def _client_fn(context: Context):  # type: ignore[no-untyped-def]
    return Institution(str(context.run_config[CONFIG_KEY]), int(context.node_config["partition-id"])).to_client()


client = ClientApp(client_fn=_client_fn, mods=[wire_mod, secaggplus_mod])


# --- ServerApp: DefaultWorkflow with SecAggPlusWorkflow as the fit workflow ------------------------------------

server = ServerApp()


@server.main()
def _main(grid, context: Context) -> None:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    path = str(context.run_config[CONFIG_KEY])
    out_path = Path(str(context.run_config[OUT_KEY]))
    config = _config(path)
    shares = _shares(path)
    model = _model(config, shares)
    rows: list[dict[str, float]] = []
    round_started = [time.perf_counter()]

    def evaluate_fn(server_round: int, parameters: NDArrays, _config: dict[str, Scalar]):  # type: ignore[no-untyped-def]
        # DefaultWorkflow calls this before round 1 and after each fit round; the interval between two calls is
        # the previous round's federated evaluate plus this round's SecAgg+ fit (the same work as a fedqf round).
        now = time.perf_counter()
        if server_round == 0:
            round_started[0] = now
            return None
        _set(model, parameters)
        loss, accuracy = _evaluate(model, shares.test)
        rows.append({"round": server_round, "round_seconds": now - round_started[0], "test_loss": loss,
                     "test_accuracy": accuracy})
        round_started[0] = time.perf_counter()  # the test pass is in no round
        return loss, {"accuracy": accuracy}

    def fit_config(server_round: int) -> dict[str, Scalar]:
        return {"server-round": server_round}

    n = config.federation.institutions
    strategy = FedAvg(
        fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=n, min_evaluate_clients=n, min_available_clients=n,
        initial_parameters=ndarrays_to_parameters(_get(model)), evaluate_fn=evaluate_fn, on_fit_config_fn=fit_config,
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=config.federation.rounds),
                           strategy=strategy)
    fit_workflow = SecAggPlusWorkflow(num_shares=int(context.run_config[SHARES_KEY]),
                                      reconstruction_threshold=int(context.run_config[THRESHOLD_KEY]))
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    summary = {"rounds": rows, "wall_seconds": time.perf_counter() - started,
               "params": int(sum(a.size for a in _get(model)))}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(summary, indent=2))
