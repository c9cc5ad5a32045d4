"""An institution's side of a round: decrypt the aggregate, train with DP-SGD, clip, encrypt, evaluate, release.

The same code serves a simulated institution (state kept in Flower's Context) and a deployed one (state kept by
the long-lived institution service, on disk, across restarts).
"""

from __future__ import annotations

import functools
import json
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import tenseal as ts
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log

from fedqf.blocks import (
    BLOCK_INDEX,
    INITIAL_DIGEST,
    OP,
    OP_AGGREGATE_BLOCK,
    OP_RELEASE_BLOCK,
    OP_UPDATE_BLOCK,
    RELEASE_IN_BLOCKS,
    BlockFiles,
    BlockLayout,
    aggregate_name,
    arrays_digest,
    block_digest,
    block_record,
    flat_assign,
    flat_assign_difference,
    flat_slice,
    is_manifest,
    layout_for,
    manifest_record,
    plain_values_per_block,
    read_manifest,
    update_name,
)
from fedqf.config import FederationConfig, ModelSection, PrivacyMode, SecureAggregationMode, config_from_dict
from fedqf.crypto import (
    CryptoPool,
    EncryptedVector,
    crypto_pool,
    decrypt,
    decrypt_integers,
    encrypt,
    encrypt_integers,
    key_fingerprint,
)
from fedqf.data import Dataset, InstitutionData, SimulatedFederationData
from fedqf.errors import FedqfError, PrivacyBudgetExceededError, UpdateRejectedError
from fedqf.model import ParameterLayout, build_model, set_arrays
from fedqf.packing import PackingScheme, scheme_for
from fedqf.privacy import PrivacyLedger, PrivacyPlan, plan_for
from fedqf.protocol import (
    AGGREGATE_ROUND,
    ARRAYS,
    CONFIG,
    FEDERATION_TOML,
    METRICS,
    REPORT,
    TRAIN_METRIC_KEYS,
    WIRE,
    WIRE_VERSION,
    ReplyStatus,
    aggregate_meta,
    encrypted_to_record,
    is_encrypted,
    record_to_encrypted,
)
from fedqf.rundir import atomic_write_bytes
from fedqf.trainer import DpSgdSettings, evaluate, train_local

if TYPE_CHECKING:
    from fedqf.workers import WorkerGroup

Arrays = list[npt.NDArray[np.float32]]


@dataclass(frozen=True)
class Institution:
    """What an institution brings to a round: its config, its data, its name, and its CKKS secret context."""

    config: FederationConfig
    data: InstitutionData
    name: str
    index: int
    secret_context: ts.Context | None
    # The institution's training group when it trains on several workers (rank 0's handle); None trains alone.
    workers: WorkerGroup | None = None
    # Where this institution keeps the encrypted blocks of updates and aggregates too large for one message
    # (fedqf.blocks): the daemon's state directory, or a simulation's private work directory.
    blocks_dir: Path | None = None
    # Processes that encrypt and decrypt its updates and aggregates in parallel (fedqf.crypto.CryptoPool): a daemon
    # uses the cores it may run on; a simulated institution 1 (the simulation runs institutions side by side).
    crypto_workers: int = 1
    # Several institutions share this process (a simulation worker): an aggregate that one of them decrypted is
    # reused by the others (_decrypted_mean). A daemon hosts one and keeps nothing of the kind.
    shares_process: bool = False

    def __post_init__(self) -> None:
        ckks = self.config.secure_aggregation.mode is SecureAggregationMode.CKKS
        if ckks and (self.secret_context is None or not self.secret_context.is_private()):
            raise FedqfError("a CKKS federation needs the institutions' context with its secret key")

    @property
    def crypto_pool(self) -> CryptoPool | None:
        return crypto_pool(self.secret_context, self.crypto_workers) if self.secret_context is not None else None

    @functools.cached_property
    def layout(self) -> ParameterLayout:
        """Names and shapes of the model's parameters (built once per model definition and process, not for every
        instruction: a simulation makes an Institution per message)."""
        return _layout_of(self.config.model, self.data.num_features, self.data.num_classes)

    def model(self) -> torch.nn.Module:
        generator = torch.Generator().manual_seed(self.config.federation.seed)
        return build_model(
            self.config.model, num_features=self.data.num_features, num_classes=self.data.num_classes,
            generator=generator,
        )


@functools.lru_cache(maxsize=8)
def _layout_of(section: ModelSection, num_features: int, num_classes: int) -> ParameterLayout:
    return ParameterLayout.of(build_model(section, num_features=num_features, num_classes=num_classes,
                                          generator=torch.Generator().manual_seed(0)))


