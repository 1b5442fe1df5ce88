"""Held-out evaluation domains: what text they hold, that none repeats calibration text, and
language_model_quality over all of them."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from svdkit.data import (
    builtin_documents,
    calibration_documents,
    evaluation_documents,
    evaluation_domains,
    sentence_runs,
)
from svdkit.eval import language_model_quality, perplexity, worst_ratio
from svdkit.overlap import remove_shared_paragraphs, shared_passages
from svdkit.tokens import EVALUATION_DOMAINS, evaluation_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 64


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).lower()


def _text_windows(text: str, length: int) -> set[str]:
    """Every window of ``length`` characters of the normalized text, at least half letters or digits."""
    norm = _normalized(text)
    return {w for w in (norm[k:k + length] for k in range(len(norm) - length + 1)) if 2 * sum(c.isalnum() for c in w) >= length}


# --- the domains ----------------------------------------------------------------------------------


def test_the_evaluation_domains_are_listed_with_what_they_hold():
    domains = evaluation_domains()
    assert list(domains) == ["in-domain", "other-domain", "legal-english", "math-docs"]
    assert EVALUATION_DOMAINS == tuple(domains)
    assert all(isinstance(text, str) and len(text) > 20 for text in domains.values())


@pytest.mark.parametrize("domain", EVALUATION_DOMAINS)
def test_each_domain_holds_enough_text_for_eight_windows_of_512_tokens(domain):
    """A BPE tokenizer for English averages about four characters a token (SmolLM2's: 4.2 on the
    legal text, the shortest domain); the slow SmolLM2 test counts its tokens exactly."""
    documents = evaluation_documents(domain)
    assert documents and all(doc.strip() for doc in documents)
    assert sum(map(len, documents)) >= 8 * 512 * 4


def test_an_unknown_domain_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown evaluation domain 'wikitext'.*legal-english"):
        evaluation_documents("wikitext")
    with pytest.raises(FileNotFoundError, match="an evaluation domain .*math-docs"):
        evaluation_tokens("wikitext", tokenizer=None)


def test_the_legal_text_is_pythons_licence_and_the_apache_license_as_prose():
    python, apache = builtin_documents("licenses")
    assert python.startswith("A. HISTORY OF THE SOFTWARE") and "Python Software Foundation" in python
    assert apache.startswith("Apache License Version 2.0, January 2004") and apache.endswith("END OF TERMS AND CONDITIONS")
    # Hard-wrapped paragraphs are joined into lines of prose.
    paragraph = next(p for p in apache.split("\n\n") if p.startswith('"Legal Entity"'))
    assert "\n" not in paragraph and "  " not in paragraph and len(paragraph) > 400


def test_the_math_text_has_no_doctest_examples_or_markup():
    documents = builtin_documents("mpmath")
    assert len(documents) >= 100
    joined = "\n".join(documents)
    assert ">>>" not in joined and "``" not in joined and ":func:" not in joined and ".. math" not in joined
    zeta = next(doc for doc in documents if doc.startswith("Computes the Riemann zeta function"))
    assert "\\zeta(s) = 1+\\frac{1}{2^s}" in zeta  # formulas are kept


# --- no evaluation text repeats calibration text --------------------------------------------------


def test_no_evaluation_domain_shares_a_64_character_passage_with_the_calibration_text():
    """Checked twice: with svdkit.overlap, and by brute force (every window of the calibration
    text in a set)."""
    calibration = calibration_documents()
    calibration_windows = set().union(*(_text_windows(doc, WINDOW) for doc in calibration))
    for domain in EVALUATION_DOMAINS:
        documents = evaluation_documents(domain)
        assert shared_passages(documents, calibration, length=WINDOW) == [], domain
        for doc in documents:
            assert not (_text_windows(doc, WINDOW) & calibration_windows), domain


def test_the_in_domain_text_is_the_odd_topics_less_the_paragraphs_they_share_with_calibration():
    """A quarter of the odd pydoc topics repeats the even ones verbatim; those paragraphs go, the rest stays."""
    odd = builtin_documents("topics", split="odd")
    assert shared_passages(odd, calibration_documents()), "the raw odd topics share passages with the calibration"
    kept = evaluation_documents("in-domain")
    paragraphs = lambda docs: [p for doc in docs for p in re.split(r"\n(?:[ \t]*\n)+", doc) if p.strip()]  # noqa: E731
    raw_paragraphs, kept_paragraphs = set(paragraphs(odd)), paragraphs(kept)
    assert all(p in raw_paragraphs for p in kept_paragraphs)
    assert 0.6 < sum(map(len, kept)) / sum(map(len, odd)) < 0.95


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab c.", max_size=60), st.text(alphabet="ab c.", max_size=60), st.integers(4, 8))
def test_shared_passages_agrees_with_a_brute_force_search(text, reference, length):
    found = shared_passages([text], [reference], length=length)
    assert bool(found) == bool(_text_windows(text, length) & _text_windows(reference, length))
    for passage in found:
        assert passage.text in _normalized(reference) and passage.text == _normalized(text[passage.start:passage.end])


def test_remove_shared_paragraphs_drops_a_reflowed_copy_and_keeps_the_rest():
    reference = ["The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill."]
    text = (
        "A first paragraph that is entirely our own words and nothing else.\n\n"
        "THE QUICK BROWN FOX\n   jumps over the lazy dog while   the cat watches from the warm windowsill!\n\n"
        "A last paragraph, also our own."
    )
    assert len(shared_passages([text], reference)) == 1
    assert remove_shared_paragraphs([text, reference[0]], reference) == [
        "A first paragraph that is entirely our own words and nothing else.\n\nA last paragraph, also our own."
    ]
    with pytest.raises(ValueError, match="length must be an int >= 2"):
        shared_passages([text], reference, length=1)


def test_sentence_runs_break_at_code_and_keep_the_sentences_split_sentences_gave():
    text = (
        "This is the first sentence of some prose. Here comes a second sentence of it.\n\n"
        "   x = 1\n   y = 2\n\n"
        "After the code a new run of sentences begins here. And it goes on for one more sentence."
    )
    runs = sentence_runs(text)
    assert runs == [
        ["This is the first sentence of some prose.", "Here comes a second sentence of it."],
        ["After the code a new run of sentences begins here.", "And it goes on for one more sentence."],
    ]
    for doc in builtin_documents("topics")[:60] + builtin_documents("idle") + builtin_documents("licenses"):
        assert [s for run in sentence_runs(doc) for s in run] == _split_sentences_as_before(doc)


def _split_sentences_as_before(text: str) -> list[str]:
    """split_sentences as it was before sentence_runs: the runs must not change the sentences."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in paragraph.splitlines()]
        if not lines or sum(ln[:1].isalpha() for ln in lines if ln) < len([ln for ln in lines if ln]) / 2:
            continue
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", " ".join(ln for ln in lines if ln)):
            sentence = sentence.strip()
            if 30 <= len(sentence) <= 400 and sentence[0].isupper() and sentence.count(" ") >= 4:
                out.append(sentence)
    return out


