"""Encrypted updates in blocks: layout, block files, manifests, the coordinator's block-by-block sum with failing
and lying institutions, an institution's side, and a whole simulation in blocks against one in single messages."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reply_from
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.common.constant import ErrorCode
from hypothesis import given, settings
from hypothesis import strategies as st

from fedqf.aggregation import AggregationSetup, aggregate_train_replies
from fedqf.blocks import (
    BLOCK_INDEX,
    OP,
    OP_AGGREGATE_BLOCK,
    OP_UPDATE_BLOCK,
    BlockFiles,
    BlockLayout,
    BlockRelay,
    block_digest,
    block_record,
    layout_for,
    manifest_record,
    read_block,
    read_manifest,
)
from fedqf.config import SecureAggregationMode, config_from_dict, dump_config
from fedqf.crypto import (
    decrypt,
    encrypt,
    generate_context,
    key_fingerprint,
    load_public_context,
    serialize_public_context,
)
from fedqf.errors import FedqfError, UpdateRejectedError
from fedqf.model import ParameterLayout
from fedqf.packing import ckks_parameters_of
from fedqf.protocol import AGGREGATE_ROUND, ARRAYS, METRICS, REPORT, WEIGHT_SUM, ReplyStatus, aggregate_meta

SLOTS = 8192  # values per ciphertext at N = 8192: two per complex slot
LENGTH = 3 * SLOTS + 100  # four ciphertexts, the last one short
CONFIG = config_from_dict({"federation": {"institutions": 3}, "privacy": {"mode": "none"},
                           "secure_aggregation": {"block_mib": 0.13}})  # one 131 kB ciphertext per block


@pytest.fixture(scope="module")
def keys():  # type: ignore[no-untyped-def]
    secret = generate_context(ckks_parameters_of(CONFIG))
    return secret, load_public_context(serialize_public_context(secret))


@given(length=st.integers(1, 40_000), mib=st.floats(0.0, 2.0))
@settings(max_examples=200, deadline=None)
def test_blocks_cover_the_vector_in_whole_ciphertexts(length: int, mib: float) -> None:
    config = config_from_dict({"secure_aggregation": {"block_mib": mib}})
    layout = BlockLayout.of(config, length)
    spans = [layout.span(i) for i in range(layout.blocks)]
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # contiguous, no overlap
    assert all(start % SLOTS == 0 and 0 < stop - start <= layout.chunks_per_block * SLOTS for start, stop in spans)
    if mib == 0:
        assert layout.blocks == 1 and layout_for(config, length) is None
    with pytest.raises(FedqfError, match="does not exist"):
        layout.span(layout.blocks)


def test_plaintext_and_small_updates_travel_in_one_message() -> None:
    plain = config_from_dict({"secure_aggregation": {"mode": "none", "block_mib": 0.13}})
    assert layout_for(plain, LENGTH) is None
    assert layout_for(CONFIG, SLOTS) is None  # one ciphertext: one block
    layout = layout_for(CONFIG, LENGTH)
    assert layout is not None and layout.blocks == 4 and layout.span(3) == (3 * SLOTS, LENGTH)


def test_block_files_round_trip_and_refuse_missing_or_corrupt(keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    secret, _ = keys
    files = BlockFiles(tmp_path / "blocks")
    vector = encrypt(secret, np.linspace(-1, 1, 100), bound=1.0)
    files.write("update-000001-000000", 0, vector)
    assert files.read("update-000001-000000", 0) == vector
    assert oct(files.path("update-000001-000000", 0).stat().st_mode & 0o777) == "0o600"
    assert files.names("update-000001-") == ["update-000001-000000"]
    with pytest.raises(FedqfError, match="block 1 of update-000001-000000 is not here"):
        files.read("update-000001-000000", 1)
    path = files.path("update-000001-000000", 0)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(FedqfError, match="not an encrypted block file"):
        files.read("update-000001-000000", 0)
    files.write("aggregate-000002", 0, vector)
    files.remove(lambda name: name.startswith("aggregate-"))
    assert files.names("") == ["aggregate-000002"]


def _blocks(secret, values: np.ndarray, layout: BlockLayout):  # type: ignore[no-untyped-def]
    vectors = []
    for index in range(layout.blocks):
        start, stop = layout.span(index)
        vectors.append(encrypt(secret, values[start:stop], bound=1.0))
    return vectors


def test_manifest_and_block_checks_name_what_differs(keys) -> None:  # type: ignore[no-untyped-def]
    secret, _ = keys
    layout = layout_for(CONFIG, LENGTH)
    assert layout is not None
    fingerprint = key_fingerprint(secret)
    vectors = _blocks(secret, np.random.default_rng(0).uniform(-1, 1, LENGTH), layout)
    record = manifest_record(layout, fingerprint, [block_digest(v) for v in vectors])
    manifest = read_manifest(record, layout, fingerprint)
    assert read_block(block_record(vectors[2], 2), layout, manifest, 2) == vectors[2]
    with pytest.raises(UpdateRejectedError, match="declares 4 blocks of a 24676-value vector; the federation expects 2 blocks"):
        read_manifest(record, BlockLayout(LENGTH, SLOTS, 2), fingerprint)
    with pytest.raises(UpdateRejectedError, match="not the federation's"):
        read_manifest(record, layout, "0" * 64)
    with pytest.raises(UpdateRejectedError, match="asked for block 1, got block 2"):
        read_block(block_record(vectors[2], 2), layout, manifest, 1)
    # A block swapped for another one of the right shape: only the digest tells.
    other = encrypt(secret, np.zeros(SLOTS), bound=1.0)
    with pytest.raises(UpdateRejectedError, match="does not match the digest"):
        read_block(block_record(other, 1), layout, manifest, 1)
    with pytest.raises(UpdateRejectedError, match="holds 8192 values, expected 100"):
        read_block(block_record(other, 3), layout, manifest, 3)


class BlockGrid:
    """Answers the coordinator's block requests as institutions would; some fail, one lies."""

    def __init__(self, blocks: dict[int, list], *, dies_at: dict[int, int], tampers_at: dict[int, int]) -> None:  # type: ignore[type-arg]
        self.blocks = blocks
        self.dies_at = dies_at
        self.tampers_at = tampers_at
        self.requests: list[tuple[int, int]] = []

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            node = int(message.metadata.dst_node_id)
            config = message.content["config"]
            assert isinstance(config, ConfigRecord) and config[OP] == OP_UPDATE_BLOCK
            index = int(config[BLOCK_INDEX])  # type: ignore[arg-type]
            self.requests.append((node, index))
            if self.dies_at.get(node) == index:
                replies.append(_error_from(node, "node offline"))
                continue
            vector = self.blocks[node][index]
            if self.tampers_at.get(node) == index:
                vector = self.blocks[node][index - 1] if index else self.blocks[node][index + 1]
                vector = type(vector)(chunks=vector.chunks, length=self.blocks[node][index].length,
                                      fingerprint=vector.fingerprint)
            replies.append(reply_from(node, RecordDict({ARRAYS: block_record(vector, index)})))
        return replies


