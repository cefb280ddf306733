#!/usr/bin/env bash
# Makes the developer environments that live outside Pants (ignored by git, under .venv/):
#   tools/dev_env.sh            .venv/py312: CPython 3.12 + 3rdparty/python/requirements.txt, and the
#                               generated gRPC code in build/gen (the fast inner loop, benchmarks)
#   tools/dev_env.sh --torch    also .venv/py311-torch: CPython 3.11 + torch (CPU) + transformers, for
#                               tools/fixtures/make_hf_fixtures.py and tools/bench/hf_decode.py only
# Interpreters come from $PYTHON312 / $PYTHON311, else pyenv, else PATH. Idempotent: rerun it after
# 3rdparty/python/requirements.txt or protos/ change. Paths are relative to the repository root.
set -euo pipefail
torch=0
for arg in "$@"; do
  case "$arg" in
    --torch) torch=1 ;;
    -h | --help) sed -n '2,8p' "${BASH_SOURCE[0]}" | cut -c3-; exit 0 ;;
    *) echo "dev_env: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PIP_CONFIG_FILE=/dev/null  # the machine-wide pip.conf pins a constraints file (see pants.toml)

find_python() {  # find_python 3.12 -> the path of a CPython 3.12 interpreter
  local v=$1 cand
  for cand in "${2:-}" "$(command -v pyenv >/dev/null && pyenv root)/versions/$v"*/bin/python$v \
    "$(command -v python$v || true)"; do
    [ -n "$cand" ] && [ -x "$cand" ] && "$cand" -c 'import sys' 2>/dev/null && { echo "$cand"; return; }
  done
  echo "dev_env: no CPython $v found (install it with pyenv, or set PYTHON${v/./})" >&2
  exit 1
}

py312=$(find_python 3.12 "${PYTHON312:-}")
if [ ! -x .venv/py312/bin/python ]; then
  "$py312" -m venv .venv/py312
fi
.venv/py312/bin/pip install -q --upgrade pip
.venv/py312/bin/pip install -q -r 3rdparty/python/requirements.txt grpcio-tools==1.85.1
mkdir -p build/gen
.venv/py312/bin/python -m grpc_tools.protoc -Iprotos --python_out=build/gen --pyi_out=build/gen \
  --grpc_python_out=build/gen protos/pathways/v1/*.proto
echo "dev_env: .venv/py312 ready; run e.g.  PYTHONPATH=libs:.:build/gen .venv/py312/bin/python -m pytest libs -m 'not slow'"

if [ "$torch" = 1 ]; then
  py311=$(find_python 3.11 "${PYTHON311:-}")
  [ -x .venv/py311-torch/bin/python ] || "$py311" -m venv .venv/py311-torch
  tpip=.venv/py311-torch/bin/pip
  # torch from PyPI is a multi-GB CUDA build: take the CPU wheel, from pip's find-links when one is
  # there (PIP_FIND_LINKS; these machines keep it in /opt/wheels, no network needed), else from
  # PyTorch's CPU index. Then its dependencies and the rest, with torch already satisfied.
  "$tpip" install -q --no-index --no-deps torch==2.13.0 2>/dev/null \
    || "$tpip" install -q --no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  # The versions tests/fixtures/hf/manifest.json records (the fixtures depend on them).
  "$tpip" install -q torch==2.13.0 transformers==5.24.0 safetensors tokenizers numpy
  echo "dev_env: .venv/py311-torch ready (tools/fixtures/make_hf_fixtures.py, tools/bench/hf_decode.py)"
fi
