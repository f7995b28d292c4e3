"""HF Trainer-equivalent LoRA run (transformers + PEFT + torch AdamW) on exactly the token ids
and labels amthal trains on, then the token-weighted answer-token eval loss on the validation
ids: the number amthal's run should reach after the same steps.
usage: hf_same_recipe.py MODEL.gguf TRAIN.jsonl VALID.jsonl --steps N --bsz B [--bf16]
(TRAIN/VALID.jsonl from `amthal tokenize --jsonl`; batches in file order, lr 2e-5 constant,
no warmup, no clipping, LoRA r16 alpha32 dropout 0 on all 7 projections, seed 42)."""
import argparse, json, os
import torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("train"); ap.add_argument("valid")
ap.add_argument("--steps", type=int, default=8); ap.add_argument("--bsz", type=int, default=2)
ap.add_argument("--bf16", action="store_true")
a = ap.parse_args()
torch.manual_seed(42); torch.set_num_threads(os.cpu_count())
load = lambda p: [json.loads(l) for l in open(p)]
train, valid = load(a.train), load(a.valid)
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(a.model), gguf_file=os.path.basename(a.model),
                                             dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.0)


def batch(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    return ids, mask, labels


def loss_sum(rows):
    ids, mask, labels = batch(rows)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != -100
    return torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"), int(keep.sum())


model.train()
for step in range(a.steps):
    rows = train[step * a.bsz:(step + 1) * a.bsz]
    total, count = loss_sum(rows)
    (total / count).backward(); opt.step(); opt.zero_grad()
model.eval()
total, count = 0.0, 0
with torch.no_grad():
    for i in range(0, len(valid), 8):
        s, c = loss_sum(valid[i:i + 8]); total += s.item(); count += c
print(json.dumps({"eval_loss": total / count, "answer_tokens": count}))
