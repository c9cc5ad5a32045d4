"""Coordinator-side aggregation: check each reply, then add ciphertexts (CKKS) or pass clean plaintext on.

This is the public API that `strategies/` builds on. Every reply is checked on its own and a bad one is
rejected with its reason; it never touches the aggregate and never stops the round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Protocol

import numpy as np
import tenseal as ts
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import remove_content_from_message
from flwr.common.logger import log

from fedqf.blocks import BlockRelay, Manifest, block_digest, manifest_record, read_block, read_manifest
from fedqf.config import FederationConfig, SecureAggregationMode
from fedqf.crypto import EncryptedSum
from fedqf.errors import FederationError, FedqfError, UpdateRejectedError
from fedqf.model import ParameterLayout
from fedqf.protocol import (
    AGGREGATE_ROUND,
    ARRAYS,
    METRICS,
    NUM_EXAMPLES,
    REPORT,
    WEIGHT_SUM,
    InstitutionReport,
    ReplyStatus,
    array_size,
    chunks_to_record,
    is_encrypted,
    record_to_encrypted,
    report_from_reply,
)


class RoundObserver(Protocol):
    """Receives every institution's report of a round (accepted or not) and what the round produced."""

    def record_train(self, server_round: int, reports: Sequence[InstitutionReport]) -> None: ...

    def record_aggregate(self, server_round: int, arrays: ArrayRecord) -> None: ...

    def record_evaluation(self, server_round: int, metrics: MetricRecord | None) -> None: ...

    def catch_up(self, node_id: int, server_round: int) -> dict[str, ArrayRecord]: ...


@dataclass(frozen=True)
class AggregationSetup:
    """What a strategy needs to check and aggregate updates. Holds a public CKKS context only."""

    mode: SecureAggregationMode
    layout: ParameterLayout
    min_institutions: int = 1
    public_context: ts.Context | None = None
    fingerprint: str = ""
    observer: RoundObserver | None = None
    encrypted_length: int = 0  # values per encrypted update: the model size, or its packed slot count
    round_offset: int = 0  # rounds completed before this coordinator (re)started: Flower counts from 1 again
    max_update_norm: float = 0.0  # plaintext: reject updates farther than this from the round's global model
    max_update_bytes: int = 0  # reject a reply whose arrays and config values exceed this many bytes; 0: no limit
    # CKKS updates larger than secure_aggregation.block_mib: manifests in the train replies, blocks fetched after
    relay: BlockRelay | None = None
    # CKKS: where a round's aggregate is written as the sum is drained (fedqf.stored), else it is held in memory
    aggregate_file: Callable[[int], Path] | None = None

    @property
    def expected_length(self) -> int:
        return self.encrypted_length or self.layout.size

    def __post_init__(self) -> None:
        if self.mode is SecureAggregationMode.CKKS:
            if self.public_context is None or not self.fingerprint:
                raise FedqfError("CKKS aggregation needs a public context and its key fingerprint")
            if self.public_context.is_private():
                raise FedqfError("the coordinator must not hold a CKKS secret key; give it the public context")


@dataclass(frozen=True)
class TrainAggregate:
    """The outcome of one training round at the coordinator."""

    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    accepted: tuple[Message, ...]
    reports: tuple[InstitutionReport, ...]


def _weighted_train_metrics(reports: Sequence[InstitutionReport]) -> MetricRecord:
    total = sum(r.metrics.get(NUM_EXAMPLES, 0.0) for r in reports)
    loss = sum(r.metrics.get("train-loss", 0.0) * r.metrics.get(NUM_EXAMPLES, 0.0) for r in reports)
    eps = [r.metrics["epsilon"] for r in reports if "epsilon" in r.metrics]
    return MetricRecord(
        {
            "train-loss": loss / total if total else float("nan"),
            "institutions": len(reports),
            "num-examples": int(total),
            "max-epsilon": max(eps) if eps else 0.0,
        }
    )


SIZE_MARGIN = 64 * 1024  # bytes of headroom over the derived limit: metric names, record keys, serialization