@dataclass
class InstitutionState:
    """What an institution remembers between rounds: the global model it holds, its round, its privacy ledger."""

    model_round: int = -1
    global_arrays: Arrays | None = None
    ledger: PrivacyLedger = field(default_factory=PrivacyLedger)
    # The last update sent, as (server round, model round, reply): a coordinator that asks again for the same
    # round (it restarted, or the reply was lost) gets the same update back, and no privacy budget is spent twice.
    # A daemon persists it (last-reply-R-M.bin, 0600) before the reply leaves, so this also holds across its restarts.
    last_update: tuple[int, int, RecordDict] | None = None
    # The (server round, model round) whose planned spend is recorded in the ledger. A daemon that dies after
    # recording it but before its reply is persisted released nothing for that round: asked again after its
    # restart, it trains the round without recording the spend a second time.
    spent_round: tuple[int, int] | None = None
    # The (server round, model round) of the update in blocks that this institution replied with: the only one
    # whose blocks it hands out (fedqf.blocks).
    sent_blocks: tuple[int, int] | None = None
    _reply_saved: tuple[int, int] | None = field(default=None, repr=False, compare=False)

    # --- simulation: Flower's Context.state -------------------------------------------------------------
    def to_records(self, *, with_model: bool = True) -> dict[str, Any]:
        record = ConfigRecord({"round": self.model_round})
        if self.sent_blocks is not None:
            record["sent-blocks"] = list(self.sent_blocks)
        for key, value in self.ledger.to_state().items():
            record[f"ledger.{key}"] = value
        out: dict[str, Any] = {"fedqf.state": record}
        if with_model and self.global_arrays is not None:
            out["fedqf.global-model"] = ArrayRecord([np.asarray(a) for a in self.global_arrays])
        return out

    @classmethod
    def from_records(cls, records: RecordDict) -> InstitutionState:
        state = records.get("fedqf.state")
        if not isinstance(state, ConfigRecord):
            return cls()
        ledger_state = {k[len("ledger.") :]: v for k, v in state.items() if k.startswith("ledger.")}
        model = records.get("fedqf.global-model")
        arrays = model.to_numpy_ndarrays() if isinstance(model, ArrayRecord) else None
        restored = cls(int(state["round"]), arrays, PrivacyLedger.from_state(ledger_state))  # type: ignore[arg-type]
        sent = state.get("sent-blocks")
        if isinstance(sent, list) and len(sent) == 2:
            restored.sent_blocks = (int(sent[0]), int(sent[1]))
        return restored

    # --- deployment: the institution's state directory ----------------------------------------------------
    def save(self, directory: Path) -> None:
        """Persist atomically: the model first, then the ledger and round that refer to it."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.global_arrays is not None:
            save_arrays(directory / "global-model.npz", self.global_arrays)
        payload: dict[str, Any] = {"round": self.model_round, "ledger": self.ledger.to_state()}
        if self.spent_round is not None:
            payload["spent-round"] = list(self.spent_round)
        if self.sent_blocks is not None:
            payload["sent-blocks"] = list(self.sent_blocks)
        reply_name = ""
        if self.last_update is not None:
            # Named by its rounds, and named in state.json only once written: a crash between the two writes
            # leaves the previous state.json pointing at the previous reply, never at another round's.
            reply_name = "last-reply-{:06d}-{:06d}.bin".format(*self.last_update[:2])
            if self._reply_saved != self.last_update[:2] or not (directory / reply_name).exists():
                from flwr.common.serde import recorddict_to_proto

                reply = bytes(recorddict_to_proto(self.last_update[2]).SerializeToString())
                atomic_write_bytes(directory / reply_name, reply, mode=0o600)
                self._reply_saved = self.last_update[:2]
            payload["last-reply"] = [*self.last_update[:2], reply_name]
        atomic_write_bytes(directory / "state.json", (json.dumps(payload) + "\n").encode())
        for stale in directory.glob("last-reply-*.bin"):
            if stale.name != reply_name:
                stale.unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: Path) -> InstitutionState:
        """Load the saved state; none saved yet is a fresh state; a corrupt file is an error, never a reset."""
        path = directory / "state.json"
        if not path.exists():
            return cls()
        try:
            payload = json.loads(path.read_text())
            ledger = PrivacyLedger.from_state(payload["ledger"])
            model_round = int(payload["round"])
            arrays: Arrays | None = None
            if (directory / "global-model.npz").exists():
                arrays = load_arrays(directory / "global-model.npz")
            spent = payload.get("spent-round")
            spent_round = (int(spent[0]), int(spent[1])) if spent is not None else None
            sent = payload.get("sent-blocks")
            sent_blocks = (int(sent[0]), int(sent[1])) if sent is not None else None
            last_update = None
            if payload.get("last-reply") is not None:
                from flwr.common.serde import recorddict_from_proto
                from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

                rounds = payload["last-reply"]
                reply = recorddict_from_proto(ProtoRecordDict.FromString((directory / str(rounds[2])).read_bytes()))
                last_update = (int(rounds[0]), int(rounds[1]), reply)
        except FedqfError:
            raise
        except Exception as exc:
            raise FedqfError(
                f"{path}: the institution's saved state is unreadable ({exc}); refusing to start rather than "
                "forget the privacy budget already spent"
            ) from exc
        return cls(model_round, arrays, ledger, last_update, spent_round, sent_blocks)


def save_arrays(path: Path, arrays: Arrays) -> None:
    """The model's arrays, in order, to an .npz file (write, fsync, rename)."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    atomic_write_bytes(path, buffer.getbuffer())


def load_arrays(path: Path) -> Arrays:
    with np.load(path) as archive:
        return [archive[f"arr_{i}"].astype(np.float32) for i in range(len(archive.files))]


@functools.lru_cache(maxsize=8)
def parse_federation(toml_text: str) -> FederationConfig:
    import tomllib

    try:
        raw = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as exc:
        raise FedqfError(f"the coordinator sent a federation config that is not TOML ({exc})") from exc
    return config_from_dict(raw, source="<federation sent by the coordinator>")


@functools.lru_cache(maxsize=16)
def _calibrated_noise(plan: PrivacyPlan) -> float:
    # The plan is the same every round; Opacus's binary search costs most of a second, so do it once.
    return plan.calibrate()


