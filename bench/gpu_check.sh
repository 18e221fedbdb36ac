#!/usr/bin/env bash
# The GPU checks of the internet issue, as one script for a lent CUDA machine (no network there):
#   1. bench/throughput.py on CUDA (fp32 and bf16 autocast): images/s with and without the feature cache;
#   2. a 4-node testnet on one GPU with vit_small_patch16_224 (random weights: no hub) on digits resized
#      to 224, codecs none and int8: images/s per node, seconds per round, share of a round spent waiting
#      for in-neighbours (result.json's wait_seconds / round_seconds).
# Packages the machine lacks (hivemind and its needs, p2pnode itself) travel as wheels in .whl/:
#   .venv/bin/pip wheel --no-deps -w .whl .     (plus hivemind's wheels, see the README's GPU section)
# Everything it measures lands in $OUT (default ./gpu-out).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
python3 -c "import hivemind, p2pnode.node.daemon" || exit 1
nvidia-smi -L | tee "$OUT/gpu.txt"
timeout 150 python3 bench/throughput.py --devices cuda --models vit_small_patch16_224,deit_small_patch16_224 \
  --json "$OUT/throughput_fp32.json" 2>&1 | tail -8
timeout 90 python3 bench/throughput.py --devices cuda --models vit_small_patch16_224 --amp \
  --json "$OUT/throughput_bf16.json" 2>&1 | tail -4
for codec in none int8; do
  rm -rf "/tmp/tn-$codec"
  timeout 200 python3 -m p2pnode.cli.app testnet --model vit_small_patch16_224 --device cuda --epochs 2 \
    --codec "$codec" --round-timeout 30 --timeout 180 --workdir "/tmp/tn-$codec" --json "$OUT/testnet_$codec.json" \
    2>&1 | tail -9
  [ -f "/tmp/tn-$codec/node0/result.json" ] || tail -n 5 /tmp/tn-$codec/*.log
  python3 - "$codec" "$OUT" <<'EOF'
import json, sys, pathlib
codec, out = sys.argv[1], pathlib.Path(sys.argv[2])
rows = []
for path in sorted(pathlib.Path(f"/tmp/tn-{codec}").glob("node*/result.json")):
    r = json.loads(path.read_text())
    batch = r["settings"]["batch_size"]
    rows.append({
        "node": r["index"], "rounds": r["rounds"], "accuracy": r["accuracy"],
        "images_per_s": batch * r["rounds"] / r["round_seconds"],
        "seconds_per_round": r["round_seconds"] / r["rounds"],
        "waiting_share": r["wait_seconds"] / r["round_seconds"],
        "mb_sent": r["bytes_sent"] / 1e6,
    })
    print(codec, rows[-1])
(out / f"testnet_{codec}_nodes.json").write_text(json.dumps(rows, indent=1))
EOF
done
