"""Golden BLEU scores from the Python reference packages, for amthal's BLEU tests.
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_bleu_golden.py
Pairs: the perturbed benchmark pairs of make_score_golden.py (its `perturbations()`)
plus edge pairs (empty reference, both empty, one word, Latin only, digits and
symbols, 13a's HTML-entity and <skipped> quirks, Python-only whitespace, long text).
Per pair: sacrebleu.sentence_bleu with tokenize="13a" and "intl" (its defaults: exp
smoothing, effective order), NLTK sentence_bleu with SmoothingFunction().method4 on
str.split() tokens; corpus: sacrebleu.corpus_bleu 13a and intl over all pairs.
A Python function that raises records null (amthal scores such a pair 0); none does
with sacrebleu 2.6.0 / nltk 3.10.4.
Also writes, as code-point ranges, what the `regex` module (which sacrebleu's intl
tokenizer uses) matches with \\p{N}, \\p{P} and \\p{S}, so the Rust test can check its
Unicode tables against the Python ones code point by code point.
Writes tests/golden/bleu.json."""
import csv, json, sys
from pathlib import Path

import nltk
import regex
import sacrebleu
from nltk.translate.bleu_score import SmoothingFunction
from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_score_golden import DATA, ROOT, perturbations  # noqa: E402


def edge_pairs(refs):
    pairs = [
        ("empty_reference", refs[0], ""),
        ("both_empty", "", ""),
        ("whitespace_only", " \t\n ", "   "),
        ("one_word_each", "الصبر", "الصبر"),
        ("one_word_differs", "الصبر", "الحلم"),
        ("one_word_vs_sentence", "الصبر", refs[1]),
        ("latin_only", "The early bird catches the worm.", "The early bird gets the worm, as they say."),
        ("latin_case", "the Early bird", "The early Bird"),
        ("digits_symbols", "50% $3 ١٢٣", "50% of $3.50 ١٢٣ + ٤٥٦ = 579"),
        ("numbers_punct", "في عام 1990. كان 1,000.5 و٣٫١٤ أو 3-4 (نعم)", "في عام 1990، كان 1,000.5 و٣٫١٤ أو 3 - 4 نعم."),
        ("entities_13a", "قال &quot;الصبر&quot; &amp; &lt;b&gt; &amp;lt; <skipped> مفتاح", "قال \"الصبر\" & <b> مفتاح"),
        ("newlines_13a", "كلمة-\nمقسومة\nسطر آخر\r\nو", "كلمةمقسومة سطر آخر و"),
        ("arabic_punct_only", "، ؟ ؛ « » ـ ٪ ٫", "،؟؛«»"),
        ("punct_runs", "يا.. هذا!!! ماذا؟! ...نعم,,لا", "يا .. هذا ! ماذا ؟ نعم , لا"),
        ("symbols", "😀 ♥ ⌘ ﷼ ⃁ ~ ^ ` | + = < >", "♥ ﷼ + = 😀"),
        ("unicode17_symbols", "السعر ٥٠\u20c1 أو ١٠\ufdfc و\ufbc3ب", "السعر ٥٠ \u20c1 أو ١٠ \ufdfc و \ufbc3 ب"),
        ("python_whitespace", "كلمة\x1cكلمة\u00a0أخرى\u2003و\u3000ثم\x1f", "كلمة كلمة أخرى و ثم"),
        ("zero_width", "كل\u200cمة \u200fو", "كلمة و"),
        ("repeated", " ".join(["في"] * 300), "في البيت " * 20),
        ("two_words_one_match", "الصبر مفتاح", "الصبر جميل"),
        ("long_mixed", " ".join(refs[:60]) + " The proverb (wisdom) 50%.", " ".join(refs[5:70])),
    ]
    return [{"row": -1, "kind": k, "hypothesis": h, "reference": r} for k, h, r in pairs]


def ranges(pattern):
    rx = regex.compile(pattern)
    out, start, prev = [], None, None
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        if rx.match(chr(cp)):
            if start is None or cp != prev + 1:
                if start is not None:
                    out.append([start, prev])
                start = cp
            prev = cp
    if start is not None:
        out.append([start, prev])
    return out


def guard(f):
    try:
        return f()
    except Exception as e:  # recorded as null; amthal scores 0
        print("raised:", type(e).__name__, e, file=sys.stderr)
        return None


if __name__ == "__main__":
    with open(DATA, encoding="utf-8-sig", newline="") as f:
        refs = [r["Explanation"].strip() for r in csv.DictReader(f)]
    pairs = perturbations(refs) + edge_pairs(refs)
    method4 = SmoothingFunction().method4
    for p in pairs:
        h, r = p["hypothesis"], p["reference"]
        p["bleu_13a"] = guard(lambda: sacrebleu.sentence_bleu(h, [r], tokenize="13a").score)
        p["bleu_intl"] = guard(lambda: sacrebleu.sentence_bleu(h, [r], tokenize="intl").score)
        p["nltk_bleu"] = guard(lambda: float(nltk_sentence_bleu([r.split()], h.split(), smoothing_function=method4)))
    hyps, refs_ = [p["hypothesis"] for p in pairs], [p["reference"] for p in pairs]
    corpus = {
        "bleu_13a": sacrebleu.corpus_bleu(hyps, [refs_], tokenize="13a").score,
        "bleu_intl": sacrebleu.corpus_bleu(hyps, [refs_], tokenize="intl").score,
    }
    out = {
        "source": f"sacrebleu {sacrebleu.__version__}, nltk {nltk.__version__}, regex {regex.__version__}, "
        f"Python {sys.version.split()[0]}",
        "pairs": pairs,
        "corpus": corpus,
        "unicode": {name: ranges(rf"\p{{{name}}}") for name in ("N", "P", "S")},
    }
    (ROOT / "tests" / "golden" / "bleu.json").write_text(json.dumps(out, ensure_ascii=False, indent=0) + "\n")
    print("wrote tests/golden/bleu.json:", len(pairs), "pairs")
