"""Command-line options that more than one command takes."""
from __future__ import annotations

import click

from ..nn.structured_dropout import DROPOUT_MODES, parse_dropout_mode
from ..train import MAX_SEED, PRECISIONS


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


def dropout_mode(command):
    """``--dropout-mode``: per-sequence dropout masks (the default) or structured ones (``nn.structured_dropout``),
    as ``MODE`` or ``MODE/N``."""
    def check(ctx, param, value):
        if value is not None:
            try:
                parse_dropout_mode(value)
            except ValueError as error:
                raise click.BadParameter(str(error)) from None
        return value

    return click.option(
        "--dropout-mode", callback=check, metavar="[" + "|".join(DROPOUT_MODES) + "][/N]",
        help="structured: one dropout mask per time step shared by the batch, and the products that read dropped "
             "units skip them (Sarma et al. 2021); structured-window: one mask for the batch's whole window, "
             "PyTorch's fused kernel on the kept inputs (faster on CPUs); structured-hybrid: the window's masks at "
             "the stack's inputs, a new one every step at the head's. /N: N consecutive steps share a mask "
             "(structured, and structured-hybrid's head), e.g. structured-hybrid/12. Default: the preset's "
             "(standard).")(command)


def lr_decay(phase: str = ""):
    """``--decay-after N`` and ``--lr-decay F``: the step schedule of ``TrainConfig`` (the lr is multiplied by F each
    epoch after the first N), for the phase named (``" of the compression phase"``; empty: the whole run)."""
    def decorate(command):
        command = click.option("--lr-decay", type=float, help=f"Factor on the lr per epoch after --decay-after"
                                                              f"{phase} (default: the preset's).")(command)
        return click.option("--decay-after", type=click.IntRange(min=0),
                            help=f"Epochs at the full lr{phase} (default: the preset's).")(command)
    return decorate


def seed(command):
    """``--seed N``: the run's random seed (``TrainConfig.seed``: initial weights, data order, dropout masks), for
    repeated runs whose median is the result."""
    return click.option("--seed", type=click.IntRange(0, MAX_SEED),
                        help="Random seed instead of the preset's 1234 (initial weights, data order, "
                             "dropout).")(command)


def precision(command):
    """``--precision float32|bfloat16``: the training forward pass's precision (``TrainConfig.precision``)."""
    return click.option(
        "--precision", type=click.Choice(PRECISIONS),
        help="Precision of the training forward pass (default float32). bfloat16 (autocast; weights, gradients "
             "and evaluation stay float32) trains faster on CPUs with AMX or AVX-512 BF16, slower on others.")(command)


def device(command):
    """``--device cpu|cuda|cuda:N``: where training runs (``TrainConfig.device``)."""
    return click.option(
        "--device", help="Where training runs: cpu (default), cuda or cuda:N (a PyTorch with CUDA on a machine "
                         "with a GPU). Checkpoints, evaluation and the batch-1 runtime do not depend on it.")(command)


def tensorboard(command):
    """``--tensorboard``: log the run for TensorBoard under ``OUT/tensorboard`` (``leanlstm.tensorboard``)."""
    return click.option(
        "--tensorboard", is_flag=True,
        help="Log losses, metrics, lr and the method's numbers (sparsity, surviving units, compression) per epoch, "
             "and the training loss every 20 steps, for TensorBoard in OUT/tensorboard.")(command)


def make_tensorboard(enabled: bool) -> list:
    """The callbacks ``--tensorboard`` asks for: a ``leanlstm.tensorboard.TensorBoard``, or none."""
    if not enabled:
        return []
    try:
        from ..tensorboard import TensorBoard
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - fails here, not after an epoch
    except ImportError as error:
        raise click.UsageError(f"--tensorboard needs the tensorboard package ({error}): pip install "
                               f"'tensorboard>=2.18,<2.22'") from None
    return [TensorBoard()]


def task(command):
    """``--task NAME`` on a command that reads run directories: they record their task, so the option only
    checks it (``check_task``)."""
    return click.option("--task", "task_name", help="Task the run directories must belong to (default: each "
                        "run's own; see `leanlstm tasks`).")(command)


def check_task(run_dirs, task_name: str | None) -> None:
    """Refuse run directories of another task than ``--task``, and an unknown ``--task``."""
    from ..runs import source_task
    from ..tasks import get_task

    if task_name is None:
        return
    get_task(task_name)     # an unknown task is an error even when the runs would tell
    for run_dir in run_dirs:
        recorded = source_task(run_dir)
        if recorded != task_name:
            raise click.UsageError(f"{run_dir} is a {recorded} run, not {task_name}; drop --task or pass "
                                   f"--task {recorded}")
