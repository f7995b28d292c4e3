"""The Python side of scripts/bench/score: one metric computed with the package the
dataset authors and the seed use, on one predictions CSV, as a user's metric script
would (the caller times the whole process, imports and model loading included).
Prints one JSON object: {"mean": m, "corpus": c or null}.
    python score_python.py PRED.csv MINILM_DIR METRIC"""
import csv, json, sys

pred, minilm, metric = sys.argv[1], sys.argv[2], sys.argv[3]
with open(pred, encoding="utf-8-sig", newline="") as f:
    rows = [r for r in csv.DictReader(f) if r["Reference_Explanation"].strip()]
hyps = [r["Generated_Explanation"] for r in rows]
refs = [r["Reference_Explanation"] for r in rows]


def sacre(tokenize):
    import sacrebleu
    scores = [sacrebleu.sentence_bleu(h, [r], tokenize=tokenize).score for h, r in zip(hyps, refs)]
    return sum(scores) / len(scores), sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score


def nltk_bleu():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    smooth = SmoothingFunction().method4
    scores = [sentence_bleu([r.split()], h.split(), smoothing_function=smooth) for h, r in zip(hyps, refs)]
    return sum(scores) / len(scores), None


def rouge_l():
    from rouge import Rouge
    scores = [Rouge().get_scores(h, r)[0]["rouge-l"]["f"] if h.strip() else 0.0 for h, r in zip(hyps, refs)]
    return sum(scores) / len(scores), None


def chrf():
    from sacrebleu.metrics import CHRF
    metric = CHRF(word_order=2)
    scores = [metric.sentence_score(h, [r]).score for h, r in zip(hyps, refs)]
    return sum(scores) / len(scores), metric.corpus_score(hyps, [refs]).score


def cosine():
    from sentence_transformers import SentenceTransformer, util
    model = SentenceTransformer(minilm, device="cpu")
    a, b = model.encode(hyps, convert_to_tensor=True), model.encode(refs, convert_to_tensor=True)
    scores = [float(util.cos_sim(a[i], b[i])) for i in range(len(hyps))]
    return sum(scores) / len(scores), None


def bertscore():
    from bert_score import score
    _, _, f = score(hyps, refs, model_type=minilm, num_layers=6, device="cpu")
    return float(f.mean()), None


METRICS = {
    "bleu": lambda: sacre("13a"),
    "bleu_intl": lambda: sacre("intl"),
    "nltk_bleu": nltk_bleu,
    "rougeL_f": rouge_l,
    "chrf++": chrf,
    "cosine": cosine,
    "bertscore_f": bertscore,
}
mean, corpus = METRICS[metric]()
print(json.dumps({"mean": mean, "corpus": corpus}))
