"""``leanlstm profile``: measure latency across layer sizes on this machine (a hardware profile)."""
from __future__ import annotations

import json

import click

from ..files import check_writable
from ..runtime.backends import BACKENDS
from ..runtime.profile import ProfileSettings, check_sizes
from ..train import ConfigError, Range

# the command-line option of each ProfileSettings field
OPTIONS = {"num_layers": "--layers", "input_size": "--input-size", "seq_len": "--seq-len", "repeats": "--repeats",
           "threads": "--threads"}


def parse_ranges(spec: str) -> list[range]:
    """``"8:64:8,100"`` -> ``[range(8, 65, 8), range(100, 101)]``: ``a:b:s`` runs from a to b inclusive in steps of
    s (default 1). Nothing is expanded, so a request of any size costs nothing to read and to check."""
    ranges = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            bounds = [int(v) for v in part.split(":")]
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a size or a range a:b[:step]", param_hint="--sizes") from None
        if len(bounds) == 1:
            ranges.append(range(bounds[0], bounds[0] + 1))
        elif len(bounds) in (2, 3) and (len(bounds) == 2 or bounds[2] > 0):
            ranges.append(range(bounds[0], bounds[1] + 1, bounds[2] if len(bounds) == 3 else 1))
        else:
            raise click.BadParameter(f"{part!r} is not a size or a range a:b[:step] with step > 0",
                                     param_hint="--sizes")
    if not any(ranges) or min(r[0] for r in ranges if r) < 1:
        raise click.BadParameter(f"need positive sizes, got {spec!r}", param_hint="--sizes")
    return [r for r in ranges if r]


def parse_sizes(spec: str, settings: ProfileSettings | None = None) -> list[int]:
    """``"8:64:8,100,128:256"`` -> sizes, once their number (at most ``MAX_SIZES``) and the largest (it must fit in
    memory) are checked.

    >>> parse_sizes("8:24:8,100")
    [8, 16, 24, 100]
    """
    ranges = parse_ranges(spec)
    try:
        check_sizes(sum(len(r) for r in ranges), max(r[-1] for r in ranges), settings or ProfileSettings())
    except ConfigError as error:
        raise click.BadParameter(str(error), param_hint="--sizes") from None
    return sorted(set().union(*ranges))


def parse_options(pairs: tuple[str, ...]) -> dict:
    """``("density=0.1", "rank=8")`` -> ``{"density": 0.1, "rank": 8}`` (values read as JSON when they parse)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--form-option")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


@click.command("profile")
@click.option("--sizes", required=True, help="Layer sizes: a:b[:step] ranges (inclusive) and single sizes, "
              "comma-separated, e.g. 32:1024:8.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Profile folder; rows already measured there are kept and skipped.")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="leanlstm", show_default=True)
@click.option("--layers", type=int, default=1, show_default=True, help="LSTM layers, all of the swept size.")
@click.option("--input-size", type=int, help="Input width (default: the swept size).")
@click.option("--form", default="dense", show_default=True, help="Weight form of every matrix.")
@click.option("--form-option", "form_options", multiple=True, help="key=value for the form, e.g. density=0.1.")
@click.option("--seq-len", type=int, default=35, show_default=True)
@click.option("--repeats", type=int, default=15, show_default=True, help="Timed sequences per size.")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--tolerance", type=float, default=0.02, show_default=True,
              help="Report a size as faster than a smaller one only beyond this fraction.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def command(sizes, out, backend, layers, input_size, form, form_options, seq_len, repeats, threads, tolerance,
            as_json):
    """Latency per layer size on this machine; marks sizes that run faster than smaller ones.

    \b
    Example:  leanlstm profile --sizes 32:1024:8 --out profiles/dense-1layer
    """
    from ..runtime.profile import profile

    try:
        settings = ProfileSettings(backend=backend, num_layers=layers, input_size=input_size, form=form,
                                   form_options=parse_options(form_options), seq_len=seq_len, repeats=repeats,
                                   threads=threads)
    except ConfigError as error:
        raise error.renamed(OPTIONS.get(error.name, error.name)) from None
    Range(0, 1, high_open=True).check("--tolerance", tolerance)
    sizes = parse_sizes(sizes, settings)
    check_writable(out, "--out")

    def progress(size, row):
        if not as_json:
            click.echo(f"size {size:>6}: {row['median']:10.2f} us/step (IQR {row['p75'] - row['p25']:.2f})")

    table = profile(sizes, out, settings, on_row=progress)
    if as_json:
        click.echo(json.dumps(table.to_dict(tolerance), indent=2))
        return
    points = table.hysteresis(tolerance)
    click.echo(f"{len(table.sizes)} sizes in {out} (latency.csv, latency.json, latency.png)")
    if not points:
        click.echo(f"no size runs more than {tolerance:.0%} faster than a smaller one")
    for p in points:
        click.echo(f"size {p['size']} ({p['latency']:.2f} us) is faster than size {p['slower_size']} "
                   f"({p['slower_latency']:.2f} us)")
