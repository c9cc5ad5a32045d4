"""Measure what CKKS secure aggregation costs per round against plaintext float32 updates, side by side in one run.

For a model update of ``--params`` values and ``--institutions`` institutions, both paths do the same round:
each institution turns a_k * d_k into bytes (CKKS: encrypt; plaintext: float32 tobytes), the coordinator sums the
bytes of all institutions into one result (CKKS: deserialize and add ciphertexts, serialize the sum; plaintext:
frombuffer and add, tobytes), and an institution turns the result back into float64 (CKKS: decrypt; plaintext:
frombuffer). Times are the median of ``--repeats`` runs.

    python benchmarks/ckks_update.py --params 1000000 --institutions 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

from fedqf.crypto import (
    CkksParameters,
    EncryptedSum,
    EncryptedVector,
    decrypt,
    encrypt,
    generate_context,
    key_fingerprint,
    load_public_context,
    serialize_public_context,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Cost:
    """One path's cost for one round."""

    bytes_per_param: float
    encrypt_s: float
    aggregate_s: float
    decrypt_s: float


def timed(fn: Callable[[], T], repeats: int) -> tuple[T, float]:
    """Run fn ``repeats`` times; return its last result and the median seconds."""
    times: list[float] = []
    result: T | None = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    assert result is not None
    return result, statistics.median(times)


def ckks_cost(terms: list[NDArray[np.float64]], bound: float, repeats: int) -> tuple[Cost, float]:
    params = CkksParameters()
    private = generate_context(params)
    public = load_public_context(serialize_public_context(private))
    fingerprint = key_fingerprint(private)
    length = terms[0].size

    updates: list[EncryptedVector] = []
    encrypt_times: list[float] = []
    for term in terms:
        update, seconds = timed(lambda term=term: encrypt(private, term, bound=bound), repeats)  # type: ignore[misc]
        updates.append(update)
        encrypt_times.append(seconds)

    def aggregate() -> EncryptedVector:
        total = EncryptedSum(public, length=length, fingerprint=fingerprint)
        for update in updates:
            total.add(update)
        return total.result()

    summed, aggregate_s = timed(aggregate, repeats)
    out, decrypt_s = timed(lambda: decrypt(private, summed), repeats)
    error = float(np.max(np.abs(out - np.sum(terms, axis=0))))
    per_param = statistics.mean(u.nbytes for u in updates) / length
    return Cost(per_param, statistics.mean(encrypt_times), aggregate_s, decrypt_s), error


def plaintext_cost(terms: list[NDArray[np.float64]], repeats: int) -> Cost:
    length = terms[0].size
    payloads: list[bytes] = []
    encode_times: list[float] = []
    for term in terms:
        payload, seconds = timed(lambda term=term: term.astype(np.float32).tobytes(), repeats)  # type: ignore[misc]
        payloads.append(payload)
        encode_times.append(seconds)

    def aggregate() -> bytes:
        total = np.zeros(length, dtype=np.float32)
        for payload in payloads:
            total += np.frombuffer(payload, dtype=np.float32)
        return total.tobytes()

    summed, aggregate_s = timed(aggregate, repeats)
    _, decode_s = timed(lambda: np.frombuffer(summed, dtype=np.float32).astype(np.float64), repeats)
    return Cost(len(payloads[0]) / length, statistics.mean(encode_times), aggregate_s, decode_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000, help="values in one model update")
    parser.add_argument("--institutions", type=int, default=3, help="updates summed by the coordinator")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    clip, weight = 1.0, 1000.0
    terms = [weight * rng.uniform(-clip, clip, size=args.params) for _ in range(args.institutions)]
    ckks, error = ckks_cost(terms, bound=weight * clip, repeats=args.repeats)
    plain = plaintext_cost(terms, repeats=args.repeats)

    rows = [
        ("bytes / parameter", ckks.bytes_per_param, plain.bytes_per_param, "{:.2f}"),
        ("encrypt s (one institution)", ckks.encrypt_s, plain.encrypt_s, "{:.4f}"),
        (f"aggregate s ({args.institutions} institutions)", ckks.aggregate_s, plain.aggregate_s, "{:.4f}"),
        ("decrypt s", ckks.decrypt_s, plain.decrypt_s, "{:.4f}"),
    ]
    print(f"{args.params} parameters, {args.institutions} institutions, median of {args.repeats} runs")
    print(f"CKKS N=8192, coeff_mod_bit_sizes=(60, 60), scale 2^40; max |decrypted sum - numpy sum| = {error:.2e}")
    print()
    print("| measure | fedqf CKKS | plaintext float32 | CKKS / plaintext |")
    print("|---|---:|---:|---:|")
    for name, c, p, fmt in rows:
        print(f"| {name} | {fmt.format(c)} | {fmt.format(p)} | {c / p:.0f}x |")


if __name__ == "__main__":
    main()
