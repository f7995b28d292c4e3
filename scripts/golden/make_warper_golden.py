"""Golden sets for HF's sampling warpers: which tokens survive temperature, top_h, top_k, top_p,
min_p, typical_p, epsilon_cutoff and eta_cutoff, alone and chained, as `generate(do_sample=True)`
builds and orders them (the model's own `_get_logits_processor`, transformers on CPU).

Run with the anchor venv after make_model_golden.py (it reads tests/fixtures/tiny-llama only to
have a model whose `_get_logits_processor` to call):
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_warper_golden.py
Writes tests/golden/sampling_warpers.json: rows of logits (float32 values; -inf where an earlier
processor, say no_repeat_ngram_size, banned a token) and cases {settings, row, kept}: the token
ids left finite. A case is kept only when float32 and float64 logits leave the same tokens, so no
answer is decided by rounding.
"""
import json
import math
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 40

SETTINGS = [
    {"temperature": 0.7},
    {"top_k": 5},
    {"top_k": 1},
    {"top_p": 0.9},
    {"top_p": 0.5},
    {"top_p": 0.05},
    {"min_p": 0.1},
    {"min_p": 0.3},
    {"min_p": 1.0},
    {"typical_p": 0.9},
    {"typical_p": 0.5},
    {"typical_p": 0.2},
    {"epsilon_cutoff": 0.02},
    {"epsilon_cutoff": 0.1},
    {"eta_cutoff": 0.02},
    {"eta_cutoff": 0.3},
    {"top_h": 0.4},
    {"top_h": 0.9},
    {"temperature": 1.5, "top_k": 20, "top_p": 0.9, "min_p": 0.05},
    {"temperature": 0.5, "top_p": 0.95, "typical_p": 0.8},
    {"temperature": 1.3, "typical_p": 0.8, "eta_cutoff": 0.01},
    {"top_h": 0.7, "top_k": 10, "epsilon_cutoff": 0.01},
    {"temperature": 0.8, "top_h": 0.9, "top_k": 30, "top_p": 0.9, "min_p": 0.02, "typical_p": 0.95,
     "epsilon_cutoff": 0.001, "eta_cutoff": 0.001},
]


def rows():
    generator = torch.Generator().manual_seed(3)
    out = []
    for scale in [0.5, 1.0, 2.0, 4.0]:
        for banned in [0, 5]:
            logits = torch.randn(VOCAB, generator=generator) * scale
            if banned:
                logits[torch.randperm(VOCAB, generator=generator)[:banned]] = -math.inf
            out.append(logits)
    # A tie at the top-k threshold (HF keeps every token equal to the k-th value).
    tied = torch.randn(VOCAB, generator=generator)
    tied[[3, 7, 11]] = tied.max() + 0.5
    out.append(tied)
    return out


def kept(model, settings, logits):
    config = GenerationConfig(do_sample=True, **{"top_k": 0, **settings})
    processors = model._get_logits_processor(generation_config=config, input_ids_seq_length=1,
                                             device="cpu")
    scores = processors(torch.zeros(1, 1, dtype=torch.long), logits.clone().unsqueeze(0))[0]
    return [i for i, v in enumerate(scores.tolist()) if v != -math.inf]


def main():
    model = AutoModelForCausalLM.from_pretrained(str(ROOT / "tests" / "fixtures" / "tiny-llama"),
                                                 dtype=torch.float32)
    all_rows = rows()
    cases, dropped = [], 0
    for settings in SETTINGS:
        for index, logits in enumerate(all_rows):
            single = kept(model, settings, logits)
            double = kept(model, settings, logits.double())
            if single != double:
                dropped += 1
                continue
            cases.append({"settings": settings, "row": index, "kept": single})
    out = {"source": f"transformers {transformers.__version__} _get_logits_processor(do_sample=True)",
           "rows": [[v if math.isfinite(v) else None for v in r.tolist()] for r in all_rows],
           "cases": cases}
    path = ROOT / "tests" / "golden" / "sampling_warpers.json"
    path.write_text(json.dumps(out) + "\n")
    finite = [sum(1 for v in r.tolist() if math.isfinite(v)) for r in all_rows]
    filtering = sum(1 for c in cases if len(c["kept"]) < finite[c["row"]])
    print(f"{len(cases)} cases ({dropped} dropped: float32 and float64 differ), "
          f"{filtering} of them removing a token")


if __name__ == "__main__":
    main()
