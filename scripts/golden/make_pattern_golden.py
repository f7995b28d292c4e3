"""PEFT adapters that use rank_pattern / alpha_pattern, a regular expression for target_modules,
and layers_to_transform, with their logits (transformers + PEFT, f32, CPU), so amthal loads the
adapters people save with those options.

Run with the anchor venv after make_model_golden.py (it reads tests/fixtures/tiny-llama):
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_pattern_golden.py
Writes:
    tests/fixtures/tiny-llama-patterns/   target_modules a regex string, rank_pattern and
                                          alpha_pattern, use_rslora
    tests/fixtures/tiny-llama-layers/     target_modules a list, layers_to_transform [1]
    tests/golden/tiny_llama_patterns.safetensors   the golden sequences' logits with each
                                          (rows padded with zeros): "patterns", "layers"
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
ADAPTERS = {
    "patterns": dict(
        r=4, lora_alpha=8, use_rslora=True,
        target_modules=r".*\.(q_proj|v_proj|down_proj|gate_proj)",
        # PEFT writes the patterns with sorted keys and, loading, takes the first key that
        # matches a module; these do not overlap, so PEFT loads the adapter back too.
        rank_pattern={"model.layers.1.mlp.down_proj": 6, "q_proj": 2},
        alpha_pattern={"v_proj": 3, "model.layers.0.mlp.gate_proj": 20},
    ),
    "layers": dict(
        r=4, lora_alpha=16,
        target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
        layers_to_transform=[1], layers_pattern="layers",
    ),
}


def main():
    from peft import LoraConfig, get_peft_model
    base = AutoModelForCausalLM.from_pretrained(str(FIXTURES / "tiny-llama"), dtype=torch.float32).eval()
    tensors = {}
    for name, settings in ADAPTERS.items():
        torch.manual_seed(5)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(
            lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False, **settings))
        out = FIXTURES / f"tiny-llama-{name}"
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out)
        config_path = out / "adapter_config.json"  # no path of this machine in a fixture
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = None
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        with torch.no_grad():
            tensors[name] = padded_logits([model(torch.tensor([s])).logits[0] for s in SEQUENCES])
        shapes = {k: tuple(p.shape) for k, p in model.named_parameters() if "lora_A" in k}
        print(name, shapes)
        # PEFT loads what it saved, with the same logits.
        from peft import PeftModel
        again = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
        with torch.no_grad():
            assert torch.equal(padded_logits([again(torch.tensor([s])).logits[0] for s in SEQUENCES]),
                               tensors[name])
    save_file(tensors, GOLDEN / "tiny_llama_patterns.safetensors")


if __name__ == "__main__":
    main()
