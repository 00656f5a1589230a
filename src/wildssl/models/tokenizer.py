"""Caption tokenizers for the CLIP text tower.

Every tokenizer lays a caption out the same way (CLIP, Radford et al. 2021):
``[SOT] t_1 ... t_n [EOT] [PAD] ... [PAD]`` in a ``(B, context_length)`` LongTensor, with the three
special tokens at fixed ids (pad 0, sot 1, eot 2) so the text tower can pool at the EOT token whatever the
tokenizer. Two kinds:

- :class:`ByteTokenizer`: UTF-8 bytes, no training, nothing to install (259 ids).
- :class:`BPETokenizer`: byte-level BPE trained on the run's own captions with the optional ``tokenizers``
  package, saved as ``tokenizer.json`` beside the checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from wildssl.errors import CheckpointError, ConfigError, DataError
from wildssl.io import atomic_write_text

PAD_ID, SOT_ID, EOT_ID = 0, 1, 2
SPECIAL_TOKENS = ("[PAD]", "[SOT]", "[EOT]")  # in id order
TOKENIZER_FILENAME = "tokenizer.json"
_BYTE_FORMAT = "wildssl.byte_tokenizer"


class CaptionTokenizer:
    """Turns captions into fixed-length id rows ``[SOT] ... [EOT] 0 ...`` (see the module docstring).

    Subclasses implement ``_encode_texts`` (text -> ids without specials), ``_decode_ids``,
    ``vocab_size``, ``save`` and ``_from_file``.
    """

    pad_id: int = PAD_ID
    sot_id: int = SOT_ID
    eot_id: int = EOT_ID

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _decode_ids(self, ids: list[int]) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        raise NotImplementedError

    @classmethod
    def _from_file(cls, data: dict[str, Any], path: Path) -> CaptionTokenizer:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], context_length: int = 77) -> torch.Tensor:
        """Tokenize captions into a ``(B, context_length)`` LongTensor.

        Row layout: ``[SOT] ids... [EOT]`` then ``pad_id`` (0). A caption longer than
        ``context_length - 2`` ids is cut at the end and still finishes with ``[EOT]``, because the
        text tower pools at the EOT position.
        """
        if context_length < 2:
            raise ConfigError(
                f"text context_length is {context_length}; it must be at least 2 to hold [SOT] and [EOT]"
            )
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"caption {i} of the batch is a {type(text).__name__}, expected str")
        rows = self._encode_texts(list(texts))
        out = torch.full((len(rows), context_length), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(rows):
            ids = ids[: context_length - 2]
            out[i, 0] = self.sot_id
            out[i, 1 : 1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
            out[i, 1 + len(ids)] = self.eot_id
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one id row: everything between ``[SOT]`` and the first ``[EOT]`` (pads dropped)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        return self._decode_ids([i for i in ids if i not in (self.pad_id, self.sot_id)])

    @classmethod
    def load(cls, path: str | os.PathLike) -> CaptionTokenizer:
        """Read a tokenizer written by :meth:`save`; on the base class the file decides the kind."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(
                f"tokenizer file {path} does not exist; expected the {TOKENIZER_FILENAME} saved with the run"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"tokenizer file {path} is not readable JSON ({error})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"tokenizer file {path} holds a {type(data).__name__}, expected a JSON object")
        kind = ByteTokenizer if data.get("format") == _BYTE_FORMAT else BPETokenizer
        if not issubclass(kind, cls):
            raise CheckpointError(
                f"tokenizer file {path} holds a {kind.__name__}, not a {cls.__name__}; "
                "load it with CaptionTokenizer.load"
            )
        return kind._from_file(data, path)


