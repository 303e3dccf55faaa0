"""The text task on a tiny corpus written here: files, vocabulary cap and ``<unk>``, training, a whole run."""
import gzip
import logging
import random

import pytest
import torch

from leanlstm.runs import RunConfig, evaluate_run, load_run, train_run
from leanlstm.tasks import DataConfig, TaskError, get_task
from leanlstm.tasks.data import DataError
from leanlstm.tasks.lm import LMConfig, WordLM
from leanlstm.tasks.ptb import EOS, UNK, LMTrainConfig
from leanlstm.tasks.text import TextTask, build_vocab, find_split, load_text

SUBJECTS, VERBS, OBJECTS = ["the cat", "a dog", "my friend"], ["sees", "likes", "eats"], ["fish", "bread", "rain"]


def _sentences(count: int, seed: int) -> str:
    """A little grammar: the next word is easy to guess, so a model that learns anything lowers the loss."""
    rng = random.Random(seed)
    return "".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} .\n" for _ in range(count))


@pytest.fixture
def corpus_dir(tmp_path):
    (tmp_path / "train.txt").write_text(_sentences(600, 0) + "zebra zebra quokka\n")
    (tmp_path / "valid.txt").write_text(_sentences(60, 1) + "unicorn\n")     # a word the training file lacks
    with gzip.open(tmp_path / "test.txt.gz", "wt") as handle:
        handle.write(_sentences(60, 2))
    return tmp_path


def test_split_files_by_plain_name_dotted_name_or_gzip(tmp_path, corpus_dir):
    assert find_split(corpus_dir, "test").name == "test.txt.gz"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "wiki.valid.tokens").write_text("a\n")
    assert find_split(tmp_path / "other", "valid").name == "wiki.valid.tokens"
    with pytest.raises(DataError, match="no train file .* --data-dir"):
        find_split(tmp_path / "other", "train")
    (tmp_path / "other" / "web.valid.txt").write_text("b\n")
    with pytest.raises(DataError, match="several valid files"):
        find_split(tmp_path / "other", "valid")


def test_vocabulary_by_frequency_with_unk_first_and_unknown_words_as_unk(corpus_dir):
    corpus = load_text(corpus_dir)
    words = {w for part in SUBJECTS + VERBS + OBJECTS for w in part.split()} | {".", EOS, "zebra", "quokka"}
    assert corpus.vocab[0] == UNK and set(corpus.vocab[1:]) == words and corpus.vocab_size == len(words) + 1
    assert corpus.vocab[1:3] == [EOS, "."]              # 601 lines end in <eos>, 600 of them in a full stop
    assert corpus.vocab[-2:] == ["zebra", "quokka"]     # the rarest last: zebra twice, quokka once
    assert corpus.valid[-2:].tolist() == [0, corpus.vocab.index(EOS)]   # "unicorn" -> <unk>
    assert build_vocab(["<unk>", "a", "<unk>"]) == [UNK, "a"]           # a corpus's own <unk> stays id 0


def test_a_model_reads_its_capped_vocabulary_and_configs_fit_the_corpus(corpus_dir, caplog):
    corpus = load_text(corpus_dir)
    config = LMConfig(vocab_size=10000, embed_size=8, hidden_sizes=[8])
    fitted = TextTask.fit_model_config(config, DataConfig(str(corpus_dir)))
    assert fitted.vocab_size == corpus.vocab_size and config.vocab_size == 10000
    capped = TextTask.fit_model_config(TextTask.configure_model(config, vocab_size=5), DataConfig(str(corpus_dir)))
    assert capped.vocab_size == 5
    with pytest.raises(TaskError, match="at least 2 words"):
        TextTask.configure_model(config, vocab_size=1)
    task = TextTask.load(DataConfig(str(corpus_dir)), LMTrainConfig(batch_size=4, bptt=5))
    small = WordLM(LMConfig(vocab_size=5, embed_size=8, hidden_sizes=[8]))
    batch = next(iter(task.train_batches()))
    assert batch[0].max() >= 5                          # the stream holds the whole vocabulary ...
    logits, loss, _ = task.forward(small, batch, None)  # ... and a 5-word model reads the rest as <unk>
    assert logits.shape[-1] == 5 and torch.isfinite(loss)
    assert torch.isfinite(torch.tensor(task.evaluate(small, "valid")["ppl"]))
    with caplog.at_level(logging.WARNING, logger="leanlstm.tasks.text"):
        task.evaluate(WordLM(config), "test")
    assert "predicts over 10000 words, the corpus has" in caplog.text


def test_training_lowers_the_loss(corpus_dir):
    task = TextTask.load(DataConfig(str(corpus_dir)), LMTrainConfig(batch_size=4, bptt=10))
    config = TextTask.fit_model_config(LMConfig(embed_size=16, hidden_sizes=[16]), DataConfig(str(corpus_dir)))
    model = WordLM(config)
    before = task.evaluate(model, "valid")["loss"]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        state = None
        for batch in task.train_batches():
            loss, state, _ = task.training_loss(model, batch, state)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state = tuple([t.detach() for t in part] for part in state)
    after = task.evaluate(model, "valid")
    assert after["loss"] < before - 1.0 and after["ppl"] < 6     # from ~ln(18) to the grammar's few choices


def test_a_run_through_train_run_and_eval(tmp_path, corpus_dir):
    assert get_task("text") is TextTask
    run = RunConfig(task="text", preset="tiny", data_dir=str(corpus_dir), overrides={"epochs": 3, "lr": 1.0})
    metrics = train_run(run, tmp_path / "run", progress=False)
    assert metrics["task"] == "text" and metrics["metric"] == "ppl" and metrics["hidden_sizes"] == [32, 32]
    assert metrics["test_ppl"] < 14      # uniform over its 17 words: 17
    _, model, _ = load_run(tmp_path / "run")
    again = evaluate_run(tmp_path / "run", ["test"])
    assert again["test"]["ppl"] == pytest.approx(metrics["test_ppl"])
    corpus_words = load_text(str(corpus_dir)).vocab_size
    assert model.config.vocab_size == corpus_words < TextTask.preset("tiny").model.vocab_size   # fitted to it


def test_the_cli_caps_the_vocabulary_and_other_tasks_refuse_the_option(tmp_path, corpus_dir):
    from click.testing import CliRunner

    from leanlstm.cli import main

    common = ["--preset", "tiny", "--data-dir", str(corpus_dir), "--epochs", "1", "--max-batches", "3",
              "--no-progress"]
    result = CliRunner().invoke(main, ["train", "--task", "text", "--vocab-size", "8", "--out",
                                       str(tmp_path / "capped"), *common])
    assert result.exit_code == 0, result.output
    assert load_run(tmp_path / "capped")[1].decoder.out_features == 8
    result = CliRunner().invoke(main, ["train", "--task", "ptb", "--vocab-size", "8", "--out", str(tmp_path / "ptb"),
                                       *common])
    assert result.exit_code != 0 and "has no vocabulary size to set" in result.output
    assert not (tmp_path / "ptb").exists()


def test_docstring_examples():
    import doctest

    import leanlstm.tasks.text

    result = doctest.testmod(leanlstm.tasks.text)
    assert result.attempted > 0 and result.failed == 0
