"""Golden numbers for label smoothing (HF Trainer's label_smoothing_factor), from transformers' own
LabelSmoother on the tiny Llama (f32, CPU).

Run with the anchor venv after make_model_golden.py (it reads tests/fixtures/tiny-llama and the golden
sequences and labels of tests/golden/tiny_llama.json):
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_label_smoothing_golden.py
Writes tests/golden/label_smoothing.json:
    cases[i].epsilon             the smoothing factor
    cases[i].loss                what Trainer.compute_loss gives for the three golden rows as one
                                 right-padded batch: LabelSmoother(epsilon)(outputs, labels,
                                 shift_labels=True, num_items_in_batch=answer tokens)
    cases[i].micro_batches_loss  the same three rows as Trainer's gradient accumulation sees them:
                                 micro-batches [row 0, row 1] and [row 2], each normalised by the
                                 whole step's answer tokens (num_items_in_batch), summed
"""
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.trainer_pt_utils import LabelSmoother

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
TINY = json.loads((GOLDEN / "tiny_llama.json").read_text())
EPSILONS = [0.0, 0.1, 0.25, 0.9]


def right_padded(rows, labels):
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    padded_labels = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, padded_labels, mask


def main():
    model = AutoModelForCausalLM.from_pretrained(
        str(ROOT / "tests" / "fixtures" / "tiny-llama"), dtype=torch.float32).eval()
    rows, labels = TINY["sequences"], TINY["labels"]
    answer_tokens = sum(sum(1 for t in l[1:] if t != -100) for l in labels)

    def smoothed(epsilon, indices):
        ids, padded_labels, mask = right_padded([rows[i] for i in indices], [labels[i] for i in indices])
        with torch.no_grad():
            outputs = model(input_ids=ids, attention_mask=mask)
        return LabelSmoother(epsilon=epsilon)(outputs, padded_labels, shift_labels=True,
                                              num_items_in_batch=answer_tokens).item()

    cases = [{"epsilon": e, "loss": smoothed(e, [0, 1, 2]),
              "micro_batches_loss": smoothed(e, [0, 1]) + smoothed(e, [2])} for e in EPSILONS]
    out = {"source": f"transformers {transformers.__version__} LabelSmoother",
           "answer_tokens": answer_tokens, "cases": cases}
    (GOLDEN / "label_smoothing.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
