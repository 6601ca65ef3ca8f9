"""The offline English corpus (pydoc_data topics) as byte tokens."""

from __future__ import annotations

import numpy as np
import pytest

from celo2.data import VOCAB_SIZE, load_text_corpus


def test_corpus_size_dtype_and_split():
    train, val = load_text_corpus()
    assert VOCAB_SIZE == 256
    assert train.dtype == np.uint8 and val.dtype == np.uint8
    total = train.size + val.size
    assert total > 200_000  # the reference-manual topics are several hundred kB
    assert val.size == pytest.approx(0.1 * total, abs=2)
    train2, val2 = load_text_corpus(val_fraction=0.25)
    assert val2.size == pytest.approx(0.25 * total, abs=2)
    # Contiguous: train then validation is the whole corpus, in order.
    np.testing.assert_array_equal(np.concatenate([train2, val2]), np.concatenate([train, val]))


def test_corpus_is_mostly_printable_english_and_deterministic():
    train, val = load_text_corpus()
    printable = (train >= 32) & (train < 127) | (train == 10)
    assert printable.mean() > 0.97
    text = bytes(train).decode("utf-8", errors="replace")
    for word in (" the ", " statement", " function", " object"):
        assert text.count(word) > 20
    again = load_text_corpus()
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(val, again[1])
    train[:] = 0  # results are copies
    assert load_text_corpus()[0].max() > 0


def test_corpus_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        load_text_corpus(val_fraction=1.0)
    with pytest.raises(FileNotFoundError, match="python-docs"):
        load_text_corpus("no-such-corpus")
    path = tmp_path / "tiny.txt"
    path.write_text("hello world " * 10)
    train, val = load_text_corpus(str(path), val_fraction=0.5)
    assert bytes(np.concatenate([train, val])) == b"hello world " * 10