def _error_from(node: int, reason: str) -> Message:
    message = reply_from(node, RecordDict())
    return make_message(message.metadata, None, Error(code=ErrorCode.REPLY_MESSAGE_UNAVAILABLE, reason=reason))


def _train_reply(node: int, manifest: ArrayRecord, weight: float) -> Message:
    metrics = MetricRecord({"num-examples": 100, "weight": weight, "train-loss": 0.5})
    report = ConfigRecord({"status": "ok", "reason": "", "fingerprint": "", "institution": f"h{node}"})
    return reply_from(node, RecordDict({ARRAYS: manifest, METRICS: metrics, REPORT: report}))


def test_the_coordinator_sums_block_by_block_and_drops_a_failing_or_lying_institution(  # type: ignore[no-untyped-def]
    keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # messages are made as in a ServerApp
        monkeypatch.setattr(TaskIdentity, name, value)
    secret, public = keys
    layout = layout_for(CONFIG, LENGTH)
    assert layout is not None
    fingerprint = key_fingerprint(public)
    rng = np.random.default_rng(1)
    values = {node: rng.uniform(-1, 1, LENGTH) for node in (1, 2, 3, 4)}
    blocks = {node: _blocks(secret, values[node], layout) for node in values}
    # Institution 3's node dies when asked for block 2; institution 4 sends block 1 with block 0's ciphertext.
    grid = BlockGrid(blocks, dies_at={3: 2}, tampers_at={4: 1})
    relay = BlockRelay(grid, tmp_path, layout, dump_config(CONFIG), timeout=None)
    setup = AggregationSetup(mode=SecureAggregationMode.CKKS, layout=ParameterLayout(("w",), ((LENGTH,),)),
                             public_context=public, fingerprint=fingerprint, encrypted_length=LENGTH, relay=relay)
    replies = [_train_reply(node, manifest_record(layout, fingerprint, [block_digest(v) for v in blocks[node]]), 0.5)
               for node in (1, 2, 3, 4)]
    outcome = aggregate_train_replies(7, replies, setup)
    status = {r.node_id: (r.status, r.reason) for r in outcome.reports}
    assert status[1][0] is status[2][0] is ReplyStatus.OK
    assert status[3][0] is ReplyStatus.FAILED and "block 2 did not arrive: node offline" in status[3][1]
    assert status[4][0] is ReplyStatus.REJECTED and "block 1 does not match the digest" in status[4][1]
    assert sorted(int(m.metadata.src_node_id) for m in outcome.accepted) == [1, 2]
    assert outcome.arrays is not None
    assert aggregate_meta(outcome.arrays) == (7, 1.0)  # the weights of the two that stayed
    assert int(outcome.arrays["fedqf.count"].numpy()[0]) == 2
    # The aggregate is a manifest of the summed blocks, which lie in the relay's directory.
    manifest = read_manifest(outcome.arrays, layout, fingerprint)
    total = np.concatenate([decrypt(secret, read_block(block_record(relay.files.read("aggregate-000007", i), i),
                                                       layout, manifest, i)) for i in range(layout.blocks)])
    np.testing.assert_allclose(total, values[1] + values[2], atol=1e-4)
    # Every block was asked for once per institution still in, and the first pass stopped at the failure.
    assert grid.requests.count((1, 3)) == 1 and (3, 3) not in grid.requests


def _blocked_institution(secret, directory: Path):  # type: ignore[no-untyped-def]
    """An institution whose 16,898-parameter model (unpacked, 8,192 values per ciphertext) travels in 3 blocks of one
    ciphertext."""
    from fedqf.data import simulate_federation_data
    from fedqf.institution import Institution

    config = config_from_dict({"federation": {"institutions": 2, "seed": 3}, "privacy": {"mode": "none"},
                               "model": {"hidden": [512]}, "secure_aggregation": {"block_mib": 0.13}})
    data = simulate_federation_data(config.data, institutions=2, seed=3)
    return config, Institution(config, data.institutions[0], "a", 0, secret, blocks_dir=directory)


def test_an_institution_encrypts_sends_and_applies_an_update_in_blocks(keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fedqf.institution import InstitutionState, handle, train_round

    secret, public = keys
    config, inst = _blocked_institution(secret, tmp_path / "a")
    layout = inst.layout
    blocks = layout_for(config, layout.size)
    assert blocks is not None and blocks.blocks > 2
    initial = ArrayRecord({n: _array(t) for n, t in inst.model().state_dict().items()})
    text = dump_config(config)
    state = InstitutionState()
    reply = train_round(inst, state, RecordDict({ARRAYS: initial, "config": ConfigRecord(
        {"server-round": 1, "fedqf.federation": text})}))
    fingerprint = key_fingerprint(public)
    manifest = read_manifest(reply[ARRAYS], blocks, fingerprint)  # type: ignore[arg-type]
    assert reply[METRICS]["bytes-sent"] > 0  # type: ignore[index]

    def query(config_values: dict[str, object], arrays: ArrayRecord | None = None) -> RecordDict:
        content = {"config": ConfigRecord({"fedqf.federation": text, **config_values})}  # type: ignore[dict-item]
        if arrays is not None:
            content[ARRAYS] = arrays  # type: ignore[assignment]
        return handle(inst, state, "query", RecordDict(content))  # type: ignore[arg-type]

    update = [read_block(query({OP: OP_UPDATE_BLOCK, "server-round": 1, BLOCK_INDEX: i})[ARRAYS], blocks, manifest, i)  # type: ignore[arg-type]
              for i in range(blocks.blocks)]
    with pytest.raises(FedqfError, match="sent no update of that round"):
        query({OP: OP_UPDATE_BLOCK, "server-round": 2, BLOCK_INDEX: 0})
    delta = np.concatenate([decrypt(secret, v) for v in update])
    # The coordinator's aggregate of this one update, delivered in blocks, then named by a manifest.
    weight = float(reply[METRICS]["weight"])  # type: ignore[index]
    for i, vector in enumerate(update):
        ack = query({OP: OP_AGGREGATE_BLOCK}, block_record(vector, i, extra={AGGREGATE_ROUND: np.array([1])}))
        assert ack[REPORT]["status"] == "ok"  # type: ignore[index]
    aggregate = manifest_record(blocks, fingerprint, [block_digest(v) for v in update],
                                extra={AGGREGATE_ROUND: np.array([1]), WEIGHT_SUM: np.array([weight]),
                                       "fedqf.count": np.array([1])})
    handle(inst, state, "evaluate", RecordDict({ARRAYS: aggregate, "config": ConfigRecord({"fedqf.federation": text})}))
    assert state.model_round == 1
    expected = layout.flatten([initial[n].numpy() for n in layout.names]) + delta / weight
    np.testing.assert_allclose(layout.flatten(state.global_arrays), expected, atol=1e-5)
    # A block file replaced on disk (stale or corrupt) is refused against the manifest's digest, not applied.
    BlockFiles(tmp_path / "a").write("aggregate-000002", 0, update[1])
    for i in range(1, blocks.blocks):
        BlockFiles(tmp_path / "a").write("aggregate-000002", i, update[i])
    aggregate[AGGREGATE_ROUND] = aggregate[AGGREGATE_ROUND].__class__(np.array([2]))
    with pytest.raises(FedqfError, match="block 0 of the aggregate of round 2 does not match"):
        handle(inst, state, "evaluate", RecordDict({ARRAYS: aggregate,
                                                    "config": ConfigRecord({"fedqf.federation": text})}))
    assert state.model_round == 1


def _array(tensor: torch.Tensor):  # type: ignore[no-untyped-def]
    from flwr.app import Array

    return Array(tensor.detach().numpy().copy())


def _simulate(out: Path, block_mib: float) -> dict:  # type: ignore[type-arg]
    args = [sys.executable, "-m", "fedqf.cli", "simulate", "--out", str(out),
            "--set", "model.hidden=[256,512]", "--set", "federation.rounds=2",
            "--set", "secure_aggregation.quantization_bits=6", "--set", "secure_aggregation.scale_bits=24",
            "--set", "secure_aggregation.weight_unit=200", "--set", "privacy.reproducible_noise=true",
            "--set", f"secure_aggregation.block_mib={block_mib}"]
    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"summary": json.loads((out / "summary.json").read_text()), "stdout": done.stdout}


def test_a_federation_in_blocks_trains_the_same_model_as_in_single_messages(tmp_path: Path) -> None:
    """Packed CKKS decodes exact integer sums, and reproducible noise draws the same DP noise and quantization:
    the model trained with updates in 0.13 MiB blocks must equal, bit for bit, the one trained in single messages."""
    single = _simulate(tmp_path / "single", 0.0)
    blocked = _simulate(tmp_path / "blocked", 0.13)
    assert "travel in 3 blocks" in blocked["stdout"] and "travel in" not in single["stdout"]
    assert blocked["summary"]["rounds_completed"] == single["summary"]["rounds_completed"] == 2
    assert blocked["summary"]["ckks"]["blocks"] == 3  # 140,546 parameters, 6 per coefficient: 3 ciphertexts
    a = torch.load(tmp_path / "single" / "model.pt")
    b = torch.load(tmp_path / "blocked" / "model.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert blocked["summary"]["epsilon"] == single["summary"]["epsilon"]


class DeliveryGrid:
    """Takes aggregate blocks as institutions would; `refuses` maps a node to the (round, block) it fails at."""

    def __init__(self, refuses: dict[int, tuple[int, int]]) -> None:
        self.refuses = refuses
        self.received: list[tuple[int, int, int]] = []  # (node, round, block)

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            node = int(message.metadata.dst_node_id)
            record = message.content[ARRAYS]
            assert isinstance(record, ArrayRecord)
            key = (int(record[AGGREGATE_ROUND].numpy()[0]), int(record[BLOCK_INDEX].numpy()[0]))
            if self.refuses.get(node) == key:
                replies.append(_error_from(node, "disk full"))
                continue
            self.received.append((node, *key))
            replies.append(reply_from(node, RecordDict({REPORT: ConfigRecord({"status": "ok"})})))
        return replies


def _instruction(node: int, **records: ArrayRecord) -> Message:
    return Message(RecordDict(dict(records)), message_type="train", dst_node_id=node)


def test_delivery_sends_each_institution_what_it_lacks_and_again_after_a_failure(  # type: ignore[no-untyped-def]
    keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    secret, _ = keys
    layout = layout_for(CONFIG, LENGTH)
    assert layout is not None
    fingerprint = key_fingerprint(secret)
    grid = DeliveryGrid(refuses={2: (1, 1)})  # institution 2 fails block 1 of the round-1 aggregate
    relay = BlockRelay(grid, tmp_path, layout, dump_config(CONFIG), timeout=None)
    manifests = {}
    for r in (1, 2):
        vectors = _blocks(secret, np.full(LENGTH, r / 10), layout)
        for i, v in enumerate(vectors):
            relay.save_sum(r, i, v)
        manifests[r] = manifest_record(layout, fingerprint, [block_digest(v) for v in vectors],
                                       extra={AGGREGATE_ROUND: np.array([r])})
    relay.check_stored([1, 2])
    # Institution 1 gets round 2; institution 2 lags and gets round 1 as catch-up with round 2.
    relay.deliver([_instruction(1, arrays=manifests[2]),
                   _instruction(2, arrays=manifests[2], **{"fedqf.catchup.000001": manifests[1]})])
    assert {(n, r) for n, r, _ in grid.received} == {(1, 2), (2, 1)}  # 2 gets nothing after its failure
    assert sorted(b for n, r, b in grid.received if n == 1) == list(range(layout.blocks))
    assert relay.delivered == {(1, 2)}
    # Sent again: only what is missing goes out; once forgotten (the institution failed), everything again.
    grid.received.clear()
    grid.refuses.clear()
    relay.deliver([_instruction(1, arrays=manifests[2]),
                   _instruction(2, arrays=manifests[2], **{"fedqf.catchup.000001": manifests[1]})])
    assert {(n, r) for n, r, _ in grid.received} == {(2, 1), (2, 2)}
    relay.forget(1)
    grid.received.clear()
    relay.deliver([_instruction(1, arrays=manifests[2])])
    assert {(n, r) for n, r, _ in grid.received} == {(1, 2)}
    # A resumed coordinator refuses a checkpoint whose blocks are gone.
    relay.files.path("aggregate-000002", 3).unlink()
    from fedqf.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="block 3 of the aggregate of round 2 is missing"):
        relay.check_stored([1, 2])


def test_an_update_whose_reply_was_not_saved_is_never_handed_out(keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fedqf.institution import InstitutionState, handle, prune_blocks, train_round

    secret, _ = keys
    config, inst = _blocked_institution(secret, tmp_path / "a")
    text = dump_config(config)
    initial = ArrayRecord({n: _array(t) for n, t in inst.model().state_dict().items()})
    state = InstitutionState()

    def train(server_round: int, persist=None) -> RecordDict:  # type: ignore[no-untyped-def]
        return train_round(inst, state, RecordDict({ARRAYS: initial, "config": ConfigRecord(
            {"server-round": server_round, "fedqf.federation": text})}), persist=persist)

    def ask(server_round: int) -> RecordDict:
        return handle(inst, state, "query", RecordDict({"config": ConfigRecord(
            {"fedqf.federation": text, OP: OP_UPDATE_BLOCK, "server-round": server_round, BLOCK_INDEX: 0})}))

    train(1, persist=lambda s: state.save(tmp_path / "state"))
    assert state.sent_blocks == (1, 0)
    assert ask(1)[ARRAYS] is not None

    def failing(_: InstitutionState) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        train(2, persist=failing)
    assert state.sent_blocks == (1, 0) and state.last_update is None
    with pytest.raises(FedqfError, match="sent no update of that round"):
        ask(2)
    files = BlockFiles(tmp_path / "a")
    assert files.names("update-") == ["update-000001-000000"]  # the unsent update's blocks are gone
    assert InstitutionState.load(tmp_path / "state").sent_blocks == (1, 0)  # and the saved state names round 1
    with pytest.raises(FedqfError, match="does not exist"):  # an index out of range is refused
        handle(inst, state, "query", RecordDict({"config": ConfigRecord(
            {"fedqf.federation": text, OP: OP_UPDATE_BLOCK, "server-round": 1, BLOCK_INDEX: 99})}))
    # Pruning after a save keeps the update sent and the aggregates not applied yet, nothing else.
    files.write("aggregate-000000", 0, files.read("update-000001-000000", 0))
    files.write("aggregate-000003", 0, files.read("update-000001-000000", 0))
    state.model_round = 1
    prune_blocks(inst, state)
    assert files.names("") == ["aggregate-000003", "update-000001-000000"]
