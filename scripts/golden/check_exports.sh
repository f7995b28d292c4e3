#!/usr/bin/env bash
# Writes an adapter and merged model folders with amthal (the model_layer round-trip
# test), then loads them with PEFT and transformers (anchor venv) and compares logits.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
source "$root/scripts/env.sh"
python=${ANCHOR_PYTHON:-$HOME/.cache/amthal-anchor/bin/python}
export AMTHAL_EXPORT_DIR=$(mktemp -d)
cd "$root"
cargo test --release --test model_layer adapter_round_trip_and_merge_keep_the_logits -- --exact --quiet
"$python" scripts/golden/check_exports.py "$AMTHAL_EXPORT_DIR"
rm -rf "$AMTHAL_EXPORT_DIR"
