"""The federation file: one TOML document, validated on load into frozen, typed objects."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from fedqf.errors import ConfigError


class Partition(str, Enum):
    """How a data source is split across institutions in a simulation."""

    IID = "iid"
    DIRICHLET = "dirichlet"


class ModelName(str, Enum):
    """Models fedqf can build; all are written without in-place ops so Opacus can hook them."""

    MLP = "mlp"
    LOGISTIC = "logistic"
    RESNET18 = "resnet18"  # ResNet-18 with GroupNorm for 3x32x32 images (features are the flattened pixels)


class Device(str, Enum):
    """Where an institution's workers train: one GPU per worker (NCCL), CPU (gloo), or GPUs when present."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class GradSampleMode(str, Enum):
    """How Opacus computes per-record gradient norms under DP-SGD; GHOST is ghost clipping (no per-record
    gradients stored: their norms come from activations and output gradients, for the layers Opacus supports)."""

    HOOKS = "hooks"
    FUNCTORCH = "functorch"
    EW = "ew"
    GHOST = "ghost"
    # fedqf's own (fedqf.bookkeeping): clipped sums in one backward pass, no per-record gradients stored, for
    # Linear, Conv2d, GroupNorm and LayerNorm layers; Opacus's noise, sampling and accounting.
    BOOKKEEPING = "bookkeeping"


class SecureAggregationMode(str, Enum):
    """Whether updates are summed under CKKS encryption or in the clear."""

    CKKS = "ckks"
    NONE = "none"


class PrivacyMode(str, Enum):
    """Whether institutions train with DP-SGD."""

    DP_SGD = "dp-sgd"
    NONE = "none"


@dataclass(frozen=True)
class FederationSection:
    name: str = "federation"
    rounds: int = 5
    institutions: int = 3
    seed: int = 0
    min_institutions: int = 0  # 0 means "all institutions"
    round_timeout: float = 600.0
    # How long round 1 waits for every institution before starting with the minimum; and how long any round start
    # waits for the minimum to be connected before the federation stops (resumable with --resume).
    join_timeout: float = 120.0
    # Times a round is extended by round_timeout, asking the institutions that have not answered again, when fewer
    # than min_institutions answered by its deadline; then the run ends, saying why.
    round_retries: int = 1
    # Largest update (bytes of arrays and config values) the coordinator accepts; larger ones are rejected unread.
    # 0: derived from the model (twice a well-formed update of this model and CKKS parameter set, plus 64 KiB).
    max_update_bytes: int = 0

    @property
    def required_institutions(self) -> int:
        return self.min_institutions or self.institutions


@dataclass(frozen=True)
class DataSection:
    source: str = "sklearn:breast_cancer"
    partition: Partition = Partition.IID
    alpha: float = 0.5
    target: str = "target"
    test_fraction: float = 0.2
    validation_fraction: float = 0.2
    # source = "synthetic": scikit-learn's make_classification, generated locally from federation.seed
    samples: int = 10_000
    features: int = 64
    classes: int = 10


@dataclass(frozen=True)
class ModelSection:
    name: ModelName = ModelName.MLP
    hidden: tuple[int, ...] = (32,)
    # Input and output sizes. A simulation reads them off its data source (0); a deployed coordinator holds no
    # data, so a deployment's file must set them, and every institution's table is checked against them.
    num_features: int = 0
    num_classes: int = 0


@dataclass(frozen=True)
class TrainingSection:
    local_epochs: int = 1
    batch_size: int = 32  # the institution's (expected) batch per step, whatever the number of workers
    learning_rate: float = 0.1
    momentum: float = 0.0
    # Local training runs as a torch.distributed group of this many processes per node (one per GPU with NCCL,
    # gloo on CPU); `fedqf institution --workers N` overrides it. A local matter: not part of the agreement.
    workers: int = 1
    device: Device = Device.AUTO
    grad_sample_mode: GradSampleMode = GradSampleMode.HOOKS