def _training_seed(config: FederationConfig, index: int, server_round: int) -> int:
    """Seed of the round's sampling and DP noise: OS entropy unless the federation asks for reproducible noise."""
    if config.privacy.mode is PrivacyMode.DP_SGD and not config.privacy.reproducible_noise:
        return secrets.randbits(63)
    return config.federation.seed * 1_000_003 + index * 1009 + server_round


def _quantization_rng(config: FederationConfig, index: int, server_round: int) -> np.random.Generator:
    if config.privacy.reproducible_noise or config.privacy.mode is PrivacyMode.NONE:
        return np.random.default_rng([config.federation.seed, index, server_round, 17])
    return np.random.default_rng()


def resolve_global_model(inst: Institution, record: ArrayRecord, state: InstitutionState, *,
                         server_round: int = 0) -> tuple[int, Arrays]:
    """The global model w_t this instruction refers to, and t.

    A plaintext record is w_t itself: in the instruction of server round r it is w_{r-1}. An encrypted record is the round-t sum S with sum_k a_k; it applies to
    w_{t-1}: w_t = w_{t-1} + Dec(S) / sum_k a_k. A sum already applied is not applied twice.
    """
    layout = inst.layout
    if INITIAL_DIGEST in record:  # the initial model, built here from the federation's seed
        arrays = [t.detach().numpy().astype(np.float32) for t in inst.model().state_dict().values()]
        if np.frombuffer(arrays_digest(arrays), dtype=np.uint8).tolist() != record[INITIAL_DIGEST].numpy().tolist():
            raise FedqfError("the initial model built here from the federation's seed differs from the coordinator's "
                             "(its digest); expected the same federation file and the same torch version on both sides")
        return (server_round - 1 if server_round > 0 else max(state.model_round, 0)), arrays
    if not is_encrypted(record) and not is_manifest(record):
        missing = [name for name in layout.names if name not in record]
        if missing:
            raise FedqfError(f"the global model lacks the arrays {missing}")
        arrays = [np.asarray(record[name].numpy(), dtype=np.float32) for name in layout.names]
        layout.flatten(arrays)  # checks every shape
        return (server_round - 1 if server_round > 0 else max(state.model_round, 0)), arrays
    aggregate_round, weight_sum = aggregate_meta(record)
    contributors = int(record["fedqf.count"].numpy()[0]) if "fedqf.count" in record else 0
    if aggregate_round == state.model_round and state.global_arrays is not None:
        return state.model_round, state.global_arrays
    if aggregate_round != state.model_round + 1 or state.global_arrays is None:
        raise FedqfError(
            f"this institution holds the global model of round {state.model_round}, but the aggregate is for "
            f"round {aggregate_round}; it cannot apply it (missed a round)"
        )
    if inst.secret_context is None:
        raise FedqfError("an encrypted aggregate arrived but this institution has no CKKS secret context")
    if weight_sum <= 0:
        raise FedqfError(f"the aggregate's weight sum must be positive, got {weight_sum}")
    if is_manifest(record):
        return aggregate_round, _apply_blocks(inst, record, aggregate_round, state.global_arrays,
                                              weight_sum=weight_sum, contributors=contributors)
    updated = layout.flatten(state.global_arrays, dtype=np.float32)
    updated += _decrypted_mean(inst, record_to_encrypted(record), contributors=contributors, weight_sum=weight_sum)
    return aggregate_round, layout.unflatten(updated)


# The last aggregate this process decrypted, and its mean delta, for institutions that share the process
# (Institution.shares_process). A simulation worker hosts several institutions in turn, and every one of them
# receives the same aggregate, encrypted under the same key, in a round: the first decrypts it, the others find
# the same ciphertext bytes here. A daemon hosts one institution and decrypts each aggregate once anyway.
_last_decryption: tuple[tuple[Any, ...], Sequence[bytes], npt.NDArray[np.float32]] | None = None
_last_decryption_lock = threading.Lock()


def _decrypted_mean(inst: Institution, encrypted: EncryptedVector, *, contributors: int,
                    weight_sum: float) -> npt.NDArray[np.float32]:
    """Dec(S) / sum_k a_k for a single-message aggregate: decrypted here, or read back from this process's last
    decryption of the very same ciphertext bytes under the same key, packing and weights (read-only)."""
    global _last_decryption
    assert inst.secret_context is not None
    scheme = scheme_for(inst.config)

    def mean() -> npt.NDArray[np.float32]:
        decrypted = _decrypt_values(inst, encrypted)
        return _mean_delta(scheme, decrypted, inst.layout.size, contributors=contributors, weight_sum=weight_sum)

    if not inst.shares_process:
        return mean()
    key = (key_fingerprint(inst.secret_context), encrypted.fingerprint, encrypted.length, inst.layout.size, scheme,
           contributors, weight_sum)
    with _last_decryption_lock:
        last = _last_decryption
        if last is not None and last[0] == key and last[1] == encrypted.chunks:
            return last[2]
        result = mean()
        result.flags.writeable = False
        _last_decryption = (key, encrypted.chunks, result)
        return result


def _encrypt_values(inst: Institution, values: npt.NDArray[Any], bound: float) -> EncryptedVector:
    """An update's slot values encrypted: packed coefficients as integers (fedqf.packing), else as CKKS reals of
    magnitude up to `bound`."""
    assert inst.secret_context is not None
    if scheme_for(inst.config) is not None:
        return encrypt_integers(inst.secret_context, values, pool=inst.crypto_pool)
    return encrypt(inst.secret_context, values, bound=bound, pool=inst.crypto_pool)


