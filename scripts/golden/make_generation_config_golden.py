"""Goldens for how `evaluate` merges its flags over a model's generation_config.json.

transformers' `generate(**kwargs)` takes each setting from its keyword argument if
given, else from `model.generation_config` (read from generation_config.json), else
from GenerationConfig's defaults. This script writes a generation_config.json into a
copy of the tiny Llama fixture for each case, loads it with transformers, and records
what `model._prepare_generation_config(None, **kwargs)` (the merge `generate` runs
first) resolves to.

Run with the anchor venv (scripts/anchors/setup.sh):
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_generation_config_golden.py
Writes tests/golden/generation_config.json: a list of
    {"file": generation_config.json's keys, "kwargs": generate's keyword arguments,
     "resolved": the merged settings (null: unset, the processor is off)}
"""
import json, shutil, tempfile
from pathlib import Path

import transformers
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-llama"
KEYS = ["do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff",
        "eta_cutoff", "top_h", "repetition_penalty", "no_repeat_ngram_size", "num_beams",
        "length_penalty", "early_stopping", "max_new_tokens", "min_new_tokens"]
LLAMA3 = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6,
          "top_p": 0.9}
CASES = [
    ({"bos_token_id": 1, "eos_token_id": 2}, {}),
    (LLAMA3, {}),
    (LLAMA3, {"do_sample": False}),
    (LLAMA3, {"temperature": 1.0}),
    (LLAMA3, {"temperature": 0.8, "top_p": 1.0, "top_k": 7}),
    (LLAMA3, {"top_k": 0, "min_p": 0.1}),
    ({"do_sample": True, "top_k": None, "temperature": 0.7}, {}),
    ({"do_sample": True, "top_k": 20, "min_p": 0.05, "typical_p": 0.9, "epsilon_cutoff": 3e-4,
      "eta_cutoff": 1e-3, "repetition_penalty": 1.1, "no_repeat_ngram_size": 3,
      "max_new_tokens": 7, "min_new_tokens": 2}, {"top_k": 5, "max_new_tokens": 9}),
    ({"do_sample": True, "top_h": 0.5}, {"repetition_penalty": 1.3}),
    ({"do_sample": False, "temperature": 0.6, "top_p": 0.9}, {"do_sample": True}),
    ({"do_sample": False, "temperature": 0.6, "top_p": 0.9}, {}),
    ({"repetition_penalty": 1.2, "no_repeat_ngram_size": 2}, {}),
    ({"repetition_penalty": 1.2, "no_repeat_ngram_size": 2},
     {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}),
    ({"num_beams": 4, "length_penalty": 0.5, "early_stopping": "never"}, {}),
    ({"num_beams": 4, "early_stopping": True}, {"num_beams": 2, "early_stopping": False}),
    ({"num_beams": 3}, {"num_beams": 1}),
    ({"pad_token_id": 0, "max_length": 4096, "transformers_version": "4.40.0",
      "use_cache": True}, {"max_new_tokens": 5}),
]

cases = []
with tempfile.TemporaryDirectory() as scratch:
    folder = Path(scratch) / "model"
    shutil.copytree(FIXTURE, folder)
    for file, kwargs in CASES:
        (folder / "generation_config.json").write_text(json.dumps(file))
        model = AutoModelForCausalLM.from_pretrained(str(folder))
        config, _ = model._prepare_generation_config(None, **kwargs)
        config.validate()  # what generate refuses (warnings for unused settings)
        cases.append({"file": file, "kwargs": kwargs,
                      "resolved": {key: getattr(config, key) for key in KEYS}})

out = ROOT / "tests" / "golden" / "generation_config.json"
out.write_text(json.dumps({"transformers": transformers.__version__, "cases": cases},
                          indent=1) + "\n")
print(f"wrote {len(cases)} cases to {out}")
