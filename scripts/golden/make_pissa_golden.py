"""Golden tensors for PEFT's residual LoRA initialisations (init_lora_weights="pissa" and "olora")
and their conversion to a plain LoRA adapter (save_pretrained's
path_initial_model_for_weight_conversion), from transformers + PEFT (f32, CPU).

Run with the anchor venv after make_model_golden.py (it reads tests/fixtures/tiny-llama):
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_pissa_golden.py
Writes tests/golden/tiny_llama_pissa.safetensors, for init in (pissa, olora), r = 4, lora_alpha = 8
(scaling 2; 4 and rslora for olora, so both scalings are covered) on every projection:
    {init}.{module}.lora_A / .lora_B   the initial factors PEFT computes, for two modules
    {init}.{module}.residual           the base weight PEFT leaves (W - scaling B A)
    {init}.trained_logits              the golden sequences' logits after the factors were moved
                                       ("trained": A += 0.01 sin, B += 0.01 cos), rows padded
    {init}.converted.{module}.lora_A / .lora_B   what save_pretrained writes for those moved factors
                                       with the conversion (rank 2r), for two modules
and tests/golden/tiny_llama_pissa.json: PEFT's version, the settings, the converted adapter's config.
"""
import copy, json, tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from make_model_golden import padded_logits  # this folder's; its work runs only as a script

ROOT = Path(__file__).resolve().parents[2]
FIXTURES, GOLDEN = ROOT / "tests" / "fixtures", ROOT / "tests" / "golden"
SEQUENCES = json.loads((GOLDEN / "tiny_llama.json").read_text())["sequences"]
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = {"pissa": dict(r=4, lora_alpha=8, use_rslora=False),
            "olora": dict(r=4, lora_alpha=4, use_rslora=True)}


def main():
    import peft
    from peft import LoraConfig, get_peft_model
    base = AutoModelForCausalLM.from_pretrained(str(FIXTURES / "tiny-llama"), dtype=torch.float32).eval()
    tensors, configs = {}, {}
    for init, settings in SETTINGS.items():
        model = get_peft_model(copy.deepcopy(base), LoraConfig(
            lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=TARGETS, init_lora_weights=init,
            **settings))
        modules = dict(model.named_modules())
        for path in MODULES:
            module = modules["base_model.model." + path]
            tensors[f"{init}.{path}.lora_A"] = module.lora_A["default"].weight.detach().clone()
            tensors[f"{init}.{path}.lora_B"] = module.lora_B["default"].weight.detach().clone()
            tensors[f"{init}.{path}.residual"] = module.base_layer.weight.detach().clone()
        with tempfile.TemporaryDirectory() as scratch:
            initial = Path(scratch) / "initial"
            model.save_pretrained(initial)  # the factors before training, for the conversion
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_A" in name:
                        p.add_(0.01 * torch.arange(p.numel(), dtype=torch.float32).sin().view(p.shape))
                    elif "lora_B" in name:
                        p.add_(0.01 * torch.arange(p.numel(), dtype=torch.float32).cos().view(p.shape))
                tensors[f"{init}.trained_logits"] = padded_logits(
                    [model(torch.tensor([s])).logits[0] for s in SEQUENCES])
            converted = Path(scratch) / "converted"
            model.save_pretrained(converted, path_initial_model_for_weight_conversion=str(initial))
            saved = load_file(converted / "adapter_model.safetensors")
            config = json.loads((converted / "adapter_config.json").read_text())
        for path in MODULES:
            for part in ["lora_A", "lora_B"]:
                tensors[f"{init}.converted.{path}.{part}"] = saved[f"base_model.model.{path}.{part}.weight"]
        configs[init] = {"settings": settings, "converted_config": {
            k: config[k] for k in ["r", "lora_alpha", "use_rslora", "init_lora_weights"]}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, GOLDEN / "tiny_llama_pissa.safetensors")
    (GOLDEN / "tiny_llama_pissa.json").write_text(json.dumps({
        "source": f"peft {peft.__version__}, transformers {__import__('transformers').__version__}",
        "modules": MODULES, "inits": configs}, indent=1) + "\n")
    print(json.dumps(configs, indent=1))


if __name__ == "__main__":
    main()