def _decrypt_values(inst: Institution, vector: EncryptedVector) -> npt.NDArray[Any]:
    """The slot values of an aggregate (or of one block of it): packed coefficients, or reals."""
    assert inst.secret_context is not None
    if scheme_for(inst.config) is not None:
        return decrypt_integers(inst.secret_context, vector, pool=inst.crypto_pool)
    return decrypt(inst.secret_context, vector, pool=inst.crypto_pool)


def _mean_delta(scheme: PackingScheme | None, slots: npt.NDArray[Any], length: int, *, contributors: int,
                weight_sum: float) -> npt.NDArray[np.float32]:
    """Dec(S) / sum_k a_k for `length` model values from the decrypted slot values of an aggregate (or of one
    block of it), in float32 like the model."""
    if scheme is None:
        return (slots[:length] / weight_sum).astype(np.float32)
    mean = scheme.dequantize_sum(scheme.unpack(slots, length), contributors=contributors, divisor=weight_sum)
    return mean.astype(np.float32, copy=False)


def _encrypted_length(inst: Institution) -> int:
    scheme = scheme_for(inst.config)
    return scheme.slots_needed(inst.layout.size) if scheme is not None else inst.layout.size


def _block_files(inst: Institution) -> BlockFiles:
    if inst.blocks_dir is None:
        raise FedqfError("this federation sends encrypted updates in blocks (secure_aggregation.block_mib), but the "
                         "institution has no directory for them")
    return BlockFiles(inst.blocks_dir)


def _block_layout(inst: Institution) -> BlockLayout:
    layout = layout_for(inst.config, _encrypted_length(inst))
    if layout is None:
        raise FedqfError("an update in blocks arrived, but this federation's updates fit one message "
                         "(secure_aggregation.block_mib)")
    return layout


def _apply_blocks(inst: Institution, record: ArrayRecord, aggregate_round: int, base: Arrays, *, weight_sum: float,
                  contributors: int) -> Arrays:
    """w_t = w_{t-1} + Dec(S) / sum_k a_k for an aggregate sent in blocks, block by block from the files the
    coordinator delivered, each checked against the manifest's digest: besides the new model, only one block's
    values are held at once."""
    assert inst.secret_context is not None
    layout = _block_layout(inst)
    try:
        manifest = read_manifest(record, layout, key_fingerprint(inst.secret_context))
    except UpdateRejectedError as exc:
        raise FedqfError(f"the aggregate of round {aggregate_round}: {exc}") from exc
    files = _block_files(inst)
    scheme = scheme_for(inst.config)
    per_slot = scheme.values_per_slot if scheme is not None else 1
    size = inst.layout.size
    updated = [np.array(a, dtype=np.float32, copy=True) for a in base]
    for index in range(layout.blocks):
        vector = files.read(aggregate_name(aggregate_round), index)
        if block_digest(vector) != manifest.digests[index]:
            raise FedqfError(f"block {index} of the aggregate of round {aggregate_round} does not match its manifest's "
                             "digest (stale or corrupt); expected the coordinator to deliver it again")
        start, stop = layout.span(index)
        first, last = start * per_slot, min(stop * per_slot, size)
        decrypted = _decrypt_values(inst, vector)
        values = flat_slice(base, first, last)
        values += _mean_delta(scheme, decrypted, last - first, contributors=contributors, weight_sum=weight_sum)
        flat_assign(updated, first, values)
    return updated  # the files stay until a saved state holds this round (prune_blocks)


def prune_blocks(inst: Institution, state: InstitutionState) -> None:
    """Once `state` is saved: delete the aggregates it has applied, and every update but the one it replied with
    (a restart can only resend that one, and a lagging institution still needs later aggregates)."""
    if inst.blocks_dir is None:
        return
    applied = aggregate_name(state.model_round)
    sent = update_name(*state.sent_blocks) if state.sent_blocks is not None else ""
    BlockFiles(inst.blocks_dir).remove(
        lambda name: (name > applied) if name.startswith("aggregate-") else (name == sent or not name.startswith("update-")))


def _encrypt_in_blocks(inst: Institution, values_for: Any, bound: float, name: str,
                       per_slot: int = 1) -> tuple[ArrayRecord, str, int]:
    """Encrypt the update block by block into the institution's block files; the reply carries their manifest.
    `values_for(first, last)` gives the slot values that hold the parameters [first, last) (slot i holds
    [i * per_slot, (i + 1) * per_slot)), so only one block of values and of ciphertexts is held at once.
    Returns (manifest, fingerprint, bytes)."""
    assert inst.secret_context is not None
    layout = _block_layout(inst)
    files = _block_files(inst)
    size = inst.layout.size
    digests: list[bytes] = []
    nbytes = 0
    fingerprint = ""
    for index in range(layout.blocks):
        start, stop = layout.span(index)
        block = values_for(start * per_slot, min(stop * per_slot, size))
        vector = _encrypt_values(inst, block[: stop - start], bound)
        files.write(name, index, vector)
        digests.append(block_digest(vector))
        nbytes += vector.nbytes
        fingerprint = vector.fingerprint
    return manifest_record(layout, fingerprint, digests), fingerprint, nbytes


