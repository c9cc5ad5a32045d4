"""All-reduce time of one flat float32 buffer the size of a model's gradient, one process per GPU (NCCL).

An institution's DDP step all-reduces its gradient every step; this shows what the host's NCCL does with that size
and with which protocol (set NCCL_PROTO / NCCL_ALGO in the environment to compare, NCCL_DEBUG=INFO to see the
choice).

    torchrun --standalone --nproc-per-node=4 benchmarks/allreduce_probe.py --mib 44 --repeat 50
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, nargs="+", default=[1.0, 25.0, 44.0])
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    world = dist.get_world_size()
    for mib in args.mib:
        buffer = torch.ones(int(mib * 2**20 / 4), device="cuda")
        for _ in range(5):
            dist.all_reduce(buffer)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeat):
            dist.all_reduce(buffer)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.repeat
        if dist.get_rank() == 0:
            bus = 2 * (world - 1) / world * buffer.numel() * 4 / seconds / 1e9
            print(json.dumps({"mib": mib, "gpus": world, "ms": round(seconds * 1e3, 3), "bus_gb_s": round(bus, 1),
                              "nccl_proto": os.environ.get("NCCL_PROTO", "default")}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
