#!/usr/bin/env bash
# The llama.cpp benchmark environment (never a lowbit dependency): llama-cpp-python built from its source
# distribution, which compiles llama.cpp (about 12 minutes on 2 cores; once — the env is reused while it exists).
# Its Python binding carries llama.cpp's quantizer (llama_model_quantize); the CLI tools (imatrix) are not built.
#   bash benchmarks/llamacpp_env.sh [VERSION]      -> benchmarks/.venv-llamacpp
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
env=$here/.venv-llamacpp
version=${1:-0.3.36}
if [ -x "$env/bin/python" ] && "$env/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "$env (cached)"; exit 0
fi
python3 -m venv "$env"
"$env/bin/pip" install -q --upgrade pip
CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2} \
  "$env/bin/pip" install -q --no-binary llama-cpp-python "llama-cpp-python==$version" numpy
"$env/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
echo "$env"
