"""A label vocabulary: caption words and hashtags -> labels (weakly-supervised pre-training, WSP).

In the spirit of SWAG's hashtag-to-synset mapping (Singh et al., "Revisiting Weakly Supervised
Pre-Training of Visual Perception Models", CVPR 2022, Sec. 3.1): each label owns a set of terms (its
name, its synonyms and plural forms, hashtags); a caption's labels are the labels of the terms it holds.

File format (UTF-8 text, written by ``wildssl vocab build`` and editable by hand), one label per line,
its index the line's position among the label lines::

    # comment
    dog: dogs, puppy, puppies, #pup
    person: people, man, men, woman, women

The label's own name is always one of its terms; a term belongs to one label only. How a caption maps
(:meth:`Vocabulary.labels_of`): it is lower-cased and split into words (runs of letters and digits) and
hashtags (``#`` + a word); a hashtag ``#x`` is the term ``#x`` when the table lists it, else the word
``x``; words that are no term (stop words among them: a vocabulary built by ``wildssl vocab build``
never lists one) map to nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from wildssl.errors import DataError

VOCABULARY_FILENAME = "vocabulary.txt"
# Words are runs of letters and digits (any script); "#" directly before one makes it a hashtag.
_TOKEN = re.compile(r"#?[^\W_]+")
_TERM = re.compile(r"^#?[^\W_]+$")
_WORD = re.compile(r"^[^\W_]+$")


def caption_tokens(caption: str) -> list[str]:
    """Lower-cased words and hashtags of a caption, in order: ``"Two #Dogs, a puppy's toy" ->
    ["two", "#dogs", "a", "puppy", "s", "toy"]``."""
    return _TOKEN.findall(caption.lower())


class Vocabulary:
    """An ordered list of labels and the term -> label index table.

    ``labels``: the K label names (index = class). ``terms``: term -> label index (lower-case words and
    ``#hashtags``); every label's own name is in it.
    """

    def __init__(self, labels: Sequence[str], synonyms: Sequence[Iterable[str]] | None = None,
                 where: str = "vocabulary") -> None:
        self.labels = [label.strip().lower() for label in labels]
        if not self.labels:
            raise DataError(f"{where} has no labels (expected lines 'label: synonym, ...')")
        for label in self.labels:
            if not _WORD.match(label):
                raise DataError(f"{where}: label {label!r} is not one word (letters and digits only)")
        self.terms: dict[str, int] = {}
        for index, label in enumerate(self.labels):
            extra = list(synonyms[index]) if synonyms is not None else []
            for term in [label, *extra]:
                term = term.strip().lower()
                if not _TERM.match(term):
                    raise DataError(f"{where}: term {term!r} of label {label!r} is not one word or #hashtag "
                                    "(letters and digits only)")
                owner = self.terms.setdefault(term, index)
                if owner != index:
                    raise DataError(f"{where}: term {term!r} belongs to both {self.labels[owner]!r} and {label!r}; "
                                    "a term may map to one label only")

    def __len__(self) -> int:
        return len(self.labels)

    def synonyms(self, index: int) -> list[str]:
        """The terms of label ``index`` other than its name, in table order."""
        return [t for t, i in self.terms.items() if i == index and t != self.labels[index]]

    def label_of(self, token: str) -> int | None:
        """The label index of one token of :func:`caption_tokens`, or None."""
        if token in self.terms:
            return self.terms[token]
        if token.startswith("#"):
            return self.terms.get(token[1:])
        return None

    def labels_of(self, captions: str | Sequence[str]) -> list[int]:
        """Sorted distinct label indices of a caption, or of all captions of an image together."""
        if isinstance(captions, str):
            captions = [captions]
        found = {self.label_of(token) for caption in captions for token in caption_tokens(caption)}
        found.discard(None)
        return sorted(found)

    # -- file ----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, header: str = "") -> None:
        """Write the text format (module docstring), atomically."""
        path = Path(path)
        lines = [f"# {line}" for line in header.splitlines()] if header else []
        for index, label in enumerate(self.labels):
            synonyms = self.synonyms(index)
            lines.append(f"{label}: {', '.join(synonyms)}" if synonyms else label)
        partial = path.with_name(path.name + ".tmp")
        partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        """Read the text format; a missing file or a malformed line is a one-line DataError."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"vocabulary file not found: {path} (make one with `wildssl vocab build CAPTIONS "
                            "--size N --out FILE`)")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text; save the vocabulary as UTF-8") from None
        labels, synonyms = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):  # labels are words, so a line starting with # is a comment
                continue
            label, colon, rest = line.partition(":")
            terms = [t.strip() for t in rest.split(",") if t.strip()] if colon else []
            if not _WORD.match(label.strip().lower()):
                raise DataError(f"{path}:{number}: label {label.strip()!r} is not one word (expected "
                                "'label: synonym, synonym, #hashtag')")
            labels.append(label)
            synonyms.append(terms)
        return cls(labels, synonyms, where=str(path))