def _delta_norm(new: Arrays, old: Arrays, delta: npt.NDArray[np.float32] | None = None, chunk: int = 1 << 22) -> float:
    """||new - old||_2 over all arrays of the float32 differences (what is encrypted), summed in float64, a chunk of
    values at a time. `delta`, when given, is new - old already flattened: read rather than computed again, in
    the same chunks, so the norm is the same to the bit."""
    squared = 0.0
    offset = 0
    for a, b in zip(new, old):
        fa, fb = np.asarray(a, dtype=np.float32).reshape(-1), np.asarray(b, dtype=np.float32).reshape(-1)
        for i in range(0, fa.size, chunk):
            j = min(i + chunk, fa.size)
            d = (delta[offset + i : offset + j] if delta is not None else fa[i:j] - fb[i:j]).astype(np.float64)
            squared += float(d @ d)
        offset += fa.size
    return float(np.sqrt(squared))


def block_query(inst: Institution, state: InstitutionState, content: RecordDict) -> RecordDict:
    """A block moving between the coordinator and this institution: an aggregate's block to keep, or a block of
    this institution's last update to send."""
    config = content.get(CONFIG)
    assert isinstance(config, ConfigRecord)
    op = str(config.get(OP, ""))
    files = _block_files(inst)
    if op == OP_AGGREGATE_BLOCK:
        record = _arrays(content)
        try:
            aggregate_round = int(record[AGGREGATE_ROUND].numpy()[0])
            index = int(record[BLOCK_INDEX].numpy()[0])
            vector = record_to_encrypted(record)
        except Exception as exc:  # anything malformed is refused with its reason, never an internal error
            raise FedqfError(f"the coordinator sent a malformed aggregate block ({exc})") from exc
        assert inst.secret_context is not None
        if vector.fingerprint != key_fingerprint(inst.secret_context):
            raise FedqfError("the coordinator sent an aggregate block under another key than this institution's")
        if not 0 < aggregate_round < 1_000_000:
            raise FedqfError(f"aggregate block of round {aggregate_round}: expected a round in 1..999999")
        layout = _block_layout(inst)
        start, stop = layout.span(index)
        if vector.length != stop - start:
            raise FedqfError(f"aggregate block {index} holds {vector.length} values, expected {stop - start}")
        files.write(aggregate_name(aggregate_round), index, vector)
        return RecordDict({REPORT: ConfigRecord({"status": ReplyStatus.OK.value, "institution": inst.name})})
    if op == OP_UPDATE_BLOCK:
        try:
            server_round = int(config.get("server-round", -1))  # type: ignore[arg-type]
            index = int(config.get(BLOCK_INDEX, -1))  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise FedqfError(f"a malformed block request ({exc})") from exc
        # Only the update this institution replied with (saved before the reply left) is handed out.
        if state.sent_blocks is None or state.sent_blocks[0] != server_round:
            raise FedqfError(f"the coordinator asked for block {index} of this institution's round {server_round} "
                             "update, but it sent no update of that round")
        _block_layout(inst).span(index)  # an index out of range is refused
        vector = files.read(update_name(*state.sent_blocks), index)
        return RecordDict({ARRAYS: block_record(vector, index),
                           REPORT: ConfigRecord({"status": ReplyStatus.OK.value, "institution": inst.name})})
    if op == OP_RELEASE_BLOCK:  # values [start, stop) of the final model this institution released
        try:
            start, stop = int(config.get("start", -1)), int(config.get("stop", -1))  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise FedqfError(f"a malformed release request ({exc})") from exc
        size = inst.layout.size
        if state.global_arrays is None or not 0 <= start < stop <= size or stop - start > plain_values_per_block(inst.config):
            raise FedqfError(f"cannot release values [{start}, {stop}) of the model: expected 0 <= start < stop <= "
                             f"{size}, at most {plain_values_per_block(inst.config)} values, after a release")
        values = flat_slice(state.global_arrays, start, stop)
        return RecordDict({ARRAYS: ArrayRecord({"values": Array(values)}),
                           REPORT: ConfigRecord({"status": ReplyStatus.OK.value, "round": state.model_round})})
    raise FedqfError(f"unknown block operation {op!r}; expected {OP_AGGREGATE_BLOCK!r}, {OP_UPDATE_BLOCK!r} or "
                     f"{OP_RELEASE_BLOCK!r}")


CATCH_UP_PREFIX = "fedqf.catchup."


def catch_up(inst: Institution, content: RecordDict, state: InstitutionState) -> None:
    """Apply the rounds an institution missed (it was down, or too slow for a round's deadline).

    The coordinator adds to the instruction of a lagging institution the initial model and every encrypted
    aggregate it has not confirmed; they are applied in round order, and any already applied are skipped.
    """
    initial_key = f"{CATCH_UP_PREFIX}initial"
    records = sorted(((key, value) for key, value in content.items() if key.startswith(CATCH_UP_PREFIX)),
                     key=lambda item: (item[0] != initial_key, item[0]))
    for key, record in records:
        if not isinstance(record, ArrayRecord):
            raise FedqfError(f"catch-up record '{key}' is not an ArrayRecord")
        if key == initial_key:
            if state.global_arrays is None:
                state.model_round, state.global_arrays = resolve_global_model(inst, record, state)
            continue
        aggregate_round, _ = aggregate_meta(record)
        if aggregate_round <= state.model_round:
            continue
        state.model_round, state.global_arrays = resolve_global_model(inst, record, state)
    if records:
        log(INFO, "%s caught up to the global model of round %d", inst.name, state.model_round)


