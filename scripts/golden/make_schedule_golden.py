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
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", {"min_lr": 5e-5, "num_cycles": 0.75, "warmup_lr_rate": 0.2}),
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

# reduce_lr_on_plateau: get_scheduler gives torch's ReduceLROnPlateau, which Trainer steps with
# eval_loss after each evaluation; the rate after each evaluation of a metric sequence.
METRICS = [5.0, 4.0, 3.9, 3.9, 3.95, 3.9, 3.91, 3.9, 3.8999, 3.9, 3.5, 3.6, 3.6, 3.6, 3.6, 3.6,
           3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.6]
plateau_settings = [
    {}, {"patience": 2}, {"patience": 1, "factor": 0.5, "cooldown": 2},
    {"patience": 0, "threshold": 0.01}, {"patience": 1, "threshold": 0.05, "threshold_mode": "abs"},
    {"patience": 1, "mode": "max"}, {"patience": 1, "mode": "max", "threshold_mode": "abs", "threshold": 0.5},
    {"patience": 0, "factor": 0.5, "min_lr": 5e-5}, {"patience": 0, "factor": 0.9, "eps": 1e-4},
]
plateau_cases = []
for kwargs in plateau_settings:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    scheduler = get_scheduler("reduce_lr_on_plateau", optimizer, num_warmup_steps=3, num_training_steps=20,
                              scheduler_specific_kwargs=dict(kwargs))
    rates = []
    for metric in METRICS:
        scheduler.step(metric)
        rates.append(optimizer.param_groups[0]["lr"])
    plateau_cases.append({"kwargs": kwargs, "rates": rates})

# greedy: get_scheduler gives transformers' GreedyLR, which Trainer steps as ReduceLROnPlateau.
# A sequence that improves for a while (the rate rises), stalls (it falls to min_lr and, with a
# small reset_start, starts over) and wobbles; smoothing averages it over a window.
import random
random.seed(4)
GREEDY_METRICS = ([5.0 - 0.1 * i for i in range(14)] + [3.7] * 30
                  + [3.7 + random.uniform(-0.2, 0.2) for _ in range(40)])
greedy_settings = [
    {}, {"min_lr": 1e-6}, {"min_lr": 1e-6, "patience": 2}, {"min_lr": 1e-6, "patience": 1, "factor": 0.5},
    {"min_lr": 1e-5, "patience": 1, "factor": 0.5, "cooldown": 2, "warmup": 3},
    {"min_lr": 2e-5, "patience": 1, "factor": 0.8, "reset_start": 3},
    {"min_lr": 1e-6, "patience": 1, "threshold": 0.01, "threshold_mode": "rel"},
    {"min_lr": 1e-6, "patience": 1, "mode": "max", "max_lr": 1e-3},
    {"min_lr": 1e-6, "patience": 1, "smooth": True, "window_size": 5},
    {"min_lr": 1e-6, "patience": 0, "smooth": True, "window_size": 3, "reset_start": 2, "eps": 1e-12},
]
greedy_cases = []
for kwargs in greedy_settings:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    scheduler = get_scheduler("greedy", optimizer, num_warmup_steps=3, num_training_steps=20,
                              scheduler_specific_kwargs=dict(kwargs))
    rates = []
    for metric in GREEDY_METRICS:
        scheduler.step(metric)
        rates.append(optimizer.param_groups[0]["lr"])
    greedy_cases.append({"kwargs": kwargs, "rates": rates})

(ROOT / "tests" / "golden" / "lr_schedules.json").write_text(json.dumps({
    "source": f"transformers {__import__('transformers').__version__}: get_scheduler + LambdaLR, base lr {BASE_LR}",
    "base_lr": BASE_LR, "cases": cases, "plateau_metrics": METRICS, "plateau_cases": plateau_cases,
    "greedy_metrics": GREEDY_METRICS, "greedy_cases": greedy_cases},
    indent=1) + "\n")
print(f"wrote lr_schedules.json: {len(cases)} cases, {len(plateau_cases)} plateau cases")
for case in plateau_cases:
    print(case["kwargs"], sorted(set(case["rates"]), reverse=True))
for case in greedy_cases:
    print("greedy", case["kwargs"], len(set(case["rates"])), "rates, from", min(case["rates"]), "to", max(case["rates"]))
