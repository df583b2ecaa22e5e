from pathlib import Path

import pytest

from viscon_hub.prepare.tokens import DEFAULT_TOKENIZER, TokenCounter

REF = DEFAULT_TOKENIZER.parent


def reference_pairs():
    inputs = (REF / "reference.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (REF / "reference.out").read_text(encoding="utf-8").split("\n")
    # The input file ends with the separator line, leaving an empty tail.
    inputs = inputs[: len(outputs)] if len(inputs) > len(outputs) else inputs
    return list(zip(inputs, outputs))


def test_bundled_tokenizer_matches_every_llama_cpp_reference_pair():
    counter = TokenCounter()
    pairs = reference_pairs()
    assert len(pairs) >= 40
    for text, expected in pairs:
        ids = [int(x) for x in expected.split()]
        assert counter.encode(text) == ids, text
    assert counter.count([t for t, _ in pairs]) == [len(e.split()) for _, e in pairs]


def test_provenance_is_kept_beside_the_vocabulary():
    source = (REF / "SOURCE.md").read_text()
    assert "llama.cpp" in source and "reference" in source


def test_length_bound_never_rejects_a_document_that_fits():
    counter = TokenCounter()
    texts = ["a" * 5000, "word " * 3000, "🦙" * 300, "x"]
    for text, n in zip(texts, counter.count(texts)):
        for limit in (1, 10, 100, 1000, 2000, 5000):
            if counter.surely_over(text, limit):
                assert n > limit


def test_tokenizer_from_file_and_folder(tmp_path):
    assert TokenCounter(str(DEFAULT_TOKENIZER)).count(["Hello world"]) == [2]
    assert TokenCounter(str(REF)).count(["Hello world"]) == [2]


def test_unknown_tokenizer_is_a_clear_error():
    from viscon_hub.errors import ConfigError

    with pytest.raises(ConfigError, match="--tokenizer"):
        TokenCounter(str(Path("/nonexistent/tok")))