def update_size_limit(config: FederationConfig, layout: ParameterLayout, encrypted_length: int = 0) -> int:
    """The largest update the coordinator accepts: `federation.max_update_bytes`, or, when that is 0,
    2 * B + 64 KiB where B bounds a well-formed update of this model.

    Plaintext: B = 4 * P bytes (P float32 parameters). CKKS: B = C * (N * L * 8 + 512), with C = ceil(S / N)
    ciphertexts for S encoded values (the model size, or its packed count `encrypted_length`), each an
    institution's secret-key ciphertext: one polynomial of N coefficients over the L data primes, 8 bytes each,
    uncompressed, plus its seed, SEAL's header and TenSEAL's message (about 220 bytes). Twice that also admits a
    public-key ciphertext (two polynomials).
    """
    if config.federation.max_update_bytes:
        return config.federation.max_update_bytes
    sa = config.secure_aggregation
    if sa.mode is SecureAggregationMode.CKKS:
        chunks = -(-(encrypted_length or layout.size) // sa.poly_modulus_degree)
        data_primes = max(len(sa.coeff_mod_bit_sizes) - 1, 1)
        expected = chunks * (sa.poly_modulus_degree * data_primes * 8 + 512)
    else:
        expected = 4 * layout.size
    return 2 * expected + SIZE_MARGIN


def update_bytes(message: Message) -> int:
    """Bytes a reply carries in its arrays (every ArrayRecord) and in the string and bytes values of its
    ConfigRecords: what a hostile institution could inflate. Reads sizes only; decodes nothing."""
    total = 0
    for record in message.content.values():
        if isinstance(record, ArrayRecord):
            total += sum(array_size(array) for array in record.values())
        elif isinstance(record, ConfigRecord):
            for value in record.values():
                items = value if isinstance(value, list) else [value]
                total += sum(len(v) for v in items if isinstance(v, (str, bytes)))
    return total


def _check_size(message: Message, setup: AggregationSetup) -> None:
    size = update_bytes(message)
    if size > setup.max_update_bytes:
        raise UpdateRejectedError(
            f"the update is {size} bytes, over the size limit of {setup.max_update_bytes} bytes "
            "(federation.max_update_bytes)"
        )


def _check_plain_update(message: Message, layout: ParameterLayout) -> None:
    record = message.content.get(ARRAYS)
    if not isinstance(record, ArrayRecord):
        raise UpdateRejectedError("the update holds no ArrayRecord 'arrays'")
    if list(record.keys()) != list(layout.names):
        raise UpdateRejectedError(f"the update's arrays are {list(record.keys())}, expected {list(layout.names)}")
    for name, shape in zip(layout.names, layout.shapes):
        array = record[name]
        if array.stype != "numpy.ndarray" or array.dtype != "float32":
            raise UpdateRejectedError(f"array '{name}' must be float32 numpy, got {array.dtype}/{array.stype}")
        try:
            values = array.numpy()
        except Exception as exc:
            raise UpdateRejectedError(f"array '{name}' does not decode ({exc})") from exc
        if tuple(values.shape) != shape:
            raise UpdateRejectedError(f"array '{name}' has shape {tuple(values.shape)}, expected {shape}")
        if not np.isfinite(values).all():
            raise UpdateRejectedError(f"array '{name}' holds NaN or Inf")


def _check_weight(report: InstitutionReport) -> float:
    samples = report.metrics.get(NUM_EXAMPLES)
    weight = report.metrics.get("weight")
    if samples is None or not math.isfinite(samples) or samples <= 0:
        raise UpdateRejectedError(f"num-examples must be a positive number, got {samples}")
    if weight is None or not math.isfinite(weight) or weight <= 0:
        raise UpdateRejectedError(f"weight must be a positive number, got {weight}")
    return weight


def _check_update_norm(message: Message, setup: AggregationSetup, reference: ArrayRecord) -> None:
    record = message.content[ARRAYS]
    assert isinstance(record, ArrayRecord)
    squared = 0.0
    for name in setup.layout.names:
        diff = record[name].numpy().astype(np.float64) - reference[name].numpy().astype(np.float64)
        squared += float(np.sum(diff * diff))
    norm = math.sqrt(squared)
    if norm > setup.max_update_norm:
        raise UpdateRejectedError(
            f"the update moves the model by {norm:.4g} (L2), beyond strategy.max_update_norm = {setup.max_update_norm:g}"
        )


def aggregate_train_replies(
    server_round: int, replies: Iterable[Message], setup: AggregationSetup, *, reference: ArrayRecord | None = None
) -> TrainAggregate:
    """Check every reply and aggregate the accepted ones.

    CKKS: S = sum_k c_k over accepted ciphertexts, added one at a time into a running sum (memory does not
    grow with the number of institutions); the result carries S, the round and sum_k a_k, from which
    institutions compute w_{t+1} = w_t + Dec(S) / sum_k a_k. Plaintext: the accepted messages are returned
    for the strategy's own rule (mean, median, Krum, ...).
    """
    accepted: list[Message] = []
    reports: list[InstitutionReport] = []
    running: EncryptedSum | None = None
    weight_sum = 0.0
    manifests: dict[int, tuple[Manifest, float]] = {}
    ckks = setup.mode is SecureAggregationMode.CKKS
    if ckks and setup.relay is None:  # in blocks, each block gets a running sum of its own (_sum_blocks)
        assert setup.public_context is not None
        running = EncryptedSum(setup.public_context, length=setup.expected_length, fingerprint=setup.fingerprint)
    pending = iter(replies)
    record: object = None
    # `message` and `record` end as None: the last reply's ciphertexts are not held while the sum is serialized
    while (message := next(pending, None)) is not None:
        report = report_from_reply(message)
        if report.status is ReplyStatus.OK:
            try:
                if setup.max_update_bytes > 0:
                    _check_size(message, setup)  # first: an oversized update is not decoded at all
                weight = _check_weight(report)
                if ckks:
                    record = message.content.get(ARRAYS)
                    if not isinstance(record, ArrayRecord):
                        raise UpdateRejectedError("the update holds no ArrayRecord 'arrays'")
                    if setup.relay is not None:  # a manifest now; its blocks are fetched once every reply is in
                        manifests[report.node_id] = (read_manifest(record, setup.relay.layout, setup.fingerprint),
                                                     weight)
                    else:
                        assert running is not None
                        # The reply's bytes are released as its ciphertexts are cut from them, and before the
                        # update is added: those chunks are all that is held of it, besides the running sum.
                        update = record_to_encrypted(record, release=True)
                        message, record = remove_content_from_message(message), None
                        running.add(update)
                        del update
                else:
                    _check_plain_update(message, setup.layout)
                    if setup.max_update_norm > 0 and reference is not None and not is_encrypted(reference):
                        _check_update_norm(message, setup, reference)
                weight_sum += weight
                # Under CKKS the update now lives in the running sum: keep the reply without its ciphertexts, or
                # the coordinator would hold every institution's update until the round ends.
                accepted.append(remove_content_from_message(message) if ckks else message)
            except FedqfError as exc:
                report = report.rejected(str(exc))
        if report.status is not ReplyStatus.OK:
            log(WARNING, "round %d: institution %s %s: %s", server_round, report.label, report.status.value, report.reason)
        reports.append(report)
        message = record = None  # not held while the next reply arrives
    digests: list[bytes] = []
    if setup.relay is not None:
        if manifests:
            dropped, digests = _sum_blocks(server_round, manifests, setup, setup.relay)
            weight_sum -= sum(manifests[node][1] for node in dropped)
            accepted = [m for m in accepted if int(m.metadata.src_node_id) not in dropped]
            for i, r in enumerate(reports):
                if r.node_id in dropped:
                    reports[i] = r = r.with_status(*dropped[r.node_id])
                    log(WARNING, "round %d: institution %s %s: %s", server_round, r.label, r.status.value, r.reason)
        for r in reports:  # an institution that failed may have lost its aggregates: deliver them again next time
            if r.status is not ReplyStatus.OK:
                setup.relay.forget(r.node_id)
    if setup.observer is not None:
        setup.observer.record_train(server_round, reports)
        validation = validation_from_reports(server_round - 1, reports)
        if validation is not None and server_round > 1:
            setup.observer.record_evaluation(server_round - 1, validation)
    ok_reports = [r for r in reports if r.status is ReplyStatus.OK]
    log(INFO, "round %d: %d of %d institutions' updates accepted", server_round, len(ok_reports), len(reports))
    if not accepted:
        return TrainAggregate(None, None, (), tuple(reports))
    metrics = _weighted_train_metrics(ok_reports)
    arrays: ArrayRecord | None = None
    if ckks:
        extra = {
            AGGREGATE_ROUND: np.array([server_round], dtype=np.int64),
            WEIGHT_SUM: np.array([weight_sum], dtype=np.float64),
            "fedqf.count": np.array([len(accepted)], dtype=np.int64),
        }
        if setup.relay is not None:
            arrays = manifest_record(setup.relay.layout, setup.fingerprint, digests, extra=extra)
        else:
            assert running is not None
            store = setup.aggregate_file(server_round) if setup.aggregate_file is not None else None
            arrays = chunks_to_record(running.drain(), length=running.length, fingerprint=setup.fingerprint,
                                      extra=extra, store=store)
    return TrainAggregate(arrays, metrics, tuple(accepted), tuple(reports))


def _sum_blocks(server_round: int, manifests: dict[int, tuple[Manifest, float]], setup: AggregationSetup,
                relay: BlockRelay) -> tuple[dict[int, tuple[ReplyStatus, str]], list[bytes]]:
    """Sum the accepted institutions' updates block by block, each block fetched from every institution and added
    as it arrives, the sum of each block written to the checkpoint directory. Returns the institutions left out:
    an institution whose block does not arrive or does not match its manifest is dropped, and the blocks are
    summed again without it, so that every block of the aggregate holds the same institutions. Also returns
    the digests of the summed blocks."""
    assert setup.public_context is not None
    dropped: dict[int, tuple[ReplyStatus, str]] = {}
    limit = block_size_limit(setup, relay)
    while True:
        members = [node for node in sorted(manifests) if node not in dropped]
        if not members:
            return dropped, []
        digests: list[bytes] = []
        for index in range(relay.layout.blocks):
            start, stop = relay.layout.span(index)
            running = EncryptedSum(setup.public_context, length=stop - start, fingerprint=setup.fingerprint)
            seen: set[int] = set()
            for reply in relay.fetch(server_round, members, index):
                node = int(reply.metadata.src_node_id)
                if node not in members or node in dropped or node in seen:
                    continue
                seen.add(node)
                try:
                    if reply.has_error():
                        dropped[node] = (ReplyStatus.FAILED, f"block {index} did not arrive: {reply.error.reason}")
                        continue
                    if update_bytes(reply) > limit:
                        raise UpdateRejectedError(f"block {index} is over the size limit of {limit} bytes")
                    record = reply.content.get(ARRAYS)
                    if not isinstance(record, ArrayRecord):
                        raise UpdateRejectedError(f"the reply for block {index} holds no ArrayRecord 'arrays'")
                    running.add(read_block(record, relay.layout, manifests[node][0], index))
                except FedqfError as exc:
                    dropped[node] = (ReplyStatus.REJECTED, str(exc))
            for node in members:  # an institution that sent no reply for this block is left out too
                if node not in seen:
                    dropped[node] = (ReplyStatus.FAILED, f"no reply for block {index}")
            left = [node for node in members if node in dropped]
            if left:
                log(WARNING, "round %d: block %d failed at institution(s) %s; summing the blocks again without them",
                    server_round, index, ", ".join(map(str, left)))
                break
            total = running.result()
            relay.save_sum(server_round, index, total)
            digests.append(block_digest(total))
            del running, total
        else:
            log(INFO, "round %d: %d institutions' updates summed in %d blocks", server_round, len(members),
                relay.layout.blocks)
            return dropped, digests


def block_size_limit(setup: AggregationSetup, relay: BlockRelay) -> int:
    """The largest block reply accepted: twice the uncompressed ciphertexts of one block, plus margin, and never
    more than the update size limit."""
    limit = 2 * relay.layout.chunks_per_block * relay.layout.ciphertext_bytes + SIZE_MARGIN
    return min(limit, setup.max_update_bytes) if setup.max_update_bytes > 0 else limit


def finish_train(setup: AggregationSetup, server_round: int, outcome: TrainAggregate, arrays: ArrayRecord | None) -> None:
    """Record the round's aggregate, or end the federation cleanly when too few institutions trained.

    Raises FederationError naming the round, how many trained and why the others did not.
    """
    if len(outcome.accepted) < setup.min_institutions or arrays is None:
        others = "; ".join(f"{r.label}: {r.status.value} ({r.reason})" for r in outcome.reports if r.status is not ReplyStatus.OK)
        raise FederationError(
            f"round {server_round}: {len(outcome.accepted)} of {len(outcome.reports)} institutions trained, "
            f"at least {setup.min_institutions} required" + (f"; {others}" if others else "")
        )
    if setup.observer is not None:
        setup.observer.record_aggregate(server_round, arrays)


def weighted_scores(scores: Iterable[tuple[object, object, object]]) -> MetricRecord | None:
    """Example-weighted mean of (examples, loss, accuracy) triples; malformed triples are skipped."""
    total = loss = accuracy = 0.0
    for triple in scores:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in triple):
            continue
        n, l, a = (float(v) for v in triple)  # type: ignore[arg-type]
        if not (n > 0 and math.isfinite(n) and math.isfinite(l) and 0.0 <= a <= 1.0):
            continue
        total += n
        loss += l * n
        accuracy += a * n
    if total == 0:
        return None
    return MetricRecord({"loss": loss / total, "accuracy": accuracy / total, "num-examples": int(total)})


