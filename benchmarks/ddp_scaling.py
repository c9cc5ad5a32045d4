"""Local-training throughput of an institution's worker group: ResNet-18 (GroupNorm) on synthetic 3x32x32 images.

Runs fedqf's own training path (fedqf.trainer.train_local under fedqf.workers.join_group, one process per GPU,
NCCL) on 1, 2, 4... GPUs, side by side in one run, each group launched by torch's elastic launcher as
`fedqf institution --workers N` launches it:
- plain SGD (DDP);
- DP-SGD: fedqf's book-keeping clipping (fedqf.bookkeeping, Opacus's noise and accounting), and Opacus's own
  ghost clipping, per-sample-gradient hooks and functorch modes.
Weak scaling: every GPU gets `--batch-per-gpu` records per step, so the institution's batch is N times that, and
every configuration runs `--steps` steps of one local epoch (Poisson-sampled under DP: the expected count).
Throughput is records per second, measured after a warm-up epoch; scaling efficiency at N GPUs is
throughput(N) / (N * throughput(1)); the DP cost is time(DP) / time(plain) at the same N.

    python benchmarks/ddp_scaling.py --gpus 1 2 4 [--out results.json]
    (CPU only, for a smoke test: --device cpu --gpus 1 2 --batch-per-gpu 4 --steps 2 --warmup 1)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODES = ("plain", "dp-bookkeeping", "dp-ghost", "dp-hooks", "dp-functorch")


def worker(args: argparse.Namespace) -> None:
    """One process of the group: for every mode, warm up, then time one local epoch; rank 0 prints JSON lines."""
    import numpy as np
    import torch

    from fedqf.config import GradSampleMode, ModelName, ModelSection, TrainingSection
    from fedqf.data import Dataset
    from fedqf.model import build_model
    from fedqf.privacy import PrivacyLedger
    from fedqf.trainer import DpSgdSettings, train_local
    from fedqf.workers import join_group

    ctx = join_group(args.device)
    batch = args.batch_per_gpu * ctx.world_size
    records = batch * args.steps
    rng = np.random.default_rng(0)  # the same records on every worker; each trains its share
    data = Dataset(features=rng.standard_normal((records, 3 * 32 * 32), dtype=np.float32),
                   labels=rng.integers(0, 10, records).astype(np.int64))
    warm = Dataset(features=data.features[: batch * args.warmup], labels=data.labels[: batch * args.warmup])
    section = ModelSection(name=ModelName.RESNET18)
    for mode_name in args.modes:
        dp = None
        mode = GradSampleMode.HOOKS
        if mode_name != "plain":
            dp = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0, secure_mode=False)
            mode = GradSampleMode(mode_name.removeprefix("dp-"))
        training = TrainingSection(local_epochs=1, batch_size=batch, learning_rate=0.05, momentum=0.9,
                                   grad_sample_mode=mode)
        model = build_model(section, num_features=3 * 32 * 32, num_classes=10,
                            generator=torch.Generator().manual_seed(1))
        ledger = PrivacyLedger() if ctx.rank == 0 and dp is not None else None
        train_local(model, warm, training=training, dp=dp, seed=1, ledger=ledger, workers=ctx)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        torch.distributed.barrier()
        start = time.perf_counter()
        result = train_local(model, data, training=training, dp=dp, seed=2, ledger=ledger, workers=ctx)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if ctx.rank == 0:
            peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.device.type == "cuda" else 0.0
            print("RESULT " + json.dumps({
                "mode": mode_name, "workers": ctx.world_size, "records": records, "steps": result.steps,
                "seconds": seconds, "records_per_second": records / seconds, "train_seconds": result.seconds,
                "batch": batch, "peak_gpu_gib": peak, "device": str(ctx.device),
                "gpu": torch.cuda.get_device_name(0) if ctx.device.type == "cuda" else platform.processor(),
            }), flush=True)
        if args.profile and ctx.device.type == "cuda":
            _profile(model, warm, training, dp, ledger, ctx)
    torch.distributed.destroy_process_group()


def _profile(model: object, data: object, training: object, dp: object, ledger: object, ctx: object) -> None:
    """Where one warm-up-sized epoch spends its time, on rank 0: the top operators by GPU and by host time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fedqf.trainer import train_local

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_local(model, data, training=training, dp=dp, seed=3, ledger=ledger, workers=ctx)  # type: ignore[arg-type]
        torch.cuda.synchronize()
    if ctx.rank == 0:  # type: ignore[attr-defined]
        table = prof.key_averages()
        print(f"PROFILE {training.grad_sample_mode if dp else 'plain'} x{ctx.world_size}\n"  # type: ignore[attr-defined]
              + table.table(sort_by="cuda_time_total", row_limit=14)
              + table.table(sort_by="self_cpu_time_total", row_limit=10), flush=True)


def launch(args: argparse.Namespace, workers: int) -> list[dict[str, object]]:
    """One group of `workers` processes runs every mode in turn (one launch per group size)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc-per-node={workers}", str(Path(__file__).resolve()), "--worker", "--modes", *args.modes,
               "--device", args.device, "--batch-per-gpu", str(args.batch_per_gpu), "--steps", str(args.steps),
               "--warmup", str(args.warmup)] + (["--profile"] if args.profile else [])
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    for block in done.stdout.split("PROFILE ")[1:]:
        print("PROFILE " + block.split("RESULT ")[0], flush=True)
    results = [dict(json.loads(line[len("RESULT "):])) for line in done.stdout.splitlines()
               if line.startswith("RESULT ")]
    if done.returncode or len(results) != len(args.modes):
        print(f"{workers} workers failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}",
              flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch-per-gpu", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5, help="steps of a warm-up epoch before each timed one")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table per mode (GPU)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = []
    for workers in args.gpus:
        for result in launch(args, workers):
            results.append(result)
            mode = result["mode"]
            print(f"{mode:>12} x{workers}: {result['records_per_second']:10.1f} records/s  "
                  f"({result['steps']} steps of {result['batch']} in {result['seconds']:.2f} s, "
                  f"peak {result['peak_gpu_gib']:.1f} GiB)", flush=True)
    by = {(r["mode"], r["workers"]): r for r in results}
    if not results:
        raise SystemExit("no configuration ran")
    print(f"\nResNet-18 (GroupNorm), 3x32x32, {args.batch_per_gpu} records per GPU per step, {args.steps} steps; "
          f"{results[0]['gpu']}; {datetime.date.today()}")
    one = min(args.gpus)
    for mode in args.modes:
        for workers in args.gpus:
            if (mode, workers) not in by or (mode, one) not in by:
                continue
            r = by[(mode, workers)]
            efficiency = float(r["records_per_second"]) / (workers / one * float(by[(mode, one)]["records_per_second"]))
            line = f"{mode:>12} x{workers}: efficiency vs x{one} {efficiency:6.1%}"
            if mode != "plain" and ("plain", workers) in by:
                ratio = float(by[("plain", workers)]["records_per_second"]) / float(r["records_per_second"])
                line += f"   time DP / plain {ratio:5.2f}"
            print(line)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