def _train_reply(inst: Institution, *, arrays: ArrayRecord, metrics: dict[str, float], status: ReplyStatus,
                 reason: str = "", fingerprint: str = "") -> RecordDict:
    return RecordDict(
        {
            ARRAYS: arrays,
            METRICS: MetricRecord({k: metrics[k] for k in TRAIN_METRIC_KEYS if k in metrics}),
            REPORT: ConfigRecord({"status": status.value, "reason": reason, "fingerprint": fingerprint,
                                  "institution": inst.name}),
        }
    )


def _arrays(content: RecordDict) -> ArrayRecord:
    record = content.get(ARRAYS)
    if not isinstance(record, ArrayRecord):
        raise FedqfError("the instruction carries no ArrayRecord 'arrays'")
    return record


def train_round(inst: Institution, state: InstitutionState, content: RecordDict, *, persist: Any = None) -> RecordDict:
    """One round of local training: the (encrypted) update, or a refusal when the budget is spent.

    The privacy spend of the round is recorded in the ledger (and persisted through `persist`) before training
    starts, so a crash mid-round can over-count the budget but never under-count it.
    """
    config = inst.config
    catch_up(inst, content, state)
    config_record = content.get(CONFIG)
    server_round = int(config_record.get("server-round", 0)) if isinstance(config_record, ConfigRecord) else 0  # type: ignore[arg-type]
    model_round, global_arrays = resolve_global_model(inst, _arrays(content), state, server_round=server_round)
    state.model_round, state.global_arrays = model_round, global_arrays
    proximal_mu = float(config_record.get("proximal-mu", 0.0)) if isinstance(config_record, ConfigRecord) else 0.0  # type: ignore[arg-type]
    if state.last_update is not None and server_round > 0 and state.last_update[:2] == (server_round, model_round):
        log(INFO, "%s resends its round %d update (asked again; no new privacy spend)", inst.name, server_round)
        return state.last_update[2]
    train_data = inst.data.train
    metrics: dict[str, float] = {"num-examples": float(len(train_data))}
    metrics["model-round"] = float(model_round)
    model = inst.model()
    set_arrays(model, global_arrays)
    metrics.update(_validate(model, inst.data.validation, model_round))
    dp: DpSgdSettings | None = None
    planned_steps = 0
    if config.privacy.mode is PrivacyMode.DP_SGD:
        plan = plan_for(
            dataset_size=len(train_data),
            batch_size=config.training.batch_size,
            local_epochs=config.training.local_epochs,
            rounds=config.privacy.planned_rounds or config.federation.rounds,
            target_epsilon=config.privacy.target_epsilon,
            delta=config.privacy.delta,
            max_grad_norm=config.privacy.max_grad_norm,
        )
        noise = _calibrated_noise(plan)
        already_spent = state.spent_round == (server_round, model_round)
        try:
            if not already_spent:  # a spend already in the ledger must not be checked (counted) a second time
                state.ledger.ensure_within_budget(
                    noise_multiplier=noise,
                    sample_rate=plan.sample_rate,
                    steps=plan.steps_per_round,
                    target_epsilon=config.privacy.target_epsilon,
                    delta=config.privacy.delta,
                )
        except PrivacyBudgetExceededError as exc:
            if persist is not None:
                persist(state)
            metrics["epsilon"] = state.ledger.epsilon(delta=config.privacy.delta)
            log(WARNING, "%s refuses round %d: %s", inst.name, server_round, exc)
            return _train_reply(inst, arrays=ArrayRecord(), metrics=metrics, status=ReplyStatus.BUDGET_EXHAUSTED,
                                reason=str(exc))
        dp = DpSgdSettings(noise_multiplier=noise, max_grad_norm=config.privacy.max_grad_norm,
                           secure_mode=config.privacy.secure_rng)
        planned_steps = plan.steps_per_round
        if already_spent:
            log(INFO, "%s trains round %d again (a restart or a failed attempt); its spend is already recorded "
                "and nothing was released", inst.name, server_round)
        else:
            state.ledger.record(noise_multiplier=noise, sample_rate=plan.sample_rate, steps=planned_steps)
            state.spent_round = (server_round, model_round)
            if persist is not None:
                persist(state)
    scratch = PrivacyLedger()
    trainer = inst.workers.train if inst.workers is not None else train_local
    result = trainer(model, train_data, training=config.training, dp=dp,
                     seed=_training_seed(config, inst.index, server_round),
                     ledger=scratch if dp is not None else None, proximal_mu=proximal_mu)
    if dp is not None:
        if result.steps > planned_steps:  # never under-count: record what went beyond the plan
            state.ledger.record(noise_multiplier=dp.noise_multiplier, sample_rate=result.sample_rate,
                                steps=result.steps - planned_steps)
        metrics.update(
            {
                "epsilon": state.ledger.epsilon(delta=config.privacy.delta),
                "noise-multiplier": dp.noise_multiplier,
                "sample-rate": result.sample_rate,
            }
        )
    metrics.update({"steps": float(result.steps), "train-loss": result.loss, "train-seconds": result.seconds})
    layout = ParameterLayout.of(model)
    weight = len(train_data) / config.secure_aggregation.weight_unit
    metrics["weight"] = weight
    fingerprint = ""
    blocked = layout_for(config, _encrypted_length(inst)) is not None
    if config.secure_aggregation.mode is SecureAggregationMode.CKKS:
        assert inst.secret_context is not None
        start = time.perf_counter()
        sa = config.secure_aggregation
        scheme = scheme_for(config)
        if scheme is not None and weight > 1.0:
            raise FedqfError(
                f"{len(train_data)} training records exceed secure_aggregation.weight_unit ({sa.weight_unit}): "
                "packed updates need weights <= 1; expected a weight_unit >= the largest institution"
            )
        rng = _quantization_rng(config, inst.index, server_round)
        bound = scheme.slot_bound if scheme is not None else weight * sa.delta_clip
        delta: npt.NDArray[np.float32] | None = None
        if not blocked:  # in blocks, a block at a time: the delta is never held whole
            delta = np.empty(layout.size, dtype=np.float32)
            flat_assign_difference(delta, result.arrays, global_arrays)
        # The delta is L2-clipped to delta_clip: ||factor * delta|| <= delta_clip, hence every value is too.
        norm = _delta_norm(result.arrays, global_arrays, delta)
        factor = min(1.0, sa.delta_clip / norm) if norm > 0 else 1.0
        if delta is None:

            def values_for(first: int, last: int) -> npt.NDArray[Any]:
                piece = flat_slice(result.arrays, first, last) - flat_slice(global_arrays, first, last)
                return _slot_values(piece, factor, weight, scheme, rng, limit=bound)

            out, fingerprint, nbytes = _encrypt_in_blocks(
                inst, values_for, bound, update_name(server_round, model_round),
                per_slot=scheme.values_per_slot if scheme is not None else 1)
        else:
            encrypted = _encrypt_values(inst, _slot_values(delta, factor, weight, scheme, rng, limit=bound), bound)
            out = encrypted_to_record(encrypted)
            fingerprint, nbytes = encrypted.fingerprint, encrypted.nbytes
        metrics["encrypt-seconds"] = time.perf_counter() - start
        metrics["bytes-sent"] = float(nbytes)
    else:
        out = ArrayRecord({n: Array(a) for n, a in zip(layout.names, result.arrays)})
        metrics["bytes-sent"] = float(sum(a.nbytes for a in result.arrays))
    log(INFO, "%s trained round %d: %d steps%s", inst.name, server_round, result.steps,
        f", epsilon {metrics['epsilon']:.3f}" if "epsilon" in metrics else "")
    reply = _train_reply(inst, arrays=out, metrics=metrics, status=ReplyStatus.OK, fingerprint=fingerprint)
    state.last_update = (server_round, model_round, reply)
    previous_blocks = state.sent_blocks
    if blocked:
        state.sent_blocks = (server_round, model_round)
    if persist is not None:  # before the reply leaves: asked again after a restart, the daemon resends it
        try:
            persist(state)
        except BaseException:
            # Not saved, so not sent: a later attempt must not resend an update a restart would have forgotten,
            # and its blocks must not be handed out.
            state.last_update = None
            if blocked:
                state.sent_blocks = previous_blocks
                name = update_name(server_round, model_round)
                _block_files(inst).remove(lambda other: other != name)
            raise
    return reply