def validation_from_reports(model_round: int, reports: Sequence[InstitutionReport]) -> MetricRecord | None:
    """Weighted validation loss and accuracy of the round-`model_round` global model, from train replies."""
    return weighted_scores(
        (r.metrics.get("val-examples"), r.metrics.get("val-loss"), r.metrics.get("val-accuracy"))
        for r in reports
        if r.metrics.get("val-round") == float(model_round)
    )


def with_catch_up(setup: AggregationSetup, server_round: int, messages: Iterable[Message]) -> list[Message]:
    """Give each lagging institution, with its train instruction, the global-model rounds it has not confirmed."""
    out: list[Message] = []
    for message in messages:
        extra = setup.observer.catch_up(message.metadata.dst_node_id, server_round) if setup.observer else {}
        if extra:
            content = RecordDict({**dict(message.content.items()), **extra})
            message = Message(content, message_type=message.metadata.message_type,
                              dst_node_id=message.metadata.dst_node_id)
        out.append(message)
    return out


def no_separate_evaluation(strategy: object, server_round: int, arrays: ArrayRecord, config: object,
                           grid: object) -> list[Message]:
    """configure_evaluate of fedqf's strategies: institutions validate each new global model when it arrives
    with the next train instruction, so a round costs one message exchange, not two; the coordinator sends one
    evaluate instruction after the last round."""
    return []


