"""The fedqf ClientApp: an institution's side of a round (train with DP-SGD, encrypt, decrypt, evaluate)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

import numpy as np
import numpy.typing as npt
import tenseal as ts
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from fedqf.config import FederationConfig, PrivacyMode, SecureAggregationMode, config_from_dict
from fedqf.crypto import decrypt, encrypt, key_fingerprint, load_private_context
from fedqf.data import InstitutionData, simulate_federation_data
from fedqf.errors import FedqfError, PrivacyBudgetExceededError
from fedqf.model import ParameterLayout, build_model, set_arrays
from fedqf.privacy import PrivacyLedger, plan_for
from fedqf.protocol import (
    ARRAYS,
    CONFIG,
    FEDERATION_TOML,
    METRICS,
    REPORT,
    TRAIN_METRIC_KEYS,
    ReplyStatus,
    aggregate_meta,
    encrypted_to_record,
    is_encrypted,
    record_to_encrypted,
)
from fedqf.trainer import DpSgdSettings, evaluate, train_local

STATE_MODEL = "fedqf.global-model"
STATE = "fedqf.state"


@dataclass(frozen=True)
class Institution:
    """What an institution brings to a round: its config, its data, and its CKKS secret context (if any)."""

    config: FederationConfig
    data: InstitutionData
    index: int
    secret_context: ts.Context | None

    @property
    def name(self) -> str:
        return f"institution-{self.index}"


@functools.lru_cache(maxsize=4)
def _parse_config(toml_text: str) -> FederationConfig:
    import tomllib

    return config_from_dict(tomllib.loads(toml_text), source="<federation sent by the coordinator>")


@functools.lru_cache(maxsize=4)
def _simulated_share(toml_text: str, base_dir: str, index: int, count: int) -> InstitutionData:
    config = _parse_config(toml_text)
    shares = simulate_federation_data(
        config.data, institutions=count, seed=config.federation.seed, base_dir=Path(base_dir) if base_dir else None
    )
    return shares.institutions[index]


@functools.lru_cache(maxsize=2)
def _secret_context(path: str) -> ts.Context:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise FedqfError(f"{path}: cannot read the CKKS secret context ({exc.strerror})") from exc
    return load_private_context(data)


def institution_from(message: Message, context: Context) -> Institution:
    """Resolve the institution in a simulation: its share of the data source, by partition id."""
    config_record = message.content.get(CONFIG)
    if not isinstance(config_record, ConfigRecord) or FEDERATION_TOML not in config_record:
        raise FedqfError("the instruction carries no federation config")
    toml_text = str(config_record[FEDERATION_TOML])
    config = _parse_config(toml_text)
    index = int(context.node_config["partition-id"])
    count = int(context.node_config["num-partitions"])
    data = _simulated_share(toml_text, str(context.run_config.get("fedqf-base-dir", "")), index, count)
    secret = None
    if config.secure_aggregation.mode is SecureAggregationMode.CKKS:
        secret = _secret_context(str(context.run_config["fedqf-secret-context"]))
    torch.set_num_threads(config.simulation.torch_threads)
    return Institution(config, data, index, secret)


def _model_for(inst: Institution) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(inst.config.federation.seed)
    return build_model(
        inst.config.model, num_features=inst.data.num_features, num_classes=inst.data.num_classes, generator=generator
    )


def _load_state(context: Context) -> tuple[int, list[npt.NDArray[np.float32]] | None, PrivacyLedger]:
    state = context.state.get(STATE)
    model = context.state.get(STATE_MODEL)
    if not isinstance(state, ConfigRecord):
        return -1, None, PrivacyLedger()
    ledger_state = {k[len("ledger.") :]: v for k, v in state.items() if k.startswith("ledger.")}
    ledger = PrivacyLedger.from_state(ledger_state) if ledger_state else PrivacyLedger()
    arrays = model.to_numpy_ndarrays() if isinstance(model, ArrayRecord) else None
    return int(state["round"]), arrays, ledger  # type: ignore[arg-type]


def _save_state(context: Context, *, model_round: int, arrays: list[npt.NDArray[np.float32]], ledger: PrivacyLedger) -> None:
    record = ConfigRecord({"round": model_round})
    for key, value in ledger.to_state().items():
        record[f"ledger.{key}"] = value
    context.state[STATE] = record
    context.state[STATE_MODEL] = ArrayRecord([np.asarray(a) for a in arrays])


def resolve_global_model(
    inst: Institution, record: ArrayRecord, state_round: int, state_arrays: list[npt.NDArray[np.float32]] | None
) -> tuple[int, list[npt.NDArray[np.float32]]]:
    """The global model w_t this instruction refers to, and t.

    A plaintext record is w_t itself. An encrypted record is the round-t sum S with sum_k a_k; it applies to
    w_{t-1}: w_t = w_{t-1} + Dec(S) / sum_k a_k. A sum already applied is not applied twice.
    """
    layout_model = _model_for(inst)
    layout = ParameterLayout.of(layout_model)
    if not is_encrypted(record):
        missing = [name for name in layout.names if name not in record]
        if missing:
            raise FedqfError(f"the global model lacks the arrays {missing}")
        arrays = [np.asarray(record[name].numpy(), dtype=np.float32) for name in layout.names]
        layout.flatten(arrays)  # checks every shape
        # Plaintext global weights carry no round: the institution simply adopts them.
        return max(state_round, 0), arrays
    aggregate_round, weight_sum = aggregate_meta(record)
    if aggregate_round == state_round and state_arrays is not None:
        return state_round, state_arrays
    if aggregate_round != state_round + 1 or state_arrays is None:
        raise FedqfError(
            f"this institution holds the global model of round {state_round}, but the aggregate is for round "
            f"{aggregate_round}; it cannot apply it (missed a round)"
        )
    if inst.secret_context is None:
        raise FedqfError("an encrypted aggregate arrived but this institution has no CKKS secret context")
    total = decrypt(inst.secret_context, record_to_encrypted(record))
    base = layout.flatten(state_arrays)
    return aggregate_round, layout.unflatten(base + total / weight_sum)


def _clip_l2(vector: npt.NDArray[np.float64], bound: float) -> npt.NDArray[np.float64]:
    """v * min(1, bound / ||v||_2): afterwards ||v||_2 <= bound, hence every |v_i| <= bound."""
    norm = float(np.linalg.norm(vector))
    return vector * min(1.0, bound / norm) if norm > 0 else vector


def _reply(message: Message, *, institution: str, arrays: ArrayRecord, metrics: dict[str, float],
           status: ReplyStatus, reason: str = "", fingerprint: str = "") -> Message:
    content = RecordDict(
        {
            ARRAYS: arrays,
            METRICS: MetricRecord({k: metrics[k] for k in TRAIN_METRIC_KEYS if k in metrics}),
            REPORT: ConfigRecord({"status": status.value, "reason": reason, "fingerprint": fingerprint,
                                  "institution": institution}),
        }
    )
    return Message(content, reply_to=message)


def train_round(inst: Institution, message: Message, context: Context) -> Message:
    """One round of local training: returns the (encrypted) update, or a refusal when the budget is spent."""
    config = inst.config
    state_round, state_arrays, ledger = _load_state(context)
    record = message.content[ARRAYS]
    assert isinstance(record, ArrayRecord)
    model_round, global_arrays = resolve_global_model(inst, record, state_round, state_arrays)
    config_record = message.content[CONFIG]
    server_round = int(config_record["server-round"])  # type: ignore[arg-type]
    train_data = inst.data.train
    dp: DpSgdSettings | None = None
    metrics: dict[str, float] = {"num-examples": float(len(train_data))}
    if config.privacy.mode is PrivacyMode.DP_SGD:
        plan = plan_for(
            dataset_size=len(train_data),
            batch_size=config.training.batch_size,
            local_epochs=config.training.local_epochs,
            rounds=config.privacy.planned_rounds or config.federation.rounds,
            target_epsilon=config.privacy.target_epsilon,
            delta=config.privacy.delta,
            max_grad_norm=config.privacy.max_grad_norm,
        )
        noise = plan.calibrate()
        try:
            ledger.ensure_within_budget(
                noise_multiplier=noise,
                sample_rate=plan.sample_rate,
                steps=plan.steps_per_round,
                target_epsilon=config.privacy.target_epsilon,
                delta=config.privacy.delta,
            )
        except PrivacyBudgetExceededError as exc:
            _save_state(context, model_round=model_round, arrays=global_arrays, ledger=ledger)
            metrics["epsilon"] = ledger.epsilon(delta=config.privacy.delta)
            log(WARNING, "institution %d refuses round %d: %s", inst.index, server_round, exc)
            return _reply(message, institution=inst.name, arrays=ArrayRecord(), metrics=metrics, status=ReplyStatus.BUDGET_EXHAUSTED,
                          reason=str(exc))
        dp = DpSgdSettings(noise_multiplier=noise, max_grad_norm=config.privacy.max_grad_norm,
                           secure_mode=config.privacy.secure_rng)
    model = _model_for(inst)
    set_arrays(model, global_arrays)
    generator = torch.Generator().manual_seed(config.federation.seed * 1_000_003 + inst.index * 1009 + server_round)
    proximal_mu = float(config_record.get("proximal-mu", 0.0))  # type: ignore[arg-type]
    result = train_local(model, train_data, training=config.training, dp=dp, generator=generator,
                         ledger=ledger, proximal_mu=proximal_mu)
    if dp is not None:
        metrics.update(
            {
                "epsilon": ledger.epsilon(delta=config.privacy.delta),
                "noise-multiplier": dp.noise_multiplier,
                "sample-rate": result.sample_rate,
            }
        )
    metrics.update({"steps": float(result.steps), "train-loss": result.loss, "train-seconds": result.seconds})
    layout = ParameterLayout.of(model)
    weight = len(train_data) / config.secure_aggregation.weight_unit
    metrics["weight"] = weight
    fingerprint = ""
    if config.secure_aggregation.mode is SecureAggregationMode.CKKS:
        assert inst.secret_context is not None
        start = time.perf_counter()
        delta = _clip_l2(layout.flatten(result.arrays) - layout.flatten(global_arrays), config.secure_aggregation.delta_clip)
        encrypted = encrypt(inst.secret_context, weight * delta, bound=weight * config.secure_aggregation.delta_clip)
        out = encrypted_to_record(encrypted)
        fingerprint = encrypted.fingerprint
        metrics["encrypt-seconds"] = time.perf_counter() - start
        metrics["bytes-sent"] = float(encrypted.nbytes)
    else:
        out = ArrayRecord({n: Array(a) for n, a in zip(layout.names, result.arrays)})
        metrics["bytes-sent"] = float(sum(a.nbytes for a in result.arrays))
    _save_state(context, model_round=model_round, arrays=global_arrays, ledger=ledger)
    return _reply(message, institution=inst.name, arrays=out, metrics=metrics, status=ReplyStatus.OK, fingerprint=fingerprint)


def evaluate_round(inst: Institution, message: Message, context: Context) -> Message:
    """Evaluate the global model of this round on the institution's validation split."""
    state_round, state_arrays, ledger = _load_state(context)
    record = message.content[ARRAYS]
    assert isinstance(record, ArrayRecord)
    model_round, global_arrays = resolve_global_model(inst, record, state_round, state_arrays)
    _save_state(context, model_round=model_round, arrays=global_arrays, ledger=ledger)
    model = _model_for(inst)
    set_arrays(model, global_arrays)
    result = evaluate(model, inst.data.validation)
    metrics = MetricRecord({"num-examples": result.num_examples, "loss": result.loss, "accuracy": result.accuracy})
    return Message(RecordDict({METRICS: metrics}), reply_to=message)


