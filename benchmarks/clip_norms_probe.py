"""Per-record gradient norms of ResNet-18's convolutions, three exact ways, timed on one GPU (fp32, no TF32).

For each convolution of ResNet-18 on 3x32x32 images, with a batch of --batch records: the time of
- "patches": strided-view patches copied once, then one batched matmul per record (materialised gradient);
- "ghost": patches, then sum_{t,t'} (a_t . a_t')(g_t . g_t');
- "grouped": cuDNN's weight gradient of a convolution with one group per record (materialised gradient);
and, for scale, the layer's ordinary weight gradient. fedqf.bookkeeping picks per layer; this shows which is
cheapest where.

    python benchmarks/clip_norms_probe.py --batch 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedqf.bookkeeping import _conv_patches

LAYERS = [  # (C_in, C_out, input size, stride, kernel)
    (3, 64, 32, 1, 3), (64, 64, 32, 1, 3), (64, 128, 32, 2, 3), (128, 128, 16, 1, 3), (64, 128, 32, 2, 1),
    (128, 256, 16, 2, 3), (256, 256, 8, 1, 3), (256, 512, 8, 2, 3), (512, 512, 4, 1, 3),
]


def _time(fn, repeat: int = 20) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def _probe(b: int, c_in: int, c_out: int, size: int, stride: int, k: int) -> dict[str, object]:
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False).cuda()
    a = torch.randn(b, c_in, size, size, device="cuda")
    out_size = (size + 2 * (k // 2) - k) // stride + 1
    g = torch.randn(b, c_out, out_size, out_size, device="cuda")
    t, d, p = out_size * out_size, c_in * k * k, c_out

    def patches() -> torch.Tensor:
        a3 = _conv_patches(conv, a)
        g3 = g.flatten(2)
        return torch.linalg.vector_norm(torch.bmm(g3, a3), dim=(1, 2)).square()

    def ghost() -> torch.Tensor:
        a3 = _conv_patches(conv, a)
        g3 = g.flatten(2).transpose(1, 2)
        return torch.linalg.vecdot(torch.bmm(a3, a3.transpose(1, 2)).flatten(1),
                                   torch.bmm(g3, g3.transpose(1, 2)).flatten(1))

    def grouped() -> torch.Tensor:
        weight = torch.empty(b * c_out, c_in, k, k, device="cuda")
        per = torch.ops.aten.convolution_backward(
            g.reshape(1, b * c_out, out_size, out_size), a.reshape(1, b * c_in, size, size), weight, None,
            conv.stride, conv.padding, conv.dilation, False, [0, 0], b, [False, True, False])[1]
        return torch.linalg.vector_norm(per.reshape(b, -1), dim=1).square()

    def wgrad() -> torch.Tensor:
        return torch.ops.aten.convolution_backward(g, a, conv.weight, None, conv.stride, conv.padding,
                                                   conv.dilation, False, [0, 0], 1, [False, True, False])[1]

    ref = patches()
    row: dict[str, object] = {"layer": f"{c_in}->{c_out} {size}x{size} s{stride} k{k}", "T": t, "d": d, "p": p,
           "ghost_cheaper": t * (d + p) < d * p}
    for name, fn in (("patches", patches), ("ghost", ghost), ("grouped", grouped), ("wgrad", wgrad)):
        if name == "ghost" and t > 256:
            continue  # T x T per record: too big to be a contender
        if name != "wgrad":
            torch.testing.assert_close(fn(), ref, rtol=1e-3, atol=1e-3)
        row[name + "_ms"] = round(_time(fn), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for layer in LAYERS:
        print(json.dumps(_probe(args.batch, *layer)), flush=True)


if __name__ == "__main__":
    main()
