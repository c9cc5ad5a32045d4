"""The fedqf ServerApp: the coordinator's side of a federation (rounds, aggregation, the run directory)."""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedqf.aggregation import AggregationSetup, update_size_limit
from fedqf.blocks import (
    RELEASE_IN_BLOCKS,
    BlockRelay,
    is_manifest,
    layout_for,
    plain_values_per_block,
    request_release_block,
    seeded_initial_record,
)
from fedqf.checkpoint import DIRECTORY as CHECKPOINT_DIRECTORY
from fedqf.checkpoint import Checkpoint, aggregate_path, config_digest, load_aggregate, save_aggregate
from fedqf.config import FederationConfig, PrivacyMode, SecureAggregationMode, dump_config, load_config
from fedqf.crypto import key_fingerprint, load_public_context
from fedqf.data import Dataset, simulate_federation_data
from fedqf.errors import FederationError, FedqfError, InstitutionsMissingError
from fedqf.model import ParameterLayout, build_model, set_arrays
from fedqf.packing import ckks_parameters_of, scheme_for
from fedqf.protocol import ARRAYS, CKKS_STYPE, CONFIG, ReplyStatus, instruction_config, is_encrypted
from fedqf.registry import load_strategy_class
from fedqf.rundir import RunRecorder
from fedqf.runtime import return_large_buffers_when_freed
from fedqf.stream import RoundPolicy, StreamingGrid
from fedqf.trainer import evaluate


@dataclass(frozen=True)
class CoordinatorInputs:
    """Everything the ServerApp is started with (from the run config)."""

    config: FederationConfig
    out_dir: Path
    public_context: ts.Context | None
    test_data: Dataset | None
    num_features: int
    num_classes: int
    resume: bool = False


def _plain_metrics(metrics: MetricRecord | None) -> dict[str, float] | None:
    if metrics is None:
        return None
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


