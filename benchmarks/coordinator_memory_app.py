"""ServerApp and ClientApp of benchmarks/coordinator_memory.py: fedqf's coordinator path in Flower's deployment
runtime, with institutions that only encrypt (issue 4).

The ServerApp runs what fedqf's coordinator runs on every training round: `fedqf.stream.StreamingGrid` hands the
replies over as they arrive, `fedqf.aggregation.aggregate_train_replies` checks each and adds it into the running
sum, which is drained into the round's aggregate file (`bench-aggregate` "memory": into an ArrayRecord held in
memory, as fedqf did before), and the aggregate goes back to every institution, which decrypts it and checks its
share of the values against the exact sum (together the institutions check every value once). What
it leaves out is training: an institution's update is `bench-params` quantized random values (seeded by the
institution and the round), packed and encrypted under the federation's key as fedqf's institutions do, so that
100 institutions fit one host.

With `bench-warm-up` > 0, a round 0 with updates of that many parameters goes first, not counted: the first use of
SEAL, zstd, Flower's HTTP client and thread pools in the process is then in the baseline of round 1, as it is in
that of every later round.

Before every round the ServerApp gives freed memory back to the system (`malloc_trim`), resets its own VmHWM
(`/proc/self/clear_refs`) and reads its VmRSS; after the aggregate is sent it reads VmHWM again. The difference is
the coordinator's peak during the round above its baseline, written to `bench-out` with the size of one update,
and with the peak of what Python allocates in the round (tracemalloc: Flower's messages, fedqf's sum).
"""

from __future__ import annotations

import ctypes
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedqf.config import SecureAggregationMode
from fedqf.crypto import (
    CkksParameters,
    decrypt_integers,
    encrypt_integers,
    key_fingerprint,
    load_private_context,
    load_public_context,
)
from fedqf.packing import PackingScheme
from fedqf.protocol import ARRAYS, CKKS_STYPE, METRICS, REPORT, encrypted_to_record, record_to_encrypted
from fedqf.runtime import return_large_buffers_when_freed
from fedqf.stream import RoundPolicy, StreamingGrid

VALUE_BOUND = 0.05
WEIGHT = 1.0


def _setting(context: Context, key: str) -> str:
    return str(context.run_config[f"bench-{key}"])


def _scheme(context: Context, params: CkksParameters) -> PackingScheme:
    return PackingScheme.design(params, bits=int(_setting(context, "bits")),
                                max_contributors=int(_setting(context, "headroom")), value_bound=VALUE_BOUND)


BLOCK = 1 << 16  # values drawn from one seed: any block of an update can be drawn again alone


