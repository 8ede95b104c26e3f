#!/usr/bin/env bash
# The llama.cpp benchmark environment (never a lowbit dependency): llama-cpp-python built from its source
# distribution, which compiles llama.cpp (about 12 minutes on 2 cores; once — the env is reused while it exists).
# Its Python binding carries llama.cpp's quantizer (llama_model_quantize); the CLI tools (imatrix) are not built.
#   bash benchmarks/llamacpp_env.sh [VERSION]      -> benchmarks/.venv-llamacpp
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
env=$here/.venv-llamacpp
version=${1:-0.3.36}
cmake_args="-DGGML_NATIVE=ON"
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
  # llama.cpp's AMX matmul (0.3.36) segfaults on the first eval of a Q4_0 or Q8_0 file of SmolLM2 on a 2-core
  # Sapphire-Rapids-class VM (2026-12-08; llama.cpp issue 20824 reports the same crash): build without AMX, so
  # its AVX-512 VNNI kernels and repacked Q4_0 run — what a user of that CPU gets once the crash is avoided.
  cmake_args="$cmake_args -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"
fi
if [ -x "$env/bin/python" ] && "$env/bin/python" -c "import llama_cpp" 2>/dev/null \
    && [ "$(cat "$env/cmake-args" 2>/dev/null)" = "$cmake_args $version" ]; then
  echo "$env (cached)"; exit 0
fi
rm -rf "$env"
python3 -m venv "$env"
"$env/bin/pip" install -q --upgrade pip
CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2} \
  "$env/bin/pip" install -q --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$version" numpy
"$env/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
echo "$cmake_args $version" > "$env/cmake-args"
echo "$env"