def release_round(inst: Institution, message: Message, context: Context) -> Message:
    """Release the final global model in plaintext: the federation's declared output."""
    state_round, state_arrays, ledger = _load_state(context)
    record = message.content[ARRAYS]
    assert isinstance(record, ArrayRecord)
    model_round, global_arrays = resolve_global_model(inst, record, state_round, state_arrays)
    _save_state(context, model_round=model_round, arrays=global_arrays, ledger=ledger)
    layout = ParameterLayout.of(_model_for(inst))
    log(WARNING, "institution %d releases the global model of round %d to the coordinator", inst.index, model_round)
    content = RecordDict(
        {
            ARRAYS: ArrayRecord({n: Array(a) for n, a in zip(layout.names, global_arrays)}),
            REPORT: ConfigRecord({"status": ReplyStatus.OK.value, "round": model_round}),
        }
    )
    return Message(content, reply_to=message)


app = ClientApp()


@app.train()
def _train(message: Message, context: Context) -> Message:
    return train_round(institution_from(message, context), message, context)


@app.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    return evaluate_round(institution_from(message, context), message, context)


@app.query()
def _query(message: Message, context: Context) -> Message:
    return release_round(institution_from(message, context), message, context)


def fingerprint_of(context: ts.Context) -> str:
    return key_fingerprint(context)