class ProgressRecorder(RunRecorder):
    """A RunRecorder that also keeps the latest aggregate and logs one progress line per round."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__(out_dir)
        self.latest_arrays: ArrayRecord | None = None
        self.latest_round = 0
        self.evaluations: dict[int, MetricRecord | None] = {}
        # Catch-up: the initial model, every encrypted aggregate (on disk, in the checkpoint directory), and the
        # round each institution confirmed.
        self.initial: ArrayRecord | None = None
        self.aggregate_rounds: set[int] = set()
        self.node_rounds: dict[int, int] = {}

    def record_train(self, server_round: int, reports: Any) -> None:
        super().record_train(server_round, reports)
        for report in reports:
            if "model-round" in report.metrics:
                self.node_rounds[report.node_id] = int(report.metrics["model-round"])
        done = sum(1 for r in reports if r.status is ReplyStatus.OK)
        eps = [r.metrics["epsilon"] for r in reports if "epsilon" in r.metrics]
        eps_text = f", epsilon spent up to {max(eps):.3f}" if eps else ""
        log(INFO, "fedqf: round %d: %d/%d institutions trained%s", server_round, done, len(reports), eps_text)

    def record_aggregate(self, server_round: int, arrays: ArrayRecord) -> None:
        if is_encrypted(arrays) or is_manifest(arrays):  # held from here on in its file, not in memory
            arrays = save_aggregate(self.out_dir, server_round, arrays)
            self.aggregate_rounds.add(server_round)
        self.latest_arrays = arrays
        self.latest_round = server_round

    def checkpoint(self, completed_round: int, digest: str, rows: list[dict[str, Any]], *,
                   wall_seconds: float = 0.0) -> None:
        """Save what a resumed coordinator needs to continue after `completed_round`."""
        Checkpoint(
            completed_round=completed_round,
            digest=digest,
            latest=self.latest_arrays,
            initial=self.initial,
            aggregate_rounds=sorted(self.aggregate_rounds),
            node_rounds=dict(self.node_rounds),
            institutions=list(self.institutions),
            rows=list(rows),
            evaluations={k: _plain_metrics(v) for k, v in self.evaluations.items()},
            wall_seconds=wall_seconds,
        ).save(self.out_dir)

    def restore(self, checkpoint: Checkpoint) -> None:
        self.latest_arrays = checkpoint.latest
        self.latest_round = checkpoint.completed_round
        self.aggregate_rounds = set(checkpoint.aggregate_rounds)
        self.node_rounds = dict(checkpoint.node_rounds)
        self.institutions = list(checkpoint.institutions)
        self.evaluations = {k: MetricRecord(dict(v)) if v is not None else None
                            for k, v in checkpoint.evaluations.items()}
        if checkpoint.initial is not None:
            self.initial = checkpoint.initial

    def catch_up(self, node_id: int, server_round: int) -> dict[str, ArrayRecord]:
        """Rounds a lagging institution needs before the aggregate of round server_round - 1 applies to it."""
        if server_round < 2 or not self.aggregate_rounds:
            return {}
        holds = self.node_rounds.get(node_id, -1)
        if holds >= server_round - 2:
            return {}
        extra: dict[str, ArrayRecord] = {}
        if holds < 0 and self.initial is not None:
            extra["fedqf.catchup.initial"] = self.initial
        for missed in range(max(holds, 0) + 1, server_round - 1):
            if missed in self.aggregate_rounds:
                extra[f"fedqf.catchup.{missed:06d}"] = load_aggregate(self.out_dir, missed)
        if extra:
            log(INFO, "fedqf: institution %d holds round %d; sending %d missed rounds", node_id, holds, len(extra))
        return extra

    def record_evaluation(self, server_round: int, metrics: MetricRecord | None) -> None:
        self.evaluations[server_round] = metrics


def _inputs_from(context: Context) -> CoordinatorInputs:
    run_config = context.run_config
    config = load_config(Path(str(run_config["fedqf-config"])))
    out_dir = Path(str(run_config["fedqf-out"]))
    public: ts.Context | None = None
    if config.secure_aggregation.mode is SecureAggregationMode.CKKS:
        path = Path(str(run_config["fedqf-public-context"]))
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise FedqfError(f"{path}: cannot read the CKKS public context ({exc.strerror})") from exc
        public = load_public_context(data)  # refuses a context holding a secret key
    if str(run_config.get("fedqf-mode", "simulation")) == "deployment":
        # The coordinator holds no data: the model's shape comes from the federation file.
        if config.model.num_features < 1 or config.model.num_classes < 2:
            raise FedqfError(
                f"{config.source}: a deployment needs 'model.num_features' >= 1 and 'model.num_classes' >= 2"
            )
        return CoordinatorInputs(config, out_dir, public, None, config.model.num_features, config.model.num_classes,
                                 resume=str(run_config.get("fedqf-resume", "")) == "1")
    base_dir = str(run_config.get("fedqf-base-dir", ""))
    shares = simulate_federation_data(
        config.data,
        institutions=config.federation.institutions,
        seed=config.federation.seed,
        base_dir=Path(base_dir) if base_dir else None,
    )
    return CoordinatorInputs(config, out_dir, public, shares.test, shares.num_features, shares.num_classes)


def _final_evaluation(grid: Grid, recorder: ProgressRecorder, config_text: str, timeout: float) -> None:
    """One evaluate instruction after the last round: the validation score of the final global model."""
    from fedqf.aggregation import aggregate_evaluate_replies

    assert recorder.latest_arrays is not None
    content = RecordDict({ARRAYS: recorder.latest_arrays,
                          CONFIG: instruction_config(config_text, **{"server-round": recorder.latest_round})})
    messages = [Message(RecordDict({**dict(content.items()), **recorder.catch_up(node, recorder.latest_round + 1)}),
                        message_type=MessageType.EVALUATE, dst_node_id=node)
                for node in sorted(grid.get_node_ids())]
    replies = grid.send_and_receive(messages, timeout=timeout)
    recorder.record_evaluation(recorder.latest_round, aggregate_evaluate_replies(recorder.latest_round, replies))


def _release_final_model(grid: Grid, arrays: ArrayRecord, config_text: str, timeout: float, *,
                         layout: ParameterLayout, in_blocks: int = 0) -> list[np.ndarray]:
    """Ask the institutions, one at a time, to release the final global model in plaintext; with `in_blocks`
    values per message, the model is then asked for block by block (no message holds all of it)."""
    for node_id in sorted(grid.get_node_ids()):
        config = instruction_config(config_text, **{"fedqf.release": True})
        if in_blocks:
            config[RELEASE_IN_BLOCKS] = True
        message = Message(RecordDict({ARRAYS: arrays, CONFIG: config}),
                          message_type=MessageType.QUERY, dst_node_id=node_id)
        for reply in grid.send_and_receive([message], timeout=timeout):
            if reply.has_error():
                log(WARNING, "institution %d could not release the model: %s", node_id, reply.error.reason)
                continue
            if in_blocks:
                released = _release_in_blocks(grid, node_id, config_text, timeout, layout, in_blocks)
                if released is not None:
                    return released
                continue
            record = reply.content.get(ARRAYS)
            if isinstance(record, ArrayRecord) and all(n in record for n in layout.names):
                return [record[n].numpy() for n in layout.names]
            log(WARNING, "institution %d released no complete model", node_id)
    raise FederationError("no institution released the final global model")


def _release_in_blocks(grid: Grid, node_id: int, config_text: str, timeout: float, layout: ParameterLayout,
                       per_block: int) -> list[np.ndarray] | None:
    flat = np.empty(layout.size, dtype=np.float32)
    for index, start in enumerate(range(0, layout.size, per_block)):
        stop = min(layout.size, start + per_block)
        for reply in grid.send_and_receive([request_release_block(config_text, node_id, index, start, stop)],
                                           timeout=timeout):
            record = None if reply.has_error() else reply.content.get(ARRAYS)
            values = record["values"].numpy() if isinstance(record, ArrayRecord) and "values" in record else None
            if values is None or values.dtype != np.float32 or values.shape != (stop - start,) \
                    or not np.isfinite(values).all():
                reason = reply.error.reason if reply.has_error() else "a malformed block"
                log(WARNING, "institution %d could not release block %d of the model: %s", node_id, index, reason)
                return None
            flat[start:stop] = values
    return layout.unflatten(flat)  # views of the one flat buffer: no copy of the model


def _wait_for_institutions(grid: Grid, config: FederationConfig) -> None:
    """Give every institution up to `join_timeout` to connect; the minimum is then waited for by the strategy."""
    expected = config.federation.institutions
    deadline = time.monotonic() + config.federation.join_timeout
    seen = -1
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected != seen:
            log(INFO, "fedqf: %d/%d institutions connected", connected, expected)
            seen = connected
        if connected >= expected or time.monotonic() >= deadline:
            return
        time.sleep(1.0)


def run_federation(grid: Grid, inputs: CoordinatorInputs) -> dict[str, Any]:
    """Run all rounds with the configured strategy and write the run directory; returns the summary."""
    config = inputs.config
    started = time.perf_counter()
    recorder = ProgressRecorder(inputs.out_dir)
    model = build_model(
        config.model,
        num_features=inputs.num_features,
        num_classes=inputs.num_classes,
        generator=torch.Generator().manual_seed(config.federation.seed),
    )
    layout = ParameterLayout.of(model)
    secure = config.secure_aggregation.mode
    fingerprint = key_fingerprint(inputs.public_context) if inputs.public_context is not None else ""
    scheme = scheme_for(config)
    config_text = dump_config(config)
    digest = config_digest(config_text)
    encrypted_length = scheme.slots_needed(layout.size) if scheme is not None else 0
    blocks = layout_for(config, encrypted_length or layout.size)
    if blocks is None:
        initial = ArrayRecord({n: Array(t.detach().numpy().copy()) for n, t in model.state_dict().items()})
    else:  # every institution builds the initial model from the seed; the coordinator sends only its digest
        initial = seeded_initial_record([t.detach().numpy() for t in model.state_dict().values()])
    recorder.initial = initial
    pending_rows: list[dict[str, Any]] = []
    offset = 0
    if inputs.resume:
        checkpoint = Checkpoint.load(inputs.out_dir, digest=digest)
        offset = checkpoint.completed_round
        recorder.restore(checkpoint)
        pending_rows.extend(checkpoint.rows)
        started -= checkpoint.wall_seconds  # wall_seconds counts every start's running time, not the downtime
        log(INFO, "fedqf: resuming after round %d of %d", offset, config.federation.rounds)
    relay: BlockRelay | None = None
    if blocks is not None:
        # Updates travel in blocks; the summed blocks live beside the checkpoint, for catch-up and resume.
        streaming = grid if isinstance(grid, StreamingGrid) else StreamingGrid(grid)
        relay_grid = StreamingGrid(streaming.inner)
        relay_grid.one_at_a_time = True  # the coordinator holds one block, not one per institution
        relay = BlockRelay(relay_grid, inputs.out_dir / CHECKPOINT_DIRECTORY, blocks, config_text,
                           config.federation.round_timeout)
        relay.check_stored(recorder.aggregate_rounds)  # on resume: every block of every stored aggregate
        streaming.before_send = relay.deliver
        streaming.on_failure = relay.forget
        grid = streaming
        log(INFO, "fedqf: encrypted updates travel in %d blocks of up to %d ciphertexts "
            "(secure_aggregation.block_mib = %g)", blocks.blocks, blocks.chunks_per_block,
            config.secure_aggregation.block_mib)
    setup = AggregationSetup(
        mode=secure,
        layout=layout,
        min_institutions=config.federation.required_institutions,
        public_context=inputs.public_context,
        fingerprint=fingerprint,
        observer=recorder,
        encrypted_length=encrypted_length,
        round_offset=offset,
        max_update_norm=config.strategy.max_update_norm,
        max_update_bytes=update_size_limit(config, layout, encrypted_length),
        relay=relay,
        # the aggregate goes straight to the run directory, and is read from there when it is sent (fedqf.stored)
        aggregate_file=functools.partial(aggregate_path, recorder.out_dir) if secure is SecureAggregationMode.CKKS
        else None,
    )
    strategy = load_strategy_class(config.strategy.name).from_config(config, setup=setup)
    log(INFO, "fedqf: %s: %d institutions, %d rounds, strategy %s, secure aggregation %s, privacy %s",
        config.federation.name, config.federation.institutions, config.federation.rounds, config.strategy.name,
        secure.value, config.privacy.mode.value)
    if inputs.public_context is not None:
        log(INFO, "fedqf: CKKS public key fingerprint %s", fingerprint)
    log(INFO, "fedqf: a round waits %.0f s for at least %d institutions, retried up to %d times; updates over %d "
        "bytes are rejected", config.federation.round_timeout, config.federation.required_institutions,
        config.federation.round_retries, setup.max_update_bytes)

    _wait_for_institutions(grid, config)
    round_started = [time.perf_counter()]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        # Called by Flower after each round: plaintext global weights can be scored on the test split here;
        # under CKKS the coordinator holds only ciphertexts, so the test split waits for the final release.
        if server_round == 0:
            round_started[0] = time.perf_counter()
            return None
        server_round += offset
        row: dict[str, Any] = {"round": server_round, "round_seconds": time.perf_counter() - round_started[0]}
        round_started[0] = time.perf_counter()
        if secure is SecureAggregationMode.NONE and inputs.test_data is not None and len(inputs.test_data):
            set_arrays(model, [arrays[n].numpy() for n in layout.names])
            test = evaluate(model, inputs.test_data)
            row.update(test_accuracy=test.accuracy, test_loss=test.loss)
        pending_rows.append(row)
        recorder.checkpoint(server_round, digest, pending_rows, wall_seconds=time.perf_counter() - started)
        return MetricRecord({k: v for k, v in row.items() if isinstance(v, (int, float))})

    stopped_reason = ""
    bounded: Any = (grid.bounded_wait_for_minimum(config.federation.required_institutions,
                                                  config.federation.join_timeout)
                    if isinstance(grid, StreamingGrid) else contextlib.nullcontext())
    try:
        with bounded:
            strategy.start(
                grid=grid,
                initial_arrays=recorder.latest_arrays if offset and recorder.latest_arrays is not None else initial,
                num_rounds=config.federation.rounds - offset,
                timeout=config.federation.round_timeout,
                train_config=instruction_config(config_text),
                evaluate_config=instruction_config(config_text),
                evaluate_fn=evaluate_fn,
            )
    except InstitutionsMissingError as exc:
        # No final release or evaluation without the institutions, and the checkpoint stays for --resume.
        log(ERROR, "fedqf: the federation stops after round %d: %s", recorder.latest_round, exc)
        raise
    except FederationError as exc:
        stopped_reason = str(exc)
        log(WARNING, "fedqf: the federation ends early: %s", exc)
    if recorder.latest_arrays is not None:
        _final_evaluation(grid, recorder, config_text, config.federation.round_timeout)
    for row in pending_rows:
        r = row["round"]
        fed = recorder.evaluations.get(r)
        trained = sum(1 for x in recorder.institutions if x["round"] == r and x["status"] == ReplyStatus.OK.value)
        row.update(
            accuracy=fed.get("accuracy") if fed is not None else None,
            loss=fed.get("loss") if fed is not None else None,
            institutions_trained=trained,
        )
        recorder.record_round(row)
    rounds_completed = recorder.latest_round

    names = list(layout.names)
    if recorder.latest_arrays is None:  # no round completed: the initial model (built from the seed, not changed)
        weights = [t.detach().numpy().copy() for t in model.state_dict().values()]
    elif secure is SecureAggregationMode.CKKS:
        weights = _release_final_model(
            grid, recorder.latest_arrays, config_text, config.federation.round_timeout, layout=layout,
            in_blocks=plain_values_per_block(config) if relay is not None else 0)
    else:
        weights = [recorder.latest_arrays[n].numpy() for n in names]
    set_arrays(model, weights)
    final_accuracy: float | None = None
    final_loss: float | None = None
    if inputs.test_data is not None and len(inputs.test_data):
        test = evaluate(model, inputs.test_data)
        final_accuracy, final_loss = test.accuracy, test.loss
    elif recorder.history:
        final_accuracy, final_loss = recorder.history[-1].get("accuracy"), recorder.history[-1].get("loss")
    recorder.write_model(names, weights)
    summary: dict[str, Any] = {
        "federation": config.federation.name,
        "rounds_planned": config.federation.rounds,
        "rounds_completed": rounds_completed,
        "final_accuracy": final_accuracy,
        "final_loss": final_loss,
        "final_accuracy_source": "held-out test split" if inputs.test_data is not None and len(inputs.test_data)
        else "federated validation",
        "secure_aggregation": secure.value,
        "epsilon": recorder.max_epsilon() if config.privacy.mode is PrivacyMode.DP_SGD else None,
        "delta": config.privacy.delta if config.privacy.mode is PrivacyMode.DP_SGD else None,
        "target_epsilon": config.privacy.target_epsilon if config.privacy.mode is PrivacyMode.DP_SGD else None,
        "strategy": config.strategy.name,
        "institutions": config.federation.institutions,
        "model_parameters": layout.size,
        "wall_seconds": time.perf_counter() - started,
    }
    if secure is SecureAggregationMode.CKKS:
        params = ckks_parameters_of(config)
        summary["ckks"] = {
            "poly_modulus_degree": params.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
            "scale_bits": params.global_scale_bits,
            "security_bits": params.security_bits,
            "key_fingerprint": fingerprint,
        }
        if scheme is not None:
            summary["ckks"]["packing"] = {
                "quantization_bits": scheme.bits,
                "encoding": "plaintext coefficients",
                "values_per_coefficient": scheme.values_per_slot,
                "field_bits": scheme.field_bits,
                "guard_bits": scheme.guard_bits,
                "max_institutions": scheme.max_contributors,
                "value_bound": scheme.value_bound,
            }
        summary["ckks"]["blocks"] = blocks.blocks if blocks is not None else 1
        summary["ckks"]["bytes_per_parameter"] = (
            scheme.bytes_per_parameter(params) if scheme is not None else 8.0 * max(len(params.coeff_mod_bit_sizes) - 1, 1)
        )
    Checkpoint.remove(inputs.out_dir)  # the run directory is complete; nothing is left to resume
    statuses = [r["status"] for r in recorder.institutions]
    summary["rejected_updates"] = statuses.count(ReplyStatus.REJECTED.value)  # malformed, wrong key, out of bounds
    summary["failed_replies"] = statuses.count(ReplyStatus.FAILED.value)  # unreachable or failed institutions
    summary["budget_refusals"] = statuses.count(ReplyStatus.BUDGET_EXHAUSTED.value)
    summary["stopped_reason"] = stopped_reason or None
    recorder.write_summary(summary)
    log(INFO, "fedqf: run directory written to %s", inputs.out_dir)
    return summary


app = ServerApp()


@app.main()
def _main(grid: Grid, context: Context) -> None:
    try:
        inputs = _inputs_from(context)
        federation = inputs.config.federation
        policy = RoundPolicy(min_replies=federation.required_institutions, retries=federation.round_retries)
        streaming = StreamingGrid(grid, policy=policy)
        if inputs.config.secure_aggregation.mode is SecureAggregationMode.CKKS:
            # the coordinator holds the running sum and one reply, however many institutions answer at once; and of
            # that reply, one Array of ciphertexts at a time (the rest stays at the SuperLink until the sum reads it)
            streaming.one_at_a_time = True
            streaming.pull_later = frozenset({CKKS_STYPE})
        if str(context.run_config.get("fedqf-mode", "simulation")) != "simulation":
            return_large_buffers_when_freed()  # a process of its own: what it frees goes back to the system
        else:
            from fedqf.simulation import instruction_window

            # replies wait in the simulation engine, beside the ServerApp, until it adds them: bound how many
            streaming.window = instruction_window(inputs.config)
        run_federation(streaming, inputs)
    except FedqfError as exc:
        log(WARNING, "fedqf: federation failed: %s", exc)
        raise
