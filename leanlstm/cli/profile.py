"""``leanlstm profile``: measure latency across layer sizes on this machine (a hardware profile): a size sweep of
one LSTM, or (``--per-layer``) the per-layer table of cell, input size, hidden size and density that hardware-guided
training (``--method symbiotic``) reads."""
from __future__ import annotations

import json

import click

from ..files import check_writable
from ..runtime.backends import BACKENDS
from ..nn.cells import CELLS
from ..runtime.profile import LayerSettings, ProfileSettings, cell_name, check_sizes, layer_key
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


def parse_options(pairs: tuple[str, ...], hint: str = "--form-option") -> dict:
    """``("density=0.1", "rank=8")`` -> ``{"density": 0.1, "rank": 8}`` (values read as JSON when they parse)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint=hint)
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
@click.option("--per-layer", is_flag=True, help="Profile single layers keyed by cell, input size, hidden size and "
              "density (the table --method symbiotic reads) instead of sweeping one LSTM.")
@click.option("--cell", type=click.Choice(sorted(CELLS)), default="lstm", show_default=True,
              help="--per-layer: the layer's cell.")
@click.option("--cell-option", "cell_options", multiple=True, help="--per-layer: key=value of the cell, e.g. "
              "gate_hidden=64 (hlstm) or proj_size=32 (lstm).")
@click.option("--input-sizes", help="--per-layer: input widths, as --sizes (default: each layer's own size).")
@click.option("--densities", help="--per-layer: also time each layer with --matrices sparse at these densities, "
              "e.g. 0.1,0.25.")
@click.option("--matrices", default="all", show_default=True,
              help="--per-layer: the matrices --densities makes sparse: all, or one (ih, hh, ...).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def command(sizes, out, backend, layers, input_size, form, form_options, seq_len, repeats, threads, tolerance,
            per_layer, cell, cell_options, input_sizes, densities, matrices, as_json):
    """Latency per layer size on this machine; marks sizes that run faster than smaller ones (hysteresis) and
    local minima (valleys). A folder measured on another machine or backend version is measured again.

    \b
    Example:  leanlstm profile --sizes 32:1024:8 --out profiles/dense-1layer
              leanlstm profile --per-layer --sizes 64:512:64 --input-sizes 128 --densities 0.1,0.3 --out profiles/l
    """
    from ..runtime.profile import profile

    Range(0, 1, high_open=True).check("--tolerance", tolerance)
    if per_layer:
        if layers != 1 or form != "dense" or form_options or input_size:
            raise click.BadParameter("--layers, --input-size, --form and --form-option shape the size sweep; "
                                     "--per-layer times one layer: give --input-sizes, --cell and --densities",
                                     param_hint="--per-layer")
        try:
            layer_settings = LayerSettings(backend, seq_len, repeats, threads)
        except ConfigError as error:
            raise error.renamed(OPTIONS.get(error.name, error.name)) from None
        cell = cell_name(cell, parse_options(cell_options, "--cell-option"))
        return _per_layer(sizes, out, layer_settings, cell, input_sizes, parse_densities(densities), matrices,
                          tolerance, as_json)
    try:
        settings = ProfileSettings(backend=backend, num_layers=layers, input_size=input_size, form=form,
                                   form_options=parse_options(form_options), seq_len=seq_len, repeats=repeats,
                                   threads=threads)
    except ConfigError as error:
        raise error.renamed(OPTIONS.get(error.name, error.name)) from None
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


def parse_densities(spec: str | None) -> list[float]:
    """``"0.1, 0.25"`` -> ``[0.1, 0.25]``, each in (0, 1).

    >>> parse_densities("0.1, 0.25"), parse_densities(None)
    ([0.1, 0.25], [])
    """
    densities = []
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        try:
            density = float(part)
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a number", param_hint="--densities") from None
        if not 0 < density < 1:
            raise click.BadParameter(f"a density lies in (0, 1), got {part}", param_hint="--densities")
        densities.append(density)
    return densities


def _per_layer(sizes: str, out: str, settings: LayerSettings, cell: str, input_sizes: str | None,
               densities: list[float], matrices: str, tolerance: float, as_json: bool) -> None:
    """``--per-layer``: every (input size, hidden size), dense and sparse at each density, into a layer table."""
    from ..runtime.profile import profile_layers

    hidden = parse_sizes(sizes)
    inputs = parse_sizes(input_sizes) if input_sizes else None
    keys = [layer_key(cell, i, h, matrices, d) for h in hidden for i in (inputs or [h]) for d in [1.0] + densities]
    check_writable(out, "--out")

    def progress(key, row):
        if not as_json:
            form = "dense" if key.is_dense else f"{key.matrices} sparse at {key.density:g}"
            click.echo(f"{key.cell} {key.input_size:>6} -> {key.hidden_size:>6} {form:>22}: "
                       f"{row['median']:10.2f} us/step")

    table = profile_layers(keys, out, settings, on_row=progress)
    if as_json:
        click.echo(json.dumps(table.to_dict(tolerance), indent=2))
        return
    click.echo(f"{len(table.rows)} layers in {out} (latency.csv, latency.json, latency.png)")
    for i in inputs or [None]:
        shown = f"input {i}" if i is not None else "square layers"
        if i is not None:
            click.echo(f"{shown}: valleys (local minima) at hidden sizes {table.sweep(cell, i).valleys(tolerance)}")
        for d in densities:
            faster = [h for h in hidden if d in table.faster_densities(cell, i or h, h, matrices, tolerance)]
            click.echo(f"{shown}: {matrices} sparse at {d:g} beats dense at hidden sizes {faster or 'none'}")
