"""Models fedqf trains, and the conversion between a model and its flat parameter vector."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedqf.config import ModelName, ModelSection
from fedqf.errors import ConfigError, UpdateRejectedError


class MLP(nn.Module):
    """Linear -> tanh -> ... -> Linear; no in-place ops, no batch norm, so Opacus's per-sample hooks apply."""

    def __init__(self, *, num_features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        widths = (num_features, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.out = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = torch.tanh(layer(x))
        out: torch.Tensor = self.out(x)
        return out


class Logistic(nn.Module):
    """Multinomial logistic regression."""

    def __init__(self, *, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.out = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(x)
        return out


def build_model(
    section: ModelSection, *, num_features: int, num_classes: int, generator: torch.Generator
) -> nn.Module:
    """Build the configured model with weights drawn from `generator` (the same seed gives the same w_0)."""
    model: nn.Module
    if section.name is ModelName.MLP:
        model = MLP(num_features=num_features, hidden=section.hidden, num_classes=num_classes)
    elif section.name is ModelName.LOGISTIC:
        model = Logistic(num_features=num_features, num_classes=num_classes)
    else:  # pragma: no cover - the enum is exhaustive
        raise ConfigError(f"model.name {section.name!r} is unknown")
    with torch.no_grad():
        for param in model.parameters():
            bound = 1.0 / np.sqrt(param.shape[-1]) if param.dim() > 1 else 0.05
            param.copy_(torch.rand(param.shape, generator=generator) * 2 * bound - bound)
    return model


@dataclass(frozen=True)
class ParameterLayout:
    """The names and shapes of a model's parameters, in state-dict order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParameterLayout:
        state = model.state_dict()
        return cls(tuple(state.keys()), tuple(tuple(t.shape) for t in state.values()))

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def flatten(self, arrays: list[npt.NDArray[np.float32]]) -> npt.NDArray[np.float64]:
        """Concatenate arrays in layout order into one float64 vector, checking every shape."""
        if len(arrays) != len(self.shapes):
            raise UpdateRejectedError(f"expected {len(self.shapes)} arrays, got {len(arrays)}")
        for name, shape, arr in zip(self.names, self.shapes, arrays):
            if tuple(arr.shape) != shape:
                raise UpdateRejectedError(f"array '{name}' has shape {tuple(arr.shape)}, expected {shape}")
        if not arrays:
            return np.zeros(0)
        return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])

    def unflatten(self, vector: npt.NDArray[np.float64]) -> list[npt.NDArray[np.float32]]:
        if vector.shape != (self.size,):
            raise UpdateRejectedError(f"expected a vector of {self.size} values, got shape {vector.shape}")
        out: list[npt.NDArray[np.float32]] = []
        start = 0
        for shape in self.shapes:
            n = int(np.prod(shape))
            out.append(vector[start : start + n].reshape(shape).astype(np.float32))
            start += n
        return out


def get_arrays(model: nn.Module) -> list[npt.NDArray[np.float32]]:
    """The model's state as float32 numpy arrays, in state-dict order."""
    return [t.detach().cpu().numpy().astype(np.float32) for t in model.state_dict().values()]


def set_arrays(model: nn.Module, arrays: list[npt.NDArray[np.float32]]) -> None:
    """Load arrays (in state-dict order) into the model."""
    keys = list(model.state_dict().keys())
    if len(keys) != len(arrays):
        raise UpdateRejectedError(f"expected {len(keys)} arrays for the model, got {len(arrays)}")
    model.load_state_dict(OrderedDict((k, torch.from_numpy(np.asarray(a))) for k, a in zip(keys, arrays)))
