"""Goldens for amthal's bitsandbytes 4-bit codec (src/model/bnb4.rs), from bitsandbytes'
own CPU backend: quantize_4bit / dequantize_4bit with NF4 and FP4, blocks of 64, with
and without double quantization (compress_statistics: absmax minus its mean, in 8 bits
with the dynamic map, blocks of 256), on f32 and bf16 weights, including a tensor whose
size is not a multiple of the block. Writes tests/golden/bnb_4bit.safetensors.
usage: ~/.cache/amthal-anchor/bin/python scripts/golden/make_bnb4_golden.py"""
import os, sys
import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from safetensors.torch import save_file

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.manual_seed(0)
inputs = {
    # a projection-like weight (rows x in), heavy-tailed columns like real LLM weights
    "w": torch.randn(96, 128) * torch.linspace(0.2, 3.0, 128),
    # 100 x 33 = 3300 values: not a multiple of 64 (a ragged last block), odd last dim
    "ragged": torch.randn(100, 33) * 0.02,
    # zeros and a constant block (absmax 0 and exact codes)
    "flat": torch.cat([torch.zeros(64), torch.full((64,), 0.5), torch.randn(128)]).view(4, 64),
}
out = {}
for name, x in inputs.items():
    for dtype_name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        a = x.to(dtype)
        out[f"{name}.{dtype_name}.input"] = a.contiguous()
        for quant in ("nf4", "fp4"):
            for double in (False, True):
                key = f"{name}.{dtype_name}.{quant}.{'double' if double else 'single'}"
                q, state = F.quantize_4bit(a, blocksize=64, quant_type=quant, compress_statistics=double)
                out[f"{key}.packed"] = q.reshape(-1).contiguous()
                if double:
                    out[f"{key}.absmax_codes"] = state.absmax.contiguous()
                    out[f"{key}.absmax2"] = state.state2.absmax.contiguous()
                    out[f"{key}.offset"] = state.offset.reshape(1).float().contiguous()
                else:
                    out[f"{key}.absmax"] = state.absmax.contiguous()
                out[f"{key}.dequantized"] = F.dequantize_4bit(q, state).contiguous()
dest = os.path.join(root, "tests/golden/bnb_4bit.safetensors")
save_file(out, dest, metadata={"bitsandbytes": bnb.__version__, "torch": torch.__version__})
print(f"wrote {dest}: {len(out)} tensors (bitsandbytes {bnb.__version__})")

int8 = {}
for name in ("w", "ragged"):
    for dtype_name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        a = inputs[name].to(dtype).contiguous()
        key = f"{name}.{dtype_name}"
        int8[f"{key}.input"] = a
        codes, row_absmax, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(a, 0.0)
        int8[f"{key}.codes"] = codes.contiguous()
        int8[f"{key}.row_absmax"] = row_absmax.contiguous()
        int8[f"{key}.dequantized"] = (
            torch.ops.bitsandbytes.int8_vectorwise_dequant.default(codes, row_absmax).to(dtype).contiguous()
        )
dest = os.path.join(root, "tests/golden/bnb_int8.safetensors")
save_file(int8, dest, metadata={"bitsandbytes": bnb.__version__, "torch": torch.__version__})
print(f"wrote {dest}: {len(int8)} tensors (bitsandbytes {bnb.__version__})")
