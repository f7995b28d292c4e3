"""Goldens for `train --lr-scheduler` / `--lr-scheduler-kwargs`: transformers' get_scheduler.

Run with the anchor venv (scripts/anchors/setup.sh):
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_schedule_golden.py
Writes tests/golden/lr_schedules.json: for each schedule, its kwargs, a warmup and a
run length, the learning rate at every optimizer step (what Trainer sets before step
s, s = 0 .. total - 1, and one step past the end), from LambdaLR on a one-parameter AdamW.
"""
import json
from pathlib import Path

import torch
from transformers import get_scheduler

ROOT = Path(__file__).resolve().parents[2]
BASE_LR = 3e-4
cases = []
settings = [
    ("linear", {}), ("cosine", {}), ("cosine", {"num_cycles": 1.5}),
    ("cosine_with_restarts", {}), ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {}), ("polynomial", {"lr_end": 1e-5, "power": 2.0}),
    ("inverse_sqrt", {}), ("inverse_sqrt", {"timescale": 7}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}), ("cosine_with_min_lr", {"min_lr": 5e-5, "num_cycles": 0.75}),
    ("warmup_stable_decay", {"num_decay_steps": 5}),
    ("warmup_stable_decay", {"num_decay_steps": 4, "warmup_type": "cosine", "decay_type": "1-sqrt",
                             "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 3, "num_stable_steps": 4, "warmup_type": "1-sqrt",
                             "decay_type": "linear", "num_cycles": 0.5}),
    ("constant", {}), ("constant_with_warmup", {}),
]
for name, kwargs in settings:
    for warmup, total in ((0, 20), (3, 20), (5, 13)):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                                  scheduler_specific_kwargs=dict(kwargs))
        rates = []
        for _ in range(total + 1):
            rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        cases.append({"schedule": name, "kwargs": kwargs, "warmup": warmup, "total": total, "rates": rates})

(ROOT / "tests" / "golden" / "lr_schedules.json").write_text(json.dumps({
    "source": f"transformers {__import__('transformers').__version__}: get_scheduler + LambdaLR, base lr {BASE_LR}",
    "base_lr": BASE_LR, "cases": cases}, indent=1) + "\n")
print(f"wrote lr_schedules.json: {len(cases)} cases")
