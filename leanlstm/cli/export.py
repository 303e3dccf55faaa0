"""``leanlstm export``: write a run directory's model in a deployment format."""
from __future__ import annotations

from pathlib import Path

import click
import onnx

from ..files import check_writable
from ..runs import load_run
from ..runtime.onnx import DEFAULT_OPSET, MIN_OPSET, RECURRENCES, STRUCTURES, export_onnx
from ..runtime.onnx_int8 import write_onnx_int8
from . import options


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False),
              help="Output file (default: RUN_DIR/model.onnx, or RUN_DIR/model.int8.onnx with --precision int8).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--opset", type=click.IntRange(MIN_OPSET, onnx.defs.onnx_opset_version()), default=DEFAULT_OPSET,
              show_default=True, help="ONNX opset version.")
@click.option("--recurrence", type=click.Choice(RECURRENCES), default="auto", show_default=True,
              help="auto: ONNX LSTM operator for dense layers, a Scan over the forms' own products otherwise.")
@click.option("--structure", type=click.Choice(STRUCTURES), default="auto", show_default=True,
              help="auto: write a layer's forms through their structure only where ONNX Runtime runs that faster "
                   "than the dense LSTM operator (measured); always: every form's structure; never: all dense.")
@click.option("--no-state-inputs", is_flag=True, help="Start from a zero state instead of taking h0/c0 inputs.")
@click.option("--precision", type=click.Choice(["float32", "int8"]), default="float32", show_default=True,
              help="int8: ONNX Runtime's dynamic quantisation of the dense export (DynamicQuantizeLSTM, int8 heads; "
                   "about 1/4 of the file), checked against float32 in ONNX Runtime. --structure auto means never.")
@options.task
def command(run_dir, fmt, out, force, opset, recurrence, structure, no_state_inputs, precision, task_name):
    """Export RUN_DIR's model (the model's inputs in, its outputs and final state out).

    \b
    Example:  leanlstm export runs/ptb-small --format onnx
              leanlstm export runs/ptb-small --precision int8      # runs/ptb-small/model.int8.onnx
    """
    options.check_task([run_dir], task_name)
    out = Path(out) if out else Path(run_dir) / (f"model.{fmt}" if precision == "float32" else f"model.int8.{fmt}")
    if out.exists() and not force:
        raise click.ClickException(f"{out} already exists; pass --force to replace it, or choose another --out")
    if out.is_dir():
        raise click.BadParameter(f"{out} is a folder; give a file name", param_hint="--out")
    check_writable(out, "--out", file=True)
    _, model, _ = load_run(run_dir)
    if precision == "int8":
        written = write_onnx_int8(model.eval(), out, opset=opset, state_inputs=not no_state_inputs,
                                  recurrence=recurrence, structure=structure, overwrite=True)
        click.echo(f"wrote {written.path} ({written.int8_bytes / 2**20:.1f} MiB int8, float32 "
                   f"{written.float_bytes / 2**20:.1f} MiB: {written.ratio:.2f}x smaller; largest difference from "
                   f"float32 in ONNX Runtime {written.errors['relative']:.2%} of the output's range)")
        return
    path = export_onnx(model.eval(), out, opset=opset, state_inputs=not no_state_inputs,
                       recurrence=recurrence, structure=structure, overwrite=True)
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
