"""Fuzzing: any federation file and any update the coordinator receives gives a result or a FedqfError."""

from __future__ import annotations

import numpy as np
from conftest import reply_from
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedqf.aggregation import AggregationSetup, aggregate_train_replies
from fedqf.config import SecureAggregationMode, apply_overrides, config_from_dict
from fedqf.crypto import (
    CkksParameters,
    generate_context,
    key_fingerprint,
    load_public_context,
    serialize_public_context,
)
from fedqf.errors import FedqfError
from fedqf.model import ParameterLayout
from fedqf.protocol import ARRAYS, METRICS, REPORT, ReplyStatus, record_to_encrypted

SECTIONS = ["federation", "data", "model", "training", "strategy", "secure_aggregation", "privacy", "simulation",
            "bogus"]
KEYS = ["rounds", "institutions", "seed", "source", "partition", "alpha", "name", "hidden", "local_epochs",
        "batch_size", "learning_rate", "mode", "target_epsilon", "delta", "max_grad_norm", "quantization_bits",
        "scale_bits", "coeff_mod_bit_sizes", "min_institutions", "value_bound", "poly_modulus_degree", "nope"]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-5, 100), max_size=6), st.sampled_from(["ckks", "none", "dp-sgd",
    "fedavg", "krum", "iid", "dirichlet", "mlp", "sklearn:breast_cancer"]),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(SECTIONS),
                       st.one_of(VALUES, st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5)), max_size=5))
def test_any_federation_document_loads_or_raises_a_fedqf_error(document: dict[str, object]) -> None:
    try:
        config_from_dict(document, source="fuzz.toml")
    except FedqfError as exc:
        assert str(exc).startswith("fuzz.toml")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=4))
def test_any_override_text_applies_or_raises_a_fedqf_error(overrides: list[str]) -> None:
    try:
        config_from_dict(apply_overrides({}, overrides), source="fuzz.toml")
    except FedqfError:
        pass


LAYOUT = ParameterLayout(names=("w",), shapes=((3,),))
_PARAMS = CkksParameters()
_SECRET = generate_context(_PARAMS)
_PUBLIC = load_public_context(serialize_public_context(_SECRET))

ARRAY = st.builds(
    lambda dtype, stype, data, shape: Array(dtype=dtype, shape=shape, stype=stype, data=data),
    st.sampled_from(["float32", "float64", "bytes", "int64", "<f4", "zz"]),
    st.sampled_from(["numpy.ndarray", "tenseal.CKKSVector", "other"]),
    st.binary(max_size=64),
    st.lists(st.integers(0, 8), max_size=2).map(tuple),
)
KEY = st.sampled_from(["w", "ckks.000000", "ckks.000001", "ckks.7", "fedqf.length", "fedqf.fingerprint", "x"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrays=st.dictionaries(KEY, ARRAY, max_size=4),
    metrics=st.dictionaries(st.sampled_from(["num-examples", "weight", "epsilon", "train-loss"]),
                            st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True)),
                            max_size=4),
    status=st.sampled_from(["ok", "budget-exhausted", "weird", ""]),
    mode=st.sampled_from([SecureAggregationMode.CKKS, SecureAggregationMode.NONE]),
)
def test_any_update_is_aggregated_or_rejected_never_crashes(
    arrays: dict[str, Array], metrics: dict[str, float], status: str, mode: SecureAggregationMode
) -> None:
    content = RecordDict({ARRAYS: ArrayRecord(arrays), METRICS: MetricRecord(metrics),
                          REPORT: ConfigRecord({"status": status, "institution": "fuzz"})})
    setup = AggregationSetup(mode=mode, layout=LAYOUT, public_context=_PUBLIC if mode is SecureAggregationMode.CKKS
                             else None, fingerprint=key_fingerprint(_PUBLIC))
    outcome = aggregate_train_replies(1, [reply_from(1, content)], setup)
    (report,) = outcome.reports
    if report.status is ReplyStatus.OK:
        assert outcome.arrays is not None or mode is SecureAggregationMode.NONE
    else:
        assert report.reason or status != "ok"


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(KEY, ARRAY, max_size=5))
def test_decoding_any_record_gives_a_vector_or_a_fedqf_error(arrays: dict[str, Array]) -> None:
    try:
        vector = record_to_encrypted(ArrayRecord(arrays))
    except FedqfError:
        return
    assert vector.chunks and isinstance(vector.length, int)


def test_fuzz_setup_is_sane() -> None:
    assert np.isfinite(_PARAMS.max_abs_value)
