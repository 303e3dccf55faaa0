"""2-process DistributedDataParallel smoke run (gloo on CPU) against a single process."""
import json
import os
import subprocess
import sys

import pytest


def _train(out, data_dir, processes):
    args = ["train", "--preset", "tiny", "--out", str(out), "--data-dir", str(data_dir), "--no-verify-data",
            "--epochs", "2", "--max-batches", "20", "--no-progress"]
    if processes == 1:
        command = [sys.executable, "-m", "leanlstm", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", "-m", "leanlstm", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def test_two_processes_match_one_within_noise(tmp_path, ptb_slice_dir):
    single = _train(tmp_path / "single", ptb_slice_dir, 1)
    ddp = _train(tmp_path / "ddp", ptb_slice_dir, 2)
    # Each rank takes half of the batch columns and gradients are averaged, so the update is the same as one
    # process up to floating-point summation order (the tiny preset has no dropout).
    assert len(single["history"]) == len(ddp["history"]) == 2
    for a, b in zip(single["history"], ddp["history"]):
        assert b["val_ppl"] == pytest.approx(a["val_ppl"], rel=1e-3)
    assert ddp["test_ppl"] == pytest.approx(single["test_ppl"], rel=1e-3)
    assert single["test_ppl"] < 3000  # it learned something: uniform guessing over the vocabulary is far worse
