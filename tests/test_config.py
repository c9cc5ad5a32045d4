"""Federation files: valid ones load into typed objects, every kind of bad input is one ConfigError."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fedqf.config import (
    FederationConfig,
    Partition,
    PrivacyMode,
    SecureAggregationMode,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
)
from fedqf.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_default_sandbox_loads_with_its_declared_settings() -> None:
    config = load_config(REPO / "fedqf" / "sandboxes" / "default.toml")
    assert config.federation.institutions == 3
    assert config.secure_aggregation.mode is SecureAggregationMode.CKKS
    assert config.privacy.mode is PrivacyMode.DP_SGD
    assert config.privacy.target_epsilon == 3.0
    assert config.privacy.delta == 1e-5
    assert config.data.partition is Partition.IID


def test_embedded_default_and_sandbox_folder_are_the_same_federation() -> None:
    embedded = load_config(REPO / "fedqf" / "sandboxes" / "default.toml")
    folder = load_config(REPO / "sandboxes" / "breast_cancer" / "federation.toml")
    assert embedded.to_dict() == folder.to_dict()


def test_overrides_replace_keys_with_typed_values(write_toml: Callable[[str], Path], default_toml: str) -> None:
    path = write_toml(default_toml)
    config = load_config(path, ["federation.rounds=2", "secure_aggregation.mode=none", "data.alpha=0.3"])
    assert config.federation.rounds == 2
    assert config.secure_aggregation.mode is SecureAggregationMode.NONE
    assert config.data.alpha == 0.3


def test_dump_then_load_round_trips(write_toml: Callable[[str], Path], default_toml: str) -> None:
    config = load_config(write_toml(default_toml))
    again = load_config(write_toml(dump_config(config), "again.toml"))
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("federation.color=1", "unknown key 'federation.color'"),
        ("federation.rounds=0", "'federation.rounds' must be >= 1"),
        ("federation.rounds='five'", "'federation.rounds' must be an integer"),
        ("federation.rounds=2.5", "'federation.rounds' must be an integer"),
        ("privacy.target_epsilon=0", "'privacy.target_epsilon' must be > 0"),
        ("privacy.target_epsilon=-1.0", "'privacy.target_epsilon' must be > 0"),
        ("privacy.delta=1.0", "'privacy.delta' must be > 0 and < 1"),
        ("privacy.delta=0", "'privacy.delta' must be > 0 and < 1"),
        ("data.alpha=0", "'data.alpha' must be > 0"),
        ("data.partition='stripes'", "'data.partition' must be one of 'iid', 'dirichlet'"),
        ("model.name='resnet'", "'model.name' must be one of 'mlp', 'logistic'"),
        ("strategy.name='fedsomething'", "unknown strategy 'fedsomething'"),
        ("secure_aggregation.mode='paillier'", "'secure_aggregation.mode' must be one of 'ckks', 'none'"),
        ("privacy.mode=true", "'privacy.mode' must be one of"),
        ("training.learning_rate=inf", "'training.learning_rate' must be a finite number"),
        ("model.hidden=[0]", "'model.hidden' must be a non-empty list of positive integers"),
        ("secure_aggregation.coeff_mod_bit_sizes=[60,60,60,60,60]", "[secure_aggregation] parameters are invalid"),
        ("nosection.key=1", "unknown section [nosection]"),
    ],
)
def test_bad_values_name_the_file_key_and_expectation(
    write_toml: Callable[[str], Path], default_toml: str, override: str, expected: str
) -> None:
    path = write_toml(default_toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    message = str(info.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize("strategy", ["fedmedian", "krum", "fedtrimmedavg"])
def test_strategies_that_see_individual_updates_are_refused_under_ckks(
    write_toml: Callable[[str], Path], default_toml: str, strategy: str
) -> None:
    path = write_toml(default_toml)
    with pytest.raises(ConfigError, match="cannot run with secure_aggregation.mode = 'ckks'.*each institution's update"):
        load_config(path, [f"strategy.name={strategy}"])
    # The same strategy is accepted in plaintext.
    config = load_config(path, [f"strategy.name={strategy}", "secure_aggregation.mode=none"])
    assert config.strategy.name == strategy


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")


def test_malformed_toml_is_a_config_error(write_toml: Callable[[str], Path]) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write_toml("[federation\nrounds = 3"))


def test_section_that_is_not_a_table_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"\[federation\] must be a table"):
        config_from_dict({"federation": 3})


def test_min_institutions_cannot_exceed_institutions() -> None:
    with pytest.raises(ConfigError, match="min_institutions' must be <= federation.institutions"):
        config_from_dict({"federation": {"institutions": 3, "min_institutions": 4}})


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("rounds")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("a.b.c=1")
    assert parse_override("data.source=sklearn:wine") == ("data", "source", "sklearn:wine")


def test_defaults_form_a_valid_federation() -> None:
    assert isinstance(config_from_dict({}), FederationConfig)


def test_institution_crypto_workers_default_to_the_usable_cpus_and_refuse_zero() -> None:
    import os

    from fedqf.cli import _crypto_workers

    assert _crypto_workers(None) == len(os.sched_getaffinity(0))
    assert _crypto_workers(3) == 3
    with pytest.raises(ConfigError, match="--crypto-workers must be at least 1"):
        _crypto_workers(0)
