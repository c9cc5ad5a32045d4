"""Coordinator-side aggregation: CKKS sums equal plaintext FedAvg; bad updates never touch the aggregate."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from conftest import reply_from
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedqf.aggregation import AggregationSetup, update_bytes, weighted_mean_arrays
from fedqf.config import SecureAggregationMode
from fedqf.crypto import (
    CkksParameters,
    aggregation_tolerance,
    decrypt,
    encrypt,
    generate_context,
    key_fingerprint,
    load_public_context,
    serialize_public_context,
)
from fedqf.errors import FederationError, FedqfError
from fedqf.model import ParameterLayout
from fedqf.protocol import (
    ARRAYS,
    METRICS,
    REPORT,
    DeferredArray,
    InstitutionReport,
    aggregate_meta,
    encrypted_to_record,
    record_to_encrypted,
)
from strategies import FedAvg

LAYOUT = ParameterLayout(names=("w", "b"), shapes=((4, 3), (3,)))
PARAMS = CkksParameters()


@dataclass
class Observer:
    reports: dict[int, list[InstitutionReport]] = field(default_factory=dict)
    aggregates: dict[int, ArrayRecord] = field(default_factory=dict)

    def record_train(self, server_round: int, reports: list[InstitutionReport]) -> None:
        self.reports[server_round] = list(reports)

    def record_aggregate(self, server_round: int, arrays: ArrayRecord) -> None:
        self.aggregates[server_round] = arrays

    def record_evaluation(self, server_round: int, metrics: MetricRecord | None) -> None:
        pass


@pytest.fixture(scope="module")
def secret():  # type: ignore[no-untyped-def]
    return generate_context(PARAMS)


def _metrics(samples: int, weight: float) -> MetricRecord:
    return MetricRecord({"num-examples": samples, "weight": weight, "train-loss": 0.5, "epsilon": 1.0})


def _report(institution: str) -> ConfigRecord:
    return ConfigRecord({"status": "ok", "reason": "", "fingerprint": "", "institution": institution})


def _encrypted_reply(node: int, secret, delta: np.ndarray, samples: int, unit: float = 100.0) -> Message:  # type: ignore[no-untyped-def]
    weight = samples / unit
    enc = encrypt(secret, weight * delta, bound=weight * float(np.abs(delta).max() + 1e-9))
    content = RecordDict({ARRAYS: encrypted_to_record(enc), METRICS: _metrics(samples, weight), REPORT: _report(f"h{node}")})
    return reply_from(node, content)


def _plain_reply(node: int, weights: list[np.ndarray], samples: int) -> Message:
    record = ArrayRecord({n: Array(w.astype(np.float32)) for n, w in zip(LAYOUT.names, weights)})
    content = RecordDict({ARRAYS: record, METRICS: _metrics(samples, samples / 100.0), REPORT: _report(f"h{node}")})
    return reply_from(node, content)


def _ckks_strategy(secret, observer: Observer, min_institutions: int = 1) -> FedAvg:  # type: ignore[no-untyped-def]
    public = load_public_context(serialize_public_context(secret))
    setup = AggregationSetup(
        mode=SecureAggregationMode.CKKS,
        layout=LAYOUT,
        min_institutions=min_institutions,
        public_context=public,
        fingerprint=key_fingerprint(public),
        observer=observer,
    )
    return FedAvg(setup=setup, min_institutions=min_institutions)


def test_decrypted_ckks_aggregate_equals_plaintext_weighted_fedavg(secret) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    clip = 1.0
    global_w = rng.normal(size=LAYOUT.size)
    deltas = [np.clip(rng.normal(scale=0.5, size=LAYOUT.size), -clip, clip) for _ in range(3)]
    samples = [120, 75, 310]
    observer = Observer()
    encrypted, _ = _ckks_strategy(secret, observer).aggregate_train(
        1, [_encrypted_reply(k, secret, d, n) for k, (d, n) in enumerate(zip(deltas, samples))]
    )
    assert encrypted is not None
    aggregate_round, weight_sum = aggregate_meta(encrypted)
    assert aggregate_round == 1 and weight_sum == pytest.approx(sum(samples) / 100.0)
    decrypted = global_w + decrypt(secret, record_to_encrypted(encrypted)) / weight_sum

    plain_setup = AggregationSetup(mode=SecureAggregationMode.NONE, layout=LAYOUT, observer=Observer())
    plain, _ = FedAvg(setup=plain_setup, min_institutions=1).aggregate_train(
        1, [_plain_reply(k, LAYOUT.unflatten(global_w + d), n) for k, (d, n) in enumerate(zip(deltas, samples))]
    )
    assert plain is not None
    plain_vector = LAYOUT.flatten([plain[n].numpy() for n in LAYOUT.names])

    max_abs = max(float(np.abs(n / 100.0 * d).max()) for d, n in zip(deltas, samples))
    # CKKS error of the sum, divided by the weight sum, plus float32 rounding of the plaintext path's weights.
    ckks_tol = aggregation_tolerance(PARAMS, num_terms=3, max_abs=max_abs) / weight_sum
    float32_tol = 4 * np.finfo(np.float32).eps * (np.abs(global_w).max() + clip)
    error = np.abs(decrypted - plain_vector).max()
    assert error <= ckks_tol + float32_tol
    # And without the float32 path: the exact float64 weighted mean.
    exact = global_w + sum(n * d for d, n in zip(deltas, samples)) / sum(samples)
    assert np.abs(decrypted - exact).max() <= ckks_tol


def test_update_under_another_key_is_rejected_and_the_round_goes_on(secret) -> None:  # type: ignore[no-untyped-def]
    other = generate_context(PARAMS)
    rng = np.random.default_rng(1)
    deltas = [rng.uniform(-1, 1, LAYOUT.size) for _ in range(3)]
    replies = [_encrypted_reply(0, secret, deltas[0], 100), _encrypted_reply(1, other, deltas[1], 100),
               _encrypted_reply(2, secret, deltas[2], 100)]
    observer = Observer()
    encrypted, metrics = _ckks_strategy(secret, observer).aggregate_train(4, replies)
    assert encrypted is not None and metrics is not None
    statuses = {r.name: (r.status.value, r.reason) for r in observer.reports[4]}
    assert statuses["h1"][0] == "rejected" and "encrypted under key" in statuses["h1"][1]
    assert statuses["h0"][0] == statuses["h2"][0] == "ok"
    _, weight_sum = aggregate_meta(encrypted)
    assert weight_sum == pytest.approx(2.0)
    total = decrypt(secret, record_to_encrypted(encrypted))
    tol = aggregation_tolerance(PARAMS, num_terms=2, max_abs=1.0)
    assert np.abs(total - (deltas[0] + deltas[2])).max() <= tol


def test_garbage_ciphertext_and_missing_report_are_rejected(secret) -> None:  # type: ignore[no-untyped-def]
    good = _encrypted_reply(0, secret, np.full(LAYOUT.size, 0.5), 100)
    bad_record = encrypted_to_record(record_to_encrypted(good.content[ARRAYS]))  # type: ignore[arg-type]
    bad_record["ckks.000000"] = Array(dtype="bytes", shape=(5,), stype="tenseal.CKKSVector", data=b"hello")
    garbage = reply_from(1, RecordDict({ARRAYS: bad_record, METRICS: _metrics(100, 1.0), REPORT: _report("h1")}))
    no_report = reply_from(2, RecordDict({ARRAYS: good.content[ARRAYS], METRICS: _metrics(100, 1.0)}))
    observer = Observer()
    encrypted, _ = _ckks_strategy(secret, observer).aggregate_train(2, [good, garbage, no_report])
    assert encrypted is not None
    statuses = [r.status.value for r in sorted(observer.reports[2], key=lambda r: r.node_id)]
    assert statuses == ["ok", "rejected", "rejected"]
    assert np.abs(decrypt(secret, record_to_encrypted(encrypted)) - 0.5).max() <= aggregation_tolerance(
        PARAMS, num_terms=1, max_abs=0.5
    )


def test_plaintext_update_with_nan_or_wrong_shape_is_rejected() -> None:
    observer = Observer()
    setup = AggregationSetup(mode=SecureAggregationMode.NONE, layout=LAYOUT, observer=observer)
    good = [np.ones((4, 3)), np.ones(3)]
    nan = [np.full((4, 3), np.nan), np.ones(3)]
    wrong_shape = [np.ones((3, 4)), np.ones(3)]
    arrays, _ = FedAvg(setup=setup, min_institutions=1).aggregate_train(
        1, [_plain_reply(0, good, 10), _plain_reply(1, nan, 10), _plain_reply(2, wrong_shape, 10)]
    )
    assert arrays is not None
    np.testing.assert_array_equal(arrays["w"].numpy(), np.ones((4, 3), dtype=np.float32))
    reasons = {r.node_id: r.reason for r in observer.reports[1]}
    assert "NaN or Inf" in reasons[1]
    assert "shape (3, 4), expected (4, 3)" in reasons[2]


def test_too_few_institutions_end_the_federation_with_the_reasons(secret) -> None:  # type: ignore[no-untyped-def]
    refusal = reply_from(
        0,
        RecordDict(
            {
                ARRAYS: ArrayRecord(),
                METRICS: MetricRecord({"num-examples": 10, "epsilon": 3.0}),
                REPORT: ConfigRecord({"status": "budget-exhausted", "reason": "budget spent", "institution": "h0"}),
            }
        ),
    )
    observer = Observer()
    with pytest.raises(FederationError, match=r"round 7: 0 of 1 institutions trained.*h0: budget-exhausted"):
        _ckks_strategy(secret, observer, min_institutions=1).aggregate_train(7, [refusal])
    assert observer.reports[7][0].status.value == "budget-exhausted"
    assert 7 not in observer.aggregates


def test_the_coordinator_refuses_a_private_context(secret) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FedqfError, match="must not hold a CKKS secret key"):
        AggregationSetup(mode=SecureAggregationMode.CKKS, layout=LAYOUT, public_context=secret,
                         fingerprint=key_fingerprint(secret))


def test_plaintext_update_far_beyond_the_bound_is_rejected() -> None:
    observer = Observer()
    setup = AggregationSetup(mode=SecureAggregationMode.NONE, layout=LAYOUT, observer=observer, max_update_norm=1.0)
    reference = ArrayRecord({"w": Array(np.zeros((4, 3), dtype=np.float32)), "b": Array(np.zeros(3, dtype=np.float32))})
    near = [np.full((4, 3), 0.1), np.zeros(3)]
    far = [np.full((4, 3), 10.0), np.zeros(3)]
    strategy = FedAvg(setup=setup, min_institutions=1)
    strategy.global_arrays = reference
    arrays, _ = strategy.aggregate_train(1, [_plain_reply(0, near, 10), _plain_reply(1, far, 10)])
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), 0.1, rtol=1e-6)
    reasons = {r.node_id: (r.status.value, r.reason) for r in observer.reports[1]}
    assert reasons[0][0] == "ok"
    assert reasons[1][0] == "rejected" and "beyond strategy.max_update_norm = 1" in reasons[1][1]


def test_update_over_the_size_limit_is_rejected_unread_and_the_round_goes_on(secret) -> None:  # type: ignore[no-untyped-def]
    public = load_public_context(serialize_public_context(secret))
    good = _encrypted_reply(0, secret, np.full(LAYOUT.size, 0.25), 100)
    # A well-formed ciphertext padded with a large extra array: structurally it would pass, its size does not.
    padded_record = encrypted_to_record(record_to_encrypted(good.content[ARRAYS]))  # type: ignore[arg-type]
    padded_record["padding"] = Array(np.zeros(200_000, dtype=np.uint8))
    padded = reply_from(1, RecordDict({ARRAYS: padded_record, METRICS: _metrics(100, 1.0), REPORT: _report("h1")}))
    good_size = update_bytes(good)
    assert good_size < update_bytes(padded)
    observer = Observer()
    setup = AggregationSetup(mode=SecureAggregationMode.CKKS, layout=LAYOUT, public_context=public,
                             fingerprint=key_fingerprint(public), observer=observer, max_update_bytes=good_size + 1000)
    encrypted, _ = FedAvg(setup=setup, min_institutions=1).aggregate_train(3, [good, padded])
    assert encrypted is not None
    reports = {r.name: r for r in observer.reports[3]}
    assert reports["h0"].status.value == "ok"
    assert reports["h1"].status.value == "rejected"
    assert f"over the size limit of {good_size + 1000} bytes" in reports["h1"].reason
    _, weight_sum = aggregate_meta(encrypted)
    assert weight_sum == pytest.approx(1.0)  # only h0's weight: the oversized update never reached the sum
    assert np.abs(decrypt(secret, record_to_encrypted(encrypted)) - 0.25).max() <= aggregation_tolerance(
        PARAMS, num_terms=1, max_abs=0.25
    )


def test_plaintext_update_over_the_size_limit_is_rejected() -> None:
    observer = Observer()
    weights = [np.ones((4, 3)), np.ones(3)]
    limit = update_bytes(_plain_reply(0, weights, 10))
    setup = AggregationSetup(mode=SecureAggregationMode.NONE, layout=LAYOUT, observer=observer, max_update_bytes=limit)
    inflated = _plain_reply(1, [np.full((4, 3), 3.0), np.ones(3)], 10)
    inflated.content[REPORT]["institution"] = "h1" + "x" * 500  # long config strings count too
    arrays, _ = FedAvg(setup=setup, min_institutions=1).aggregate_train(1, [_plain_reply(0, weights, 10), inflated])
    assert arrays is not None
    np.testing.assert_array_equal(arrays["w"].numpy(), np.ones((4, 3), dtype=np.float32))
    statuses = {r.node_id: (r.status.value, r.reason) for r in observer.reports[1]}
    assert statuses[0][0] == "ok"
    assert statuses[1][0] == "rejected" and "over the size limit" in statuses[1][1]


def test_derived_size_limit_admits_a_real_update_and_a_configured_one_wins(secret) -> None:  # type: ignore[no-untyped-def]
    from fedqf.aggregation import SIZE_MARGIN, update_size_limit
    from fedqf.config import config_from_dict

    plain = config_from_dict({"secure_aggregation": {"mode": "none"}, "privacy": {"mode": "none"}})
    assert update_size_limit(plain, LAYOUT) == 2 * 4 * LAYOUT.size + SIZE_MARGIN
    ckks = config_from_dict({"secure_aggregation": {"poly_modulus_degree": PARAMS.poly_modulus_degree,
                                                    "coeff_mod_bit_sizes": list(PARAMS.coeff_mod_bit_sizes),
                                                    "scale_bits": PARAMS.global_scale_bits}})
    big = ParameterLayout(names=("w",), shapes=((PARAMS.poly_modulus_degree + 1,),))  # two ciphertexts of N values
    limit = update_size_limit(ckks, big)
    two_chunks = encrypt(secret, np.full(big.size, 0.5), bound=0.5)
    assert len(two_chunks.chunks) == 2
    assert two_chunks.nbytes < limit < 4 * two_chunks.nbytes + SIZE_MARGIN  # admits it, yet is no blank cheque
    public_key = encrypt(load_public_context(serialize_public_context(secret)), np.full(big.size, 0.5), bound=0.5)
    assert two_chunks.nbytes < public_key.nbytes < limit  # a public-key update (both polynomials) is admitted too
    configured = config_from_dict({"federation": {"max_update_bytes": 12345}})
    assert update_size_limit(configured, big) == 12345


def test_plaintext_mean_does_not_depend_on_the_order_replies_arrive() -> None:
    rng = np.random.default_rng(5)
    replies = [_plain_reply(k, [rng.normal(size=(4, 3)) * 10 ** k, rng.normal(size=3)], 7 + 13 * k) for k in range(6)]
    forward = weighted_mean_arrays(replies, LAYOUT)
    backward = weighted_mean_arrays(list(reversed(replies)), LAYOUT)
    for name in LAYOUT.names:
        assert forward[name].numpy().tobytes() == backward[name].numpy().tobytes()


def _deferred_reply(node: int, secret, values: np.ndarray, *, corrupt: int | None = None) -> tuple[Message, list[int]]:  # type: ignore[no-untyped-def]
    """A reply whose ciphertext Arrays are still at the SuperLink (DeferredArray, one ciphertext each), as
    fedqf.stream hands them on; `corrupt` garbles that Array's bytes when read. Returns the reply and a log of
    the Arrays read."""
    enc = encrypt(secret, values, bound=float(np.abs(values).max() + 1e-9))
    record = encrypted_to_record(enc, group_bytes=1)
    reads: list[int] = []
    for index, key in enumerate(sorted(k for k in record if k.startswith("ckks."))):
        array = record[key]
        data = array.data if index != corrupt else bytes(len(array.data))

        def read(index: int = index, data: bytes = data) -> bytes:
            reads.append(index)
            return data

        record[key] = DeferredArray(dtype=array.dtype, shape=array.shape, stype=array.stype, read=read)
    content = RecordDict({ARRAYS: record, METRICS: _metrics(100, 1.0), REPORT: _report(f"h{node}")})
    return reply_from(node, content), reads


def test_an_update_still_at_the_superlink_is_added_as_read_and_a_bad_one_is_taken_out_again(secret) -> None:  # type: ignore[no-untyped-def]
    # The coordinator adds a deployed reply's ciphertexts as it pulls them, an Array at a time. One whose third
    # Array turns out garbage has had two added already: they are read again and subtracted, and the sum is the
    # good replies' alone.
    length = 3 * PARAMS.values_per_ciphertext
    rng = np.random.default_rng(5)
    good = [rng.uniform(-1, 1, length) for _ in range(2)]
    first, first_reads = _deferred_reply(0, secret, good[0])
    bad, bad_reads = _deferred_reply(1, secret, rng.uniform(-1, 1, length), corrupt=2)
    last, _ = _deferred_reply(2, secret, good[1])
    assert update_bytes(bad) > length and bad_reads == []  # its size is what the Arrays declare: nothing read
    public = load_public_context(serialize_public_context(secret))
    observer = Observer()
    setup = AggregationSetup(mode=SecureAggregationMode.CKKS, layout=ParameterLayout(("w",), ((length,),)),
                             public_context=public, fingerprint=key_fingerprint(public), observer=observer)
    encrypted, _ = FedAvg(setup=setup, min_institutions=1).aggregate_train(1, [first, bad, last])
    assert encrypted is not None
    assert first_reads == [0, 1, 2]  # each Array read once, in order
    assert bad_reads == [0, 1, 2, 0, 1]  # the two added before the garbage, read again to be taken out
    statuses = {r.name: r.status.value for r in observer.reports[1]}
    assert statuses == {"h0": "ok", "h1": "rejected", "h2": "ok"}
    total = decrypt(secret, record_to_encrypted(encrypted))
    assert np.abs(total - (good[0] + good[1])).max() <= aggregation_tolerance(PARAMS, num_terms=2, max_abs=1.0)
