"""An institution's state machine: applying aggregates once, in order, and catching up on missed rounds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from fedqf.config import config_from_dict
from fedqf.crypto import (
    EncryptedSum,
    encrypt,
    generate_context,
    key_fingerprint,
    load_public_context,
    serialize_public_context,
)
from fedqf.data import simulate_federation_data
from fedqf.errors import FedqfError
from fedqf.institution import Institution, InstitutionState, evaluate_round
from fedqf.model import ParameterLayout
from fedqf.packing import ckks_parameters_of
from fedqf.protocol import AGGREGATE_ROUND, ARRAYS, REPORT, WEIGHT_SUM, encrypted_to_record


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    config = config_from_dict({"federation": {"institutions": 2, "seed": 3}, "privacy": {"mode": "none"}})
    secret = generate_context(ckks_parameters_of(config))
    data = simulate_federation_data(config.data, institutions=2, seed=3)
    inst = Institution(config, data.institutions[0], "a", 0, secret)
    layout = ParameterLayout.of(inst.model())
    initial = ArrayRecord({n: Array(t.detach().numpy().copy()) for n, t in inst.model().state_dict().items()})
    public = load_public_context(serialize_public_context(secret))
    rng = np.random.default_rng(0)
    aggregates = {}
    for r in (1, 2, 3):
        running = EncryptedSum(public, length=layout.size, fingerprint=key_fingerprint(public))
        for _ in range(2):
            running.add(encrypt(secret, rng.uniform(-0.1, 0.1, layout.size), bound=0.1))
        aggregates[r] = encrypted_to_record(running.result(), extra={AGGREGATE_ROUND: np.array([r]),
                                                                     WEIGHT_SUM: np.array([2.0])})
    return inst, layout, initial, aggregates


def _content(main: ArrayRecord, **extra: ArrayRecord) -> RecordDict:
    return RecordDict({ARRAYS: main, **extra})


def test_a_lagging_institution_catches_up_to_the_same_model(setup) -> None:  # type: ignore[no-untyped-def]
    inst, layout, initial, aggregates = setup
    steady = InstitutionState()
    for record in (initial, aggregates[1], aggregates[2], aggregates[3]):
        evaluate_round(inst, steady, _content(record))
        evaluate_round(inst, steady, _content(record))  # a repeated instruction is not applied twice
    assert steady.model_round == 3

    lagging = InstitutionState()
    evaluate_round(inst, lagging, _content(initial))
    with pytest.raises(FedqfError, match="missed a round"):
        evaluate_round(inst, InstitutionState(lagging.model_round, lagging.global_arrays), _content(aggregates[3]))
    evaluate_round(inst, lagging, _content(aggregates[3], **{"fedqf.catchup.000001": aggregates[1],
                                                           "fedqf.catchup.000002": aggregates[2]}))
    assert lagging.model_round == 3
    np.testing.assert_array_equal(layout.flatten(lagging.global_arrays), layout.flatten(steady.global_arrays))


def test_a_new_institution_starts_from_the_initial_model(setup) -> None:  # type: ignore[no-untyped-def]
    inst, layout, initial, aggregates = setup
    fresh = InstitutionState()
    evaluate_round(inst, fresh, _content(aggregates[2], **{"fedqf.catchup.initial": initial,
                                                         "fedqf.catchup.000001": aggregates[1]}))
    reference = InstitutionState()
    for record in (initial, aggregates[1], aggregates[2]):
        evaluate_round(inst, reference, _content(record))
    np.testing.assert_array_equal(layout.flatten(fresh.global_arrays), layout.flatten(reference.global_arrays))


def test_state_round_trips_through_the_state_directory(setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    inst, layout, initial, aggregates = setup
    state = InstitutionState()
    evaluate_round(inst, state, _content(initial))
    evaluate_round(inst, state, _content(aggregates[1]))
    state.ledger.record(noise_multiplier=1.3, sample_rate=0.25, steps=8)
    state.save(tmp_path)
    again = InstitutionState.load(tmp_path)
    assert again.model_round == 1
    assert again.ledger.epsilon(delta=1e-5) == state.ledger.epsilon(delta=1e-5)
    np.testing.assert_array_equal(layout.flatten(again.global_arrays), layout.flatten(state.global_arrays))
    (tmp_path / "state.json").write_text("{broken")
    with pytest.raises(FedqfError, match="refusing to start rather than forget the privacy budget"):
        InstitutionState.load(tmp_path)


def test_a_repeated_train_instruction_gets_the_same_update_without_new_spend(setup) -> None:  # type: ignore[no-untyped-def]
    from flwr.app import ConfigRecord

    from fedqf.config import dump_config
    from fedqf.institution import train_round

    inst, _, initial, _ = setup
    dp_config = config_from_dict({"federation": {"institutions": 2, "seed": 3}})
    dp_inst = Institution(dp_config, inst.data, "a", 0, inst.secret_context)
    state = InstitutionState()
    content = RecordDict({ARRAYS: initial, "config": ConfigRecord({"server-round": 1,
                                                                    "fedqf.federation": dump_config(dp_config)})})
    first = train_round(dp_inst, state, content)
    spent = state.ledger.epsilon(delta=1e-5)
    again = train_round(dp_inst, state, content)
    assert again is first
    assert state.ledger.epsilon(delta=1e-5) == spent > 0
    content_round_2 = RecordDict({ARRAYS: initial, "config": ConfigRecord({"server-round": 2,
                                                                            "fedqf.federation": dump_config(dp_config)})})
    train_round(dp_inst, state, content_round_2)
    assert state.ledger.epsilon(delta=1e-5) > spent


def test_a_restarted_daemon_neither_retrains_a_sent_round_nor_records_a_spend_twice(setup, tmp_path,  # type: ignore[no-untyped-def]
                                                                                    monkeypatch) -> None:
    from flwr.app import ConfigRecord
    from flwr.common.serde import recorddict_to_proto

    from fedqf import institution
    from fedqf.config import dump_config
    from fedqf.institution import train_round

    inst, _, initial, _ = setup
    # One planned round: its spend uses the whole budget, so a retrain that checked the budget again would be refused.
    dp_config = config_from_dict({"federation": {"institutions": 2, "seed": 3, "rounds": 1}})
    dp_inst = Institution(dp_config, inst.data, "a", 0, inst.secret_context)
    content = RecordDict({ARRAYS: initial, "config": ConfigRecord({"server-round": 1,
                                                                    "fedqf.federation": dump_config(dp_config)})})

    def persist(state: InstitutionState) -> None:
        state.save(tmp_path)

    # Killed while training: the planned spend is recorded and persisted, nothing is released.
    real_train = institution.train_local

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed mid-training")

    monkeypatch.setattr(institution, "train_local", killed)
    with pytest.raises(KeyboardInterrupt):
        train_round(dp_inst, InstitutionState.load(tmp_path), content, persist=persist)
    after_kill = InstitutionState.load(tmp_path)
    one_round = after_kill.ledger.total_steps
    assert one_round > 0 and after_kill.spent_round == (1, 0) and after_kill.last_update is None

    # Restarted and asked again: it trains the round, and the ledger still holds one round's spend. Saving the reply
    # fails the first time: that reply never leaves, and is not resent later either.
    monkeypatch.setattr(institution, "train_local", real_train)

    def disk_full(state: InstitutionState) -> None:
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        train_round(dp_inst, after_kill, content, persist=disk_full)
    assert after_kill.last_update is None
    first = train_round(dp_inst, after_kill, content, persist=persist)
    assert first[REPORT]["status"] == "ok", first[REPORT]["reason"]
    assert after_kill.ledger.total_steps == one_round
    saved = list(tmp_path.glob("last-reply-*.bin"))
    assert [p.name for p in saved] == ["last-reply-000001-000000.bin"]  # the rounds it answers, one file kept
    assert oct(saved[0].stat().st_mode & 0o777) == "0o600"

    # Killed after the reply was persisted: restarted, it resends the same bytes and spends nothing.
    monkeypatch.setattr(institution, "train_local", killed)
    restarted = InstitutionState.load(tmp_path)
    again = train_round(dp_inst, restarted, content, persist=persist)
    assert recorddict_to_proto(again).SerializeToString() == recorddict_to_proto(first).SerializeToString()
    assert InstitutionState.load(tmp_path).ledger.total_steps == one_round


def test_a_simulation_worker_splits_the_federation_data_once_for_all_its_institutions(monkeypatch) -> None:
    import fedqf.data
    from fedqf import institution

    calls: list[int] = []
    real = fedqf.data.simulate_federation_data

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs["institutions"])
        return real(*args, **kwargs)

    monkeypatch.setattr(fedqf.data, "simulate_federation_data", counting)
    institution._simulated_federation.cache_clear()
    toml_text = '[federation]\nname = "share-cache"\ninstitutions = 3\nseed = 5\n[data]\nsource = "synthetic"\nsamples = 300\n'
    shares = [institution._simulated_share(toml_text, "", k, 3) for k in (0, 1, 2, 0)]
    assert calls == [3]
    expected = real(institution.parse_federation(toml_text).data, institutions=3, seed=5)
    for share, k in zip(shares, (0, 1, 2, 0)):
        np.testing.assert_array_equal(share.train.features, expected.institutions[k].train.features)
    assert len({id(s) for s in shares[:3]}) == 3


def test_synthetic_data_is_generated_on_one_blas_thread(monkeypatch) -> None:
    import sklearn.datasets
    from threadpoolctl import threadpool_info

    from fedqf.config import DataSection
    from fedqf.data import load_table

    seen: list[int] = []
    real = sklearn.datasets.make_classification

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.extend(info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas")
        return real(*args, **kwargs)

    monkeypatch.setattr(sklearn.datasets, "make_classification", recording)
    table = load_table(DataSection(source="synthetic", samples=200, features=8, classes=2), seed=1)
    assert table.features.shape == (200, 8)
    assert seen and set(seen) == {1}


def test_institutions_in_one_process_decrypt_an_aggregate_once(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from fedqf import institution

    alone_inst, layout, initial, aggregates = setup
    inst = dataclasses.replace(alone_inst, shares_process=True)  # as a simulation worker makes them
    other = Institution(inst.config, simulate_federation_data(inst.config.data, institutions=2, seed=3).institutions[1],
                        "b", 1, inst.secret_context, shares_process=True)
    calls: list[int] = []
    real = institution.decrypt

    def counting(ctx, enc, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(enc.length)
        return real(ctx, enc, **kwargs)

    monkeypatch.setattr(institution, "decrypt", counting)
    monkeypatch.setattr(institution, "_last_decryption", None)
    states = [InstitutionState(), InstitutionState()]
    for member, state in zip((inst, other), states):
        evaluate_round(member, state, _content(initial))
        evaluate_round(member, state, _content(aggregates[1]))
    assert calls == [layout.size]  # the second institution found the first one's decryption
    expected = layout.flatten(states[0].global_arrays)
    np.testing.assert_array_equal(layout.flatten(states[1].global_arrays), expected)
    # what it found is what decrypting it itself gives
    monkeypatch.setattr(institution, "_last_decryption", None)
    alone = InstitutionState()
    evaluate_round(other, alone, _content(initial))
    evaluate_round(other, alone, _content(aggregates[1]))
    np.testing.assert_array_equal(layout.flatten(alone.global_arrays), expected)
    assert len(calls) == 2
    # another aggregate (other ciphertext bytes) is decrypted again, and so is one with other weights
    evaluate_round(other, alone, _content(aggregates[2]))
    assert len(calls) == 3
    base = alone.global_arrays
    reweighted = ArrayRecord(dict(aggregates[3].items()))
    reweighted[WEIGHT_SUM] = Array(np.array([4.0]))
    halves = []
    for record in (aggregates[3], reweighted):
        state = InstitutionState(2, base)
        evaluate_round(other, state, _content(record))
        halves.append(layout.flatten(state.global_arrays) - layout.flatten(base))
    assert len(calls) == 5
    np.testing.assert_allclose(halves[1], halves[0] / 2, atol=1e-6)
    # an institution that has its process to itself (a daemon) neither keeps nor reuses a decryption
    monkeypatch.setattr(institution, "_last_decryption", None)
    for _ in range(2):
        state = InstitutionState(2, base)
        evaluate_round(alone_inst, state, _content(aggregates[3]))
    assert len(calls) == 7 and institution._last_decryption is None
