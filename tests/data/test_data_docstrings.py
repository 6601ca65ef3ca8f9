"""The standard-library docstring corpus: built offline, deterministic, split by file, apart from the bench's text."""

import numpy as np
import pytest

from celo2.data import docstrings
from celo2.data.docstrings import DocstringCorpusError, byte_windows, load_docstring_corpus
from celo2.data.text import load_text_corpus

SMALL = 50_000


def test_the_corpus_is_docstring_bytes_and_the_same_on_every_call():
    a = load_docstring_corpus("train", SMALL)
    assert a.dtype == np.uint8 and a.size == SMALL
    text = a.tobytes().decode("utf-8", errors="replace")
    assert "\n\n" in text and sum(c.isalpha() for c in text) > 0.5 * len(text)
    docstrings._corpus.cache_clear()
    assert np.array_equal(load_docstring_corpus("train", SMALL), a)  # rebuilt from the files: identical
    a[:] = 0
    assert load_docstring_corpus("train", SMALL).any()  # a fresh array each call


def test_the_train_and_selection_splits_read_different_files_and_never_pydoc_data():
    train = {rel for rel, _ in docstrings.stdlib_sources("train")}
    selection = {rel for rel, _ in docstrings.stdlib_sources("selection")}
    assert train and selection and not train & selection
    assert len(selection) < len(train) / 4
    for rel in train | selection:
        parts = rel.split("/")[:-1]
        assert not set(parts) & {"pydoc_data", "test", "tests", "site-packages"}, rel
    with pytest.raises(DocstringCorpusError, match="unknown split 'validation'"):
        docstrings.stdlib_sources("validation")


def test_the_meta_training_text_shares_no_passage_with_the_bench_corpus():
    ours = load_docstring_corpus("train").tobytes()  # the budget the text-docstrings family reads
    assert len(ours) > 500_000
    train, val = load_text_corpus("python-docs")
    bench = np.concatenate([train, val]).tobytes()
    # Every 64-byte passage of the bench's corpus at a multiple of 16: a shared passage of
    # 79 bytes or more would contain one of them.
    chunks = {bench[i:i + 64] for i in range(0, len(bench) - 63, 16)}
    assert not any(ours[i:i + 64] in chunks for i in range(len(ours) - 63))
    assert not docstrings.shares_a_bench_passage(ours)
    assert docstrings.shares_a_bench_passage(bench[1000:1200])  # the check does find bench text


def test_docstrings_of_a_source_are_read_without_running_it():
    src = b'"""Module doc."""\nraise SystemExit("never run")\nclass A:\n    """Class doc."""\n    def f(self):\n        """Method\n        doc."""\n'
    assert docstrings.docstrings_of_source(src) == ["Module doc.", "Class doc.", "Method\ndoc."]
    assert docstrings.docstrings_of_source(b"def broken(:\n") == []


def test_byte_windows_pair_each_byte_with_the_next():
    tokens = np.arange(20, dtype=np.uint8)
    X, y = byte_windows(tokens, context=4, stride=3)
    assert X.shape == y.shape == (6, 4) and X.dtype == np.uint8
    assert X[1].tolist() == [3, 4, 5, 6] and y[1].tolist() == [4, 5, 6, 7]
    assert y[-1, -1] == 19
    with pytest.raises(DocstringCorpusError, match="cannot fill one window"):
        byte_windows(tokens[:4], context=4, stride=1)
    with pytest.raises(DocstringCorpusError, match="stride=0"):
        byte_windows(tokens, context=4, stride=0)
    with pytest.raises(DocstringCorpusError, match="max_bytes=1"):
        load_docstring_corpus("train", 1)
