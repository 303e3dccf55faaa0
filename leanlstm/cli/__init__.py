"""``leanlstm`` command line. Each command is a small module; this file only dispatches."""
from __future__ import annotations

import logging
import sys

import click

from ..checkpoint import CheckpointError
from ..files import FileProblem
from ..runs import RunDirError
from ..runtime.profile import ProfileError
from ..tasks.data import DataError
from ..train import ConfigError, TrainingDiverged
from . import bench as bench_command
from . import compress as compress_command
from . import eval as eval_command
from . import export as export_command
from . import profile as profile_command
from . import report as report_command
from . import show as show_command
from . import tasks as tasks_command
from . import train as train_command
from . import transcribe as transcribe_command

# Errors whose message already tells the user what to do: print it, no traceback.
USER_ERRORS = (CheckpointError, DataError, FileProblem, ProfileError, RunDirError, TrainingDiverged, ValueError)


class Main(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ConfigError as error:        # an option out of its range: a usage error, named by its option
            raise click.UsageError(str(error), ctx) from error
        except USER_ERRORS as error:
            raise click.ClickException(str(error)) from error
        except OSError as error:            # the disk, not a bug: a full or read-only file system, say
            where = f"{error.filename}: " if error.filename else ""
            raise click.ClickException(f"{where}{error.strerror or error}") from error


@click.group(cls=Main)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """leanlstm: compress LSTMs into compact, accurate and genuinely faster ones."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        stream=sys.stderr)


main.add_command(train_command.command)
main.add_command(eval_command.command)
main.add_command(compress_command.command)
main.add_command(compress_command.list_methods)
main.add_command(export_command.command)
main.add_command(bench_command.command)
main.add_command(profile_command.command)
main.add_command(report_command.command)
main.add_command(show_command.command)
main.add_command(tasks_command.command)
main.add_command(transcribe_command.command)
