"""``leanlstm transcribe``: the digits spoken in WAV files, by a trained ``digits`` run."""
from __future__ import annotations

import time

import click
import numpy as np

from ..runs import load_run
from ..tasks.data import DataError

HOP_SECONDS = 0.01   # audio is fed to a stream in 10 ms pieces, as a microphone would deliver it


@click.command("transcribe")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--stream", is_flag=True, help="Feed the audio 10 ms at a time and print each digit as it is "
              "recognised, with the audio time it was recognised at and the real-time factor.")
@click.option("--beam", type=click.IntRange(0), default=0, show_default=True,
              help="Prefix beam-search width (0: greedy). Not with --stream, which decodes greedily.")
@click.option("--backend", type=click.Choice(["leanlstm", "torch"]), default="leanlstm", show_default=True,
              help="What runs the LSTM steps of --stream.")
def command(run_dir, files, stream, beam, backend):
    """Print the digits spoken in each FILE (mono 8 kHz WAV; other rates are resampled, several channels
    averaged), recognised by RUN_DIR's model.

    \b
    Example:  leanlstm transcribe runs/digits-small recording.wav
              leanlstm transcribe runs/digits-small recording.wav --stream
    """
    from ..tasks.digits import DigitsCTC, DigitsStream, transcribe
    from ..tasks.fsdd import read_wav

    if stream and beam:
        raise click.UsageError("--stream decodes greedily; drop --beam")
    run, model, _ = load_run(run_dir)
    if not isinstance(model, DigitsCTC):
        raise click.UsageError(f"{run_dir} is a {run.task} run; transcribe needs a run of the digits task")
    model.eval()
    rate = model.config.features.sample_rate
    streamer = DigitsStream(model, backend) if stream else None
    failed = 0
    for path in files:
        try:
            audio = read_wav(path, rate)
        except DataError as error:
            click.echo(f"error: {error}", err=True)
            failed += 1
            continue
        if streamer is None:
            click.echo(f"{path}: {' '.join(map(str, transcribe(model, audio, beam)))}")
        else:
            _stream(streamer, path, audio, rate)
    if failed:
        raise click.ClickException(f"{failed} of {len(files)} files could not be read")


def _stream(streamer, path: str, audio: np.ndarray, rate: int) -> None:
    """Feed ``audio`` hop by hop, printing digits as they come; then the transcript and the real-time factor."""
    streamer.reset()
    hop = int(rate * HOP_SECONDS)
    click.echo(f"{path}:")
    busy = 0.0
    for start in range(0, len(audio), hop):
        began = time.perf_counter()
        digits = streamer.push(audio[start:start + hop])
        busy += time.perf_counter() - began
        for digit in digits:
            click.echo(f"  {(start + hop) / rate:6.2f} s  {digit}")
    for digit in streamer.finish():
        click.echo(f"  {len(audio) / rate:6.2f} s  {digit}  (at the end)")
    seconds = len(audio) / rate
    click.echo(f"  = {' '.join(map(str, streamer.digits))}   ({seconds:.2f} s of audio in {busy * 1e3:.1f} ms: "
               f"real-time factor {busy / seconds:.4f})")