@dataclass(frozen=True)
class StrategySection:
    name: str = "fedavg"  # a name registered under the `fedqf.strategies` entry-point group
    proximal_mu: float = 0.01
    trim_fraction: float = 0.2
    krum_byzantine: int = 0
    # Plaintext only: reject an update whose weights lie farther than this (L2) from the global model it started
    # from; 0 turns the check off. Under CKKS institutions clip their deltas and the coordinator sees no values.
    max_update_norm: float = 0.0


@dataclass(frozen=True)
class SecureAggregationSection:
    mode: SecureAggregationMode = SecureAggregationMode.CKKS
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    scale_bits: int = 40
    delta_clip: float = 1.0
    weight_unit: int = 1000
    # Packing (BatchCrypt-style): 0 encrypts each weighted delta value as one encoded real (two per complex CKKS
    # slot); b > 0 quantizes each to b bits in [-value_bound, value_bound] and packs several into each plaintext
    # coefficient with headroom for max_institutions (fedqf.packing).
    quantization_bits: int = 0
    value_bound: float = 0.5
    max_institutions: int = 0  # 0 means federation.institutions
    # An encrypted update (and aggregate) larger than this many MiB travels in blocks of at most this size, one
    # Flower message each, so no process holds a whole large update (fedqf.blocks); 0 sends it in one message.
    block_mib: float = 64.0


@dataclass(frozen=True)
class PrivacySection:
    mode: PrivacyMode = PrivacyMode.DP_SGD
    target_epsilon: float = 3.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    secure_rng: bool = False
    # Seed DP noise and Poisson sampling from the federation seed. Anyone holding the config could then
    # regenerate the noise, so this is for reproducible research only; by default both come from OS entropy.
    reproducible_noise: bool = False
    planned_rounds: int = 0  # rounds the budget is spread over; 0 means federation.rounds


@dataclass(frozen=True)
class SimulationSection:
    cpus_per_institution: int = 1
    torch_threads: int = 1


