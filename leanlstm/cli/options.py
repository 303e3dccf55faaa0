"""Command-line options that more than one command takes."""
from __future__ import annotations

import click

from ..train import PRECISIONS


def distillation(command):
    """``--distill-from RUN``, ``--distill-weight``, ``--distill-temperature`` (``tasks.distill``)."""
    options = [
        click.option("--distill-from", type=click.Path(exists=True, file_okay=False),
                     help="Trained run to distil from: the loss mixes in its soft predictions (knowledge "
                          "distillation), in every training phase."),
        click.option("--distill-weight", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
                     help="Share of the teacher's soft targets in the loss."),
        click.option("--distill-temperature", type=click.FloatRange(0.0, min_open=True), default=1.0,
                     show_default=True, help="Softening temperature of the distillation term."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def precision(command):
    """``--precision float32|bfloat16``: the training forward pass's precision (``TrainConfig.precision``)."""
    return click.option(
        "--precision", type=click.Choice(PRECISIONS),
        help="Precision of the training forward pass (default float32). bfloat16 (autocast; weights, gradients "
             "and evaluation stay float32) trains faster on CPUs with AMX or AVX-512 BF16, slower on others.")(command)
