"""Independent readers of a GGUF file written by `amthal export` (not run in CI; the
results are in README.md, "Small GPUs and everyday tools").

1. The `gguf` package (llama.cpp's own Python reader) reads every key and tensor, and
   dequantizes each tensor; with --hf-folder, each is compared with the source
   safetensors weight (q/k rows un-permuted), printing the largest error per type.
2. With --llama, llama.cpp itself (llama-cpp-python) loads the file and decodes
   greedily from --prompt; with --reference, transformers decodes greedily from the
   same prompt on the source model (an HF folder, or a GGUF file transformers reads),
   and the two token lists are compared.

usage: PY scripts/golden/check_gguf_export.py FILE.gguf [--hf-folder DIR]
           [--llama] [--reference MODEL] [--prompt TEXT] [--tokens N]
(PY: a Python with `gguf` and numpy; --llama needs llama-cpp-python; --reference
transformers and torch, e.g. ~/.cache/amthal-anchor/bin/python)"""
import argparse, json, os, sys
import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("file")
ap.add_argument("--hf-folder")
ap.add_argument("--llama", action="store_true")
ap.add_argument("--reference")
ap.add_argument("--prompt", default="اشرح المثل اليمني: الصبر مفتاح الفرج")
ap.add_argument("--tokens", type=int, default=12)
args = ap.parse_args()
result = {}

if not args.llama and not args.reference:
    import gguf
    from gguf.quants import dequantize
    reader = gguf.GGUFReader(args.file)
    result["keys"] = len(reader.fields)
    result["arch"] = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    tensors = {}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        tensors[t.name] = (t.tensor_type.name, values)
    result["tensors"] = len(tensors)
    if args.hf_folder:
        from safetensors.numpy import load_file
        hf = {}
        for f in os.listdir(args.hf_folder):
            if f.endswith(".safetensors"):
                hf.update(load_file(os.path.join(args.hf_folder, f)))
        cfg = json.load(open(os.path.join(args.hf_folder, "config.json")))
        names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
        parts = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
        def permute(w, heads):
            return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        errors = {}
        for name, (kind, values) in tensors.items():
            base = name.rsplit(".", 1)[0]
            if base.startswith("blk."):
                _, layer, part = base.split(".")
                hf_name = f"model.layers.{layer}.{parts[part]}.weight"
            elif base in names:
                hf_name = names[base] + ".weight"
            else:
                continue
            source = hf[hf_name].astype(np.float32)
            if hf_name.endswith("q_proj.weight"):
                source = permute(source, cfg["num_attention_heads"])
            elif hf_name.endswith("k_proj.weight"):
                source = permute(source, cfg["num_key_value_heads"])
            err = float(np.abs(values - source).max() / max(np.abs(source).max(), 1e-12))
            errors[kind] = max(errors.get(kind, 0.0), err)
        result["max_relative_error_by_type"] = errors

if args.llama:
    from llama_cpp import Llama
    llm = Llama(model_path=args.file, n_ctx=512, verbose=False, logits_all=False)
    prompt = llm.tokenize(args.prompt.encode("utf-8"), add_bos=True, special=True)
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == args.tokens:
            break
    result["llama_cpp"] = {"prompt": prompt, "greedy": out}

if args.reference:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw = {"gguf_file": os.path.basename(args.reference)} if args.reference.endswith(".gguf") else {}
    where = os.path.dirname(args.reference) if kw else args.reference
    tok = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, torch_dtype=torch.float32, **kw)
    ids = tok(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
    result["transformers"] = {"prompt": ids[0].tolist(), "greedy": gen[0, ids.shape[1]:].tolist()}

print(json.dumps(result, ensure_ascii=False))