@dataclass(frozen=True)
class FederationConfig:
    """A whole federation: what `fedqf simulate` and `fedqf coordinator` run."""

    federation: FederationSection = field(default_factory=FederationSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    secure_aggregation: SecureAggregationSection = field(default_factory=SecureAggregationSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    simulation: SimulationSection = field(default_factory=SimulationSection)
    source: str = "<defaults>"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The config as plain TOML-able data (enums as their values, tuples as lists)."""
        out: dict[str, dict[str, Any]] = {}
        for section in _SECTIONS:
            values = {}
            for f in dataclasses.fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                if isinstance(value, Enum):
                    value = value.value
                elif isinstance(value, tuple):
                    value = list(value)
                values[f.name] = value
            out[section] = values
        return out


_SECTIONS: tuple[str, ...] = (
    "federation",
    "data",
    "model",
    "training",
    "strategy",
    "secure_aggregation",
    "privacy",
    "simulation",
)
_SECTION_TYPES: dict[str, type[Any]] = {
    "federation": FederationSection,
    "data": DataSection,
    "model": ModelSection,
    "training": TrainingSection,
    "strategy": StrategySection,
    "secure_aggregation": SecureAggregationSection,
    "privacy": PrivacySection,
    "simulation": SimulationSection,
}

# (low, high, low_inclusive, high_inclusive) per numeric key; None is unbounded.
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "federation.rounds": (1, 100_000, True, True),
    "federation.institutions": (1, 10_000, True, True),
    "federation.min_institutions": (0, 10_000, True, True),
    "federation.round_timeout": (0, None, False, True),
    "federation.join_timeout": (0, None, True, True),
    "federation.round_retries": (0, 1000, True, True),
    "federation.max_update_bytes": (0, None, True, True),
    "data.alpha": (0, None, False, True),
    "data.test_fraction": (0, 1, True, False),
    "data.validation_fraction": (0, 1, True, False),
    "data.samples": (10, 10_000_000, True, True),
    "data.features": (2, 100_000, True, True),
    "data.classes": (2, 1000, True, True),
    "model.num_features": (0, None, True, True),
    "model.num_classes": (0, None, True, True),
    "training.local_epochs": (1, 10_000, True, True),
    "training.batch_size": (1, None, True, True),
    "training.learning_rate": (0, None, False, True),
    "training.momentum": (0, 1, True, False),
    "training.workers": (1, 1024, True, True),
    "strategy.proximal_mu": (0, None, True, True),
    "strategy.trim_fraction": (0, 0.5, True, False),
    "strategy.krum_byzantine": (0, None, True, True),
    "strategy.max_update_norm": (0, None, True, True),
    "secure_aggregation.poly_modulus_degree": (4096, 32768, True, True),
    "secure_aggregation.scale_bits": (20, 60, True, True),
    "secure_aggregation.delta_clip": (0, None, False, True),
    "secure_aggregation.weight_unit": (1, None, True, True),
    "secure_aggregation.quantization_bits": (0, 24, True, True),
    "secure_aggregation.value_bound": (0, None, False, True),
    "secure_aggregation.max_institutions": (0, 10_000, True, True),
    "secure_aggregation.block_mib": (0, 1_048_576, True, True),
    "privacy.target_epsilon": (0, None, False, True),
    "privacy.delta": (0, 1, False, False),
    "privacy.max_grad_norm": (0, None, False, True),
    "privacy.planned_rounds": (0, 100_000, True, True),
    "simulation.cpus_per_institution": (1, 1024, True, True),
    "simulation.torch_threads": (1, 256, True, True),
}


def _describe_range(low: float | None, high: float | None, low_inc: bool, high_inc: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>=' if low_inc else '>'} {low:g}")
    if high is not None:
        parts.append(f"{'<=' if high_inc else '<'} {high:g}")
    return " and ".join(parts)


def _coerce(where: str, key: str, value: Any, default: Any) -> Any:
    """Check `value` against the type of `default` and return it in that type."""
    expected = type(default)
    if isinstance(default, Enum):
        allowed = ", ".join(repr(m.value) for m in type(default))
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key '{key}' must be one of {allowed}, got {value!r}")
        try:
            return type(default)(value.lower())
        except ValueError:
            raise ConfigError(f"{where}: key '{key}' must be one of {allowed}, got {value!r}") from None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key '{key}' must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: key '{key}' must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: key '{key}' must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{where}: key '{key}' must be a finite number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: key '{key}' must be a non-empty string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where}: key '{key}' must be a non-empty list of positive integers, got {value!r}")
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise ConfigError(
                    f"{where}: key '{key}' must be a non-empty list of positive integers, got {value!r}"
                )
        return tuple(value)
    raise ConfigError(f"{where}: key '{key}' has unsupported type {expected.__name__}")  # pragma: no cover


def _check_range(where: str, key: str, value: Any) -> None:
    bounds = _RANGES.get(key)
    if bounds is None:
        return
    low, high, low_inc, high_inc = bounds
    ok = True
    if low is not None:
        ok = ok and (value >= low if low_inc else value > low)
    if high is not None:
        ok = ok and (value <= high if high_inc else value < high)
    if not ok:
        raise ConfigError(f"{where}: key '{key}' must be {_describe_range(*bounds)}, got {value!r}")


def _build_section(where: str, name: str, raw: Any) -> Any:
    cls = _SECTION_TYPES[name]
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: [{name}] must be a table, got {raw!r}")
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        if key not in known:
            raise ConfigError(
                f"{where}: unknown key '{dotted}'; expected one of {', '.join(sorted(known))}"
            )
        coerced = _coerce(where, dotted, value, getattr(defaults, key))
        _check_range(where, dotted, coerced)
        values[key] = coerced
    return cls(**values)


def _cross_check(where: str, config: FederationConfig) -> None:
    """Rules that span several keys."""
    fed = config.federation
    if fed.min_institutions > fed.institutions:
        raise ConfigError(
            f"{where}: key 'federation.min_institutions' must be <= federation.institutions "
            f"({fed.institutions}), got {fed.min_institutions}"
        )
    if config.data.test_fraction + config.data.validation_fraction >= 0.9:
        raise ConfigError(
            f"{where}: keys 'data.test_fraction' + 'data.validation_fraction' must leave at least 10% "
            f"of the data for training, got {config.data.test_fraction} + {config.data.validation_fraction}"
        )
    from fedqf.registry import load_strategy_class, strategy_names

    strategy = config.strategy.name
    try:
        strategy_class = load_strategy_class(strategy)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if config.secure_aggregation.mode is SecureAggregationMode.CKKS and getattr(
        strategy_class, "needs_individual_updates", False
    ):
        usable = [n for n in strategy_names() if not getattr(load_strategy_class(n), "needs_individual_updates", False)]
        raise ConfigError(
            f"{where}: key 'strategy.name' = '{strategy}' cannot run with secure_aggregation.mode = 'ckks': "
            "it must see each institution's update, and under CKKS the coordinator only ever sees their "
            f"encrypted sum; expected one of {', '.join(repr(n) for n in usable)}, or secure_aggregation.mode = 'none'"
        )
    sa = config.secure_aggregation
    if sa.mode is SecureAggregationMode.CKKS:
        # The parameter set itself is validated by fedqf.crypto, which knows SEAL's limits.
        from fedqf.crypto import CkksParameters

        try:
            params = CkksParameters(
                poly_modulus_degree=sa.poly_modulus_degree,
                coeff_mod_bit_sizes=sa.coeff_mod_bit_sizes,
                global_scale_bits=sa.scale_bits,
            )
        except Exception as exc:  # CryptoError, with the reason
            raise ConfigError(f"{where}: [secure_aggregation] parameters are invalid: {exc}") from exc
        if sa.max_institutions and sa.max_institutions < fed.institutions:
            raise ConfigError(
                f"{where}: key 'secure_aggregation.max_institutions' ({sa.max_institutions}) must be >= "
                f"federation.institutions ({fed.institutions}): the packing needs headroom for every contributor"
            )
        if sa.quantization_bits:
            from fedqf.packing import PackingScheme

            try:
                PackingScheme.design(params, bits=sa.quantization_bits,
                                     max_contributors=sa.max_institutions or fed.institutions,
                                     value_bound=sa.value_bound)
            except Exception as exc:
                raise ConfigError(f"{where}: [secure_aggregation] packing cannot work: {exc}") from exc


def config_from_dict(raw: Mapping[str, Any], *, source: str = "<dict>") -> FederationConfig:
    """Validate a parsed TOML document; raises ConfigError naming the file, the key and what was expected."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a TOML table at the top level")
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _SECTION_TYPES:
            raise ConfigError(
                f"{source}: unknown section [{name}]; expected one of {', '.join('[' + s + ']' for s in _SECTIONS)}"
            )
        sections[name] = _build_section(source, name, value)
    config = FederationConfig(**sections, source=source)
    _cross_check(source, config)
    return config


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse `section.key=value`; the value is read as a TOML literal, else as a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    dotted, value_text = text.split("=", 1)
    dotted = dotted.strip()
    if dotted.count(".") != 1 or not all(dotted.split(".")):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. federation.rounds=3")
    section, key = dotted.split(".")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return section, key, value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `section.key=value` override applied."""
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        table = merged.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {text!r}: [{section}] is not a table")
        table[key] = value
    return merged


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; a missing, unreadable or malformed file is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; expected a federation TOML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the federation file ({exc})") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


def load_config(path: Path, overrides: Sequence[str] = ()) -> FederationConfig:
    """Load and validate a federation file, applying `--set` overrides first."""
    raw = apply_overrides(read_toml(path), overrides)
    return config_from_dict(raw, source=str(path))


def dump_config(config: FederationConfig) -> str:
    """The config as TOML text (every key, defaults included), for the run directory."""
    lines: list[str] = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)
