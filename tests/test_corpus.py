"""Calibration sources and mixes (svdkit.corpus): what a mix names, how its windows are drawn,
reproducibility, and that no source shares text with an evaluation domain."""

from __future__ import annotations

import pytest
import torch

from svdkit.corpus import CALIBRATION_SOURCES, is_mix, mix_windows, parse_mix, source_documents
from svdkit.data import builtin_documents, evaluation_documents, evaluation_domains
from svdkit.overlap import shared_passages
from svdkit.tokens import calibration_tokens, token_stream

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import build_tokenizer

    return build_tokenizer()


def test_a_mix_names_registered_sources_with_weights():
    assert parse_mix("pydoc+stdlib+networkx:2") == [("pydoc", 1.0), ("stdlib", 1.0), ("networkx", 2.0)]
    assert parse_mix("stdlib-odd") == [("stdlib-odd", 1.0)]
    assert is_mix("pydoc+torch") and is_mix("pydoc") and is_mix("nonsense+pydoc")
    assert not is_mix("builtin") and not is_mix("in-domain") and not is_mix("text.txt") and not is_mix("ids.pt")


@pytest.mark.parametrize("mix, message", [
    ("pydoc+wikipedia", "unknown calibration source 'wikipedia' in the calibration mix 'pydoc+wikipedia'; known sources: networkx"),
    ("pydoc+legal-english", "'legal-english' in the calibration mix 'pydoc+legal-english' is an evaluation domain"),
    ("pydoc+pydoc", "names 'pydoc' twice"),
    ("pydoc:0", "must be > 0"),
    ("pydoc+", "'' is not 'name' or 'name:weight'"),
])
def test_a_bad_mix_is_a_clear_error(mix, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        parse_mix(mix)


def test_calibration_tokens_refuses_an_unknown_source_before_reading_any_text(tokenizer):
    with pytest.raises(ValueError, match="unknown calibration source 'nope'"):
        calibration_tokens("stdlib+nope", tokenizer, n_seqs=4, seq_len=16)
    with pytest.raises(FileNotFoundError, match="a calibration source or mix of networkx, numpy"):
        calibration_tokens("nope", tokenizer, n_seqs=4, seq_len=16)


def test_mix_windows_come_from_each_source_in_proportion_and_reproducibly(tokenizer):
    windows = calibration_tokens("stdlib:3+stdlib-odd", tokenizer, n_seqs=8, seq_len=24, seed=3)
    assert windows.shape == (8, 24) and windows.dtype == torch.int64
    assert torch.equal(windows, mix_windows("stdlib:3+stdlib-odd", tokenizer, n_seqs=8, seq_len=24, seed=3))
    assert not torch.equal(windows, calibration_tokens("stdlib:3+stdlib-odd", tokenizer, n_seqs=8, seq_len=24, seed=4))
    even = token_stream(builtin_documents("docstrings", split="even"), tokenizer).tolist()
    odd = token_stream(builtin_documents("docstrings", split="odd"), tokenizer).tolist()

    def inside(row, stream):
        text = ",".join(map(str, stream))
        return ",".join(map(str, row)) in text

    origin = ["even" if inside(row.tolist(), even) else "odd" if inside(row.tolist(), odd) else "?" for row in windows]
    # 6 of the 8 windows come from the source of weight 3; the sources take turns while both have windows left
    assert origin.count("even") == 6 and origin.count("odd") == 2 and "?" not in origin
    assert origin[:2] == ["even", "odd"]  # the first batch reads both sources


def test_builtin_stays_svdkit_s_calibration_text(tokenizer):
    # 'builtin' is not a mix: the same windows as svdkit 0.1 drew from the even topics and files interleaved
    from svdkit.data import calibration_documents

    stream = token_stream(calibration_documents(), tokenizer)
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, stream.numel() - 32 + 1, (6,), generator=generator)
    expected = torch.stack([stream[s:s + 32] for s in starts.tolist()])
    assert torch.equal(calibration_tokens("builtin", tokenizer, n_seqs=6, seq_len=32, seed=0), expected)


def _evaluation_text() -> list[str]:
    return [doc for domain in evaluation_domains() for doc in evaluation_documents(domain)]


@pytest.mark.parametrize("name", ["pydoc", "stdlib", "stdlib-odd"])
def test_the_standard_library_sources_share_no_passage_with_an_evaluation_domain(name):
    documents = source_documents(name)
    assert documents and sum(map(len, documents)) > 100_000
    assert shared_passages(documents, _evaluation_text()) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CALIBRATION_SOURCES))
def test_no_calibration_source_shares_a_passage_with_an_evaluation_domain(name):
    documents = source_documents(name)
    assert documents and sum(map(len, documents)) > 100_000
    assert shared_passages(documents, _evaluation_text()) == []
    assert source_documents(name) == documents  # the same text every time it is read
