#!/usr/bin/env bash
# llama.cpp's own command-line tools for the side-by-side benchmark (never a lowbit dependency): llama-imatrix
# and llama-quantize, built from the llama.cpp that llama-cpp-python's source distribution vendors (the same
# version the benchmark's Python binding runs; about 10 minutes on 2 cores, once).
#   bash benchmarks/llamacpp_tools.sh [VERSION]      -> benchmarks/.llamacpp-tools/bin/{llama-imatrix,llama-quantize}
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest=$here/.llamacpp-tools
version=${1:-0.3.36}
if [ -x "$dest/bin/llama-imatrix" ] && [ -x "$dest/bin/llama-quantize" ]; then
  echo "$dest/bin (cached)"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-binary :all: --no-deps -d "$work" "llama-cpp-python==$version"
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DBUILD_SHARED_LIBS=OFF > "$work/configure.log"
cmake --build "$work/build" --target llama-imatrix llama-quantize -j "${JOBS:-2}" > "$work/build.log"
mkdir -p "$dest/bin"
cp "$work/build/bin/llama-imatrix" "$work/build/bin/llama-quantize" "$dest/bin/"
echo "$dest/bin"
