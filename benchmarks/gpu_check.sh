#!/usr/bin/env bash
# The GPU figures in one run, on a machine with PyTorch and CUDA but no vLLM and no network (under 10 minutes on one
# H100/H200-class GPU; each stage has its own limit, compiling takes minutes): the vision service on InternVL3.5-8B's
# real vision shapes (`vision8b`, bf16), eager and compiled (`vision_server --compile`), against its bare forward loop, with MFU against an in-run bf16 matmul and
# the card's data-sheet peak; then the embedding transfer benchmark.
#
#   benchmarks/gpu_check.sh [OUT_DIR]        # default results/gpu_check
#
# Needs, beside torch: grpcio, grpcio-health-checking, protobuf, numpy, Pillow, safetensors, tokenizers,
# prometheus-client, matplotlib, tqdm, and the generated stubs in dvd/v2 (`./run.sh setup` makes them; copy them
# along where setup cannot run). The checkpoint is generated locally (no hub).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
out=$(readlink -f "${1:-results/gpu_check}")
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

"$py" - <<'EOF'
import importlib.util, sys
need = ["torch", "grpc", "grpc_health", "google.protobuf", "numpy", "PIL", "safetensors", "tokenizers",
        "prometheus_client", "matplotlib", "tqdm", "dvd.v2.vision_pb2"]
missing = [m for m in need if importlib.util.find_spec(m.split(".")[0]) is None
           or (m.startswith("dvd.v2") and importlib.util.find_spec(m) is None)]
if missing:
    sys.exit(f"missing: {', '.join(missing)}")
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device")
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), flush=True)
EOF
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv || true

# Each stage runs under its own limit and a failing one does not stop the next (a lease is short and one try counts).
stage() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%T))" >&2
  timeout "$limit" "$@" --out "$out/$name" 2>&1 | grep -v -i warn | tee "$out/$name.log" \
    || echo "== $name failed or ran past ${limit}s" >&2
}
"$py" -c "from dvd.checkpoint import resolve_model; print(resolve_model('vision8b'))"  # generated once, not timed
vision=(benchmarks/vision_bench.py --device cuda --model vision8b --no-vllm --images 64 --image-size 896x896
        --concurrency 8 --rounds 2 --repeats 3 --lone-requests 10)
stage vision8b-eager 120 "$py" "${vision[@]}"
stage transfer 90 "$py" benchmarks/transfer.py --images 48
stage vision8b-compiled 320 "$py" "${vision[@]}" --compile
