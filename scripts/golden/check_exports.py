"""Checks, with transformers + PEFT, that what amthal writes loads in Python with the same
logits: a LoRA adapter saved by amthal (PeftModel.from_pretrained), merged HF model
folders, single-file and sharded (AutoModelForCausalLM.from_pretrained), and LoRA and DoRA
adapters trained by `amthal train` (the same loss).

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

# Adapters trained by `amthal train` (LoRA, DoRA with --use-dora, PiSSA saved converted): PEFT's answer-token
# loss on amthal's token ids equals `amthal loss` with that adapter.
for kind in ["lora", "dora", "pissa"]:
    trained = export / f"trained_{kind}"
    if not trained.is_dir():
        continue
    rows = [json.loads(l) for l in (export / "tokenized.jsonl").read_text().splitlines()]
    ours = json.loads((export / f"trained_{kind}_loss.json").read_text())["loss"]
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(ROOT / "tests" / "fixtures" / "tiny-llama", dtype=torch.float32),
        trained).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
            logits = peft_model(ids).logits[0, :-1]
            mask = labels[1:] != -100
            total += torch.nn.functional.cross_entropy(logits[mask], labels[1:][mask], reduction="sum").item()
            count += int(mask.sum())
    theirs = total / count
    ok = abs(ours - theirs) / theirs <= 1e-5
    print(("ok" if ok else "MISMATCH") + f": {kind} adapter trained by amthal in PeftModel: loss {theirs:.8f} vs amthal {ours:.8f}")
    results.append(ok)
sys.exit(0 if all(results) and same else 1)
