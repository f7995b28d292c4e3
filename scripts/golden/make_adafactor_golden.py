"""Goldens for `--optim adafactor`: transformers' Adafactor with the settings HF Trainer
gives it for `optim="adafactor"` (scale_parameter=False, relative_step=False, lr from
the schedule), on a matrix in the decayed group, a matrix and a vector outside it, for
six steps with a changing learning rate, as Trainer's two parameter groups hold them.

Run with the anchor venv:
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_adafactor_golden.py
Writes tests/golden/adafactor.safetensors: "<name>.start" (each parameter before the
first step), "<name>.grad.<t>" (its gradient at step t, from 1), "<name>.after.<t>"
(the parameter after step t), "lr" (the learning rate of each step) and
"weight_decay" (the decayed group's).
"""
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers.optimization import Adafactor

GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "golden"
STEPS = 6


def main():
    torch.manual_seed(0)
    # (name, shape, in the decayed group); a 3 x 1 matrix: a column of one value.
    shapes = [("decayed", (5, 7), True), ("matrix", (3, 1), False), ("vector", (7,), False)]
    params = {name: torch.nn.Parameter(torch.randn(shape)) for name, shape, _ in shapes}
    weight_decay = 0.1
    lrs = [0.0, 1e-2, 3e-2, 3e-2, 2e-2, 5e-3]
    groups = [
        {"params": [params[n] for n, _, d in shapes if d], "weight_decay": weight_decay},
        {"params": [params[n] for n, _, d in shapes if not d], "weight_decay": 0.0},
    ]
    optimizer = Adafactor(groups, lr=lrs[0], scale_parameter=False, relative_step=False)
    tensors = {name: p.detach().clone() for name, p in params.items()}
    tensors = {f"{name}.start": t for name, t in tensors.items()}
    for step, lr in enumerate(lrs, start=1):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for name, shape, _ in shapes:
            # Gradients of different sizes per step, so the clipping by RMS both acts
            # and does not.
            grad = torch.randn(shape) * (10.0 ** (step % 3 - 2))
            params[name].grad = grad
            tensors[f"{name}.grad.{step}"] = grad.clone()
        optimizer.step()
        for name in params:
            tensors[f"{name}.after.{step}"] = params[name].detach().clone()
    tensors["lr"] = torch.tensor(lrs, dtype=torch.float64)
    tensors["weight_decay"] = torch.tensor(weight_decay, dtype=torch.float64)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(GOLDEN / "adafactor.safetensors"))
    print(f"wrote {len(tensors)} tensors to {GOLDEN / 'adafactor.safetensors'}")


if __name__ == "__main__":
    main()
