"""Goldens for `--init-lora-weights pissa_niter_K`: PEFT's `pissa_init` with
`init_lora_weights="pissa_niter_K"` (torch.svd_lowrank) on the tiny Llama, with the
random start torch drew for each projection recorded, so amthal can start from the same
matrix (its own runs draw theirs from libtorch's generator).

Run with the anchor venv after make_model_golden.py (it reads tests/fixtures/tiny-llama):
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_pissa_niter_golden.py
Writes tests/golden/tiny_llama_pissa_niter.safetensors: for K in 0, 2, 4 and each of
layer 0's seven projections, "K.<module>.start" (the randn start), ".lora_A", ".lora_B"
(PEFT's factors), r 4, alpha 8.
"""
import copy
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
FIXTURES, GOLDEN = ROOT / "tests" / "fixtures", ROOT / "tests" / "golden"


def main():
    from peft import LoraConfig, get_peft_model
    base = AutoModelForCausalLM.from_pretrained(str(FIXTURES / "tiny-llama"), dtype=torch.float32).eval()
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    tensors = {}
    randn = torch.randn
    for iterations in [0, 2, 4]:
        starts = []

        def recording(*args, **kwargs):  # svd_lowrank's one draw per projection
            drawn = randn(*args, **kwargs)
            starts.append(drawn.clone())
            return drawn

        torch.manual_seed(3)
        torch.randn = recording
        try:
            model = get_peft_model(copy.deepcopy(base), LoraConfig(
                r=4, lora_alpha=8, lora_dropout=0.0, target_modules=modules,
                init_lora_weights=f"pissa_niter_{iterations}"))
        finally:
            torch.randn = randn
        layers = model.base_model.model.model.layers
        names = [f"{part}.{m}" for part, ms in [("self_attn", modules[:4]), ("mlp", modules[4:])] for m in ms]
        assert len(starts) == 2 * len(names), len(starts)  # the draw order is PEFT's module order
        for index, name in enumerate(names):
            layer = layers[0]
            module = layer
            for attribute in name.split("."):
                module = getattr(module, attribute)
            key = f"{iterations}.{name}"
            tensors[f"{key}.start"] = starts[index]
            tensors[f"{key}.lora_A"] = module.lora_A["default"].weight.detach().clone()
            tensors[f"{key}.lora_B"] = module.lora_B["default"].weight.detach().clone()
    save_file(tensors, GOLDEN / "tiny_llama_pissa_niter.safetensors")
    print(len(tensors), "tensors")


if __name__ == "__main__":
    main()
