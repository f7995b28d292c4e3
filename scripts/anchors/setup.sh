#!/usr/bin/env bash
# Builds the Python reference stack used only for side-by-side benchmarks and golden files:
# HF transformers + PEFT (the seed's training/evaluation recipe) and the reference metric packages.
# usage: scripts/anchors/setup.sh [VENV_DIR]   (default ~/.cache/amthal-anchor)
set -euo pipefail
venv=${1:-$HOME/.cache/amthal-anchor}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q torch transformers peft gguf sacrebleu rouge rouge-score nltk bert-score sentence-transformers pandas bitsandbytes==0.50.2 tensorboard
echo "anchor venv ready: $venv/bin/python"
