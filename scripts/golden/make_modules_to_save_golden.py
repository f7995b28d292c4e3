"""PEFT adapters with `modules_to_save` (full trained copies of embed_tokens and/or
lm_head beside the LoRA factors, as axolotl's `lora_modules_to_save` writes them when
tokens were added or the head retrained), with their logits (transformers + PEFT, f32,
CPU), so amthal loads them as PEFT does.

The tiny Llama ties its lm_head to embed_tokens. PEFT (0.21, without
`ensure_weight_tying`) then gives the copies their own weights: a saved embed_tokens
changes the embeddings only (the head keeps reading the original matrix), a saved
lm_head the head only.

Run with the anchor venv after make_model_golden.py (it reads tests/fixtures/tiny-llama):
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_modules_to_save_golden.py
Writes:
    tests/fixtures/tiny-llama-saved-both/   LoRA on q_proj, v_proj + embed_tokens and lm_head
    tests/fixtures/tiny-llama-saved-embed/  LoRA on q_proj, v_proj + embed_tokens
    tests/golden/tiny_llama_saved_modules.safetensors   the golden sequences' logits with
                                            each ("both", "embed"; rows padded with zeros)
"""
import copy, json, shutil, warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from make_model_golden import padded_logits  # this folder's; its work runs only as a script

ROOT = Path(__file__).resolve().parents[2]
FIXTURES, GOLDEN = ROOT / "tests" / "fixtures", ROOT / "tests" / "golden"
SEQUENCES = json.loads((GOLDEN / "tiny_llama.json").read_text())["sequences"]
SAVED = {"both": ["embed_tokens", "lm_head"], "embed": ["embed_tokens"]}


def main():
    from peft import LoraConfig, PeftModel, get_peft_model
    warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
    base = AutoModelForCausalLM.from_pretrained(str(FIXTURES / "tiny-llama"), dtype=torch.float32).eval()
    tensors = {}
    for name, modules in SAVED.items():
        torch.manual_seed(11)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False,
            target_modules=["q_proj", "v_proj"], modules_to_save=modules))
        # As if trained: every saved copy moves away from the base.
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if "modules_to_save" in key:
                    parameter.add_(torch.randn_like(parameter) * 0.05)
        out = FIXTURES / f"tiny-llama-saved-{name}"
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out)
        (out / "README.md").unlink()  # PEFT's model card names this machine's paths
        config_path = out / "adapter_config.json"  # no path of this machine in a fixture
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = None
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        model.eval()
        with torch.no_grad():
            tensors[name] = padded_logits([model(torch.tensor([s])).logits[0] for s in SEQUENCES])
        # PEFT loads what it saved, with the same logits.
        again = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
        with torch.no_grad():
            assert torch.equal(padded_logits([again(torch.tensor([s])).logits[0] for s in SEQUENCES]),
                               tensors[name])
        print(name, sorted(k for k in model.state_dict() if "modules_to_save" in k))
    save_file(tensors, GOLDEN / "tiny_llama_saved_modules.safetensors")


if __name__ == "__main__":
    main()
