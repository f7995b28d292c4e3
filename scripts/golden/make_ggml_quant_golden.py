"""Goldens for `amthal export`'s block encoders, from the gguf package (llama.cpp's own
Python library; its `quantize` ports ggml's reference quantizers for the types it
covers: Q8_0 `quantize_row_q8_0_ref`, Q5_0 `quantize_row_q5_0_ref`).

Run with a Python that has `gguf` (the anchor venv has it; `pip install gguf` suffices):
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_ggml_quant_golden.py
Writes tests/golden/ggml_quants.json:
    values    f32 values, 16 blocks of 32: mixed signs and magnitudes, blocks whose value
              of largest magnitude is negative or positive, all zeros, a constant, ties
              of the rounding (values at exact half steps), a block of tiny values
    quants    {type: hex of the encoded bytes} for Q8_0 and Q5_0
"""
import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize

ROOT = Path(__file__).resolve().parents[2]
rng = np.random.default_rng(11)
blocks = [
    rng.normal(0, 0.02, 32),
    rng.normal(0, 1.0, 32),
    rng.uniform(-3, 1, 32),  # largest magnitude negative
    rng.uniform(-1, 3, 32),  # largest magnitude positive
    np.zeros(32),
    np.full(32, 0.125),
    np.arange(32) - 16.0,  # exact steps
    (np.arange(32) - 15.5) / 8.0,  # half steps: ties of the rounding
    rng.normal(0, 1e-6, 32),
    rng.standard_t(2, 32) * 0.05,  # heavy tails
]
while len(blocks) < 16:
    blocks.append(rng.normal(0, rng.uniform(0.001, 2.0), 32))
values = np.concatenate(blocks).astype(np.float32)
quants = {}
for name in ["Q8_0", "Q5_0"]:
    encoded = quantize(values.reshape(1, -1), GGMLQuantizationType[name])
    quants[name] = encoded.tobytes().hex()
out = ROOT / "tests" / "golden" / "ggml_quants.json"
out.write_text(json.dumps({"values": [float(v) for v in values], "quants": quants}, indent=1) + "\n")
print(f"wrote {out}")
