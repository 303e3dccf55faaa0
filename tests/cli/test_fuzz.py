"""Property-based fuzz of the command line and of every method's config: whatever the options, the outcome is a
success or a clean error (exit code 1 or 2 with a message), never a traceback, never a finished run that did no
training, never a large growth of memory. Valid draws are kept cheap (the tiny preset, one batch, few items), so
that the whole file runs in well under a minute."""
import json
import math
import resource
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import leanlstm
from leanlstm.cli import main
from leanlstm.methods import METHODS, get_method
from leanlstm.methods.base import parse_settings

MEMORY_BOUND_KIB = 2 * 2**20         # peak resident memory may grow by at most 2 GiB over a whole fuzz test
FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def fuzz(examples: int) -> settings:
    """A fixed, bounded set of examples: the same on every run, no example database."""
    return settings(FUZZ, max_examples=examples)

# text the command line might be given for a number: edge values, nonsense and anything a float can be
EDGES = st.sampled_from(["0", "-1", "-3", "-0.0", "1e308", "-1e308", "nan", "inf", "-inf", "1e-308", "1e30",
                         "99999999999999999999", "1.5", "abc", ""])
NUMBERS = st.one_of(EDGES, st.integers(-10**13, 10**13).map(str),
                    st.floats(allow_nan=True, allow_infinity=True).map(repr))


def any_of(*values) -> st.SearchStrategy[str]:
    """One of ``values`` (valid ones), or any number at all, about as often."""
    return st.one_of(st.sampled_from([str(v) for v in values]), NUMBERS)


def cheap(*values, above: int) -> st.SearchStrategy[str]:
    """For a count whose valid values cost time (epochs, items): one of ``values``, or one that must be refused
    (edge values, non-positive numbers, whole numbers ``above`` the option's maximum)."""
    return st.one_of(st.sampled_from([str(v) for v in values]), EDGES, st.integers(-10**13, 0).map(str),
                     st.integers(above + 1, 10**20).map(str))


SIZES = st.one_of(st.lists(st.integers(1, 12), min_size=2, max_size=2),
                  st.lists(st.sampled_from([0, -4, 99999999, 10**12]), min_size=1, max_size=3)
                  ).map(lambda sizes: ",".join(map(str, sizes)))
# options of a run: (option, values); the base command line already asks for a cheap valid run
RUN_OPTIONS = {"--epochs": cheap(1, 2, above=10**6), "--lr": any_of(0.5, 1, 20), "--max-batches": any_of(1, 2),
               "--max-items": cheap(1, 30, 45, 120, 400, above=10**12), "--dropout": any_of(0, 0.2, 0.5),
               "--seed": any_of(0, 7, 2**32 - 1), "--distill-weight": any_of(0, 0.5, 1),
               "--distill-temperature": any_of(0.5, 2), "--precision": st.sampled_from(["float32", "bfloat16",
                                                                                         "float64"])}
TRAIN_OPTIONS = RUN_OPTIONS | {"--clip": any_of(0, 0.25, 5), "--hidden-sizes": SIZES}
COMPRESS_OPTIONS = RUN_OPTIONS | {"--lr-decay": any_of(0.5, 1), "--decay-after": any_of(0, 1, 10**9),
                                  "--finetune-lr": any_of(0.1, 1), "--finetune-epochs": cheap(0, 1, above=10**6),
                                  "--strength": any_of(0, 0.001, 0.01)}
LIBRARY_METHODS = sorted(name for name, method in METHODS.items() if method.__module__.startswith("leanlstm."))


def options(table: dict) -> st.SearchStrategy[list[str]]:
    """Up to two of ``table``'s options with drawn values, as command-line words."""
    chosen = st.lists(st.sampled_from(sorted(table)), max_size=2, unique=True)
    return chosen.flatmap(lambda names: st.tuples(*(table[n] for n in names)).map(
        lambda values: [word for pair in zip(names, values) for word in pair]))


