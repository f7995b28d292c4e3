"""Golden numbers from the Python reference stack, for amthal's tests.

Run with the anchor venv (scripts/anchors/setup.sh builds it):
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_golden.py
It reads the SmolLM2 GGUF from the setup cache and the benchmark splits from
data/ (the benchmark splits), and writes:
    tests/fixtures/tiny-spm.gguf                  a tiny sentencepiece-style (llama) GGUF vocabulary
    tests/golden/smollm2_tokenize.json            transformers' ids for every benchmark row (plain + chat)
    tests/golden/tiny_spm_tokenize.json           transformers' ids for edge-case strings on tiny-spm.gguf
    tests/golden/chat_templates.json              apply_chat_template renderings of the fixture templates
"""
import csv, json, os, sys
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("AMTHAL_CACHE", Path.home() / ".cache" / "amthal"))
SMOL = CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = ROOT / "data"
GOLDEN = ROOT / "tests" / "golden"
FIXTURES = ROOT / "tests" / "fixtures"

INSTRUCTION = ("You are a linguistic expert in Yemeni proverbs. Explain the figurative meaning of the following "
               "proverb clearly and concisely in Modern Standard Arabic only. Do not translate into English.\n")


def prompt(proverb):
    return INSTRUCTION + f"Proverb: {proverb}\nExplanation:"


def load(gguf_path):
    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def write_json(path, value):
    path.write_text(json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print("wrote", path.relative_to(ROOT))


EDGE_STRINGS = [
    "",
    " ",
    "مثل",
    " مثل",
    "  مثلان  بينهما مسافتان",
    "السلام عليكم\nورحمة الله\n\nوبركاته",
    "يضرب للرجل، الذي: «لا يعرف» قدر نفسه؛ (انظر) 123 و ٤٥٦.",
    "Hello world, the proverb said.",
    "mixed عربي and English كلمات",
    "emoji 🙂 and tatweel مـــثل",
    "<s> and </s> and <|im_end|> inside text",
    "\tTabbed\r\nline",
]


def smollm2_golden():
    tok = load(SMOL)
    rows = []
    for split in ["Train", "Validation", "Test"]:
        with open(DATA / f"{split}_data.csv", encoding="utf-8-sig", newline="") as f:
            for record in csv.DictReader(f):
                proverb, reference = record["Proverbs"].strip(), record["Explanation"].strip()
                chat = tok.apply_chat_template([{"role": "user", "content": prompt(proverb)}],
                                               add_generation_prompt=True, tokenize=False)
                rows.append({
                    "split": split,
                    "plain_prompt": tok(prompt(proverb))["input_ids"],
                    "plain_answer": tok(" " + reference, add_special_tokens=False)["input_ids"],
                    "chat_prompt": tok(chat, add_special_tokens=False)["input_ids"],
                    "chat_answer": tok(reference, add_special_tokens=False)["input_ids"],
                })
    edges = [{"text": s, "with_specials": tok(s)["input_ids"],
              "without_specials": tok(s, add_special_tokens=False)["input_ids"]} for s in EDGE_STRINGS]
    write_json(GOLDEN / "smollm2_tokenize.json", {
        "source": f"transformers {__import__('transformers').__version__}, AutoTokenizer from {SMOL.name}",
        "eos_id": tok.eos_token_id, "bos_id": tok.bos_token_id, "rows": rows, "edge_strings": edges})
    return tok


def tiny_spm_gguf(path):
    """A llama-style (sentencepiece BPE, byte fallback) vocabulary with scores but no merges,
    so the reader must derive merges from scores as transformers does."""
    import gguf
    letters = list("اأإآءئؤبتثجحخدذرزسشصضطظعغفقكلمنهوىيةـ") + list("abcdehilnoprstwy") + list(".,،:؛()«»0123456789٤٥٦")
    pieces = ["▁", "ال", "▁ال", "▁م", "ثل", "مث", "▁مثل", "▁ي", "ضر", "يض", "▁يضرب", "▁و", "لا", "▁لا", "ين", "ون",
              "▁عل", "▁على", "▁من", "من", "▁في", "في", "▁th", "th", "he", "▁the", "▁a", "an", "▁an", "nd", "▁and",
              "er", "▁w", "or", "ld", "▁wor", "▁world", "▁H", "el", "ll", "lo", "▁Hello", "سلام", "▁السلام"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    for i, letter in enumerate(letters):
        tokens.append(letter); types.append(1); scores.append(-1000.0 - i)
    for i, piece in enumerate(pieces):
        tokens.append(piece); types.append(1); scores.append(-10.0 - (i % 7) * 0.5)  # ties on purpose
    tokens += ["<|eot|>", "<think>"]; types += [3, 4]; scores += [0.0, 0.0]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1); writer.add_context_length(64); writer.add_embedding_length(8)
    writer.add_feed_forward_length(16); writer.add_head_count(2); writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5); writer.add_rope_freq_base(10000.0); writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens); writer.add_token_scores(scores); writer.add_token_types(types)
    writer.add_bos_token_id(1); writer.add_eos_token_id(2); writer.add_unk_token_id(0)
    writer.add_add_bos_token(True); writer.add_add_eos_token(False)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    print("wrote", path.relative_to(ROOT))


