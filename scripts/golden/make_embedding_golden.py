"""Golden numbers for amthal's embedding metrics: BERTScore (bert_score 0.3.12) and
sentence-transformers cosine similarity (SAS), f32 on CPU.

Run with the anchor venv (needs scripts/setup's all-MiniLM-L6-v2 and the benchmark data in data/):
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_embedding_golden.py
Writes (fixtures only when absent, so reruns keep them byte-identical):
    tests/fixtures/tiny-bert/          a tiny random BertModel (seed 0) with a WordPiece vocab of
                                       Arabic + Latin characters and frequent benchmark words
    tests/fixtures/tiny-bert-baseline.tsv  a bert_score-format baseline (LAYER,P,R,F) for it
    tests/fixtures/tiny-bert-signed/   one-layer random BERT with signed LayerNorm gains (negative
                                       cosines), same tokenizer, for bert_score's padded-max case
    tests/fixtures/tiny-st-cls/        sentence-transformers folder around tiny-bert: Transformer
                                       at path "", CLS pooling (legacy bool keys), Normalize
    tests/fixtures/tiny-st-max/        Transformer in 0_Transformer, pooling_mode
                                       ["max", "mean_sqrt_len_tokens"], do_lower_case, max_seq_length 24
    tests/golden/embeddings.json       per pair: BERTScore P/R/F for each setting, SAS cosines
NaN (bert_score's 0/0 idf cases) is written as null.
bert_score 0.3.12 raises AttributeError on an empty candidate under transformers 5; see
patch_empty_sentences for the transformers-4 behaviour these goldens (and amthal) use.
"""
import collections, json, math, os, shutil, sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "golden"))
from make_score_golden import DATA, perturbations  # noqa: E402

import csv  # noqa: E402

CACHE = Path(os.environ.get("AMTHAL_CACHE", Path.home() / ".cache" / "amthal"))
MINILM = CACHE / "models" / "all-MiniLM-L6-v2"
FIXTURES, GOLDEN = ROOT / "tests" / "fixtures", ROOT / "tests" / "golden"
TINY = FIXTURES / "tiny-bert"
BASELINE = FIXTURES / "tiny-bert-baseline.tsv"
SIGNED = FIXTURES / "tiny-bert-signed"
torch.set_num_threads(os.cpu_count())

ARABIC = [chr(c) for c in range(0x621, 0x64B)] + [chr(c) for c in range(0x64B, 0x653)] + list("،؛؟٠١٢٣٤٥٦٧٨٩")
LATIN = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
OTHER = list("0123456789.,!?;:()[]\"'-_/«»…")


def make_tiny_bert(refs):
    from transformers import BertConfig, BertModel, BertTokenizer

    words = collections.Counter(w for r in refs for w in r.split() if w.isalpha())
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += ARABIC + LATIN + OTHER
    vocab += ["##" + c for c in ARABIC + LATIN + list("0123456789")]
    vocab += [w for w, _ in words.most_common(150)] + ["the", "proverb", "means", "wisdom"]
    seen, unique = set(), []
    for v in vocab:
        if v not in seen:
            seen.add(v)
            unique.append(v)
    TINY.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(vocab={v: i for i, v in enumerate(unique)}, do_lower_case=False,
                              model_max_length=64)
    tokenizer.save_pretrained(TINY)
    config = BertConfig(vocab_size=len(unique), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
                        hidden_act="gelu", layer_norm_eps=1e-12)
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # larger-than-init weights so layers differ visibly
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.15)
    model.save_pretrained(TINY, safe_serialization=True)


def make_signed_bert():
    """One layer, LayerNorm gains of either sign: token cosines are often negative, which
    exercises bert_score's zeroed padding in the greedy max."""
    from transformers import BertConfig, BertModel

    SIGNED.mkdir(parents=True, exist_ok=True)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(TINY / f, SIGNED / f)
    vocab = json.loads((TINY / "config.json").read_text())["vocab_size"]
    config = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, hidden_act="gelu")
    torch.manual_seed(1)
    model = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.normal_(0, 1) if name.endswith("weight") else p.zero_()
            elif "position_embeddings" in name or "token_type" in name:
                p.normal_(0, 0.02)  # small shared parts: word vectors point every way
            else:
                p.normal_(0, 0.3)
    model.save_pretrained(SIGNED, safe_serialization=True)


