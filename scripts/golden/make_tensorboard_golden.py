"""Golden for `train --report-to tensorboard`: an event file written by torch's SummaryWriter.

Run with the anchor venv (scripts/anchors/setup.sh, plus `pip install tensorboard`):
    ~/.cache/amthal-anchor/bin/python scripts/golden/make_tensorboard_golden.py
Writes tests/golden/tensorboard.tfevents (the file SummaryWriter wrote for a few
add_scalar calls with fixed wall times, as HF's TensorBoardCallback makes them) and
tests/golden/tensorboard.json (the calls). Its first record carries the time the file
was opened, which no argument sets; the scalar records that follow are what amthal's
must equal byte for byte.
"""
import json, shutil, tempfile
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
calls = [
    {"tag": "train/loss", "step": 1, "value": 2.4795, "wall_time": 1764800000.25},
    {"tag": "train/grad_norm", "step": 1, "value": 0.8125, "wall_time": 1764800000.25},
    {"tag": "train/learning_rate", "step": 1, "value": 1e-3, "wall_time": 1764800000.25},
    {"tag": "train/epoch", "step": 1, "value": 0.05, "wall_time": 1764800000.25},
    {"tag": "eval/loss", "step": 200, "value": 1.8601, "wall_time": 1764800123.5},
    {"tag": "train/epoch", "step": 300, "value": 3.0, "wall_time": 1764800200.0},
]
with tempfile.TemporaryDirectory() as tmp:
    writer = SummaryWriter(log_dir=tmp)
    for c in calls:
        writer.add_scalar(c["tag"], c["value"], c["step"], walltime=c["wall_time"])
    writer.close()
    (event_file,) = Path(tmp).glob("events.out.tfevents.*")
    shutil.copy(event_file, GOLDEN / "tensorboard.tfevents")
(GOLDEN / "tensorboard.json").write_text(json.dumps({
    "source": f"torch {__import__('torch').__version__} SummaryWriter.add_scalar", "calls": calls}, indent=1) + "\n")
print("wrote tensorboard.tfevents:", (GOLDEN / "tensorboard.tfevents").stat().st_size, "bytes")