def method_settings(name: str) -> st.SearchStrategy[list[str]]:
    """``--set KEY=VALUE`` words for up to two of the method's options (and an unknown one now and then)."""
    keys = sorted(get_method(name).Config().to_dict()) + ["colour"]
    values = st.one_of(NUMBERS, st.sampled_from(["0.5", "0.25", "1", "2", "4", "8"]),
                       st.sampled_from(["true", "no", "row", "matrix", "random", "zero", "macs", "group", "lowrank",
                                        "kronecker", "1,2"]))
    pairs = st.lists(st.tuples(st.sampled_from(keys), values), max_size=2)
    return pairs.map(lambda drawn: [word for key, value in drawn for word in ("--set", f"{key}={value}")])


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def check_outcome(result, out: Path) -> None:
    """Success or a clean error, and a finished run only where training happened."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(result.exception))
        pytest.fail(f"{result.exception!r} escaped the command line:\n{result.output}\n{trace}")
    assert result.exit_code in (0, 1, 2), result.output
    if result.exit_code:
        assert "Error" in result.output and "Traceback" not in result.output, result.output
    metrics = out / "metrics.json"
    assert metrics.is_file() == (result.exit_code == 0), result.output
    if metrics.is_file():
        finished = json.loads(metrics.read_text())
        assert finished["epochs"] >= 1 and finished["history"], finished
        assert any(entry["phase"] in ("train", "compress") for entry in finished["history"])
        numbers = [v for v in finished.values() if isinstance(v, float)]
        assert all(math.isfinite(v) for v in numbers), finished


def _base(data_dir: Path, out: Path) -> list[str]:
    return ["--preset", "tiny", "--data-dir", str(data_dir), "--no-verify-data", "--max-items", "400",
            "--max-batches", "1", "--epochs", "1", "--no-progress", "--out", str(out)]


def test_fuzz_train(ptb_slice_dir):
    before = _peak_kib()

    @fuzz(25)
    @given(args=options(TRAIN_OPTIONS))
    def run(args):
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "run"
            result = CliRunner().invoke(main, ["train", *_base(ptb_slice_dir, out), *args])
            check_outcome(result, out)

    run()
    assert _peak_kib() - before < MEMORY_BOUND_KIB


def test_fuzz_compress(ptb_slice_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                  # a drawn relative path (a profile folder) lands here
    before = _peak_kib()

    @fuzz(25)
    @given(method=st.sampled_from(LIBRARY_METHODS), data=st.data())
    def run(method, data):
        args = data.draw(method_settings(method)) + data.draw(options(COMPRESS_OPTIONS))
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "run"
            result = CliRunner().invoke(main, ["compress", "--method", method, "--latency-repeats", "0",
                                               "--finetune-epochs", "1", *_base(ptb_slice_dir, out), *args])
            check_outcome(result, out)

    run()
    assert _peak_kib() - before < MEMORY_BOUND_KIB


# size requests that are cheap to measure, or that must be refused (too many sizes, too large, not sizes)
SIZE_SPECS = st.one_of(st.sampled_from(["4", "4:8:4", "6,5", "1:1000000000", "0:4", "8:4", "4:8:0", "a:b", ",",
                                        "1:100000:1000", "-3", "2000000"]),
                       st.lists(st.one_of(st.integers(-10**10, 0), st.integers(2 * 10**5, 10**10)), min_size=1,
                                max_size=3).map(lambda bounds: ":".join(map(str, bounds))))
PROFILE_OPTIONS = {"--layers": cheap(1, 2, above=1000), "--input-size": cheap(4, 8, above=10**6),
                   "--seq-len": cheap(1, 3, above=10**5), "--repeats": cheap(1, 2, above=10**5),
                   "--threads": cheap(1, above=1024), "--tolerance": NUMBERS}


def test_fuzz_profile():
    before = _peak_kib()

    @fuzz(30)
    @given(sizes=SIZE_SPECS, args=options(PROFILE_OPTIONS))
    def run(sizes, args):
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "profile"
            result = CliRunner().invoke(main, ["profile", "--backend", "torch", "--sizes", sizes, "--seq-len", "2",
                                               "--repeats", "1", "--out", str(out), *args])
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                pytest.fail(f"{result.exception!r}:\n" + "".join(traceback.format_exception(result.exception)))
            assert result.exit_code in (0, 1, 2), result.output
            assert result.exit_code == 0 or "Error" in result.output
            assert result.exit_code != 0 or (out / "latency.csv").is_file()

    run()
    assert _peak_kib() - before < MEMORY_BOUND_KIB


@pytest.mark.parametrize("name", LIBRARY_METHODS)
def test_fuzz_method_configs(name, tmp_path, monkeypatch):
    """Every method's config from the command line's text, then used in a user's own loop: a config is refused
    with a ValueError naming the option, or it compresses a small LSTM through its whole life."""
    monkeypatch.chdir(tmp_path)                  # a drawn relative path (a profile folder) lands here
    method = get_method(name)

    @fuzz(25)
    @given(words=method_settings(name), total_steps=st.integers(0, 6))
    def run(words, total_steps):
        try:
            values = parse_settings(words[1::2])
            config = method.Config.from_strings(values)
            if "total_steps" in config.to_dict() and "total_steps" not in values:
                config = method.Config.from_dict(config.to_dict() | {"total_steps": total_steps})
        except ValueError as error:
            assert str(error)
            return
        _use(config)

    run()


def _use(config) -> None:
    """A user's loop around ``compress_``: a ValueError (the shape cannot take the config) is a clean refusal."""
    torch.manual_seed(0)
    model = leanlstm.LSTM(8, 16, 2)
    try:
        handle = leanlstm.compress_(model, config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            output, _ = model(torch.randn(4, 2, 8))
            loss = output.pow(2).mean() + handle.penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            handle.after_step()
        handle.on_epoch_end()
        handle.finalize()
        output, _ = model(torch.randn(4, 2, 8))
    except ValueError as error:
        assert str(error)
        return
    assert torch.isfinite(output).all()
