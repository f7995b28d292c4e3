"""Checks, with transformers + PEFT, that what amthal writes loads in Python with the same
logits: a LoRA adapter saved by amthal (PeftModel.from_pretrained), and merged HF model
folders, single-file and sharded (AutoModelForCausalLM.from_pretrained).

    scripts/golden/check_exports.sh     # runs the Rust test that writes them, then this
"""
import json, sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
export = Path(sys.argv[1])
golden = load_file(ROOT / "tests" / "golden" / "tiny_llama.safetensors")["adapter"]
sequences = json.loads((ROOT / "tests" / "golden" / "tiny_llama.json").read_text())["sequences"]


def check(model, what):
    worst = 0.0
    with torch.no_grad():
        for i, seq in enumerate(sequences):
            logits = model(torch.tensor([seq])).logits[0]
            worst = max(worst, (logits - golden[i, : len(seq)]).abs().max().item())
    status = "ok" if worst <= 1e-4 else "MISMATCH"
    print(f"{status}: {what}: max abs logit difference {worst:.2e}")
    return worst <= 1e-4


base = AutoModelForCausalLM.from_pretrained(ROOT / "tests" / "fixtures" / "tiny-llama", dtype=torch.float32).eval()
results = [check(PeftModel.from_pretrained(base, export / "adapter").eval(), "amthal adapter in PeftModel")]
for folder in ["merged", "sharded"]:
    model = AutoModelForCausalLM.from_pretrained(export / folder, dtype=torch.float32).eval()
    results.append(check(model, f"amthal {folder} folder in AutoModelForCausalLM"))
tok = AutoTokenizer.from_pretrained(export / "merged")
reference = AutoTokenizer.from_pretrained(ROOT / "tests" / "fixtures" / "tiny-llama")
same = tok("يضرب المثل")["input_ids"] == reference("يضرب المثل")["input_ids"]
print(("ok" if same else "MISMATCH") + ": tokenizer saved by amthal")
sys.exit(0 if all(results) and same else 1)
