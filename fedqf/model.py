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


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm (Opacus cannot clip per record through BatchNorm) and no in-place ops."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _group_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.norm2 = _group_norm(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), _group_norm(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 3x32x32 images (CIFAR layout: 3x3 stem, no max-pool), about 11.2M parameters.

    Takes flattened pixels (N, 3072), the way institutions' tables hold them, and reshapes them.
    """

    IMAGE_SHAPE = (3, 32, 32)

    def __init__(self, *, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.stem_norm = _group_norm(64)
        blocks: list[nn.Module] = []
        in_channels = 64
        for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels, 1)]
            in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.IMAGE_SHAPE)
        x = torch.relu(self.stem_norm(self.stem(x)))
        x = self.blocks(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
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
    elif section.name is ModelName.RESNET18:
        pixels = int(np.prod(ResNet18.IMAGE_SHAPE))
        if num_features != pixels:
            raise ConfigError(
                f"model.name 'resnet18' takes 3x32x32 images ({pixels} features per record), got {num_features}"
            )
        # Torch's default (Kaiming) initialisation, drawn from a seed taken from `generator`.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ResNet18(num_classes=num_classes)
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

    def flatten(self, arrays: list[npt.NDArray[np.float32]], dtype: type[np.floating] = np.float64) -> npt.NDArray[np.floating]:
        """Concatenate arrays in layout order into one vector of `dtype` (float64 unless told), checking every
        shape."""
        if len(arrays) != len(self.shapes):
            raise UpdateRejectedError(f"expected {len(self.shapes)} arrays, got {len(arrays)}")
        for name, shape, arr in zip(self.names, self.shapes, arrays):
            if tuple(arr.shape) != shape:
                raise UpdateRejectedError(f"array '{name}' has shape {tuple(arr.shape)}, expected {shape}")
        if not arrays:
            return np.zeros(0, dtype=dtype)
        return np.concatenate([np.asarray(a).ravel() for a in arrays], dtype=dtype)

    def unflatten(self, vector: npt.NDArray[np.floating]) -> list[npt.NDArray[np.float32]]:
        """Cut a vector in layout order into float32 arrays (views of it when it is float32 already)."""
        if vector.shape != (self.size,):
            raise UpdateRejectedError(f"expected a vector of {self.size} values, got shape {vector.shape}")
        out: list[npt.NDArray[np.float32]] = []
        start = 0
        for shape in self.shapes:
            n = int(np.prod(shape))
            out.append(vector[start : start + n].reshape(shape).astype(np.float32, copy=False))
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
