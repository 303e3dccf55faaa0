import gzip
import hashlib
from pathlib import Path

import pytest
import torch

from leanlstm.tasks.data import DataError, data_dir, download
from leanlstm.tasks.ptb import EOS, MD5, LanguageModelTask, batchify, load_ptb, tokenize


def test_full_files_load_and_verify(ptb_full_dir):
    corpus = load_ptb(ptb_full_dir)
    assert corpus.vocab_size == 10000
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (929589, 73760, 82430)


def test_slice_loads_plain_text_and_maps_unknown_words(ptb_slice_dir):
    corpus = load_ptb(ptb_slice_dir, verify=False, fetch=False)
    assert corpus.vocab[corpus.train[0]] == "aer"  # first word of ptb.train.txt
    assert EOS in corpus.vocab and corpus.train.dtype == torch.long
    assert corpus.valid.max() < corpus.vocab_size


def test_checksum_mismatch_is_reported(ptb_slice_dir):
    with pytest.raises(DataError, match=r"ptb.train.txt has md5 .* truncated or modified"):
        load_ptb(ptb_slice_dir, fetch=False)


def test_truncated_gzip_is_reported(tmp_path, ptb_slice_dir):
    for split in ("train", "valid", "test"):
        data = gzip.compress((ptb_slice_dir / f"ptb.{split}.txt").read_bytes())
        (tmp_path / f"ptb.{split}.txt.gz").write_bytes(data[: len(data) // 2] if split == "valid" else data)
    with pytest.raises(DataError, match=r"ptb.valid.txt.gz.*truncated or corrupt"):
        load_ptb(tmp_path, verify=False, fetch=False)


def test_missing_file_without_network_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match="LEANLSTM_DATA"):
        load_ptb(tmp_path, fetch=False)


def test_download_checks_md5_and_never_leaves_partial_files(tmp_path, ptb_slice_dir):
    source = ptb_slice_dir / "ptb.test.txt"
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    got = download(source.as_uri(), tmp_path / "out" / "ptb.test.txt", md5)
    assert got.read_bytes() == source.read_bytes()
    with pytest.raises(DataError, match="expected 0+"):
        download(source.as_uri(), tmp_path / "bad" / "ptb.test.txt", "0" * 32)
    assert list((tmp_path / "bad").iterdir()) == []


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANLSTM_DATA", str(tmp_path / "env"))
    assert data_dir("explicit") == Path("explicit")                 # an explicit folder wins over the variable
    assert data_dir("~/x") == Path.home() / "x"
    assert data_dir() == tmp_path / "env"
    monkeypatch.delenv("LEANLSTM_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_dir() == tmp_path / "cache" / "leanlstm"


def test_md5_table_matches_the_shared_files(ptb_full_dir):
    for split, expected in MD5.items():
        with gzip.open(ptb_full_dir / "ptb" / f"ptb.{split}.txt.gz", "rb") as handle:
            assert hashlib.md5(handle.read()).hexdigest() == expected


def test_tokenize_and_batchify():
    assert tokenize("a b\nc\n") == ["a", "b", EOS, "c", EOS]
    data = batchify(torch.arange(26), 4)
    assert data.shape == (6, 4) and data[:, 1].tolist() == [6, 7, 8, 9, 10, 11]
    with pytest.raises(DataError, match="too few"):
        batchify(torch.arange(3), 4)


def test_task_windows_and_rank_sharding(ptb_slice_dir):
    corpus = load_ptb(ptb_slice_dir, verify=False, fetch=False)
    whole = LanguageModelTask(corpus, batch_size=4, bptt=5)
    halves = [LanguageModelTask(corpus, batch_size=4, bptt=5, rank=r, world_size=2) for r in (0, 1)]
    inputs, targets = next(whole.train_batches())
    assert inputs.shape == (5, 4) and torch.equal(inputs[1:], targets[:-1])
    assert torch.equal(torch.cat([next(h.train_batches())[0] for h in halves], 1), inputs)
    assert sum(1 for _ in whole.train_batches()) == whole.num_train_batches()
    with pytest.raises(ValueError, match="divisible"):
        LanguageModelTask(corpus, batch_size=5, bptt=5, world_size=2)