def make_st_folders():
    cls = FIXTURES / "tiny-st-cls"
    if not cls.exists():
        cls.mkdir()
        for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(TINY / f, cls / f)
        (cls / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ], indent=2))
        (cls / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 40, "do_lower_case": False}))
        (cls / "1_Pooling").mkdir()
        (cls / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    mx = FIXTURES / "tiny-st-max"
    if not mx.exists():
        (mx / "0_Transformer").mkdir(parents=True)
        for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(TINY / f, mx / "0_Transformer" / f)
        (mx / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ], indent=2))
        (mx / "0_Transformer" / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": 24, "do_lower_case": True}))
        (mx / "1_Pooling").mkdir()
        (mx / "1_Pooling" / "config.json").write_text(json.dumps({
            "embedding_dimension": 32, "pooling_mode": ["max", "mean_sqrt_len_tokens"]}, indent=2))


def clean(x):
    x = float(x)
    return None if math.isnan(x) else x


def patch_empty_sentences():
    """bert_score 0.3.12 encodes an empty (after strip) sentence with
    tokenizer.build_inputs_with_special_tokens([]), which transformers 5 tokenizers no
    longer have (AttributeError). Restore what transformers 4's BertTokenizer returned,
    [CLS] [SEP], so empty candidates score P = R = F = 0 as bert_score intends."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if not hasattr(TokenizersBackend, "build_inputs_with_special_tokens"):
        TokenizersBackend.build_inputs_with_special_tokens = (
            lambda self, ids: [self.cls_token_id] + list(ids) + [self.sep_token_id])


def bertscore(hyps, refs, **kw):
    from bert_score import score

    patch_empty_sentences()

    p, r, f = score(hyps, refs, device="cpu", nthreads=0, **kw)
    return [{"p": clean(a), "r": clean(b), "f": clean(c)} for a, b, c in zip(p.tolist(), r.tolist(), f.tolist())]


if __name__ == "__main__":
    with open(DATA, encoding="utf-8-sig", newline="") as f:
        refs = [r["Explanation"].strip() for r in csv.DictReader(f)]
    if not (TINY / "model.safetensors").exists():
        make_tiny_bert(refs)
    if not BASELINE.exists():
        BASELINE.write_text("LAYER,P,R,F\n" + "".join(
            f"{i},{0.1 + 0.05 * i:.8f},{0.12 + 0.04 * i:.8f},{0.11 + 0.045 * i:.8f}\n" for i in range(4)))
    make_st_folders()
    if not (SIGNED / "model.safetensors").exists():
        make_signed_bert()

    pairs = perturbations(refs[:5])
    pairs = [p for p in pairs if p["kind"] != "long"]
    pairs.append({"row": -1, "kind": "long", "hypothesis": " ".join(refs[:30]), "reference": " ".join(refs[10:40])})
    pairs.append({"row": -1, "kind": "whitespace_only", "hypothesis": "  \n ", "reference": refs[0]})
    pairs.append({"row": -1, "kind": "duplicate_pair", "hypothesis": pairs[1]["hypothesis"], "reference": pairs[1]["reference"]})
    # A reference made only of tokens every reference has ([CLS] [SEP]): empty reference.
    pairs.append({"row": -1, "kind": "empty_reference", "hypothesis": refs[1], "reference": ""})
    hyps = [p["hypothesis"] for p in pairs]
    rs = [p["reference"] for p in pairs]

    tiny = str(TINY)
    settings = {
        "tiny_l3": dict(model_type=tiny, num_layers=3),
        "tiny_l3_idf": dict(model_type=tiny, num_layers=3, idf=True),
        "tiny_l1": dict(model_type=tiny, num_layers=1),
        "tiny_l0_b7": dict(model_type=tiny, num_layers=0, batch_size=7),
        "tiny_l2_baseline": dict(model_type=tiny, num_layers=2, lang="ar", rescale_with_baseline=True,
                                 baseline_path=str(BASELINE)),
        "tiny_l2_idf_baseline_b5": dict(model_type=tiny, num_layers=2, idf=True, lang="ar",
                                        rescale_with_baseline=True, baseline_path=str(BASELINE), batch_size=5),
        "minilm_l4": dict(model_type=str(MINILM), num_layers=4),
        "minilm_l6_idf": dict(model_type=str(MINILM), num_layers=6, idf=True),
    }
    bert = {}
    for name, kw in settings.items():
        bert[name] = bertscore(hyps, rs, **kw)
        print(name, "done", file=sys.stderr)

    # idf=True where every token of a candidate occurs in every reference: idf sum 0, P = 0/0
    # = NaN (kept), F NaN -> 0.
    zero_idf = {"hypotheses": ["proverb", "proverb means", "wisdom"],
                "references": ["proverb means", "means proverb", "proverb the means"]}
    zero_idf["scores"] = bertscore(zero_idf["hypotheses"], zero_idf["references"], model_type=tiny,
                                   num_layers=3, idf=True)

    # Short pairs beside a long one in the same batch: a token whose best cosine is
    # negative scores 0 in bert_score when its partner is padded (batch_size 2), not when
    # each pair is its own batch (batch_size 1).
    letters = list("abcdefghijklmnopqrstuvwxyz") + list("ابتثجحخدذرزسشصضطظعغفقكلمنهوي")
    long = "The proverb means " + " ".join(letters[:20])
    padding = {"hypotheses": [], "references": []}
    for i in range(0, 40, 2):
        padding["hypotheses"] += [letters[i] + " " + letters[i + 1], long]
        padding["references"] += [letters[(i * 7 + 3) % len(letters)], long]
    for b in (1, 2):
        padding[f"scores_b{b}"] = bertscore(padding["hypotheses"], padding["references"],
                                            model_type=str(SIGNED), num_layers=0, batch_size=b)
    changed = sum(abs(x["f"] - y["f"]) > 1e-4 for x, y in zip(padding["scores_b1"], padding["scores_b2"]))
    assert changed > 0, "the padding case does not change any score"
    print("padding zeroes change", changed, "of", len(padding["hypotheses"]), "scores", file=sys.stderr)

    from sentence_transformers import SentenceTransformer, util

    sas = {}
    for name, folder in [("minilm", MINILM), ("tiny_st_cls", FIXTURES / "tiny-st-cls"),
                         ("tiny_st_max", FIXTURES / "tiny-st-max")]:
        model = SentenceTransformer(str(folder), device="cpu")
        a = model.encode(hyps, convert_to_tensor=True)
        b = model.encode(rs, convert_to_tensor=True)
        sas[name] = [float(x) for x in util.cos_sim(a, b).diagonal().tolist()]

    import bert_score, sentence_transformers, transformers
    out = {
        "source": f"bert_score {bert_score.__version__}, sentence_transformers {sentence_transformers.__version__}, "
                  f"transformers {transformers.__version__}, torch {torch.__version__}",
        "settings": {k: {kk: (Path(vv).name if kk in ("model_type", "baseline_path") else vv) for kk, vv in v.items()}
                     for k, v in settings.items()},
        "pairs": [{"kind": p["kind"], "row": p["row"], "hypothesis": p["hypothesis"], "reference": p["reference"]}
                  for p in pairs],
        "bertscore": bert,
        "sas": sas,
        "zero_idf": zero_idf,
        "padding": padding,
    }
    (GOLDEN / "embeddings.json").write_text(json.dumps(out, ensure_ascii=False, indent=0) + "\n")
    print("wrote tests/golden/embeddings.json:", len(pairs), "pairs")
