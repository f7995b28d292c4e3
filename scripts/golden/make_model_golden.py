"""Golden numbers for amthal's model layer, from transformers + PEFT (f32, CPU).

Run with the anchor venv after make_golden.py (it needs tests/fixtures/tiny-spm.gguf):
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_model_golden.py
Writes:
    tests/fixtures/tiny-llama/            a tiny random Llama (GQA, tied embeddings, llama3 rope
                                          scaling) as an HF folder, with the tiny sentencepiece tokenizer
    tests/fixtures/tiny-llama-adapter/    a PEFT LoRA adapter for it with random A and B
    tests/golden/tiny_llama.safetensors   logits of fixed batches: base, with adapter, other rope types
    tests/golden/tiny_llama.json          the inputs and configs behind those logits, and losses
    tests/golden/smollm2_logits.safetensors  SmolLM2 GGUF logits at chosen positions
    tests/golden/smollm2_loss.json        answer-token loss over the benchmark Validation split (plain)
    tests/golden/smollm2_greedy.json      transformers greedy generate (f32) on Test proverbs, with
                                          each step's gap between the top two logits
    tests/fixtures/quants.gguf            random blocks of every supported GGUF type, each beside
                                          "expected.<name>": the gguf package's dequantization (F32)
"""
import copy, json, math, os, shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("AMTHAL_CACHE", Path.home() / ".cache" / "amthal"))
SMOL = CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURES, GOLDEN = ROOT / "tests" / "fixtures", ROOT / "tests" / "golden"
torch.set_num_threads(os.cpu_count())

# Three rows of different lengths; the short ones are padded on the right with 0 in the test.
SEQUENCES = [[1, 300, 301, 302, 17, 40, 41, 350, 351, 2],
             [1, 310, 320, 330, 340, 345],
             [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
LABELS = [[-100, -100, -100, 302, 17, 40, 41, 350, 351, 2],
          [-100, -100, 320, 330, 340, 345],
          [-100] * 6 + [11, 12, 13, 14, 15, -100]]


def tiny_config(**overrides):
    vocab = len(AutoTokenizer.from_pretrained(str(FIXTURES), gguf_file="tiny-spm.gguf"))
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16})
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def per_row_logits(model, sequences):
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0] for s in sequences]


def padded_logits(rows):
    width = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), width, rows[0].shape[1])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def loss_of(logits_rows):
    total, count = 0.0, 0
    for logits, labels in zip(logits_rows, LABELS):
        labels = torch.tensor(labels)
        shift_logits, shift_labels = logits[:-1], labels[1:]
        mask = shift_labels != -100
        total += torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum").item()
        count += int(mask.sum())
    return total / count, count


def tiny_llama():
    torch.manual_seed(0)
    config = tiny_config()
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms so a wrong norm is visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    out = FIXTURES / "tiny-llama"
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(str(FIXTURES), gguf_file="tiny-spm.gguf")
    tok.chat_template = (FIXTURES / "templates" / "llama2.jinja").read_text(encoding="utf-8")
    tok.save_pretrained(out)
    tensors, golden = {}, {"sequences": SEQUENCES, "labels": LABELS, "source": f"transformers {__import__('transformers').__version__}"}
    base_rows = per_row_logits(model, SEQUENCES)
    tensors["base"] = padded_logits(base_rows)
    golden["base_loss"], golden["answer_tokens"] = loss_of(base_rows)

    # Other rope types: same weights, another config; one long row (past max_position_embeddings=16).
    long_row = [1] + list(range(300, 323))
    golden["long_row"] = long_row
    golden["rope_variants"] = {}
    variants = {
        "default": dict(rope_scaling=None),
        "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16),
        "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
        "llama3": dict(),
    }
    for name, overrides in variants.items():
        variant = LlamaForCausalLM(tiny_config(**overrides)).eval()
        variant.load_state_dict(model.state_dict())
        tensors[f"rope_{name}"] = per_row_logits(variant, [long_row])[0]
        golden["rope_variants"][name] = json.loads(variant.config.to_json_string())

    # A PEFT adapter with random A and B (PEFT's default B=0 would test nothing).
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).eval()
    adapter_dir = FIXTURES / "tiny-llama-adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    peft_model.save_pretrained(adapter_dir)
    adapter_rows = per_row_logits(peft_model, SEQUENCES)
    tensors["adapter"] = padded_logits(adapter_rows)
    golden["adapter_loss"], _ = loss_of(adapter_rows)
    save_file({k: v.contiguous() for k, v in tensors.items()}, GOLDEN / "tiny_llama.safetensors")
    (GOLDEN / "tiny_llama.json").write_text(json.dumps(golden, indent=1) + "\n")
    print("wrote tiny-llama fixtures and goldens")


