"""Tabular data for institutions: loading (pandas, scikit-learn), schema checks, splits and partitions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from fedqf.config import DataSection, Partition
from fedqf.errors import DataError

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

_SKLEARN_DATASETS = ("breast_cancer", "wine", "iris", "digits")


@dataclass(frozen=True)
class Dataset:
    """Features (float32, standardized) and integer class labels."""

    features: FloatArray
    labels: IntArray

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.labels.ndim != 1 or len(self.features) != len(self.labels):
            raise DataError(
                f"features must be 2-D and labels 1-D of the same length, got {self.features.shape} "
                f"and {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: npt.NDArray[np.int64]) -> Dataset:
        return Dataset(self.features[index], self.labels[index])


@dataclass(frozen=True)
class Table:
    """A whole labelled table before it is split: raw features and labels, plus its class count."""

    features: FloatArray
    labels: IntArray
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])


@dataclass(frozen=True)
class InstitutionData:
    """What one institution holds: its training and validation splits, standardized with its own statistics."""

    train: Dataset
    validation: Dataset
    num_features: int
    num_classes: int


def _load_sklearn(name: str) -> Table:
    from sklearn import datasets

    if name not in _SKLEARN_DATASETS:
        raise DataError(
            f"data.source 'sklearn:{name}' is unknown; expected one of "
            + ", ".join(f"'sklearn:{n}'" for n in _SKLEARN_DATASETS)
        )
    bunch = getattr(datasets, f"load_{name}")()
    features = np.asarray(bunch.data, dtype=np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return Table(features, labels, int(labels.max()) + 1)


def read_table_file(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet table with pandas; a missing or unreadable file is a DataError."""
    if not path.exists():
        raise DataError(f"{path}: data file not found; expected a CSV or Parquet table")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".txt"):
            return pd.read_csv(path)
    except Exception as exc:  # pandas raises many types for unreadable files
        raise DataError(f"{path}: cannot read the table ({exc.__class__.__name__}: {exc})") from exc
    raise DataError(f"{path}: unsupported file type '{suffix}'; expected .csv or .parquet")


def table_from_frame(frame: pd.DataFrame, *, target: str, where: str) -> Table:
    """Check the schema (target column present, numeric features, no missing values) and convert."""
    if target not in frame.columns:
        raise DataError(
            f"{where}: target column '{target}' is missing; columns are {', '.join(map(str, frame.columns))}"
        )
    feature_frame = frame.drop(columns=[target])
    if feature_frame.shape[1] == 0:
        raise DataError(f"{where}: no feature columns besides the target '{target}'")
    non_numeric = [str(c) for c in feature_frame.columns if not pd.api.types.is_numeric_dtype(feature_frame[c])]
    if non_numeric:
        raise DataError(f"{where}: feature columns must be numeric; not numeric: {', '.join(non_numeric)}")
    missing = [str(c) for c in frame.columns if frame[c].isna().any()]
    if missing:
        raise DataError(f"{where}: missing values in columns {', '.join(missing)}; expected a complete table")
    raw_labels = frame[target]
    if pd.api.types.is_integer_dtype(raw_labels) and raw_labels.min() >= 0:
        labels = raw_labels.to_numpy(dtype=np.int64)
    else:
        # Class names (or arbitrary codes) map to 0..k-1 in sorted order, the same at every institution.
        classes = sorted(raw_labels.astype(str).unique())
        lookup = {c: i for i, c in enumerate(classes)}
        labels = raw_labels.astype(str).map(lookup).to_numpy(dtype=np.int64)
    features = feature_frame.to_numpy(dtype=np.float32)
    if not np.isfinite(features).all():
        raise DataError(f"{where}: feature values must be finite numbers")
    return Table(features, labels, max(int(labels.max()) + 1, 2))


