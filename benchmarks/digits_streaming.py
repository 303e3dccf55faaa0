"""Spoken digits: compressed runs beside their dense baseline, error rates, size and streaming latency per 10 ms.

    OMP_NUM_THREADS=1 LEANLSTM_DATA=../shared/data python benchmarks/digits_streaming.py \
        --baseline runs/digits-medium runs/digits-medium-prune runs/digits-medium-kp \
        --out results/digits-medium-compressed.json [--repeats 30] [--utterances 100]

Per model (the whole ``DigitsCTC``: normalisation constants, LSTM stack, linear head), in one interleaved
measurement (``leanlstm.runtime.measure``, one thread, batch 1, 100 LSTM steps = 3 s of audio):

- streaming, one LSTM step at a time: the leanlstm engine's ``Stream.step`` (every weight form as itself) and
  ONNX Runtime stepping the exported dense model with its state fed back (``onnxruntime-stream``);
- whole utterances: leanlstm ``run``, ONNX Runtime, and PyTorch's int8 dynamic quantisation (``torch-int8``).

The model steps once per ``stack`` (3) feature frames, so the latency per 10 ms frame is the step's divided by 3.
Then the real-time factor of the whole streaming pipeline (``DigitsStream``: log-mel features for every 10 ms
hop, LSTM step, head, incremental greedy decoding) on the first ``--utterances`` test utterances, audio pushed in
10 ms pieces: processing seconds per second of audio (silence pads included), on leanlstm and on PyTorch, with
the word error rate of what the stream printed. Error rates on the full fixed sets (valid, test, held-out speaker)
are evaluated here, with this checkout's decoder, for every model (``leanlstm.runs.evaluate_run``); sizes and
settings come from each run's ``metrics.json`` (finished runs only).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_run import command_line  # noqa: E402

from leanlstm.runs import evaluate_run, load_run  # noqa: E402
from leanlstm.runtime.latency import machine_info, measure  # noqa: E402
from leanlstm.tasks import ctc, fsdd  # noqa: E402
from leanlstm.tasks.digits import DigitsStream, silence  # noqa: E402
from leanlstm.tasks.features import FeatureStream  # noqa: E402

KEEP = ("method", "preset", "hidden_sizes", "lstm_params", "dense_lstm_params", "lstm_compression", "epochs",
        "train_minutes", "method_config", "source", "structure", "sparse_density", "cell")
STEPS = 100                                                  # LSTM steps per timed sequence: 3 s of audio
STREAMING, WHOLE = ("leanlstm-stream", "onnxruntime-stream"), ("leanlstm", "onnxruntime", "torch-int8")
HOP_SAMPLES = 80                                             # 10 ms at 8 kHz


def summary(run_dir: Path) -> dict:
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise SystemExit(f"{run_dir} has no metrics.json: finish the run first (leanlstm compress ... --resume)")
    metrics = json.loads(metrics_file.read_text())
    row = {"run": str(run_dir), "task": metrics.get("task", "digits"), **{k: metrics[k] for k in KEEP if k in metrics}}
    evaluated = evaluate_run(run_dir, ["valid", "test", "heldout"])
    for split in ("valid", "test", "heldout"):
        measured = evaluated[split]
        row |= {f"{'val' if split == 'valid' else split}_{name}": value for name, value in measured.items()
                if name in ("loss", "wer", "ser")}
    return row


def test_utterances(count: int) -> list[fsdd.Utterance]:
    """The first ``count`` utterances of the task's fixed test set (the set ``metrics.json``'s test_wer is on)."""
    recordings = fsdd.load_recordings(fsdd.recordings_dir())
    total, seed = fsdd.EVAL_SETS["test"]
    return fsdd.synthesize(fsdd.split_pool(recordings, "test"), min(count, total), seed)


def features_per_frame(utterances: list[fsdd.Utterance], config) -> float:
    """Microseconds of ``FeatureStream.push`` per 10 ms hop, audio pushed 10 ms at a time (median of utterances)."""
    per_utterance = []
    for utterance in utterances:
        stream, frames = FeatureStream(config), 0
        start = time.perf_counter()
        for at in range(0, len(utterance.audio), HOP_SAMPLES):
            frames += len(stream.push(utterance.audio[at:at + HOP_SAMPLES]))
        per_utterance.append((time.perf_counter() - start) / max(frames, 1) * 1e6)
    return float(np.median(per_utterance))


def real_time_factor(model: torch.nn.Module, backend: str, utterances: list[fsdd.Utterance]) -> dict:
    """Seconds of processing per second of audio for the whole streaming pipeline, and the stream's WER."""
    stream = DigitsStream(model, backend)          # compiles (leanlstm) before the clock starts
    rate = model.config.features.sample_rate
    pad = len(silence(stream.pad, rate))
    seconds, audio_seconds, hypotheses = 0.0, 0.0, []
    for utterance in utterances:
        start = time.perf_counter()
        stream.reset()                             # pushes the leading pad of silence
        for at in range(0, len(utterance.audio), HOP_SAMPLES):
            stream.push(utterance.audio[at:at + HOP_SAMPLES])
        stream.finish()                            # the trailing pad: the last digit comes out in it
        seconds += time.perf_counter() - start
        audio_seconds += (len(utterance.audio) + 2 * pad) / rate
        hypotheses.append(" ".join(map(str, stream.digits)))
    references = [" ".join(map(str, u.digits)) for u in utterances]
    return {"rtf": seconds / audio_seconds, "audio_seconds": audio_seconds,
            **{f"stream_{k}": v for k, v in ctc.error_rates(references, hypotheses).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="finished compressed run directories")
    parser.add_argument("--baseline", required=True, type=Path, help="the dense run they were compressed from")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--utterances", type=int, default=100, help="test utterances streamed for the RTF")
    args = parser.parse_args()
    torch.set_num_threads(1)

    run_dirs = [args.baseline, *args.runs]
    rows = {str(run_dir): summary(run_dir) for run_dir in run_dirs}
    models = {str(run_dir): load_run(run_dir)[1].eval() for run_dir in run_dirs}
    stack = models[str(args.baseline)].config.stack
    backends = {label: [*STREAMING, *WHOLE] for label in models}
    timed = measure(models, backends, seq_len=STEPS, repeats=args.repeats, threads=1)
    utterances = test_utterances(args.utterances)
    feature_us = features_per_frame(utterances, models[str(args.baseline)].config.features)

    base = timed["models"][str(args.baseline)]["backends"]
    dense_stream, peer_stream = base["leanlstm-stream"]["median"], base["onnxruntime-stream"]["median"]
    for label, row in rows.items():
        measured = timed["models"][label]
        medians = {name: stats["median"] for name, stats in measured["backends"].items()}
        ours = medians["leanlstm-stream"]
        peers = {name: medians[name] for name in ("onnxruntime-stream",) if name in medians}
        row |= {
            "baseline_test_wer": rows[str(args.baseline)]["test_wer"],
            "baseline_heldout_wer": rows[str(args.baseline)].get("heldout_wer"),
            "us_per_step": medians, "us_per_frame": {name: value / stack for name, value in medians.items()},
            "latency_stats": measured["backends"], "errors": measured["errors"],
            "speedup_vs_dense_leanlstm_stream": dense_stream / ours,
            "speedup_vs_dense_onnxruntime_stream": peer_stream / ours,
            "speedup_vs_best_peer_stream": min(peers.values()) / ours if peers else None,
            "speedup_vs_dense_torch_int8_whole": base["torch-int8"]["median"] / medians["leanlstm"]
            if "torch-int8" in base and "leanlstm" in medians else None,
            "model_rtf_leanlstm": ours / stack / 1e4,       # per 10 ms frame, over 10,000 us
            "features_us_per_frame": feature_us,
            "pipeline": {backend: real_time_factor(models[label], backend, utterances)
                         for backend in ("leanlstm", "torch")},
        }
        print(f"{label}: test WER {row['test_wer']:.4f} (baseline {row['baseline_test_wer']:.4f}), "
              f"x{row.get('lstm_compression', 1.0):.1f} LSTM params; us per 10 ms frame: "
              + ", ".join(f"{name} {value:.2f}" for name, value in row["us_per_frame"].items())
              + f"; pipeline RTF leanlstm {row['pipeline']['leanlstm']['rtf']:.4f}, "
                f"torch {row['pipeline']['torch']['rtf']:.4f}")
    report = {"command": command_line(), "machine": machine_info(), "seq_len_steps": STEPS, "stack": stack,
              "frame_ms": 10, "repeats": args.repeats, "utterances": len(utterances), "rows": list(rows.values())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