def smollm2():
    tok = AutoTokenizer.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name)
    model = AutoModelForCausalLM.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name, torch_dtype=torch.float32).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    positions = [0, len(ids) // 2, len(ids) - 1]
    save_file({"input_ids": torch.tensor(ids), "positions": torch.tensor(positions),
               "logits": logits[positions].contiguous()}, GOLDEN / "smollm2_logits.safetensors")

    rows = json.loads((GOLDEN / "smollm2_tokenize.json").read_text())["rows"]
    eos = tok.eos_token_id
    total, count, per_row = 0.0, 0, []
    for row in rows:
        if row["split"] != "Validation":
            continue
        prompt_ids, answer = row["plain_prompt"], row["plain_answer"] + [eos]
        ids = torch.tensor([prompt_ids + answer])
        with torch.no_grad():
            logits = model(ids).logits[0]
        targets = ids[0, len(prompt_ids):]
        row_loss = torch.nn.functional.cross_entropy(logits[len(prompt_ids) - 1:-1], targets, reduction="sum").item()
        per_row.append(row_loss / len(answer))
        total += row_loss
        count += len(answer)
    (GOLDEN / "smollm2_loss.json").write_text(json.dumps({
        "split": "Validation", "format": "plain", "loss": total / count, "answer_tokens": count,
        "perplexity": math.exp(total / count), "per_row_loss": per_row,
        "source": "transformers f32, GGUF dequantized, token ids from smollm2_tokenize.json"}, indent=1) + "\n")
    print("wrote smollm2 goldens: loss", total / count, "over", count, "answer tokens")


def greedy():
    import csv
    tok = AutoTokenizer.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name)
    model = AutoModelForCausalLM.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name, dtype=torch.float32).eval()
    instruction = ("You are a linguistic expert in Yemeni proverbs. Explain the figurative meaning of the following "
                   "proverb clearly and concisely in Modern Standard Arabic only. Do not translate into English.\n")
    data = ROOT / "data" / "Test_data.csv"
    with open(data, encoding="utf-8-sig", newline="") as f:
        proverbs = [r["Proverbs"].strip() for r in csv.DictReader(f)][:4]
    contents = [instruction + f"Proverb: {p}\nExplanation:" for p in proverbs] + ["What is the capital of France?"]
    cases = []
    for content in contents:
        ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                      tokenize=False)
        ids = tok(ids, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=48, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
        new = out.sequences[0, ids.shape[1]:].tolist()
        gaps = []
        for scores in out.scores:
            top = torch.topk(scores[0].float(), 2).values
            gaps.append(float(top[0] - top[1]))
        cases.append({"content": content, "prompt_ids": ids[0].tolist(), "generated": new, "top2_gaps": gaps,
                      "text": tok.decode(new, skip_special_tokens=True)})
    (GOLDEN / "smollm2_greedy.json").write_text(json.dumps({
        "source": f"transformers {__import__('transformers').__version__} generate(do_sample=False), f32, GGUF",
        "max_new_tokens": 48, "cases": cases}, ensure_ascii=False, indent=1) + "\n")
    print("wrote smollm2_greedy.json:", cases[-1]["text"])


def quants_fixture():
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as T, quants
    rng = np.random.default_rng(0)
    # byte offsets of the f16 scale fields in each block: random bytes there could be inf/nan
    scale_fields = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q8_0: [0], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
    writer = gguf.GGUFWriter(str(FIXTURES / "quants.gguf"), "llama")
    for qtype in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]:
        rows, cols = 2, 512
        if qtype in (T.F32, T.F16, T.BF16):
            raw = quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
        else:
            block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
            for offset in scale_fields[qtype]:
                scales = (rng.standard_normal(raw.shape[:2]) * 0.05).astype(np.float16)
                raw[:, :, offset:offset + 2] = scales.view(np.uint8).reshape(rows, -1, 2)
            raw = raw.reshape(rows, -1)
        expected = quants.dequantize(raw, qtype).astype(np.float32)
        name = qtype.name.lower()
        writer.add_tensor(name, raw, raw_dtype=qtype)
        writer.add_tensor(f"expected.{name}", expected)
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    print("wrote quants.gguf")


if __name__ == "__main__":
    import sys
    parts = sys.argv[1:] or ["quants", "tiny", "smollm2", "greedy"]  # a subset can be named to redo just that
    for part in parts:
        {"quants": quants_fixture, "tiny": tiny_llama, "smollm2": smollm2, "greedy": greedy}[part]()