def _synthetic(section: DataSection, seed: int) -> Table:
    """A generated classification task. Its small matrix products run on one BLAS thread: in a simulation the
    coordinator generates it in the ServerApp's thread while Ray starts its workers on the same cores, and
    OpenBLAS's thread pool then spun for minutes inside make_classification (seen on 2 cores)."""
    from sklearn.datasets import make_classification
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        features, labels = make_classification(
            n_samples=section.samples,
            n_features=section.features,
            n_informative=max(2, min(section.features // 2, 32)),
            n_classes=section.classes,
            n_clusters_per_class=1,
            random_state=seed,
        )
    return Table(features.astype(np.float32), labels.astype(np.int64), section.classes)


def load_table(section: DataSection, *, base_dir: Path | None = None, seed: int = 0) -> Table:
    """Load `data.source`: 'sklearn:NAME' for a dataset scikit-learn ships, 'synthetic' for a generated
    classification task, else a CSV/Parquet path."""
    source = section.source
    if source == "synthetic":
        return _synthetic(section, seed)
    if source.startswith("sklearn:"):
        return _load_sklearn(source.split(":", 1)[1])
    path = Path(source)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return table_from_frame(read_table_file(path), target=section.target, where=str(path))


def standardize(features: FloatArray, *, reference: FloatArray) -> FloatArray:
    """(x - mean) / std with the statistics of `reference`; constant columns are left centred."""
    mean = reference.mean(axis=0)
    std = reference.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    scaled: FloatArray = ((features - mean) / std).astype(np.float32)
    return scaled


def _stratified_holdout(
    labels: IntArray, fraction: float, rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Indices (kept, held out): `fraction` of every class is held out."""
    held: list[int] = []
    kept: list[int] = []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_held = round(fraction * len(idx))
        held.extend(idx[:n_held].tolist())
        kept.extend(idx[n_held:].tolist())
    return np.sort(np.array(kept, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))


def partition_indices(
    labels: IntArray,
    *,
    institutions: int,
    partition: Partition,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 2,
) -> list[npt.NDArray[np.int64]]:
    """Split record indices across institutions.

    iid: a random permutation cut into near-equal parts. dirichlet: for every class c, proportions
    p_c ~ Dir(alpha * 1_K) give each institution its share of class c (smaller alpha, more skew);
    resampled until every institution holds at least `min_size` records.
    Raises DataError when there are too few records for the institutions.
    """
    n = len(labels)
    if n < institutions * min_size:
        raise DataError(
            f"{n} records cannot be split across {institutions} institutions with at least {min_size} each"
        )
    if partition is Partition.IID:
        return [np.sort(part) for part in np.array_split(rng.permutation(n), institutions)]
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(institutions)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(institutions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].extend(piece.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise DataError(
        f"data.alpha = {alpha} leaves some of the {institutions} institutions with fewer than {min_size} records; "
        "expected a larger alpha or fewer institutions"
    )


@dataclass(frozen=True)
class SimulatedFederationData:
    """A data source split as a simulation needs it: one share per institution and a held-out test split."""

    institutions: tuple[InstitutionData, ...]
    test: Dataset
    num_features: int
    num_classes: int


def institution_data(
    features: FloatArray, labels: IntArray, *, num_classes: int, validation_fraction: float, rng: np.random.Generator
) -> InstitutionData:
    """Split one institution's records into train/validation and standardize both with the train statistics."""
    n = len(labels)
    order = rng.permutation(n)
    n_val = round(validation_fraction * n)
    if n - n_val < 1:
        raise DataError(f"an institution with {n} records has none left for training")
    val_idx, train_idx = order[:n_val], order[n_val:]
    train_x = features[train_idx]
    return InstitutionData(
        train=Dataset(standardize(train_x, reference=train_x), labels[train_idx]),
        validation=Dataset(standardize(features[val_idx], reference=train_x), labels[val_idx]),
        num_features=int(features.shape[1]),
        num_classes=num_classes,
    )


def simulate_federation_data(
    section: DataSection, *, institutions: int, seed: int, base_dir: Path | None = None
) -> SimulatedFederationData:
    """Load the source, hold out a stratified test split, and partition the rest across institutions.

    Every institution standardizes with its own training statistics (nothing about its records leaves it);
    the held-out test split is standardized with its own statistics, as an evaluator outside the
    federation would do.
    """
    table = load_table(section, base_dir=base_dir, seed=seed)
    rng = np.random.default_rng(seed)
    kept, held = _stratified_holdout(table.labels, section.test_fraction, rng)
    parts = partition_indices(
        table.labels[kept], institutions=institutions, partition=section.partition, alpha=section.alpha, rng=rng
    )
    shares = tuple(
        institution_data(
            table.features[kept][part],
            table.labels[kept][part],
            num_classes=table.num_classes,
            validation_fraction=section.validation_fraction,
            rng=np.random.default_rng([seed, k]),
        )
        for k, part in enumerate(parts)
    )
    test_x = table.features[held] if len(held) else table.features[:0]
    test = Dataset(standardize(test_x, reference=test_x) if len(held) else test_x, table.labels[held])
    return SimulatedFederationData(shares, test, table.num_features, table.num_classes)