def _slot_values(delta: npt.NDArray[np.float32], factor: float, weight: float, scheme: PackingScheme | None,
                 rng: np.random.Generator, *, limit: float) -> npt.NDArray[Any]:
    """What is encrypted for a float32 delta (scaled in place) and its L2-clipping factor: a_k * factor * delta,
    or, packed, each value of factor * delta clipped to +-R (weight <= 1 keeps a_k times it there too), quantized
    and packed several per slot value; the packed path stays in float32 until the packing. Unpacked values are
    clipped to +-limit (= a_k * delta_clip), which the L2 clipping guarantees up to rounding."""
    if scheme is None:
        values = delta.astype(np.float64)
        values *= weight * factor
        return np.clip(values, -limit, limit, out=values)
    bound = np.float32(scheme.value_bound)
    if float(bound) > scheme.value_bound:  # float32 rounded R up: clip just inside it
        bound = np.nextafter(bound, np.float32(0))
    delta *= np.float32(factor)
    np.clip(delta, -bound, bound, out=delta)
    delta *= np.float32(weight)
    return scheme.pack(scheme.quantize(delta, rng))


def _validate(model: torch.nn.Module, validation: Dataset, model_round: int) -> dict[str, float]:
    """Score the global model of `model_round` (loaded in `model`, which is left as it was) on the validation split
    (reported with the train reply)."""
    result = evaluate(model, validation)
    if result.num_examples == 0:
        return {}
    return {"val-round": float(model_round), "val-examples": float(result.num_examples), "val-loss": result.loss,
            "val-accuracy": result.accuracy}


def evaluate_round(inst: Institution, state: InstitutionState, content: RecordDict, *, persist: Any = None) -> RecordDict:
    """Evaluate the global model of this round on the institution's validation split."""
    catch_up(inst, content, state)
    state.model_round, state.global_arrays = resolve_global_model(inst, _arrays(content), state)
    if persist is not None:
        persist(state)
    model = inst.model()
    set_arrays(model, state.global_arrays)
    result = evaluate(model, inst.data.validation)
    metrics = MetricRecord({"num-examples": result.num_examples, "loss": result.loss, "accuracy": result.accuracy})
    return RecordDict({METRICS: metrics})


