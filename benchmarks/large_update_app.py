"""A 100M-parameter packed CKKS update through Flower's deployment runtime, block by block (issue 4).

ServerApp and ClientApp of benchmarks/large_update.py. The update of `bench-params` values is cut into blocks of
`bench-block` values (a whole number of ciphertexts); for each block the ServerApp asks every institution for its
encrypted block ("train"), adds each reply into a running `fedqf.crypto.EncryptedSum` as it is pulled (one reply
held at a time), and sends the encrypted block sum back ("evaluate"); each institution decrypts and unpacks it and
checks it against the exact sum of every institution's quantized values (recomputed from their seeds: a benchmark
check, not something a real institution could do). So no process ever holds more than one block's ciphertexts of
one institution plus the running sum, whatever `bench-params` is; `bench-block = bench-params` sends the whole
update as one Flower message per institution instead.

Every message appends one JSON line to `bench-trace`; the ServerApp writes `bench-out` at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedqf.crypto import (
    CkksParameters,
    EncryptedSum,
    decrypt_integers,
    encrypt_integers,
    key_fingerprint,
    load_private_context,
    load_public_context,
)
from fedqf.packing import PackingScheme
from fedqf.protocol import encrypted_to_record, record_to_encrypted

PARAMS_KEY = "bench-params"
BLOCK_KEY = "bench-block"
INSTITUTIONS_KEY = "bench-institutions"
HEADROOM_KEY = "bench-headroom"  # institutions the packing leaves room for (>= bench-institutions)
BITS_KEY = "bench-bits"
SECRET_KEY = "bench-secret-context"
PUBLIC_KEY = "bench-public-context"
OUT_KEY = "bench-out"
TRACE_KEY = "bench-trace"
VALUE_BOUND = 0.05
POLL_SECONDS = 1.0  # between pulls of pending replies (each pull is one request to the SuperLink)


def _scheme(context: Context, params: CkksParameters) -> PackingScheme:
    return PackingScheme.design(params, bits=int(context.run_config[BITS_KEY]),
                                max_contributors=int(context.run_config[HEADROOM_KEY]), value_bound=VALUE_BOUND)


def _quantized_block(index: int, block: int, start: int, length: int, scheme: PackingScheme) -> np.ndarray:
    """Institution `index`'s quantized values for one block: deterministic in (index, block)."""
    rng = np.random.default_rng([index, block])
    values = rng.uniform(-VALUE_BOUND, VALUE_BOUND, length)
    return scheme.quantize(values, rng)


def _trace(context: Context, **row: float | str) -> None:
    with open(str(context.run_config[TRACE_KEY]), "a") as handle:
        handle.write(json.dumps(row) + "\n")


def _block_of(message: Message) -> tuple[int, int, int]:
    config = message.content["config"]
    assert isinstance(config, ConfigRecord)
    return int(config["block"]), int(config["start"]), int(config["length"])  # type: ignore[arg-type]


client = ClientApp()


@client.train()
def _encrypt_block(message: Message, context: Context) -> Message:
    started = time.perf_counter()
    secret = load_private_context(Path(str(context.run_config[SECRET_KEY])).read_bytes())
    scheme = _scheme(context, CkksParameters.from_context(secret))
    index = int(context.node_config["partition-id"])
    block, start, length = _block_of(message)
    packed = scheme.pack(_quantized_block(index, block, start, length, scheme))
    t0 = time.perf_counter()
    encrypted = encrypt_integers(secret, packed)
    t1 = time.perf_counter()
    del packed
    content = RecordDict({"arrays": encrypted_to_record(encrypted), "metrics": MetricRecord({"institution": index})})
    _trace(context, kind="encrypt", institution=index, block=block, encrypt_seconds=t1 - t0,
           seconds=time.perf_counter() - started, bytes=encrypted.nbytes)
    return Message(content, reply_to=message)


