"""The Python side of scripts/bench/score: the metric packages the dataset authors and
the seed use, timed per metric on one predictions CSV. Prints one JSON object:
{metric: {"seconds": s, "mean": m, "corpus": c or null}}.
    python score_python.py PRED.csv MINILM_DIR"""
import csv, json, sys, time

pred, minilm = sys.argv[1], sys.argv[2]
with open(pred, encoding="utf-8-sig", newline="") as f:
    rows = [r for r in csv.DictReader(f) if r["Reference_Explanation"].strip()]
hyps = [r["Generated_Explanation"] for r in rows]
refs = [r["Reference_Explanation"] for r in rows]
out = {}


def timed(name, fn):
    start = time.perf_counter()
    mean, corpus = fn()
    out[name] = {"seconds": time.perf_counter() - start, "mean": mean, "corpus": corpus}


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


timed("bleu", lambda: sacre("13a"))
timed("bleu_intl", lambda: sacre("intl"))
timed("nltk_bleu", nltk_bleu)
timed("rougeL_f", rouge_l)
timed("chrf++", chrf)
timed("cosine", cosine)
timed("bertscore_f", bertscore)
print(json.dumps(out))
