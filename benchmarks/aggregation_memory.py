"""What the coordinator's CKKS aggregation keeps per institution: peak and retained memory of
`fedqf.aggregation.aggregate_train_replies` over 1, 10 and 100 encrypted replies (issue 4).

Replies are made one at a time by a generator, each with its own copy of the ciphertext bytes, as the coordinator
pulls them; Python-level allocations are measured with tracemalloc (the ciphertexts travel as Python bytes), the
running sum's SEAL memory (one update) is outside it. No Flower runtime: this isolates fedqf's own aggregation.

    PYTHONPATH=. /work/venv/bin/python benchmarks/aggregation_memory.py [--params 1060170] [--institutions 1 10 100]
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from collections.abc import Iterator

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from fedqf.aggregation import AggregationSetup, aggregate_train_replies
from fedqf.config import SecureAggregationMode
from fedqf.crypto import (
    CkksParameters,
    EncryptedVector,
    encrypt,
    generate_context,
    key_fingerprint,
    load_public_context,
    serialize_public_context,
)
from fedqf.model import ParameterLayout
from fedqf.packing import PackingScheme
from fedqf.protocol import ARRAYS, METRICS, REPORT, encrypted_to_record


def _reply(node: int, update: EncryptedVector) -> Message:
    copy = EncryptedVector(chunks=tuple(bytes(bytearray(c)) for c in update.chunks), length=update.length,
                           fingerprint=update.fingerprint)
    content = RecordDict({
        ARRAYS: encrypted_to_record(copy),
        METRICS: MetricRecord({"num-examples": 1000, "weight": 0.5, "train-loss": 0.5}),
        REPORT: ConfigRecord({"status": "ok", "reason": "", "fingerprint": "", "institution": f"h{node}"}),
    })
    metadata = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"instruction-{node}", group_id="1", created_at=time.time(), ttl=600.0,
                        message_type=MessageType.TRAIN)
    return make_message(metadata, content)


def measure(params: int, institutions: int) -> dict[str, float]:
    ckks = CkksParameters(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60), global_scale_bits=24)
    scheme = PackingScheme.design(ckks, bits=6, max_contributors=institutions, value_bound=0.05)
    secret = generate_context(ckks)
    public = load_public_context(serialize_public_context(secret))
    rng = np.random.default_rng(0)
    packed = scheme.pack(scheme.quantize(rng.uniform(-0.05, 0.05, params), rng))
    update = encrypt(secret, packed, bound=scheme.slot_bound)
    setup = AggregationSetup(mode=SecureAggregationMode.CKKS, layout=ParameterLayout(("w",), ((params,),)),
                             public_context=public, fingerprint=key_fingerprint(public),
                             encrypted_length=scheme.slots_needed(params))

    def replies() -> Iterator[Message]:
        for node in range(1, institutions + 1):
            yield _reply(node, update)

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    outcome = aggregate_train_replies(1, replies(), setup)
    gc.collect()
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(outcome.accepted) == institutions, outcome.reports[:1]
    mib = 2.0**20
    return {"institutions": institutions, "update_mib": update.nbytes / mib, "peak_mib": (peak - base) / mib,
            "retained_mib": (retained - base) / mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_060_170)
    parser.add_argument("--institutions", type=int, nargs="+", default=[1, 10, 100])
    args = parser.parse_args()
    print("| institutions | one update MiB | peak MiB (Python) | peak / update | kept after the round MiB |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.institutions:
        row = measure(args.params, n)
        print(f"| {n} | {row['update_mib']:.1f} | {row['peak_mib']:.1f} | {row['peak_mib'] / row['update_mib']:.2f}x | "
              f"{row['retained_mib']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
