"""Batch-1 latency of PTB ``medium-cpu``-shaped models in float32, int8 and bfloat16 against the int8 peers.

    OPENBLAS_CORETYPE= python benchmarks/int8_latency.py --out results/int8-latency.json

Models, each the LSTM stack alone and the whole word model (10,000-word embedding, stack, decoder): the dense 2x650
stack, the ISS result (a dense stack of sizes 227 and 445), and the structures of the 20x compressed runs in
BENCHMARKS.md (magnitude pruning: 3.23% of each matrix;
doped KP share 0.75: (182x112) kron (15x6) plus 2.42% dense D; doped KP share 0.25: (653x94) kron (4x7) plus 0.81%).
The ``-int8-bytes`` structures keep what fits a byte budget once values are int8 (1 byte, a float32 scale per row,
indices counted): unstructured at 60x (ADMM's target) and 16x4 blocks (``BlockSparse``) at 20x, 40x and 60x; the
``+decoder-Nx`` ones also hold the decoder in 16x4 blocks at N x fewer bytes (a ``FormLinear``), the
``+lowrank-decoder-Nx`` ones as a low-rank product of the largest rank within those bytes; the ``-int4-bytes`` ones
keep the 16x4 blocks that fit with 4-bit values (two a byte: ADMM's ``bits=4``), run from packed tiles.
Latency depends on the structure, not on the trained values, so the models here have random weights of those
structures. The dense model runs on every backend (leanlstm float32 / int8 / bf16, torch, torch-int8, ONNX Runtime
float32 and int8); the compressed ones on the leanlstm engine in each precision. Every (model, part, backend) takes
turns in one interleaved run; medians of ``--repeats`` samples, microseconds per time step, one thread.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from leanlstm.methods.pruning import lowrank_rank
from leanlstm.nn import FormLinear
from leanlstm.nn.forms import BlockSparse, LowRank
from leanlstm.runtime.latency import measure
from leanlstm.runtime.pipeline import pipeline_of
from leanlstm.tasks.lm import LMConfig, WordLM

PEERS = ("torch", "torch-int8", "onnxruntime", "onnxruntime-int8")
OURS = ("leanlstm", "leanlstm-int8", "leanlstm-bf16")
def int8_density(kind: str, compression: float, shape: tuple[int, int] = (2600, 650), bits: int = 8) -> float:
    """The density a matrix (default 2600x650) keeps at ``compression`` x fewer bytes than dense float32 with int8
    (or ``bits``-wide) values (indices, pointers and row scales counted): unstructured CSR, or 16x4 blocks."""
    from leanlstm.methods.pruning import csr_entries_within
    from leanlstm.nn.forms.blocksparse import block_entries_within

    rows, cols = shape
    within = block_entries_within if kind == "blocksparse" else csr_entries_within
    return within(rows, cols, rows * cols * 4 / compression, bits) / (rows * cols)


DECODER = (10000, 650)


STRUCTURES = {
    "dense": None,
    "iss-227-445": "shrunk",
    "prune-20x": ("sparse", {"density": 0.0323}),
    "doped-kp-20x-share0.75": ("doped", {"structure": "kronecker",
                                         "structure_options": {"factor_shapes": ((182, 112), (15, 6))},
                                         "density": 0.0242}),
    "doped-kp-20x-share0.25": ("doped", {"structure": "kronecker",
                                         "structure_options": {"factor_shapes": ((653, 94), (4, 7))},
                                         "density": 0.0081}),
    # the same byte budgets once values are int8: 60x is ADMM's target; blocks of 16 rows x 4 inputs (BlockSparse)
    "prune-60x-int8-bytes": ("sparse", {"density": int8_density("sparse", 60)}),
    "blocks-20x-int8-bytes": ("blocksparse", {"density": int8_density("blocksparse", 20)}),
    "blocks-40x-int8-bytes": ("blocksparse", {"density": int8_density("blocksparse", 40)}),
    "blocks-60x-int8-bytes": ("blocksparse", {"density": int8_density("blocksparse", 60)}),
    "blocks-60x-int4-bytes": ("blocksparse", {"density": int8_density("blocksparse", 60, bits=4), "bits": 4}),
    # the same stack with the decoder in 16x4 blocks too (Prune(heads=N, block="16x4", value_bits=8)): N x fewer
    # bytes than the dense float32 decoder, int8 values
    "blocks-60x-int8-bytes+decoder-8x": ("blocksparse", {"density": int8_density("blocksparse", 60)},
                                         int8_density("blocksparse", 8, DECODER)),
    "blocks-60x-int8-bytes+decoder-16x": ("blocksparse", {"density": int8_density("blocksparse", 60)},
                                          int8_density("blocksparse", 16, DECODER)),
    "blocks-40x-int8-bytes+decoder-12x": ("blocksparse", {"density": int8_density("blocksparse", 40)},
                                          int8_density("blocksparse", 12, DECODER)),
    # the decoder at 12x as a low-rank product instead (Prune(heads=12, head_form="lowrank", value_bits=8))
    "blocks-40x-int8-bytes+lowrank-decoder-12x": ("blocksparse", {"density": int8_density("blocksparse", 40)},
                                                  ("lowrank", lowrank_rank("decoder", *DECODER, 12, 8))),
}


def density_of(structure) -> float | None:
    """The density of a sparse structure's (sparse part's) matrices; None for dense and shrunk stacks."""
    return structure[1].get("density") if isinstance(structure, tuple) else None


def model(structure) -> WordLM:
    torch.manual_seed(0)
    sizes = [227, 445] if structure == "shrunk" else [650, 650]        # ISS's medium-cpu result (row M2)
    lm = WordLM(LMConfig(vocab_size=10000, embed_size=650, hidden_sizes=sizes)).eval()
    if structure not in (None, "shrunk"):
        form, options = structure[0], dict(structure[1])
        bits = options.pop("bits", None)
        lm.lstm.replace_forms(form, speed_check=False, **options)
        if bits is not None:
            for _, matrix in lm.lstm.forms():
                matrix.set_value_bits(bits)
    if isinstance(structure, tuple) and len(structure) > 2:       # a compressed decoder: a block density or a rank
        weight, decoder = lm.decoder.weight.detach(), structure[2]
        form = (LowRank.from_dense(weight, rank=decoder[1]) if isinstance(decoder, tuple)
                else BlockSparse.from_dense(weight, density=decoder))
        lm.decoder = FormLinear.from_linear(lm.decoder, form)
    return lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=35)
    parser.add_argument("--structures", default=",".join(STRUCTURES),
                        help="comma-separated subset of: " + ", ".join(STRUCTURES) + " (dense is always timed)")
    options = parser.parse_args()
    chosen = ["dense"] + [name for name in options.structures.split(",") if name != "dense"]
    unknown = sorted(set(chosen) - set(STRUCTURES))
    if unknown:
        parser.error(f"unknown structures {', '.join(unknown)}; known: {', '.join(STRUCTURES)}")
    parts, backends = {}, {}
    for label, structure in ((name, STRUCTURES[name]) for name in chosen):
        pipeline = pipeline_of(model(structure))
        names = OURS + PEERS if structure is None else OURS
        parts[f"{label}/lstm"], parts[f"{label}/model"] = pipeline.recurrent_only(), pipeline
        backends[f"{label}/lstm"] = backends[f"{label}/model"] = names
    result = measure(parts, backends, seq_len=options.seq_len, repeats=options.repeats)
    medians = {label: {name: stats["median"] for name, stats in measured["backends"].items()}
               for label, measured in result["models"].items()}
    rows = []
    for part in ("lstm", "model"):
        dense = medians[f"dense/{part}"]
        peer_name = min(PEERS, key=lambda name: dense.get(name, float("inf")))
        for label in chosen:
            timed = medians[f"{label}/{part}"]
            for name in OURS:
                if name in timed:
                    rows.append({"model": label, "part": part, "backend": name, "us_per_step": timed[name],
                                 "density": density_of(STRUCTURES[label]),
                                 "decoder": STRUCTURES[label][2] if len(STRUCTURES[label] or ()) > 2 else None,
                                 "vs_dense_float32": dense["leanlstm"] / timed[name],
                                 "best_peer": peer_name, "best_peer_us": dense[peer_name],
                                 "vs_best_peer_dense": dense[peer_name] / timed[name]})
    report = {"command": "python benchmarks/int8_latency.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                        for k, v in vars(options).items()),
              "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"), "load_average": os.getloadavg(),
              **{k: v for k, v in result.items() if k != "models"}, "medians": medians, "rows": rows,
              "errors": {label: m["errors"] for label, m in result["models"].items() if m["errors"]}}
    options.out.write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        print(f"{row['model']:24s} {row['part']:5s} {row['backend']:14s} {row['us_per_step']:8.1f} us  "
              f"{row['vs_dense_float32']:5.2f}x dense  {row['vs_best_peer_dense']:5.2f}x best peer "
              f"({row['best_peer']} {row['best_peer_us']:.1f})")


if __name__ == "__main__":
    main()
