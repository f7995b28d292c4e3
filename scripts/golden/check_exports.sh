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
amthal=$CARGO_TARGET_DIR/release/amthal
tiny=tests/fixtures/tiny-llama
"$amthal" tokenize --model $tiny --data examples/data/Validation_data.csv --prompt-format plain --jsonl \
    > "$AMTHAL_EXPORT_DIR/tokenized.jsonl" 2>/dev/null
# A LoRA, a DoRA and a PiSSA adapter (saved converted) trained by amthal, each with amthal's
# loss on the Validation rows.
for kind in lora dora pissa; do
    extra=""; [ $kind = dora ] && extra=--use-dora; [ $kind = pissa ] && extra="--init-lora-weights pissa"
    "$amthal" train --model $tiny --data-dir examples/data --output-dir "$AMTHAL_EXPORT_DIR/trained_$kind" --lora $extra \
        --lr 5e-3 --max-steps 10 --bsz 4 --grad-accum 1 --precision f32 --device cpu --prompt-format plain \
        --eval-strategy no --previews 0 >/dev/null 2>&1
    "$amthal" loss --model $tiny --adapter "$AMTHAL_EXPORT_DIR/trained_$kind" --data examples/data/Validation_data.csv \
        --prompt-format plain --precision f32 --device cpu --json > "$AMTHAL_EXPORT_DIR/trained_${kind}_loss.json" 2>/dev/null
done
"$python" scripts/golden/check_exports.py "$AMTHAL_EXPORT_DIR"
rm -rf "$AMTHAL_EXPORT_DIR"
