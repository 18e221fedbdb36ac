"""One peer of the hivemind baseline in bench/wan.py: `hivemind.Optimizer` on p2pnode's model and data.

What a user would pick instead of p2pnode: collaborative training with hivemind's Optimizer over a
hivemind DHT. The peer fine-tunes the same trainable tail (the trunk's features cached as in p2pnode)
on its share of the same --split, `--batch-size` samples per local step, and the swarm takes one
optimizer step per `--target-batch-size` samples (gradients averaged by all-reduce). It waits for all
peers (ready files in --workdir) before training, evaluates the test set after every pass of the swarm
over the training data, and writes `{"t", "step", "accuracy"}` lines to --out. It stops after --steps
swarm steps. Tuning (see bench/wan.py): matchmaking_time 1 s (the default 15 s would make every step
at least 15 s), gradients in fp16, parameters re-averaged only every --average-state-every steps
(every step would double the bytes; the averaged gradients keep the peers in step anyway).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
from pathlib import Path

import hivemind
import torch
from hivemind.compression import Float16Compression, NoCompression
from torch.nn import functional as F

from p2pnode.node.data import parse_split, partition
from p2pnode.node.settings import RunSettings
from p2pnode.node.training import FeatureBank, prepare_model_and_data

# hivemind 1.1.12's 8-bit decoders fail silently with numpy >= 2.4 (DESIGN §4, §6): not offered
COMPRESSION = {"none": NoCompression, "fp16": Float16Compression}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", action="store_true", help="only run a plain hivemind DHT peer; print its address")
    ap.add_argument("--index", type=int)
    ap.add_argument("--peers", help="bootstrap multiaddr")
    ap.add_argument("--listen", required=True)
    ap.add_argument("--workdir")
    ap.add_argument("--out")
    ap.add_argument("--model", default="vit_digits_s")
    ap.add_argument("--split", default="0-1,2-3,4-6,7-9")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--target-batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=0, help="swarm optimizer steps to run")
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    ap.add_argument("--matchmaking-time", type=float, default=2.0)
    ap.add_argument("--request-timeout", type=float, default=1.0, help="below --matchmaking-time")
    ap.add_argument("--average-state-every", type=int, default=50)
    ap.add_argument("--compression", choices=sorted(COMPRESSION), default="fp16")
    args = ap.parse_args()
    if args.bootstrap:
        dht = hivemind.DHT(host_maddrs=[args.listen], start=True)
        print(dht.get_visible_maddrs()[0], flush=True)
        while dht.is_alive():
            time.sleep(1)
        return
    torch.manual_seed(args.index)

    settings = RunSettings(model=args.model, split=args.split).validate()
    model, data = prepare_model_and_data(settings, torch.device("cpu"))
    split = parse_split(settings.split)
    parts = partition(data.train_labels, split, settings.nodes, settings.seed, data.num_classes, data.name)
    mine = parts[args.index]
    train = FeatureBank(model, data.train, data.train_labels, mine)
    test = FeatureBank(model, data.test, data.test_labels)
    tail = model.tail
    samples = sum(len(p) for p in parts)
    steps_per_pass = samples / args.target_batch_size

    dht = hivemind.DHT(initial_peers=[args.peers], host_maddrs=[args.listen], start=True)
    compression = COMPRESSION[args.compression]()
    opt = hivemind.Optimizer(
        dht=dht,
        run_id="wan_baseline",
        params=tail.parameters(),
        optimizer=lambda params: (
            torch.optim.Adam(params, lr=args.lr)
            if args.optimizer == "adam"
            else torch.optim.SGD(params, lr=args.lr, momentum=args.momentum)
        ),
        # the same cosine step size over the run that p2pnode uses
        scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(
            o, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, args.steps) / args.steps))
        ),
        batch_size_per_step=args.batch_size,
        target_batch_size=args.target_batch_size,
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=60.0,
        average_state_every=args.average_state_every,
        averager_opts=dict(request_timeout=args.request_timeout),  # below matchmaking_time (DESIGN §6)
        grad_compression=compression,
        state_averaging_compression=compression,
        verbose=False,
    )
    workdir = Path(args.workdir)
    (workdir / f"ready{args.index}").touch()
    nodes = settings.nodes
    deadline = time.time() + 300
    while sum((workdir / f"ready{i}").exists() for i in range(nodes)) < nodes and time.time() < deadline:
        time.sleep(0.2)  # without this barrier early peers take steps alone (DESIGN §6)
    if sum((workdir / f"ready{i}").exists() for i in range(nodes)) < nodes:
        raise SystemExit(f"peer {args.index}: not every peer was ready within 300 s")
    t0 = time.time()
    out = Path(args.out).open("w")  # noqa: SIM115 (written to until the end of the run)

    def evaluate() -> float:
        with torch.no_grad():
            x, y = test.get(torch.arange(len(test.labels)))
            return float((tail(x).argmax(1) == y).float().mean())

    rng = torch.Generator().manual_seed(args.index)
    order = torch.empty(0, dtype=torch.long)
    next_eval = 1
    while opt.local_epoch < args.steps:
        if len(order) < args.batch_size:  # shuffled passes over the local data, as p2pnode draws them
            order = torch.cat([order, torch.as_tensor(mine)[torch.randperm(len(mine), generator=rng)]])
        batch, order = order[: args.batch_size], order[args.batch_size :]
        x, y = train.get(batch)
        loss = F.cross_entropy(tail(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if opt.local_epoch >= next_eval * steps_per_pass or opt.local_epoch >= args.steps:
            record = {"t": time.time() - t0, "step": opt.local_epoch, "accuracy": evaluate(), "loss": float(loss)}
            out.write(json.dumps(record) + "\n")
            out.flush()
            next_eval = math.floor(opt.local_epoch / steps_per_pass) + 1
    out.close()
    # hivemind's shutdown can hang when the other peers have gone: bounded, then the process ends (its
    # DHT and p2pd children are in its process group, which the bench ends)
    closer = threading.Thread(target=lambda: (opt.shutdown(), dht.shutdown()), daemon=True)
    closer.start()
    closer.join(15)
    os._exit(0)


if __name__ == "__main__":
    main()
