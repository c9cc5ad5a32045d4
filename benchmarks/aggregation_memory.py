"""What the coordinator's CKKS aggregation keeps per institution: peak and retained memory of
`fedqf.aggregation.aggregate_train_replies` over 1, 10 and 100 encrypted replies (issue 4).

Replies are made one at a time by a generator, each with its own copy of the ciphertext bytes (and nothing else), as
the coordinator pulls them. Two measures, each institution count in a fresh process:
- process: the peak resident memory (VmHWM, reset through /proc/self/clear_refs once the update is made and freed
  memory is returned with malloc_trim) above the resident memory just before the round: everything, SEAL's
  memory included;
- Python: allocations traced by tracemalloc (the ciphertexts travel as Python bytes; SEAL's memory is outside it).
No Flower runtime: this isolates fedqf's own aggregation. The packing is large_model's (4 bits, 60-bit first prime)
with headroom for that many institutions.

    PYTHONPATH=. /work/venv/bin/python benchmarks/aggregation_memory.py [--params 1060170] [--institutions 1 10 100]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from fedqf.aggregation import AggregationSetup, aggregate_train_replies
from fedqf.config import SecureAggregationMode
from fedqf.crypto import (
    CkksParameters,
    encrypt_integers,
    generate_context,
    key_fingerprint,
    load_public_context,
    serialize_public_context,
)
from fedqf.model import ParameterLayout
from fedqf.packing import PackingScheme
from fedqf.protocol import ARRAYS, METRICS, REPORT, encrypted_to_record

LARGE_MODEL_PRIMES = (60, 60)  # sandboxes/large_model's coeff_mod_bit_sizes


def _reply(node: int, update: ArrayRecord) -> Message:
    """A reply carrying its own copy of the update's bytes, made with no copy besides: as Flower hands it over."""
    arrays = ArrayRecord({key: Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=bytes(memoryview(a.data)))
                          for key, a in update.items()})
    content = RecordDict({
        ARRAYS: arrays,
        METRICS: MetricRecord({"num-examples": 1000, "weight": 0.5, "train-loss": 0.5}),
        REPORT: ConfigRecord({"status": "ok", "reason": "", "fingerprint": "", "institution": f"h{node}"}),
    })
    metadata = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"instruction-{node}", group_id="1", created_at=time.time(), ttl=600.0,
                        message_type=MessageType.TRAIN)
    return make_message(metadata, content)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(params: int, institutions: int, *, process: bool = False) -> dict[str, float]:
    """Peak and retained memory of one round's aggregation over `institutions` replies, in MiB: Python allocations
    (tracemalloc), or with `process` the whole process's peak resident memory above its resident memory before the
    round (run it in a fresh process)."""
    # large_model's parameters (the packing has headroom for `institutions`)
    ckks = CkksParameters(poly_modulus_degree=8192, coeff_mod_bit_sizes=LARGE_MODEL_PRIMES, global_scale_bits=21)
    scheme = PackingScheme.design(ckks, bits=4, max_contributors=institutions, value_bound=0.05)
    secret = generate_context(ckks)
    public = load_public_context(serialize_public_context(secret))
    rng = np.random.default_rng(0)
    packed = scheme.pack(scheme.quantize(rng.uniform(-0.05, 0.05, params), rng))
    update = encrypt_integers(secret, packed)
    setup = AggregationSetup(mode=SecureAggregationMode.CKKS, layout=ParameterLayout(("w",), ((params,),)),
                             public_context=public, fingerprint=key_fingerprint(public),
                             encrypted_length=scheme.slots_needed(params))

    record = encrypted_to_record(update)

    def replies() -> Iterator[Message]:
        for node in range(1, institutions + 1):
            yield _reply(node, record)

    mib = 2.0**20
    gc.collect()
    if process:
        # Freed memory goes back to the system first, or the round would reuse it unseen: the peak counts every
        # page the round touches.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base_kib = _status_kib("VmRSS")
        outcome = aggregate_train_replies(1, replies(), setup)
        peak_kib = _status_kib("VmHWM")
        assert len(outcome.accepted) == institutions, outcome.reports[:1]
        return {"institutions": institutions, "update_mib": update.nbytes / mib,
                "peak_mib": (peak_kib - base_kib) * 1024 / mib, "retained_mib": float("nan")}
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    outcome = aggregate_train_replies(1, replies(), setup)
    gc.collect()
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(outcome.accepted) == institutions, outcome.reports[:1]
    return {"institutions": institutions, "update_mib": update.nbytes / mib, "peak_mib": (peak - base) / mib,
            "retained_mib": (retained - base) / mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_060_170)
    parser.add_argument("--institutions", type=int, nargs="+", default=[1, 10, 100])
    args = parser.parse_args()
    print("| institutions | one update MiB | process peak above its baseline MiB | process peak / update | "
          "Python peak MiB | Python peak / update | Python kept after the round MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    spawn = multiprocessing.get_context("spawn")
    for n in args.institutions:
        with spawn.Pool(1) as pool:
            whole = pool.apply(measure, (args.params, n), {"process": True})
        with spawn.Pool(1) as pool:
            python = pool.apply(measure, (args.params, n))
        update = whole["update_mib"]
        print(f"| {n} | {update:.2f} | {whole['peak_mib']:.1f} | {whole['peak_mib'] / update:.2f}x | "
              f"{python['peak_mib']:.1f} | {python['peak_mib'] / update:.2f}x | {python['retained_mib']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
