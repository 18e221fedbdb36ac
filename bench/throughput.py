"""Fine-tuning throughput (images/s) with and without the frozen-feature cache.

What it measures
----------------
For each model (random weights, 10 classes, the default single trainable block) and each device it
times training steps on random images in two modes:

* **uncached** - a step runs the frozen trunk under ``torch.no_grad`` on the image batch
  (``FineTuneModel.features``), then forward + backward of the trainable tail with cross-entropy
  (``FineTuneModel.logits`` on a flat parameter vector) and an SGD update of that vector. This is
  what a node pays per step when the trunk runs every time (e.g. with augmentation).
* **cached** - the trunk outputs are computed once up front (as ``FeatureBank(cached=True)`` does);
  a step is only the tail forward + backward + update on the stored features.

One step is one mini-batch; images/s = batch size x steps / seconds. After one warm-up step per
mode, ``--repeats`` timed runs of ``--steps`` steps each are made and the median is reported
(``time.perf_counter``, with ``torch.cuda.synchronize`` on CUDA). The cache is not free: the
one-time cost of building it (trunk forward only, timed over the same ``--steps`` batches) is
printed in seconds per 1000 images, next to the per-step speed-up it buys.

How to run
----------
From the repository root::

    .venv/bin/python bench/throughput.py                      # defaults: 3 ViT/DeiT/Swin models, cpu (+ cuda)
    .venv/bin/python bench/throughput.py --batch-size 8 --steps 1 --repeats 1   # quick smoke test
    .venv/bin/python bench/throughput.py --devices cuda --amp --json bench.json

``--amp`` runs trunk and tail under bf16 autocast on CUDA (CPU always stays fp32). Defaults are
per device: on CPU batch 8 x 3 steps x 3 repeats (a ViT-S trunk forward at 224 px takes ~0.1-0.2 s
per image on 2 cores, Swin-S about 3x that, so batch 32 would take over 5 minutes; pass
``--batch-size 32`` for the node's own default), on CUDA batch 32 x 20 steps x 3 repeats. The
default CPU run takes about 2-4 minutes on a 2-core machine; figures from a loaded machine are
noisy. The values used are printed before the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from p2pnode.node.models import build_model

DEFAULT_MODELS = ("vit_small_patch16_224", "deit_small_patch16_224", "swin_small_patch4_window7_224")
# A ViT-S trunk forward at 224 px costs ~0.1-0.2 s per image on a 2-core CPU (Swin-S ~3x that), so the CPU
# defaults keep the whole default run to a few minutes there; CUDA uses the node's default batch of 32.
DEFAULT_BATCH = {"cpu": 8, "cuda": 32}
DEFAULT_STEPS = {"cpu": 3, "cuda": 20}
NUM_CLASSES = 10
LR = 0.01


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def bench_model(name: str, device: torch.device, batch: int, steps: int, repeats: int, amp: bool) -> dict:
    """Time uncached and cached fine-tuning steps of one model on one device."""
    model = build_model(name, num_classes=NUM_CLASSES, trainable_blocks=1, seed=0).to(device)
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn((batch, *model.input_size), generator=gen).to(device) for _ in range(steps)]
    labels = [torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device) for _ in range(steps)]
    params = model.trainable_vector().to(device)

    def train_step(features: torch.Tensor, y: torch.Tensor) -> None:
        leaf = params.detach().requires_grad_(True)
        with _autocast(device, amp):
            loss = F.cross_entropy(model.logits(leaf, features), y)
        (grad,) = torch.autograd.grad(loss, leaf)
        with torch.no_grad():
            params.sub_(LR * grad)

    def trunk(x: torch.Tensor) -> torch.Tensor:
        with _autocast(device, amp):
            return model.features(x)

    def run_uncached() -> None:
        for x, y in zip(images, labels, strict=True):
            train_step(trunk(x), y)

    # Warm-up (one step per mode), then build the cache once: the trunk's one-time cost.
    _sync(device)
    train_step(trunk(images[0]), labels[0])
    cache: list[torch.Tensor] = []
    build_s = _timed(lambda: cache.extend(trunk(x) for x in images), device)
    train_step(cache[0], labels[0])

    def run_cached() -> None:
        for f, y in zip(cache, labels, strict=True):
            train_step(f, y)

    uncached = [_timed(run_uncached, device) for _ in range(repeats)]
    cached = [_timed(run_cached, device) for _ in range(repeats)]
    images_per_run = batch * steps
    unc_ips = images_per_run / statistics.median(uncached)
    cac_ips = images_per_run / statistics.median(cached)
    return {
        "model": name,
        "device": device.type,
        "amp": bool(amp and device.type == "cuda"),
        "batch_size": batch,
        "steps": steps,
        "repeats": repeats,
        "trainable_params": model.num_trainable,
        "uncached_img_per_s": unc_ips,
        "cached_img_per_s": cac_ips,
        "speedup": cac_ips / unc_ips,
        "uncached_run_s": uncached,
        "cached_run_s": cached,
        "cache_build_s": build_s,
        "cache_build_s_per_1000_images": build_s / images_per_run * 1000,
        "cache_feature_shape": list(cache[0].shape[1:]),
        "cache_feature_dtype": str(cache[0].dtype).removeprefix("torch."),
    }


def _table(rows: list[dict]) -> str:
    head = (
        "| model | device | batch | uncached img/s | cached img/s | speed-up (cached/uncached) | trainable params |\n"
        "|---|---|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        dev = r["device"] + (" (bf16)" if r["amp"] else "")
        lines.append(
            f"| {r['model']} | {dev} | {r['batch_size']} | {r['uncached_img_per_s']:.2f} | "
            f"{r['cached_img_per_s']:.2f} | {r['speedup']:.1f}x | {r['trainable_params']:,} |"
        )
    return "\n".join(lines)


def _cache_table(rows: list[dict]) -> str:
    lines = [
        "| model | device | cache build s / 1000 images | cached feature (per image) | pays off after (epochs) |",
        "|---|---|---:|---|---:|",
    ]
    for r in rows:
        # Passes over the data after which building the cache has paid for itself:
        # build time per image / training time saved per image and pass.
        saved = 1 / r["uncached_img_per_s"] - 1 / r["cached_img_per_s"]
        build = r["cache_build_s_per_1000_images"] / 1000
        even = f"{build / saved:.2f}" if saved > 0 else "never"
        shape = "x".join(map(str, r["cache_feature_shape"]))
        lines.append(
            f"| {r['model']} | {r['device']} | {r['cache_build_s_per_1000_images']:.1f} | "
            f"{shape} {r['cache_feature_dtype']} | {even} |"
        )
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma list of timm names (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: 8 on cpu, 32 on cuda)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default: 3 on cpu, 20 on cuda)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default: %(default)s)")
    p.add_argument("--devices", default="auto", help="comma list of cpu,cuda; auto = cpu plus cuda when available")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (CPU stays fp32)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    for flag in ("batch_size", "steps", "repeats", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1 (got {value})")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.devices == "auto":
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        args.devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        for d in args.devices:
            if d not in ("cpu", "cuda"):
                p.error(f"unknown device {d!r}: use cpu and/or cuda")
            if d == "cuda" and not torch.cuda.is_available():
                p.error("--devices cuda was asked for but torch.cuda.is_available() is False")
    if args.threads is None:
        try:
            args.threads = len(os.sched_getaffinity(0))
        except AttributeError:
            args.threads = os.cpu_count() or 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(
        f"torch {torch.__version__} | {platform.processor() or platform.machine()} | "
        f"threads {torch.get_num_threads()} | devices {','.join(args.devices)}"
        + (f" | cuda {torch.cuda.get_device_name(0)}" if "cuda" in args.devices else "")
    )
    rows = []
    for dev_name in args.devices:
        device = torch.device(dev_name)
        batch = args.batch_size or DEFAULT_BATCH[device.type]
        steps = args.steps or DEFAULT_STEPS[device.type]
        amp = args.amp and device.type == "cuda"
        print(
            f"{dev_name}: batch {batch}, {steps} steps x {args.repeats} repeats (median), "
            f"1 warm-up step per mode, {'bf16 autocast' if amp else 'fp32'}, SGD lr {LR}",
            flush=True,
        )
        for name in args.models:
            t0 = time.perf_counter()
            row = bench_model(name, device, batch, steps, args.repeats, args.amp)
            rows.append(row)
            print(
                f"  {name}: uncached {row['uncached_img_per_s']:.2f} img/s, cached {row['cached_img_per_s']:.2f} "
                f"img/s ({time.perf_counter() - t0:.0f} s incl. model build)",
                flush=True,
            )
    print()
    print(_table(rows))
    print()
    print(
        "One-time cost of building the cache (trunk forward only, timed once over the step batches); "
        "'pays off after' = build cost / time saved per pass over the data:"
    )
    print(_cache_table(rows))
    total = time.perf_counter() - start
    print(f"\ntotal wall time {total:.0f} s")
    if args.json is not None:
        payload = {
            "config": {
                "models": args.models,
                "devices": args.devices,
                "batch_size": {d: args.batch_size or DEFAULT_BATCH[d] for d in args.devices},
                "steps": {d: args.steps or DEFAULT_STEPS[d] for d in args.devices},
                "repeats": args.repeats,
                "threads": torch.get_num_threads(),
                "amp": args.amp,
                "lr": LR,
                "num_classes": NUM_CLASSES,
                "torch": torch.__version__,
            },
            "results": rows,
            "total_wall_s": total,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
