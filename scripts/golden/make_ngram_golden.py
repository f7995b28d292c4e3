"""Goldens for `--no-repeat-ngram-size` and `--repetition-penalty`, from transformers (f32, CPU).

Run with the anchor venv (scripts/anchors/setup.sh):
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_ngram_golden.py
Writes tests/golden/no_repeat_ngram.json:
    bans        random token sequences (a small vocabulary, so n-grams repeat) and, for
                n = 1..4, the ids NoRepeatNGramLogitsProcessor sets to -inf
    generations greedy generate() on the tiny Llama fixture, one prompt at a time, with
                no_repeat_ngram_size and repetition_penalty combinations
"""
import json, random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
random.seed(7)

bans = []
for _ in range(40):
    length = random.randint(1, 14)
    sequence = [random.randint(0, 5) for _ in range(length)]
    for n in range(1, 5):
        processor = NoRepeatNGramLogitsProcessor(n)
        scores = processor(torch.tensor([sequence]), torch.zeros(1, 6))
        banned = [i for i in range(6) if scores[0, i] == float("-inf")]
        bans.append({"sequence": sequence, "n": n, "banned": banned})

model = AutoModelForCausalLM.from_pretrained(str(ROOT / "tests" / "fixtures" / "tiny-llama"),
                                             dtype=torch.float32).eval()
prompts = [[1, 17, 250, 33], [1, 300, 301, 302, 17, 40], [1, 5, 6, 7, 5, 6]]
generations = []
for ngram, penalty in [(2, 1.0), (3, 1.0), (2, 1.3), (0, 1.3)]:
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                 no_repeat_ngram_size=ngram, repetition_penalty=penalty,
                                 pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        gaps = []
        for scores in out.scores:
            finite = scores[0][torch.isfinite(scores[0])]
            top = torch.topk(finite, 2).values
            gaps.append(float(top[0] - top[1]))
        generations.append({"prompt_ids": prompt, "no_repeat_ngram_size": ngram,
                            "repetition_penalty": penalty,
                            "generated": out.sequences[0, len(prompt):].tolist(), "top2_gaps": gaps})

(GOLDEN / "no_repeat_ngram.json").write_text(json.dumps({
    "source": f"transformers {__import__('transformers').__version__}: NoRepeatNGramLogitsProcessor, "
              "generate(do_sample=False) on tests/fixtures/tiny-llama, f32",
    "max_new_tokens": 24, "bans": bans, "generations": generations}, indent=1) + "\n")
print(f"wrote no_repeat_ngram.json: {len(bans)} ban cases, {len(generations)} generations")
