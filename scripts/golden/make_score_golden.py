"""Golden scores from the Python metric packages, for amthal's score tests.
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_score_golden.py
Hypotheses are perturbations of the benchmark Test references (identity, words dropped,
words shuffled, Arabic punctuation, Latin mixed in, another row's reference, empty).
Writes tests/golden/scores.json."""
import csv, json, random
from pathlib import Path

from rouge import Rouge
from sacrebleu.metrics import CHRF

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "Test_data.csv"


def perturbations(refs):
    rng = random.Random(0)
    pairs = []
    for i, ref in enumerate(refs):
        words = ref.split()
        shuffled = words[:]
        rng.shuffle(shuffled)
        variants = {
            "identity": ref,
            "dropped": " ".join(w for j, w in enumerate(words) if j % 3 != 1),
            "shuffled": " ".join(shuffled),
            "arabic_punct": "، ".join(words[:4]) + "؟ " + " ".join(words[4:]) + " .",
            "latin_mixed": "The proverb means " + " ".join(words[: len(words) // 2]) + " (wisdom).",
            "other_row": refs[(i + 1) % len(refs)],
            "empty": "",
            "one_word": words[0] if words else "x",
        }
        for kind, hyp in variants.items():
            pairs.append({"row": i, "kind": kind, "hypothesis": hyp, "reference": ref})
    pairs.append({"row": -1, "kind": "punct_only", "hypothesis": "،؟!", "reference": "..."})
    pairs.append({"row": -1, "kind": "long", "hypothesis": " ".join(refs[:30]), "reference": " ".join(refs[10:40])})
    return pairs


if __name__ == "__main__":
    with open(DATA, encoding="utf-8-sig", newline="") as f:
        refs = [r["Explanation"].strip() for r in csv.DictReader(f)]
    pairs = perturbations(refs)
    chrfpp = CHRF(word_order=2)
    for p in pairs:
        p["chrf++"] = chrfpp.sentence_score(p["hypothesis"], [p["reference"]]).score
        try:  # rouge 1.0.1 raises on an empty hypothesis; amthal scores that 0
            p["rouge"] = Rouge().get_scores(p["hypothesis"], p["reference"])[0]
        except ValueError:
            p["rouge"] = None
    corpus = chrfpp.corpus_score([p["hypothesis"] for p in pairs], [[p["reference"] for p in pairs]]).score
    out = {"source": f"sacrebleu {__import__('sacrebleu').__version__}", "pairs": pairs, "corpus": {"chrf++": corpus}}
    (ROOT / "tests" / "golden" / "scores.json").write_text(json.dumps(out, ensure_ascii=False, indent=0) + "\n")
    print("wrote tests/golden/scores.json:", len(pairs), "pairs")