# --- perplexity over every domain -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from lm_helpers import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    return tiny_llama(len(tokenizer), max_positions=128), tokenizer


def test_language_model_quality_scores_every_domain_and_names_the_worst(tiny):
    model, tokenizer = tiny
    dense = language_model_quality(model, tokenizer, max_tokens=4 * 64, seq_len=64)
    assert list(dense) == list(EVALUATION_DOMAINS)
    for domain, value in dense.items():
        ids = evaluation_tokens(domain, tokenizer, max_tokens=4 * 64)
        assert value == pytest.approx(perplexity(model, ids, seq_len=64).perplexity, rel=1e-6)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(3.0)  # a perturbed model
    try:
        after = language_model_quality(model, tokenizer, max_tokens=4 * 64, seq_len=64, reference=dense)
    finally:
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.div_(3.0)
    ratios = {d: after[d] / dense[d] for d in EVALUATION_DOMAINS}
    assert after["worst domain"] == max(ratios, key=ratios.get)
    assert after["worst ratio"] == pytest.approx(max(ratios.values()))
    assert worst_ratio({"a": 2.0, "b": 9.0, "c": "text"}, {"a": 1.0, "b": 6.0, "c": "text"}) == ("a", 2.0)
    with pytest.raises(ValueError, match="no numeric key"):
        worst_ratio({"a": 1.0}, {"b": 1.0})
    assert math.isfinite(after["worst ratio"])