def _blocks(length: int) -> int:
    return -(-length // BLOCK)


def _quantized(index: int, server_round: int, length: int, scheme: PackingScheme, block: int) -> np.ndarray:
    """Block `block` of institution `index`'s update of round `server_round` (`length` values in all)."""
    rng = np.random.default_rng([index, server_round, block])
    size = min(BLOCK, length - block * BLOCK)
    return scheme.quantize(rng.uniform(-VALUE_BOUND, VALUE_BOUND, size), rng)


def _round_of(message: Message) -> tuple[int, int]:
    """The round an instruction is for and the number of parameters its updates have."""
    config = message.content["config"]
    assert isinstance(config, ConfigRecord)
    return int(config["round"]), int(config["params"])  # type: ignore[arg-type]


client = ClientApp()


@client.train()
def _encrypt(message: Message, context: Context) -> Message:
    secret = load_private_context(Path(_setting(context, "secret-context")).read_bytes())
    scheme = _scheme(context, CkksParameters.from_context(secret))
    index = int(context.node_config["partition-id"])
    server_round, params = _round_of(message)
    update = np.concatenate([_quantized(index, server_round, params, scheme, b) for b in range(_blocks(params))])
    encrypted = encrypt_integers(secret, scheme.pack(update))
    content = RecordDict({
        ARRAYS: encrypted_to_record(encrypted),
        METRICS: MetricRecord({"num-examples": 1000, "weight": WEIGHT, "train-loss": 0.0,
                               "update-bytes": encrypted.nbytes}),
        REPORT: ConfigRecord({"status": "ok", "reason": "", "institution": f"bench-{index}"}),
    })
    return Message(content, reply_to=message)


@client.evaluate()
def _decrypt(message: Message, context: Context) -> Message:
    secret = load_private_context(Path(_setting(context, "secret-context")).read_bytes())
    scheme = _scheme(context, CkksParameters.from_context(secret))
    server_round, params = _round_of(message)
    record = message.content[ARRAYS]
    assert isinstance(record, ArrayRecord)
    sums = scheme.unpack(decrypt_integers(secret, record_to_encrypted(record)), params)
    # each institution checks its share of the blocks against the exact sum: together, every value once
    institutions, index = int(_setting(context, "institutions")), int(context.node_config["partition-id"])
    mismatches = 0
    for block in range(index, _blocks(params), institutions):
        expected = sum(_quantized(k, server_round, params, scheme, block) for k in range(institutions))
        mismatches += int(np.count_nonzero(sums[block * BLOCK:(block + 1) * BLOCK] != expected))
    return Message(RecordDict({METRICS: MetricRecord({"mismatches": mismatches})}), reply_to=message)


def _status_kib() -> dict[str, int]:
    lines = Path("/proc/self/status").read_text().splitlines()
    return {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in lines)
            if k in ("VmRSS", "VmHWM", "RssAnon", "Threads")}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_kib(libc: ctypes.CDLL) -> dict[str, int]:
    """glibc's heaps, all arenas: what they took from the system (`heap`), of it what is free (`heap_free`), and
    the buffers mapped on their own (`mapped`), KiB. What is free stays resident until trimmed."""
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {"heap": info.arena // 1024, "heap_free": info.fordblks // 1024, "mapped": info.hblkhd // 1024}


server = ServerApp()


@server.main()
def _main(grid: Grid, context: Context) -> None:
    # here, not at the top: the ClientApp, started afresh for every message, does not import torch (fedqf.model)
    from fedqf.aggregation import SIZE_MARGIN, AggregationSetup, aggregate_train_replies
    from fedqf.model import ParameterLayout

    params, institutions = int(_setting(context, "params")), int(_setting(context, "institutions"))
    allocator = _setting(context, "allocator")
    if allocator == "fedqf":  # as fedqf's deployed ServerApp (fedqf.server_app)
        return_large_buffers_when_freed()
    elif allocator == "threshold":  # the mmap threshold alone: glibc's heaps per thread
        return_large_buffers_when_freed(arenas=None)
    public = load_public_context(Path(_setting(context, "public-context")).read_bytes())
    ckks = CkksParameters.from_context(public)
    scheme = _scheme(context, ckks)

    def ciphertexts(size: int) -> int:
        return -(-scheme.slots_needed(size) // ckks.values_per_ciphertext)

    def setup_for(size: int) -> AggregationSetup:
        length = scheme.slots_needed(size)
        chunks = ciphertexts(size)
        return AggregationSetup(
            mode=SecureAggregationMode.CKKS, layout=ParameterLayout(("w",), ((size,),)),
            min_institutions=institutions, public_context=public, fingerprint=key_fingerprint(public),
            encrypted_length=length,
            max_update_bytes=2 * chunks * (ckks.poly_modulus_degree * (len(ckks.coeff_mod_bit_sizes) - 1) * 8 + 512)
            + SIZE_MARGIN,  # fedqf.aggregation.update_size_limit's rule
            # as fedqf's coordinator: the aggregate is drained into its file and sent from there (fedqf.stored)
            aggregate_file=(lambda r: Path(_setting(context, "out")).parent / f"aggregate-{r:06d}.bin")
            if _setting(context, "aggregate") == "file" else None)

    # as fedqf's coordinator: a reply that does not come by the deadline (a SuperNode whose push failed) is asked
    # for again; one reply pulled at a time
    streaming = StreamingGrid(grid, policy=RoundPolicy(min_replies=institutions, retries=3))
    streaming.one_at_a_time = True
    streaming.pull_later = frozenset({CKKS_STYPE})
    deadline = float(_setting(context, "round-timeout"))
    wait_until = time.monotonic() + deadline
    while len(list(grid.get_node_ids())) < institutions:
        if time.monotonic() > wait_until:
            raise RuntimeError(f"{len(list(grid.get_node_ids()))} of {institutions} SuperNodes connected in "
                               f"{deadline:.0f} s")
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    libc = ctypes.CDLL("libc.so.6")

    def one_round(server_round: int, size: int) -> dict[str, object]:
        """Send the round's instructions, sum the updates as they come, send the aggregate back; measured."""
        setup = setup_for(size)
        config = ConfigRecord({"round": server_round, "params": size})
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kib()
        tracemalloc.start()
        traced_base = tracemalloc.get_traced_memory()[0]
        started, since = time.perf_counter(), time.monotonic()  # monotonic: the same clock in every process
        instructions = [Message(RecordDict({"config": config}), dst_node_id=node, message_type="train")
                        for node in nodes]
        outcome = aggregate_train_replies(server_round, streaming.send_and_receive(instructions, timeout=deadline),
                                          setup)
        if len(outcome.accepted) != institutions or outcome.arrays is None:
            raise RuntimeError(f"round {server_round}: {len(outcome.accepted)} of {institutions} updates accepted: "
                               f"{[r.reason for r in outcome.reports if r.reason][:3]}")
        summed = time.perf_counter()
        after_sum, heap_after_sum = _status_kib(), _heap_kib(libc)
        traced_to_sum = tracemalloc.get_traced_memory()[1] - traced_base  # the peak while pulling and adding
        update_bytes = max(int(r.metrics["update-bytes"]) for r in outcome.reports)
        aggregate = outcome.arrays
        del outcome
        back = [Message(RecordDict({"config": config, ARRAYS: aggregate}), dst_node_id=node, message_type="evaluate")
                for node in nodes]
        del aggregate
        mismatches = undelivered = 0
        for reply in streaming.send_and_receive(back, timeout=deadline):
            if reply.has_error():  # e.g. a SuperNode's push refused by a busy SuperLink: counted, not fatal
                undelivered += 1
                print(f"round {server_round}: an aggregate was not decrypted: {reply.error.reason}", flush=True)
                continue
            metrics = reply.content[METRICS]
            assert isinstance(metrics, MetricRecord)
            mismatches += int(metrics["mismatches"])  # type: ignore[arg-type]
        del back
        after, heap_after = _status_kib(), _heap_kib(libc)
        traced_peak = tracemalloc.get_traced_memory()[1] - traced_base
        tracemalloc.stop()
        print(f"round {server_round}: {institutions} updates of {size} parameters summed in {summed - started:.1f} s; "
              f"coordinator peak {(after['VmHWM'] - before['VmRSS']) / 1024:.1f} MiB above "
              f"{before['VmRSS'] / 1024:.0f} MiB (Python peak {traced_peak / 2**20:.1f} MiB); {mismatches} mismatches",
              flush=True)
        return {
            "round": server_round, "params": size, "update_bytes": update_bytes,
            "baseline_rss_kib": before["VmRSS"], "baseline_anon_kib": before["RssAnon"],
            "peak_to_sum_kib": after_sum["VmHWM"] - before["VmRSS"], "peak_kib": after["VmHWM"] - before["VmRSS"],
            "python_peak_kib": traced_peak / 1024, "python_peak_to_sum_kib": traced_to_sum / 1024,
            "collect_and_sum_seconds": summed - started, "round_seconds": time.perf_counter() - started,
            "heap_after_sum_kib": heap_after_sum, "heap_after_kib": heap_after, "threads": after["Threads"],
            "mismatches": mismatches, "undelivered": undelivered, "monotonic_start": since,
            "monotonic_end": time.monotonic(),
        }

    result: dict[str, object] = {
        "params": params, "institutions": institutions, "update_bytes": 0,
        "chunks": ciphertexts(params),
        "values_per_coefficient": scheme.values_per_slot, "rounds": []}
    warm_up = int(_setting(context, "warm-up"))
    if warm_up:  # round 0: the same path with updates of `warm_up` parameters, not counted
        result["warm_up"] = one_round(0, warm_up)
    rounds: list[dict[str, object]] = []
    for server_round in range(1, int(_setting(context, "rounds")) + 1):
        rounds.append(one_round(server_round, params))
        # written after every round, so that a run cut short keeps what it measured
        result.update(rounds=rounds, update_bytes=max(int(r["update_bytes"]) for r in rounds))  # type: ignore[call-overload]
        Path(_setting(context, "out")).write_text(json.dumps(result, indent=2))
