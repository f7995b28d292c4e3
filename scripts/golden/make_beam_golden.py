"""Goldens for `evaluate --num-beams`: transformers' beam search on the tiny Llama fixture.

Run with the anchor venv (scripts/anchors/setup.sh):
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_beam_golden.py
Writes tests/golden/beam_search.json: for each prompt and setting (num_beams,
length_penalty, early_stopping, no_repeat_ngram_size, repetition_penalty, min_new_tokens),
the stop id and the best beam's generated ids (the stop id included when one ended it),
from generate(do_sample=False, num_beams=K) in f32.

The stop id of each case is a token the search would otherwise produce a few steps in
(found by a first search with no reachable stop id), so beams finish at different
lengths and the length penalty and the stopping rules matter; random prompts add pairs
of cases whose answers differ only by early_stopping. A case is kept only if
the same search in float64 gives the same ids: its choices are not decided by rounding,
so another machine's f32 kernels give the same answer.
"""
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
MAX_NEW = 20
UNREACHABLE = 511  # outside the fixture's 380-token vocabulary: no search can end on it

model = AutoModelForCausalLM.from_pretrained(str(ROOT / "tests" / "fixtures" / "tiny-llama"),
                                             dtype=torch.float32).eval()
model64 = AutoModelForCausalLM.from_pretrained(str(ROOT / "tests" / "fixtures" / "tiny-llama"),
                                               dtype=torch.float64).eval()


def search(m, prompt, eos, setting):
    with torch.no_grad():
        out = m.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                         num_beams=setting["num_beams"],
                         length_penalty=setting["length_penalty"],
                         early_stopping={"false": False, "true": True, "never": "never"}[
                             setting["early_stopping"]],
                         no_repeat_ngram_size=setting["no_repeat_ngram_size"],
                         repetition_penalty=setting["repetition_penalty"],
                         min_new_tokens=setting["min_new_tokens"],
                         eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


prompts = [[1, 17, 250, 33], [1, 300, 301, 302, 17, 40], [1, 5, 6, 7, 5, 6]]
settings = []
for beams in (2, 4):
    for penalty, early in ((1.0, "false"), (0.0, "false"), (2.0, "never"), (1.0, "true"),
                           (-1.0, "false")):
        settings.append(dict(num_beams=beams, length_penalty=penalty, early_stopping=early,
                             no_repeat_ngram_size=0, repetition_penalty=1.0, min_new_tokens=0))
settings.append(dict(num_beams=3, length_penalty=1.0, early_stopping="false",
                     no_repeat_ngram_size=2, repetition_penalty=1.0, min_new_tokens=0))
settings.append(dict(num_beams=3, length_penalty=1.0, early_stopping="false",
                     no_repeat_ngram_size=0, repetition_penalty=1.3, min_new_tokens=0))
settings.append(dict(num_beams=3, length_penalty=1.0, early_stopping="false",
                     no_repeat_ngram_size=0, repetition_penalty=1.0, min_new_tokens=6))

cases, dropped = [], 0
for prompt in prompts:
    for setting in settings:
        free = search(model, prompt, UNREACHABLE, setting)
        for at in (2, 5):
            eos = free[at]
            generated = search(model, prompt, eos, setting)
            if generated != search(model64, prompt, eos, setting):
                dropped += 1
                continue
            cases.append(dict(prompt_ids=prompt, stop_id=eos, generated=generated, **setting))

# Cases where the stopping rule decides the answer: the same search under "false" and
# "true" gives different ids (without them the goldens would pass with "true" left
# out). "never" and "false" differ only when a beam's later tokens are likelier than
# its earlier ones, which neither this random model nor SmolLM2 (tried on short
# questions) shows in 20 tokens: pairs where they differ are kept if found, and
# src/beam_search.rs tests the heuristic's arithmetic on made-up scores.
import random
random.seed(11)
deciding = {"never": 0, "true": 0}
tries = 0
while deciding["true"] < 6 and tries < 200:
    tries += 1
    prompt = [1] + [random.randint(3, 379) for _ in range(random.randint(2, 7))]
    beams, penalty = random.choice((2, 3, 4)), random.choice((0.5, 1.0, 2.0, 3.0))
    base = dict(num_beams=beams, length_penalty=penalty, early_stopping="false",
                no_repeat_ngram_size=0, repetition_penalty=1.0, min_new_tokens=0)
    free = search(model, prompt, UNREACHABLE, base)
    eos = free[random.randint(1, 6)]
    answers = {rule: search(model, prompt, eos, dict(base, early_stopping=rule))
               for rule in ("false", "true", "never")}
    for rule in ("never", "true"):
        if answers[rule] == answers["false"] or deciding[rule] >= 6:
            continue
        pair = [dict(base, early_stopping=r) for r in ("false", rule)]
        if all(answers[s["early_stopping"]] == search(model64, prompt, eos, s) for s in pair):
            deciding[rule] += 1
            for s in pair:
                cases.append(dict(prompt_ids=prompt, stop_id=eos,
                                  generated=answers[s["early_stopping"]], **s))
assert deciding["true"] >= 6, deciding

# Prompts searched together: one setting and one stop id for all (a token several
# prompts' searches reach), each prompt's answer alone (f32 equal to float64) being
# what the batched search must give. Their answers end at different steps, so prompts
# leave the batch while others go on.
batch_setting = dict(num_beams=3, length_penalty=1.0, early_stopping="false",
                     no_repeat_ngram_size=0, repetition_penalty=1.0, min_new_tokens=0)
batch_prompts = prompts + [[1] + [random.randint(3, 379) for _ in range(n)] for n in (1, 3, 5, 8, 2)]
counts = {}
for prompt in batch_prompts:
    for token in search(model, prompt, UNREACHABLE, batch_setting)[1:10]:
        counts[token] = counts.get(token, 0) + 1
best = None
for stop in sorted(counts, key=counts.get, reverse=True)[:8]:
    answers = [search(model, prompt, stop, batch_setting) for prompt in batch_prompts]
    variety = len({len(a) for a in answers})
    if best is None or variety > best[0]:
        best = (variety, stop, answers)
_, batch_stop, answers = best
batch_cases = []
for prompt, generated in zip(batch_prompts, answers):
    if generated == search(model64, prompt, batch_stop, batch_setting):
        batch_cases.append({"prompt_ids": prompt, "generated": generated})

stopped = sum(c["generated"][-1] == c["stop_id"] for c in cases)
(GOLDEN / "beam_search.json").write_text(json.dumps({
    "source": f"transformers {__import__('transformers').__version__}: generate(do_sample=False, "
              "num_beams=K) on tests/fixtures/tiny-llama, f32 (cases equal in float64)",
    "max_new_tokens": MAX_NEW, "cases": cases,
    "batch": {"setting": batch_setting, "stop_id": batch_stop, "cases": batch_cases}}, indent=1) + "\n")
print(f"wrote beam_search.json: {len(cases)} cases ({stopped} ended by the stop id), "
      f"{dropped} left out (f32 and float64 disagree); the stopping rule decides "
      f"{deciding} pairs ({tries} random prompts tried); batch: {len(batch_cases)} prompts, lengths "
      f"{[len(c['generated']) for c in batch_cases]}")
