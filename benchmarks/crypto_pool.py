"""Encryption and decryption of one large update on several processes (issue 4: "use all cores for encryption").

An institution's update of N parameters, packed as sandboxes/large_model packs it (4-bit values, 6 per plaintext
coefficient), is encrypted under the secret key and its aggregate decrypted, first in the calling process
(`fedqf.crypto.encrypt_integers` / `decrypt_integers` without a pool) and then on `fedqf.crypto.CryptoPool`s of 2, 4, ...
workers, each run repeated and interleaved; the pool's start-up (spawning workers, loading the context) is timed
apart, since a daemon pays it once. Prints seconds and the speed-up over one process.

    PYTHONPATH=. python benchmarks/crypto_pool.py [--params 10000000] [--workers 2 4 8 16] [--repeat 3] [--json F]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedqf.crypto import (
    SYMMETRIC_NOISE_MAX,
    CkksParameters,
    CryptoPool,
    EncryptedSum,
    crypto_pool,
    decrypt_integers,
    encrypt_integers,
    generate_context,
    key_fingerprint,
    load_public_context,
    serialize_public_context,
)
from fedqf.packing import PackingScheme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    cpus = len(os.sched_getaffinity(0))
    parser.add_argument("--workers", type=int, nargs="+", default=[w for w in (2, 4, 8, 16) if w <= cpus] or [2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    # sandboxes/large_model's parameters, read from its file without the rest of fedqf (no Flower needed)
    raw = tomllib.loads((REPO / "sandboxes" / "large_model" / "federation.toml").read_text())
    sa = raw["secure_aggregation"]
    params = CkksParameters(poly_modulus_degree=int(sa.get("poly_modulus_degree", 8192)),
                            coeff_mod_bit_sizes=tuple(sa["coeff_mod_bit_sizes"]), global_scale_bits=int(sa["scale_bits"]))
    value_bound = float(sa["value_bound"])
    scheme = PackingScheme.design(params, bits=int(sa["quantization_bits"]),
                                  max_contributors=int(raw["federation"]["institutions"]), value_bound=value_bound)
    secret = generate_context(params)
    public = load_public_context(serialize_public_context(secret))
    rng = np.random.default_rng(0)
    packed = scheme.pack(scheme.quantize(rng.uniform(-value_bound, value_bound, args.params).astype(np.float32),
                                         rng))
    update = encrypt_integers(secret, packed)
    total = EncryptedSum(public, length=update.length, fingerprint=key_fingerprint(public))
    total.add(update)
    aggregate = total.result()
    print(f"{args.params:,} parameters: {len(update.chunks)} ciphertexts; {cpus} CPUs; workers {args.workers}",
          flush=True)

    pools: dict[int, CryptoPool] = {}
    startup: dict[int, float] = {}
    for w in args.workers:
        start = time.perf_counter()
        pool = crypto_pool(secret, w)
        assert pool is not None
        encrypt_integers(secret, packed[: 2 * w * params.values_per_ciphertext], pool=pool)  # warm
        startup[w] = time.perf_counter() - start
        pools[w] = pool
    times: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        for w in [1, *args.workers]:
            pool = pools.get(w)
            start = time.perf_counter()
            encrypt_integers(secret, packed, pool=pool)
            times.setdefault(f"encrypt-{w}", []).append(time.perf_counter() - start)
            start = time.perf_counter()
            out = decrypt_integers(secret, aggregate, pool=pool)
            times.setdefault(f"decrypt-{w}", []).append(time.perf_counter() - start)
            assert np.abs(out - packed.astype(np.int64)).max() <= SYMMETRIC_NOISE_MAX  # one update's noise
    print("| workers | encrypt s | speed-up | decrypt s | speed-up | pool start-up s |")
    print("|---:|---:|---:|---:|---:|---:|")
    base_e, base_d = statistics.median(times["encrypt-1"]), statistics.median(times["decrypt-1"])
    rows = []
    for w in [1, *args.workers]:
        e, d = statistics.median(times[f"encrypt-{w}"]), statistics.median(times[f"decrypt-{w}"])
        rows.append({"workers": w, "encrypt_s": e, "decrypt_s": d, "startup_s": startup.get(w, 0.0)})
        print(f"| {w} | {e:.2f} | {base_e / e:.2f}x | {d:.2f} | {base_d / d:.2f}x | "
              f"{startup.get(w, 0.0):.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": platform.node(),
            "cpus": cpus, "params": args.params, "ciphertexts": len(update.chunks), "repeat": args.repeat,
            "rows": rows, "times": times}, indent=1))


if __name__ == "__main__":
    main()