@client.evaluate()
def _decrypt_block(message: Message, context: Context) -> Message:
    started = time.perf_counter()
    secret = load_private_context(Path(str(context.run_config[SECRET_KEY])).read_bytes())
    scheme = _scheme(context, CkksParameters.from_context(secret))
    index = int(context.node_config["partition-id"])
    block, start, length = _block_of(message)
    record = message.content["arrays"]
    assert isinstance(record, ArrayRecord)
    t0 = time.perf_counter()
    slots = decrypt_integers(secret, record_to_encrypted(record))
    t1 = time.perf_counter()
    field_sums = scheme.unpack(slots, length)
    institutions = int(context.run_config[INSTITUTIONS_KEY])
    expected = sum(_quantized_block(k, block, start, length, scheme) for k in range(institutions))
    mismatches = int(np.count_nonzero(field_sums != expected))
    _trace(context, kind="decrypt", institution=index, block=block, decrypt_seconds=t1 - t0,
           seconds=time.perf_counter() - started, mismatches=mismatches)
    return Message(RecordDict({"metrics": MetricRecord({"mismatches": mismatches})}), reply_to=message)


server = ServerApp()


@server.main()
def _main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    params, block = int(context.run_config[PARAMS_KEY]), int(context.run_config[BLOCK_KEY])
    institutions = int(context.run_config[INSTITUTIONS_KEY])
    public = load_public_context(Path(str(context.run_config[PUBLIC_KEY])).read_bytes())
    ckks = CkksParameters.from_context(public)
    scheme = _scheme(context, ckks)
    per_ct = ckks.values_per_ciphertext * scheme.values_per_slot
    block = max(per_ct, block // per_ct * per_ct)
    fingerprint = key_fingerprint(public)
    while len(list(grid.get_node_ids())) < institutions:
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    blocks: list[dict[str, float]] = []
    wire_bytes = 0
    mismatches = 0
    for number, start in enumerate(range(0, params, block)):
        length = min(block, params - start)
        config = ConfigRecord({"block": number, "start": start, "length": length})
        t0 = time.perf_counter()
        ids = list(grid.push_messages([Message(RecordDict({"config": config}), dst_node_id=node, message_type="train")
                                       for node in nodes]))
        total = EncryptedSum(public, length=scheme.slots_needed(length), fingerprint=fingerprint)
        pending = set(ids)
        while pending:
            # One id per pull: the ServerApp never holds two encrypted replies at once.
            for mid in sorted(pending):
                replies = list(grid.pull_messages([mid]))
                if not replies:
                    continue
                reply = replies[0]
                del replies
                pending.discard(mid)
                if reply.has_error():
                    raise RuntimeError(f"block {number}: an institution failed: {reply.error.reason}")
                record = reply.content["arrays"]
                assert isinstance(record, ArrayRecord)
                update = record_to_encrypted(record)
                wire_bytes += update.nbytes
                total.add(update)
                del reply, record, update
            if pending:
                time.sleep(POLL_SECONDS)
        t1 = time.perf_counter()
        aggregate = encrypted_to_record(total.result())
        del total
        ids = list(grid.push_messages([
            Message(RecordDict({"config": config, "arrays": aggregate}), dst_node_id=node, message_type="evaluate")
            for node in nodes]))
        del aggregate
        pending = set(ids)
        while pending:
            for reply in grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    raise RuntimeError(f"block {number}: decryption failed: {reply.error.reason}")
                metrics = reply.content["metrics"]
                assert isinstance(metrics, MetricRecord)
                mismatches += int(metrics["mismatches"])  # type: ignore[arg-type]
            if pending:
                time.sleep(POLL_SECONDS)
        t2 = time.perf_counter()
        blocks.append({"block": number, "length": length, "encrypt_collect_sum_seconds": t1 - t0,
                       "aggregate_decrypt_seconds": t2 - t1})
        print(f"block {number + 1}/{-(-params // block)}: {length} values, {t1 - t0:.1f} s encrypt+collect+sum, "
              f"{t2 - t1:.1f} s aggregate back + decrypt", flush=True)
    out = Path(str(context.run_config[OUT_KEY]))
    out.write_text(json.dumps({
        "params": params, "block": block, "institutions": institutions, "values_per_slot": scheme.values_per_slot,
        "bits": scheme.bits, "ckks": {"poly_modulus_degree": ckks.poly_modulus_degree,
                                      "coeff_mod_bit_sizes": list(ckks.coeff_mod_bit_sizes),
                                      "scale_bits": ckks.global_scale_bits},
        "upload_bytes_per_param": wire_bytes / institutions / params, "mismatches": mismatches,
        "blocks": blocks, "wall_seconds": time.perf_counter() - started,
    }, indent=2))
