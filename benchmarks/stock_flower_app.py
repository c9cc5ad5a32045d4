"""Stock Flower FedAvg (plain SGD, no encryption, no DP) on fedqf's model and data split: the round-time baseline."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedqf.config import FederationConfig, load_config
from fedqf.data import Dataset, SimulatedFederationData, simulate_federation_data
from fedqf.model import build_model

# Run-config keys this app reads (set by benchmarks/round_time.py through `flwr run --run-config`).
CONFIG_KEY = "bench-config"
OUT_KEY = "bench-out"


@functools.lru_cache(maxsize=2)
def _config(path: str) -> FederationConfig:
    return load_config(Path(path))


@functools.lru_cache(maxsize=2)
def _shares(path: str) -> SimulatedFederationData:
    config = _config(path)
    return simulate_federation_data(
        config.data, institutions=config.federation.institutions, seed=config.federation.seed
    )


def _model(config: FederationConfig, shares: SimulatedFederationData) -> nn.Module:
    # The same seed as fedqf's coordinator and institutions, so w_0 is the same model.
    return build_model(
        config.model,
        num_features=shares.num_features,
        num_classes=shares.num_classes,
        generator=torch.Generator().manual_seed(config.federation.seed),
    )


def _loader(data: Dataset, *, batch_size: int, shuffle: bool, generator: torch.Generator | None = None) -> DataLoader:
    dataset = TensorDataset(torch.from_numpy(data.features), torch.from_numpy(data.labels))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


@torch.no_grad()
def _evaluate(model: nn.Module, data: Dataset) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` on `data`."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss, correct = 0.0, 0
    for features, labels in _loader(data, batch_size=1024, shuffle=False):
        logits = model(features)
        loss += float(criterion(logits, labels))
        correct += int((logits.argmax(dim=1) == labels).sum())
    return loss / len(data), correct / len(data)


# --- ClientApp: one institution, plain SGD ------------------------------------------------------------------

client = ClientApp()


def _institution(context: Context) -> tuple[FederationConfig, SimulatedFederationData, int]:
    path = str(context.run_config[CONFIG_KEY])
    config = _config(path)
    torch.set_num_threads(config.simulation.torch_threads)  # as fedqf's institutions do
    return config, _shares(path), int(context.node_config["partition-id"])


@client.train()
def _train(message: Message, context: Context) -> Message:
    config, shares, index = _institution(context)
    data = shares.institutions[index].train
    model = _model(config, shares)
    arrays = message.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    model.load_state_dict(arrays.to_torch_state_dict())
    server_round = int(message.content["config"]["server-round"])  # type: ignore[index, arg-type]
    generator = torch.Generator().manual_seed(config.federation.seed * 1_000_003 + index * 1009 + server_round)
    training = config.training
    optimizer = torch.optim.SGD(model.parameters(), lr=training.learning_rate, momentum=training.momentum)
    criterion = nn.CrossEntropyLoss()
    model.train()
    for _ in range(training.local_epochs):
        for features, labels in _loader(data, batch_size=training.batch_size, shuffle=True, generator=generator):
            optimizer.zero_grad(set_to_none=True)
            criterion(model(features), labels).backward()
            optimizer.step()
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(data)}),
        }
    )
    return Message(content, reply_to=message)


@client.evaluate()
def _evaluate_local(message: Message, context: Context) -> Message:
    config, shares, index = _institution(context)
    data = shares.institutions[index].validation
    model = _model(config, shares)
    arrays = message.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, accuracy = _evaluate(model, data)
    metrics = MetricRecord({"num-examples": len(data), "loss": loss, "accuracy": accuracy})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


# --- ServerApp: FedAvg.start, per-round seconds measured like fedqf's ----------------------------------------

server = ServerApp()


@server.main()
def _main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    path = str(context.run_config[CONFIG_KEY])
    out_path = Path(str(context.run_config[OUT_KEY]))
    config = _config(path)
    shares = _shares(path)
    model = _model(config, shares)
    rows: list[dict[str, float]] = []
    round_started = [time.perf_counter()]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        # Flower calls this before round 1 and after each round (train + federated evaluate): the interval
        # between two calls is one round, the same interval fedqf's ServerApp writes as round_seconds.
        now = time.perf_counter()
        if server_round == 0:
            round_started[0] = now
            return None
        row = {"round": float(server_round), "round_seconds": now - round_started[0]}
        model.load_state_dict(arrays.to_torch_state_dict())
        row["test_loss"], row["test_accuracy"] = _evaluate(model, shares.test)
        rows.append(row)
        # Restart the clock after scoring, so the test pass is in no round.
        round_started[0] = time.perf_counter()
        return MetricRecord({k: v for k, v in row.items() if k != "round"})

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=config.federation.institutions,
        min_evaluate_nodes=config.federation.institutions,
        min_available_nodes=config.federation.institutions,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=config.federation.rounds,
        timeout=config.federation.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )
    model.load_state_dict(result.arrays.to_torch_state_dict())
    final_loss, final_accuracy = _evaluate(model, shares.test)
    summary = {
        "rounds": rows,
        "final_accuracy": final_accuracy,
        "final_loss": final_loss,
        "wall_seconds": time.perf_counter() - started,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(summary, indent=2))
