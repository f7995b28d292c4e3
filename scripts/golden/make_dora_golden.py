"""Golden numbers for DoRA adapters (PEFT's use_dora=True), from transformers + PEFT (f32, CPU).

Run with the anchor venv after make_model_golden.py (it reads tests/fixtures/tiny-llama):
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_dora_golden.py
Writes:
    tests/fixtures/tiny-llama-dora/        a PEFT DoRA adapter for the tiny Llama: random A and B,
                                           magnitudes moved off their initial norms (so that every
                                           part of DoRA changes the output)
    tests/golden/tiny_llama_dora.safetensors
        dora            logits of the golden sequences (rows padded with zeros), adapter attached
        dora_merged     the same after PEFT's merge_and_unload
        grad.<name>     gradients of sum(logits * probe) for the first sequence, probe =
                        sin(0, 1, 2, ...) in the logits' shape, for two projections' A, B, magnitude
    tests/golden/tiny_llama_dora.json  PEFT's version and the names above
"""
import copy, json, shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from make_model_golden import padded_logits  # this folder's; its work runs only as a script

ROOT = Path(__file__).resolve().parents[2]
FIXTURES, GOLDEN = ROOT / "tests" / "fixtures", ROOT / "tests" / "golden"
SEQUENCES = json.loads((GOLDEN / "tiny_llama.json").read_text())["sequences"]
GRADIENT_OF = ["base_model.model.model.layers.0.self_attn.q_proj",
               "base_model.model.model.layers.1.mlp.down_proj"]


def main():
    import peft
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(FIXTURES / "tiny-llama"), torch_dtype=torch.float32).eval()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False, use_dora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
    out = FIXTURES / "tiny-llama-dora"
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    config_path = out / "adapter_config.json"  # no path of this machine in a fixture
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = None
    config_path.write_text(json.dumps(config, indent=2) + "\n")

    tensors = {}
    with torch.no_grad():
        tensors["dora"] = padded_logits([model(torch.tensor([s])).logits[0] for s in SEQUENCES])
    logits = model(torch.tensor([SEQUENCES[0]])).logits
    probe = torch.arange(logits.numel(), dtype=torch.float32).sin().view(logits.shape)
    (logits * probe).sum().backward()
    modules = dict(model.named_modules())
    for path in GRADIENT_OF:
        module = modules[path]
        short = path.removeprefix("base_model.model.")
        tensors[f"grad.{short}.lora_A"] = module.lora_A["default"].weight.grad.clone()
        tensors[f"grad.{short}.lora_B"] = module.lora_B["default"].weight.grad.clone()
        tensors[f"grad.{short}.lora_magnitude_vector"] = module.lora_magnitude_vector["default"].weight.grad.clone()
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        tensors["dora_merged"] = padded_logits([merged(torch.tensor([s])).logits[0] for s in SEQUENCES])
    save_file({k: v.contiguous() for k, v in tensors.items()}, GOLDEN / "tiny_llama_dora.safetensors")
    (GOLDEN / "tiny_llama_dora.json").write_text(json.dumps({
        "source": f"peft {peft.__version__}, transformers {__import__('transformers').__version__}",
        "probe": "sin(arange(numel)) in the logits' shape, first sequence",
        "tensors": sorted(tensors),
    }, indent=1) + "\n")
    print("wrote", out, "and", GOLDEN / "tiny_llama_dora.safetensors")


if __name__ == "__main__":
    main()
