"""The sweep runner behind BENCHMARKS.md: parsing, resuming and waiting for the runs a command starts from."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sweep  # noqa: E402


def test_sweep_parses_resumes_and_waits_for_unfinished_sources(tmp_path):
    runs = tmp_path / "runs"
    (tmp_path / "s.txt").write_text(
        "# a comment\n"
        "leanlstm train --preset small --out {runs}/base   # trailing comment\n"
        "leanlstm compress --method prune --from {runs}/base --out {runs}/pruned/\n"
        "leanlstm train --hidden-sizes-from {runs}/pruned --out {runs}/direct\n")
    base, pruned, direct = sweep.commands(tmp_path / "s.txt", str(runs))
    assert base == ["leanlstm", "train", "--preset", "small", "--out", f"{runs}/base"]
    assert sweep.log_path(pruned) == runs / "pruned.log"               # beside the run, even with a slash
    assert sweep.prepared(base) == base                                # nothing there yet: start it
    (runs / "base").mkdir(parents=True)
    (runs / "base" / "checkpoint.pt").write_bytes(b"")
    assert sweep.prepared(base) == base + ["--resume"]
    assert not sweep.source_ready(pruned) and not sweep.source_ready(direct) and sweep.source_ready(base)
    (runs / "base" / "metrics.json").write_text("{}")
    assert sweep.prepared(base) is None                                # finished: skipped
    assert sweep.source_ready(pruned) and not sweep.source_ready(direct)
    (tmp_path / "bad.txt").write_text("python train.py --out x\n")
    with pytest.raises(SystemExit, match="bad.txt:1: expected a `leanlstm ... --out DIR` command"):
        sweep.commands(tmp_path / "bad.txt", str(runs))