def tiny_spm_golden():
    path = FIXTURES / "tiny-spm.gguf"
    tiny_spm_gguf(path)
    tok = load(path)
    strings = EDGE_STRINGS + [prompt("السلام من الله"), " يضرب المثل", "the world and the word", "<|eot|><think>", "<|eot|>مثل", "the<s>world"]
    write_json(GOLDEN / "tiny_spm_tokenize.json", {
        "source": f"transformers {__import__('transformers').__version__}, AutoTokenizer from tiny-spm.gguf",
        "cases": [{"text": s, "with_specials": tok(s)["input_ids"],
                   "without_specials": tok(s, add_special_tokens=False)["input_ids"],
                   "decoded": tok.decode(tok(s, add_special_tokens=False)["input_ids"])} for s in strings]})
    return tok


def chat_golden(smol_tok, spm_tok):
    smol_template = smol_tok.chat_template
    (FIXTURES / "templates" / "smollm2.jinja").write_text(smol_template, encoding="utf-8")
    templates = {
        "smollm2": (smol_template, smol_tok),
        "llama2": ((FIXTURES / "templates" / "llama2.jinja").read_text(encoding="utf-8"), spm_tok),
        "namespace": ((FIXTURES / "templates" / "namespace.jinja").read_text(encoding="utf-8"), spm_tok),
    }
    conversations = [
        [{"role": "user", "content": prompt("الصبر مفتاح الفرج")}],
        [{"role": "system", "content": "  أنت خبير في الأمثال.  "}, {"role": "user", "content": "اشرح: جمل يعصر"}],
        [{"role": "user", "content": "first"}, {"role": "assistant", "content": " الجواب الأول "},
         {"role": "user", "content": "second\n"}],
    ]
    cases = []
    for name, (source, tok) in templates.items():
        for conversation in conversations:
            for add_generation_prompt in [True, False]:
                rendered = tok.apply_chat_template(conversation, chat_template=source, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)
                cases.append({"template": name, "messages": conversation,
                              "add_generation_prompt": add_generation_prompt,
                              "bos_token": tok.bos_token, "eos_token": tok.eos_token, "rendered": rendered})
    write_json(GOLDEN / "chat_templates.json", {"cases": cases})


if __name__ == "__main__":
    if not SMOL.is_file() or not DATA.is_dir():
        sys.exit(f"need {SMOL} (scripts/setup) and {DATA}")
    smol = smollm2_golden()
    spm = tiny_spm_golden()
    chat_golden(smol, spm)