def aggregate_evaluate_replies(server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
    """Weighted mean of the institutions' validation loss and accuracy; malformed replies are skipped."""
    scores: list[tuple[object, object, object]] = []
    for message in replies:
        if message.has_error():
            log(WARNING, "round %d: evaluation failed at institution %d: %s", server_round,
                message.metadata.src_node_id, message.error.reason)
            continue
        metrics = message.content.get(METRICS)
        if isinstance(metrics, MetricRecord):
            scores.append((metrics.get(NUM_EXAMPLES), metrics.get("loss"), metrics.get("accuracy")))
    return weighted_scores(scores)


def record_evaluation(setup: AggregationSetup, server_round: int, metrics: MetricRecord | None) -> MetricRecord | None:
    """Pass a separate evaluation's result to the observer; `server_round` is Flower's (relative) round."""
    if setup.observer is not None and metrics is not None:
        setup.observer.record_evaluation(server_round + setup.round_offset, metrics)
    return metrics


def _institution_name(message: Message) -> str:
    report = message.content.get(REPORT)
    return str(report.get("institution", "")) if isinstance(report, ConfigRecord) else ""


def weighted_mean_arrays(messages: Sequence[Message], layout: ParameterLayout) -> ArrayRecord:
    """Plaintext FedAvg of full weight vectors, weighted by each reply's num-examples.

    Summed in the order of the institutions' names, not of arrival: floating-point addition is not associative,
    and the same updates must give the same bits however the replies raced (a resumed or retried round).
    """
    total = 0.0
    acc = [np.zeros(s, dtype=np.float64) for s in layout.shapes]
    for message in sorted(messages, key=lambda m: (_institution_name(m), int(m.metadata.src_node_id))):
        weight = float(message.content[METRICS][NUM_EXAMPLES])  # type: ignore[arg-type]
        record = message.content[ARRAYS]
        for i, name in enumerate(layout.names):
            acc[i] += weight * record[name].numpy().astype(np.float64)  # type: ignore[union-attr]
        total += weight
    return ArrayRecord({n: Array((a / total).astype(np.float32)) for n, a in zip(layout.names, acc)})