class ByteTokenizer(CaptionTokenizer):
    """UTF-8 bytes as tokens: byte ``b`` is id ``b + 3`` (after the three special ids). Needs no training."""

    _offset = len(SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        return self._offset + 256

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [[b + self._offset for b in text.encode("utf-8")] for text in texts]

    def _decode_ids(self, ids: list[int]) -> str:
        # A row cut by truncation can end inside a multi-byte character; show it as U+FFFD.
        return bytes(i - self._offset for i in ids if i >= self._offset).decode("utf-8", errors="replace")

    def describe(self) -> str:
        return f"byte tokenizer ({self.vocab_size} ids: 3 special + 256 UTF-8 bytes)"

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps({"format": _BYTE_FORMAT, "version": 1}))

    @classmethod
    def _from_file(cls, data: dict[str, Any], path: Path) -> ByteTokenizer:
        if data.get("version") != 1:
            raise CheckpointError(
                f"tokenizer file {path} has byte tokenizer version {data.get('version')!r}, expected 1"
            )
        return cls()


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(
            "the BPE caption tokenizer needs the `tokenizers` package: pip install tokenizers "
            "(or wildssl[text]), or use method.tokenizer=byte"
        ) from None
    return tokenizers


class BPETokenizer(CaptionTokenizer):
    """Byte-level BPE (GPT-2 style byte alphabet, so no input is ever unknown) on normalized captions.

    Normalization (NFC, lowercase, runs of whitespace -> one space, strip) lives inside the saved
    ``tokenizer.json``, so a loaded tokenizer treats captions exactly as the trained one did.
    """

    def __init__(self, tokenizer: Any):
        """Wrap a ``tokenizers.Tokenizer`` whose special tokens sit at ids 0, 1, 2 (see :meth:`train`)."""
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            found = tokenizer.token_to_id(token)
            if found != expected_id:
                raise CheckpointError(
                    f"BPE tokenizer has {token} at id {found}, expected {expected_id}; "
                    "train it with BPETokenizer.train"
                )
        self._tokenizer = tokenizer

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> BPETokenizer:
        """Learn merges from ``captions`` until ``vocab_size`` ids (fewer if the captions run out of pairs
        seen ``min_frequency`` times). The vocabulary always holds the 3 specials and all 256 bytes."""
        tk = _import_tokenizers()
        floor = len(SPECIAL_TOKENS) + 256
        if vocab_size < floor:
            raise ConfigError(f"BPE vocab_size is {vocab_size}; it must be at least {floor} (3 special + 256 bytes)")
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.normalizer = tk.normalizers.Sequence(
            [
                tk.normalizers.NFC(),
                tk.normalizers.Lowercase(),
                tk.normalizers.Replace(tk.Regex(r"\s+"), " "),
                tk.normalizers.Strip(),
            ]
        )
        # The prefix space makes a caption's first word tokenize like the same word mid-caption.
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        seen = 0

        def counted():
            nonlocal seen
            for caption in captions:
                seen += 1
                yield caption

        tokenizer.train_from_iterator(counted(), trainer)
        if seen == 0:
            raise DataError("no captions to train the BPE tokenizer on; give captions or use method.tokenizer=byte")
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _decode_ids(self, ids: list[int]) -> str:
        # The pre-tokenizer's prefix space comes back on decoding; normalized text never starts with one.
        return self._tokenizer.decode(ids, skip_special_tokens=True).strip()

    def describe(self) -> str:
        return f"byte-level BPE tokenizer ({self.vocab_size} ids, lowercased)"

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self._tokenizer.to_str())

    @classmethod
    def _from_file(cls, data: dict[str, Any], path: Path) -> BPETokenizer:
        tk = _import_tokenizers()
        try:
            tokenizer = tk.Tokenizer.from_str(json.dumps(data))
        except Exception as error:  # the Rust side raises a bare Exception for any malformed field
            raise CheckpointError(f"tokenizer file {path} is not a valid tokenizers JSON ({error})") from None
        return cls(tokenizer)


def build_tokenizer(
    kind: str,
    captions: Iterable[str] | None = None,
    vocab_size: int = 8192,
    min_frequency: int = 2,
) -> CaptionTokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; ``"bpe"`` -> :meth:`BPETokenizer.train` on ``captions``."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if captions is None:
            raise ConfigError("method.tokenizer=bpe needs captions to train on; pass captions or use method.tokenizer=byte")
        return BPETokenizer.train(captions, vocab_size=vocab_size, min_frequency=min_frequency)
    raise ConfigError(f"method.tokenizer is {kind!r}; expected 'bpe' or 'byte'")