def release_round(inst: Institution, state: InstitutionState, content: RecordDict, *, persist: Any = None) -> RecordDict:
    """Release the final global model in plaintext: the federation's declared output, logged as such."""
    catch_up(inst, content, state)
    state.model_round, state.global_arrays = resolve_global_model(inst, _arrays(content), state)
    if persist is not None:
        persist(state)
    layout = inst.layout
    log(WARNING, "%s releases the global model of round %d to the coordinator", inst.name, state.model_round)
    config = content.get(CONFIG)
    if isinstance(config, ConfigRecord) and config.get(RELEASE_IN_BLOCKS):  # the coordinator asks for it in blocks
        return RecordDict({REPORT: ConfigRecord({"status": ReplyStatus.OK.value, "round": state.model_round,
                                                 "values": layout.size})})
    return RecordDict(
        {
            ARRAYS: ArrayRecord({n: Array(a) for n, a in zip(layout.names, state.global_arrays)}),
            REPORT: ConfigRecord({"status": ReplyStatus.OK.value, "round": state.model_round}),
        }
    )


def handle(inst: Institution, state: InstitutionState, message_type: str, content: RecordDict, *,
           persist: Any = None) -> RecordDict:
    """Dispatch one instruction by its Flower message type."""
    if message_type == MessageType.TRAIN:
        return train_round(inst, state, content, persist=persist)
    if message_type == MessageType.EVALUATE:
        return evaluate_round(inst, state, content, persist=persist)
    if message_type == MessageType.QUERY:
        config = content.get(CONFIG)
        if isinstance(config, ConfigRecord) and OP in config:
            return block_query(inst, state, content)
        return release_round(inst, state, content, persist=persist)
    raise FedqfError(f"unknown instruction type {message_type!r}; expected train, evaluate or query")


def federation_text(content: RecordDict) -> str:
    """The federation file an instruction carries, once its wire format is this institution's."""
    record = content.get(CONFIG)
    if not isinstance(record, ConfigRecord) or FEDERATION_TOML not in record:
        raise FedqfError("the instruction carries no federation config")
    wire = record.get(WIRE)
    if wire != WIRE_VERSION:
        raise FedqfError(
            f"the coordinator speaks fedqf wire format {wire if wire is not None else 1!r}, this institution "
            f"{WIRE_VERSION}: packed updates would not add up; expected the same fedqf release on both sides"
        )
    return str(record[FEDERATION_TOML])




# --- simulation: an institution is a partition of the data source, its state lives in Flower's Context --------


@functools.lru_cache(maxsize=2)
def _simulated_federation(toml_text: str, base_dir: str, count: int) -> SimulatedFederationData:
    """The whole simulated federation's data, loaded and split once per worker process: a worker hosts many
    institutions in turn, and every one of them is a partition of the same source."""
    from fedqf.data import simulate_federation_data

    config = parse_federation(toml_text)
    return simulate_federation_data(
        config.data, institutions=count, seed=config.federation.seed, base_dir=Path(base_dir) if base_dir else None
    )


def _simulated_share(toml_text: str, base_dir: str, index: int, count: int) -> InstitutionData:
    return _simulated_federation(toml_text, base_dir, count).institutions[index]


@functools.lru_cache(maxsize=2)
def read_secret_context(path: str) -> ts.Context:
    """The institutions' CKKS context (with its secret key) from a file."""
    from fedqf.crypto import load_private_context

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise FedqfError(f"{path}: cannot read the CKKS secret context ({exc.strerror})") from exc
    return load_private_context(data)


def handle_simulated(
    message_type: str, content: RecordDict, *, node_config: dict[str, Any], run_config: dict[str, Any],
    state_records: RecordDict,
) -> RecordDict:
    """Handle an instruction in a simulation: institution k is partition k of the data source."""
    toml_text = federation_text(content)
    config = parse_federation(toml_text)
    index = int(node_config["partition-id"])
    count = int(node_config["num-partitions"])
    data = _simulated_share(toml_text, str(run_config.get("fedqf-base-dir", "")), index, count)
    secret = None
    if config.secure_aggregation.mode is SecureAggregationMode.CKKS:
        secret = read_secret_context(str(run_config["fedqf-secret-context"]))
    torch.set_num_threads(config.simulation.torch_threads)
    work = str(run_config.get("fedqf-work", "")) if run_config.get("fedqf-mode", "simulation") == "simulation" else ""
    inst = Institution(config, data, f"institution-{index}", index, secret,
                       blocks_dir=Path(work) / f"institution-{index}-blocks" if work else None, shares_process=True)
    state = InstitutionState.from_records(state_records)
    # The simulated institution's copy of the global model lives in the simulation's private work directory, not
    # in Flower's Context: the contexts of every simulated institution share the coordinator's process.
    model_file = Path(work) / f"institution-{index}-model.npz" if work else None
    saved_round = [state.model_round]
    if model_file is not None and state.global_arrays is None and model_file.exists():
        state.global_arrays = load_arrays(model_file)

    def persist(current: InstitutionState) -> None:
        if model_file is not None and current.global_arrays is not None and (
                current.model_round != saved_round[0] or not model_file.exists()):
            save_arrays(model_file, current.global_arrays)
            saved_round[0] = current.model_round
        for key, value in current.to_records(with_model=model_file is None).items():
            state_records[key] = value
        prune_blocks(inst, current)

    reply = handle(inst, state, message_type, content, persist=persist)
    persist(state)
    return reply
