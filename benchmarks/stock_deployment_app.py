"""Stock Flower FedAvg for the deployment runtime: the per-round baseline of benchmarks/deployment_round_time.py.

A stock ServerApp (`flwr.serverapp.strategy.FedAvg.start`, no encryption, no DP) and a stock ClientApp that, like
any Flower ClientApp under a SuperNode, runs in a fresh process per message: it imports torch and reads its
institution's CSV (the same file and train/validation split a fedqf institution uses) in every message, then trains
the same model with plain SGD. Every message appends one timing line to `bench-trace` (JSON lines).
"""

from __future__ import annotations

import time

_IMPORT_STARTED = time.time()  # before torch and fedqf are imported: the per-message import cost

import json
import os
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from stock_flower_app import _evaluate, _loader
from torch import nn

from fedqf.config import FederationConfig, load_config
from fedqf.data import Dataset, InstitutionData, institution_data, read_table_file, table_from_frame
from fedqf.model import build_model

_IMPORT_SECONDS = time.time() - _IMPORT_STARTED

# Run-config keys (set by benchmarks/deployment_round_time.py through `flwr run --run-config`).
CONFIG_KEY = "bench-config"
DATA_DIR_KEY = "bench-data-dir"
OUT_KEY = "bench-out"
TRACE_KEY = "bench-trace"


def _process_age() -> float:
    """Seconds since this process started (from /proc/self/stat), or NaN where /proc is missing."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22 of stat(5); fields[0] is field 3
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _model(config: FederationConfig) -> nn.Module:
    return build_model(config.model, num_features=config.model.num_features, num_classes=config.model.num_classes,
                       generator=torch.Generator().manual_seed(config.federation.seed))


def _institution(context: Context) -> tuple[FederationConfig, InstitutionData, int]:
    """The federation and this institution's data, read from its CSV as `fedqf institution` reads it."""
    config = load_config(Path(str(context.run_config[CONFIG_KEY])))
    torch.set_num_threads(config.simulation.torch_threads)
    index = int(context.node_config["partition-id"])
    path = Path(str(context.run_config[DATA_DIR_KEY])) / f"hospital-{index}.csv"
    table = table_from_frame(read_table_file(path), target=config.data.target, where=str(path))
    data = institution_data(table.features, table.labels, num_classes=config.model.num_classes,
                            validation_fraction=config.data.validation_fraction,
                            rng=np.random.default_rng(config.federation.seed))
    return config, data, index


def _trace(context: Context, **row: float | str) -> None:
    with open(str(context.run_config[TRACE_KEY]), "a") as handle:
        handle.write(json.dumps(row) + "\n")


client = ClientApp()


@client.train()
def _train(message: Message, context: Context) -> Message:
    entered, age = time.time(), _process_age()
    config, institution, index = _institution(context)
    loaded = time.time()
    data: Dataset = institution.train
    model = _model(config)
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
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"num-examples": len(data)})})
    _trace(context, kind="train", round=server_round, institution=index, entered=entered, process_age=age,
           import_seconds=_IMPORT_SECONDS, load_seconds=loaded - entered, work_seconds=time.time() - loaded)
    return Message(content, reply_to=message)


@client.evaluate()
def _evaluate_local(message: Message, context: Context) -> Message:
    entered, age = time.time(), _process_age()
    config, institution, index = _institution(context)
    loaded = time.time()
    model = _model(config)
    arrays = message.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, accuracy = _evaluate(model, institution.validation)
    metrics = MetricRecord({"num-examples": len(institution.validation), "loss": loss, "accuracy": accuracy})
    server_round = int(message.content["config"].get("server-round", 0))  # type: ignore[union-attr, arg-type]
    _trace(context, kind="evaluate", round=server_round, institution=index, entered=entered, process_age=age,
           import_seconds=_IMPORT_SECONDS, load_seconds=loaded - entered, work_seconds=time.time() - loaded)
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


server = ServerApp()


@server.main()
def _main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    config = load_config(Path(str(context.run_config[CONFIG_KEY])))
    out_path = Path(str(context.run_config[OUT_KEY]))
    model = _model(config)
    needed = config.federation.institutions
    # As fedqf's ServerApp does before round 1: wait until every institution is connected.
    while len(list(grid.get_node_ids())) < needed:
        time.sleep(0.5)
    rows: list[dict[str, float]] = []
    round_started = [time.perf_counter(), time.time()]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        # The interval between two calls is one round (train + aggregate + federated evaluation), as fedqf's
        # ServerApp writes round_seconds.
        now, wall = time.perf_counter(), time.time()
        if server_round > 0:
            rows.append({"round": float(server_round), "round_seconds": now - round_started[0],
                         "started": round_started[1], "ended": wall})
        round_started[0], round_started[1] = now, wall
        return None

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=needed, min_evaluate_nodes=needed,
                      min_available_nodes=needed)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                            num_rounds=config.federation.rounds, timeout=config.federation.round_timeout,
                            train_config=ConfigRecord(), evaluate_config=ConfigRecord(), evaluate_fn=evaluate_fn)
    evaluations = {int(r): dict(m) for r, m in result.evaluate_metrics_clientapp.items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"rounds": rows, "wall_seconds": time.perf_counter() - started,
                                    "federated_evaluation": evaluations}, indent=2))
