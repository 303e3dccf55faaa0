"""Shared fixtures: small slices of the real Penn Treebank, read through LEANLSTM_DATA."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SLICE_LINES = {"train": 2000, "valid": 200, "test": 200}


def shared_data_dir() -> Path:
    directory = Path(os.environ.get("LEANLSTM_DATA", REPO.parent / "shared" / "data"))
    if not (directory / "ptb" / "ptb.train.txt.gz").is_file():
        raise RuntimeError(f"the tests read Penn Treebank slices from {directory}/ptb; set LEANLSTM_DATA to "
                           f"the shared data folder (see README)")
    return directory


@pytest.fixture(scope="session")
def ptb_full_dir() -> Path:
    return shared_data_dir()


@pytest.fixture(scope="session")
def ptb_slice_dir(tmp_path_factory) -> Path:
    """A data folder holding the first lines of each real PTB split, as plain text."""
    out = tmp_path_factory.mktemp("ptb-slice")
    for split, lines in SLICE_LINES.items():
        with gzip.open(shared_data_dir() / "ptb" / f"ptb.{split}.txt.gz", "rt") as handle:
            head = [next(handle) for _ in range(lines)]
        (out / f"ptb.{split}.txt").write_text("".join(head))
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tiny models gain nothing from a second thread, and OpenMP threads stall badly when the machine is busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
