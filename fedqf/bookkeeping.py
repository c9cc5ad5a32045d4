"""Book-keeping per-record clipping for DP-SGD: clipped gradients in one backward pass, no per-record gradients kept.

DP-SGD needs sum_i g_i * min(1, C / ||g_i||) over the records i of a batch, where g_i is record i's gradient of all
the model's parameters. Opacus's hooks mode materialises every g_i (batch x parameters floats); its ghost mode needs a
second backward pass and has ghost norms only for Linear and Embedding layers. Book-keeping clipping (Bu et al.,
"Differentially Private Optimization on Large Model at Small Cost", 2023) does one backward pass through the layer
*inputs* only, keeping each layer's input a and output gradient g, and then:
1. per layer, the squared norm of each record's gradient, the cheaper of two exact ways:
   - ghost norm: ||sum_t g_t a_t^T||^2 = sum_{t,t'} (a_t . a_t')(g_t . g_t'), cost T^2 (d + p) per record;
   - materialised: the record's d x p gradient, one layer at a time, cost T d p per record;
   (T positions, d inputs, p outputs per position; a Linear on flat features has T = 1 and costs d + p);
2. the clip factors c_i = min(1, C / (||g_i|| + 1e-6)), as Opacus computes them;
3. per layer, the clipped sum as the layer's ordinary weight gradient with g scaled by c_i (cuDNN's
   convolution backward for Conv2d, one matmul for Linear), in full fp32 like the norms: no TF32, so that no
   record's share of the sum exceeds the clip norm by more than fp32 rounding.
The backward pass computes no weight gradients (the parameters are detached while it runs), so the extra work is
step 1 plus the record-wise products of step 3's inputs.

Noise, the expected-batch scaling, the all-reduce of several workers and the privacy accounting are Opacus's own
(`DPOptimizerFastGradientClipping` and its distributed variant): this module only replaces how the clipped sum
is computed, and the result equals Opacus's hooks mode up to float rounding (tests/test_bookkeeping.py).

Supported layers: Linear, Conv2d (groups = 1), GroupNorm and LayerNorm, each called at most once per forward.
A model with another trainable layer, or a layer used twice, is refused with the layer named.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from fedqf.errors import ConfigError

SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)
# Materialised per-record gradients are built in slices of at most this many floats (256 MiB).
_MATERIALISE_FLOATS = 64 * 2**20


def check_supported(model: nn.Module) -> None:
    """Refuse a model whose trainable parameters are not all held by layers book-keeping clipping supports.

    Raises:
        ConfigError: naming the first unsupported layer and the supported kinds.
    """
    kinds = ", ".join(kind.__name__ for kind in SUPPORTED)
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not isinstance(module, SUPPORTED):
            raise ConfigError(
                f"grad_sample_mode 'bookkeeping' cannot clip layer '{name}' ({type(module).__name__}); "
                f"expected only {kinds} layers with trainable parameters (or grad_sample_mode 'hooks')"
            )
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ConfigError(
                f"grad_sample_mode 'bookkeeping' cannot clip layer '{name}': Conv2d with groups={module.groups}; "
                "expected groups = 1 (or grad_sample_mode 'hooks')"
            )
        if isinstance(module, nn.Conv2d) and isinstance(module.padding, str):
            raise ConfigError(
                f"grad_sample_mode 'bookkeeping' cannot clip layer '{name}': padding {module.padding!r}; expected "
                "numeric padding (or grad_sample_mode 'hooks')"
            )
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise ConfigError(
                f"grad_sample_mode 'bookkeeping' cannot clip layer '{name}': padding_mode "
                f"{module.padding_mode!r}; expected 'zeros' (or grad_sample_mode 'hooks')"
            )


@dataclass
class _Record:
    """One layer's input and output gradient in the current step, and its per-record gradient pieces."""

    module: nn.Module
    name: str
    weight: bool  # whether the layer's weight / bias are trained (a frozen one gets no gradient)
    bias: bool
    activation: torch.Tensor | None = None
    output_grad: torch.Tensor | None = None
    # GroupNorm / LayerNorm: the per-record weight and bias gradients (batch x channels), small enough to keep.
    per_record: dict[str, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.activation = self.output_grad = None
        self.per_record = {}


def _conv_patches(module: nn.Conv2d, activation: torch.Tensor) -> torch.Tensor:
    """The conv's input patches, batch x positions x (C_in k_h k_w) in F.unfold's order, built from strided views
    of the padded input with one copy (F.unfold on CUDA launches one kernel per record)."""
    assert not isinstance(module.padding, str)  # refused by check_supported
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = module.kernel_size, module.stride, module.dilation, module.padding
    padded = F.pad(activation, (pw, pw, ph, ph)) if ph or pw else activation
    # batch x C x H' x W' x span_h x span_w, then every dilation-th tap of the span.
    windows = padded.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
    batch, channels, out_h, out_w = windows.shape[:4]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(batch, out_h * out_w, channels * kh * kw)


def _weight_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||sum_t g_t a_t^T||_F^2 per record, for a: batch x T x d and g: batch x T x p, the cheaper exact way."""
    batch, positions, d = a.shape
    p = g.shape[2]
    if positions == 1:
        return a[:, 0].pow(2).sum(1) * g[:, 0].pow(2).sum(1)
    if positions * (d + p) < d * p:
        ghost: torch.Tensor = torch.linalg.vecdot(torch.bmm(a, a.transpose(1, 2)).flatten(1),
                                                  torch.bmm(g, g.transpose(1, 2)).flatten(1))
        return ghost
    step = max(1, _MATERIALISE_FLOATS // (d * p))
    return torch.cat([torch.linalg.vector_norm(torch.bmm(g[i : i + step].transpose(1, 2), a[i : i + step]),
                                               dim=(1, 2)).square() for i in range(0, batch, step)])


def _norm_layer_pieces(module: nn.GroupNorm | nn.LayerNorm, a: torch.Tensor,
                       g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-record weight and bias gradients of a GroupNorm or LayerNorm, each batch x parameter size."""
    if isinstance(module, nn.GroupNorm):
        normalised = F.group_norm(a, module.num_groups, eps=module.eps)
        dims: tuple[int, ...] = tuple(range(2, a.dim()))
    else:
        normalised = F.layer_norm(a, module.normalized_shape, eps=module.eps)
        dims = tuple(range(1, a.dim() - len(module.normalized_shape)))
    weight, bias = g * normalised, g
    if dims:
        weight, bias = weight.sum(dims), bias.sum(dims)
    return weight.reshape(a.shape[0], -1), bias.reshape(a.shape[0], -1)


class BookkeepingClipper:
    """Per-record clipped gradient sums of `model`'s parameters, one backward pass per batch.

    Use:
        clipper = BookkeepingClipper(model, max_grad_norm=C)
        with clipper.step():                      # parameters detached, hooks recording
            loss = F.cross_entropy(model(x), y, reduction="sum")   # the sum over records
            clipper.backward(loss, batch_size=len(y))
        # now p.grad = sum_i clip_C(g_i) for every trainable p; clipper.last_norms holds the ||g_i||
        clipper.close()                           # removes the hooks

    The loss must be a sum of per-record losses (reduction="sum"), so that the output gradients it yields are
    the records' own; the model must not mix records (GroupNorm and LayerNorm are per record, BatchNorm is not).
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float) -> None:
        check_supported(model)
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.last_norms: torch.Tensor | None = None
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._records: list[_Record] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._active = False
        for name, module in model.named_modules():
            if not isinstance(module, SUPPORTED):
                continue
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            trains_weight = isinstance(weight, torch.Tensor) and weight.requires_grad
            trains_bias = isinstance(bias, torch.Tensor) and bias.requires_grad
            if trains_weight or trains_bias:
                record = _Record(module=module, name=name, weight=trains_weight, bias=trains_bias)
                self._records.append(record)
                self._handles.append(module.register_forward_hook(self._forward_hook(record)))
        owners: dict[int, str] = {}
        for record in self._records:
            for param in record.module.parameters(recurse=False):
                if id(param) in owners:
                    raise ConfigError(
                        f"grad_sample_mode 'bookkeeping' cannot clip layers '{owners[id(param)]}' and "
                        f"'{record.name}': they share a parameter; expected every parameter in one layer "
                        "(or grad_sample_mode 'hooks')"
                    )
                owners[id(param)] = record.name
        # The parameters are detached during the step, so the input itself must carry the graph.
        self._handles.append(model.register_forward_pre_hook(self._input_requires_grad))

    def close(self) -> None:
        """Remove the hooks: the model is a plain module again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _input_requires_grad(self, module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...] | None:
        if not self._active or not torch.is_grad_enabled():
            return None
        return tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)

    def _forward_hook(self, record: _Record) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not self._active or not torch.is_grad_enabled():
                return
            if record.activation is not None:
                raise ConfigError(
                    f"grad_sample_mode 'bookkeeping': layer '{record.name}' runs twice in one forward pass; "
                    "expected every layer once (or grad_sample_mode 'hooks')"
                )
            record.activation = inputs[0].detach()

            def capture(grad: torch.Tensor) -> None:
                record.output_grad = grad.detach()

            if output.requires_grad:
                output.register_hook(capture)  # type: ignore[no-untyped-call]

        return hook

    @contextmanager
    def step(self) -> Iterator[None]:
        """Record one batch: parameters detached (no weight gradients in the backward pass), hooks on."""
        for record in self._records:
            record.clear()
        for p in self._params:
            p.requires_grad_(False)
        self._active = True
        try:
            yield
        finally:
            self._active = False
            for p in self._params:
                p.requires_grad_(True)
            for record in self._records:
                record.clear()

    def backward(self, loss: torch.Tensor, *, batch_size: int) -> None:
        """Backpropagate `loss` (a sum over `batch_size` records) to the layer inputs, then set every trainable
        parameter's .grad to the sum of the records' clipped gradients."""
        if not self._active:
            raise RuntimeError("BookkeepingClipper.backward must run inside clipper.step()")
        device = self._params[0].device if self._params else loss.device
        for p in self._params:
            p.grad = None
        if batch_size > 0 and loss.requires_grad:
            loss.backward()  # type: ignore[no-untyped-call]
            dtype = self._params[0].dtype if self._params else torch.float32
            squared = torch.zeros(batch_size, device=device, dtype=dtype)
            for record in self._records:
                if record.output_grad is not None:
                    squared += self._squared_norms(record, batch_size)
            norms = squared.sqrt()
            factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            for record in self._records:
                if record.output_grad is not None:
                    self._clipped_sum(record, factors)
        else:
            norms = torch.zeros(0, device=device)
        self.last_norms = norms
        for p in self._params:  # a layer that the loss did not reach, or an empty batch: zero gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _squared_norms(self, record: _Record, batch_size: int) -> torch.Tensor:
        a, g, module = record.activation, record.output_grad, record.module
        assert a is not None and g is not None
        if a.shape[0] != batch_size:
            raise RuntimeError(f"layer '{record.name}' saw {a.shape[0]} records, expected {batch_size}")
        out = torch.zeros(batch_size, device=a.device, dtype=a.dtype)
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if isinstance(module, nn.Conv2d):
                a3 = _conv_patches(module, a)  # batch x T x d
                g3 = g.flatten(2).transpose(1, 2)  # batch x T x p
            else:
                a3 = a.reshape(batch_size, -1, a.shape[-1])
                g3 = g.reshape(batch_size, -1, g.shape[-1])
            if record.weight:
                out += _weight_norms(a3, g3)
            if record.bias:
                out += g3.sum(1).pow(2).sum(1)
            return out
        assert isinstance(module, (nn.GroupNorm, nn.LayerNorm))
        weight, bias = _norm_layer_pieces(module, a, g)
        if record.weight:
            record.per_record["weight"] = weight
            out += weight.pow(2).sum(1)
        if record.bias:
            record.per_record["bias"] = bias
            out += bias.pow(2).sum(1)
        return out

    def _clipped_sum(self, record: _Record, factors: torch.Tensor) -> None:
        a, g, module = record.activation, record.output_grad, record.module
        assert a is not None and g is not None
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            for name, pieces in record.per_record.items():
                param = getattr(module, name)
                param.grad = (factors @ pieces).view_as(param)
            return
        scaled = g * factors.view(-1, *([1] * (g.dim() - 1)))
        if isinstance(module, nn.Conv2d):
            if record.weight:
                # In full fp32: cuDNN would otherwise round the inputs to TF32 (10-bit mantissas), and a record's
                # share of the released sum could exceed the clip norm by about 1e-3 of it.
                allow_tf32 = torch.backends.cudnn.allow_tf32
                torch.backends.cudnn.allow_tf32 = False
                try:
                    module.weight.grad = torch.ops.aten.convolution_backward(
                        scaled, a, module.weight, None, module.stride, module.padding, module.dilation, False,
                        [0, 0], module.groups, [False, True, False])[1]
                finally:
                    torch.backends.cudnn.allow_tf32 = allow_tf32
            if record.bias:
                assert module.bias is not None
                module.bias.grad = scaled.sum((0, 2, 3))
            return
        assert isinstance(module, nn.Linear)
        flat_g = scaled.reshape(-1, scaled.shape[-1])
        if record.weight:
            module.weight.grad = flat_g.t() @ a.reshape(-1, a.shape[-1])
        if record.bias:
            assert module.bias is not None
            module.bias.grad = flat_g.sum(0)
