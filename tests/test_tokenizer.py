from __future__ import annotations

import sys

import pytest
import torch

from wildssl.errors import CheckpointError, ConfigError, DataError
from wildssl.models.tokenizer import BPETokenizer, ByteTokenizer, CaptionTokenizer, build_tokenizer

TEXTS = ["a dog", "", "Zürich café, naïve résumé", "北京的猫 🐈‍⬛ and 🦓", "tab\tnew\nline  spaces"]


def synthetic_captions() -> list[str]:
    colours = ["red", "blue", "green", "yellow", "black"]
    animals = ["dog", "cat", "horse", "bird", "zebra"]
    places = ["on the grass", "in the street"]
    return [f"A {c} {a} {p}" for c in colours for a in animals for p in places]  # 50 captions


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(synthetic_captions(), vocab_size=400, min_frequency=2)


def test_byte_tokenizer_round_trips_ascii_and_unicode():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode_batch(TEXTS, context_length=77)
    for row, text in zip(ids, TEXTS):
        assert tokenizer.decode(row) == text


def test_byte_rows_are_sot_utf8_bytes_plus_3_eot_then_zero_padding():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode_batch(["hé", ""], context_length=8)
    assert ids.dtype == torch.long and ids.shape == (2, 8)
    # 'h' = 0x68, 'é' = 0xC3 0xA9 in UTF-8; bytes are shifted past the ids 0, 1, 2 of [PAD] [SOT] [EOT].
    assert ids[0].tolist() == [1, 0x68 + 3, 0xC3 + 3, 0xA9 + 3, 2, 0, 0, 0]
    assert ids[1].tolist() == [1, 2, 0, 0, 0, 0, 0, 0]
    assert (tokenizer.pad_id, tokenizer.sot_id, tokenizer.eot_id, tokenizer.vocab_size) == (0, 1, 2, 259)
    assert int(ids.max()) < tokenizer.vocab_size


@pytest.mark.parametrize("context_length", [2, 5, 16])
def test_truncation_keeps_sot_first_and_eot_last(context_length):
    tokenizer = ByteTokenizer()
    text = "x" * 100
    row = tokenizer.encode_batch([text], context_length=context_length)[0]
    assert row[0].item() == tokenizer.sot_id and row[-1].item() == tokenizer.eot_id
    assert (row == tokenizer.eot_id).sum().item() == 1
    assert tokenizer.decode(row) == text[: context_length - 2]


def test_context_length_below_two_and_non_string_captions_are_rejected():
    tokenizer = ByteTokenizer()
    with pytest.raises(ConfigError, match="context_length"):
        tokenizer.encode_batch(["a"], context_length=1)
    with pytest.raises(DataError, match="caption 1"):
        tokenizer.encode_batch(["a", None], context_length=8)


def test_byte_tokenizer_save_load_round_trip_through_base_class(tmp_path):
    path = tmp_path / "tokenizer.json"
    ByteTokenizer().save(path)
    loaded = CaptionTokenizer.load(path)
    assert isinstance(loaded, ByteTokenizer)
    assert torch.equal(loaded.encode_batch(TEXTS), ByteTokenizer().encode_batch(TEXTS))


def test_bpe_trained_on_50_captions_learns_merges():
    tokenizer = BPETokenizer.train(synthetic_captions(), vocab_size=8192, min_frequency=2)
    # Merges were learned: a frequent caption is far shorter than its byte count.
    row = tokenizer.encode_batch(["a red dog on the grass"])[0]
    assert (row != tokenizer.pad_id).sum().item() < len("a red dog on the grass") // 2
    assert 259 < tokenizer.vocab_size <= 8192


def test_bpe_rows_have_the_shared_layout_and_padding(bpe):
    ids = bpe.encode_batch(["a red dog", ""], context_length=12)
    assert ids.shape == (2, 12) and ids.dtype == torch.long
    for row in ids.tolist():
        assert row[0] == 1
        end = row.index(2)
        assert all(i == 0 for i in row[end + 1 :])
        assert all(i > 2 for i in row[1:end])
    assert ids[1].tolist()[:3] == [1, 2, 0]
    long_row = bpe.encode_batch(["a red dog on the grass " * 20], context_length=10)[0]
    assert long_row[-1].item() == 2 and long_row[0].item() == 1


def test_bpe_lowercases_and_normalizes_whitespace(bpe):
    assert torch.equal(bpe.encode_batch(["  A  RED\tDog\n"]), bpe.encode_batch(["a red dog"]))
    assert bpe.decode(bpe.encode_batch(["  A  RED\tDog\n"])[0]) == "a red dog"


def test_bpe_encodes_unseen_words_and_symbols_without_unknowns(bpe):
    text = "Quixotic 北京 🦓 naïve"
    row = bpe.encode_batch([text], context_length=77)[0]
    assert bpe.decode(row) == "quixotic 北京 🦓 naïve"
    assert int(row.max()) < bpe.vocab_size


def test_bpe_save_load_gives_identical_ids(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    for loaded in (BPETokenizer.load(path), CaptionTokenizer.load(path)):
        assert isinstance(loaded, BPETokenizer)
        assert loaded.vocab_size == bpe.vocab_size
        texts = synthetic_captions()[:7] + TEXTS
        assert torch.equal(loaded.encode_batch(texts), bpe.encode_batch(texts))


def test_loading_a_missing_corrupt_or_other_kind_file_raises_checkpoint_error(bpe, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        CaptionTokenizer.load(tmp_path / "missing.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        CaptionTokenizer.load(corrupt)
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"model": 3}')
    with pytest.raises(CheckpointError, match="not a valid tokenizers JSON"):
        CaptionTokenizer.load(bogus)
    byte_path = tmp_path / "byte.json"
    ByteTokenizer().save(byte_path)
    with pytest.raises(CheckpointError, match="not a BPETokenizer"):
        BPETokenizer.load(byte_path)


def test_bpe_vocab_smaller_than_the_byte_alphabet_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 259"):
        BPETokenizer.train(synthetic_captions(), vocab_size=100)


def test_bpe_without_captions_is_an_error():
    with pytest.raises(DataError, match="no captions"):
        BPETokenizer.train([], vocab_size=300)
    with pytest.raises(ConfigError, match="needs captions"):
        build_tokenizer("bpe")


def test_missing_tokenizers_package_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` raise ImportError
    with pytest.raises(ConfigError, match="pip install tokenizers.*method.tokenizer=byte"):
        BPETokenizer.train(synthetic_captions())


def test_build_tokenizer_picks_the_kind_and_rejects_unknown_ones():
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    built = build_tokenizer("bpe", captions=synthetic_captions(), vocab_size=300)
    assert isinstance(built, BPETokenizer) and built.vocab_size <= 300
    assert "BPE" in built.describe() and "byte" in ByteTokenizer().describe()
    with pytest.raises(ConfigError, match="method.tokenizer"):
        build_tokenizer("wordpiece")
