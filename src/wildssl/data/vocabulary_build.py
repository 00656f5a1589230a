"""``wildssl vocab build``: a label vocabulary from the most frequent words and hashtags of a caption set.

SWAG (Singh et al. 2022, Sec. 3.1) keeps the hashtags frequent enough to learn and maps their synonyms to
one canonical label. Here, on captions:

1. Read the captions (:func:`read_caption_files`): ``.jsonl`` / ``.jsonl.gz`` with one image per line
   (``captions`` list and/or ``caption``; a wildssl manifest or the caption dumps in ``shared/data``), or
   ``.txt`` / ``.txt.gz`` with one caption per line.
2. Count, per image, each word once (the union of its captions; hashtags count as their word), so a word
   repeated in five captions of one photo counts once, as a hashtag once per post in SWAG.
3. Drop stop words (:data:`STOP_WORDS` plus the user's list), words shorter than two characters and numbers.
4. Fold synonyms into one label: plural -> singular (``dogs``, ``boxes``, ``puppies``, the irregular
   :data:`IRREGULAR_PLURALS`) when the singular occurs too, and the user's synonym groups (a file in the
   vocabulary format: ``label: term, term``). A label's count is the number of images holding any of its
   terms.
5. Keep the ``size`` most frequent labels (ties by name), each with its folded terms.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from wildssl.data.vocabulary import Vocabulary, caption_tokens
from wildssl.errors import DataError

# English function words, pronouns and auxiliaries (after the common NLTK / scikit-learn lists), and words
# that describe the photo rather than its content ("picture", "image", "view").
STOP_WORDS = frozenset("""
a about above across after again against all almost along also although am among an and another any are
around as at away back be because been before behind being below beside besides between both but by can
cannot could did do does doing done down during each either else even ever every few for from front full
further get gets getting go goes going got had has have having he her here hers herself him himself his how
i if in inside into is it its itself just like made make makes many may me might more most much must my
myself near next no nor not now of off on once one only onto or other others our ours ourselves out outside
over own past per perhaps quite rather really same several she should since so some something still such
than that the their theirs them themselves then there these they this those through to together too top
toward towards two three four under until up upon us very via was we well were what when where whether
which while who whom whose why will with within without would yet you your yours yourself yourselves
picture pictures image images photo photos photograph view shot close closeup background
""".split())

# Irregular plurals -> singular; regular ones (-s, -es, -ies) are folded by rule.
IRREGULAR_PLURALS = {"men": "man", "women": "woman", "children": "child", "people": "person", "feet": "foot",
                     "teeth": "tooth", "mice": "mouse", "geese": "goose", "knives": "knife", "leaves": "leaf",
                     "wolves": "wolf", "shelves": "shelf", "loaves": "loaf", "sheep": "sheep", "fish": "fish"}

CAPTION_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz")


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8-sig") if path.name.endswith(".gz") else open(
        path, encoding="utf-8-sig")


def read_caption_files(paths: Iterable[str | os.PathLike]) -> Iterator[list[str]]:
    """The captions of each image of the files, one list per image (per line of a ``.txt``)."""
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"caption file not found: {path} (give {', '.join(CAPTION_SUFFIXES)} files)")
        if not path.name.endswith(CAPTION_SUFFIXES):
            raise DataError(f"unsupported caption file {path}: give .jsonl (one image per line with 'captions' "
                            "or 'caption') or .txt (one caption per line), optionally .gz")
        jsonl = ".jsonl" in path.name
        try:
            with _open_text(path) as lines:
                for number, line in enumerate(lines, start=1):
                    if not line.strip():
                        continue
                    if not jsonl:
                        yield [line.strip()]
                        continue
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise DataError(f"{path}:{number}: invalid JSON ({error.msg})") from None
                    captions = entry.get("captions") or [] if isinstance(entry, dict) else None
                    if isinstance(entry, dict) and isinstance(entry.get("caption"), str):
                        captions = [*captions, entry["caption"]]
                    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                        raise DataError(f"{path}:{number}: expected an object with 'captions' (a list of strings) "
                                        "or 'caption' (a string)")
                    yield captions
        except (OSError, EOFError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read caption file {path}: {error}") from None


def singular(word: str, known: Iterable[str] | dict) -> str:
    """The singular of ``word`` when it is a plural whose singular is ``known`` (else ``word``)."""
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    candidates = []
    if word.endswith("ies") and len(word) > 4:
        candidates.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        candidates.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        candidates.append(word[:-1])
    return next((c for c in candidates if c in known), word)


def _is_candidate(word: str, stop_words: frozenset[str]) -> bool:
    return len(word) >= 2 and not word.isdigit() and word not in stop_words


def build_vocabulary(images: Iterable[list[str]], size: int, stop_words: Iterable[str] = (),
                     synonyms: Vocabulary | None = None, min_count: int = 1) -> tuple[Vocabulary, list[int]]:
    """The ``size`` most frequent labels of the captions of ``images`` (module docstring) and the number
    of images holding each. ``stop_words`` add to :data:`STOP_WORDS`; ``synonyms`` fold their terms into
    their labels first; labels held by fewer than ``min_count`` images are left out."""
    if size < 1:
        raise DataError(f"--size {size}: a vocabulary needs at least one label")
    if min_count < 1:
        raise DataError(f"--min-count {min_count}: a label is held by at least 1 image; give 1 or more")
    stops = STOP_WORDS | {w.strip().lower() for w in stop_words}
    per_image: list[set[str]] = []
    frequency: Counter[str] = Counter()
    for captions in images:
        words = {t.lstrip("#") for caption in captions for t in caption_tokens(caption)}
        words = {w for w in words if _is_candidate(w, stops)}
        per_image.append(words)
        frequency.update(words)
    if not per_image:
        raise DataError("the caption files hold no captions")
    known = set(frequency) | (set(synonyms.terms) if synonyms is not None else set())

    def fold(word: str) -> str:
        if synonyms is not None and (index := synonyms.label_of(word)) is not None:
            return synonyms.labels[index]
        return singular(word, known)

    canonical: dict[str, str] = {}
    for word in frequency:
        label, seen = word, {word}
        while (folded := fold(label)) not in seen:  # to a fixed point: "dogs" -> "dog" -> a synonym's label
            seen.add(folded)
            label = folded
        canonical[word] = label
    label_count: Counter[str] = Counter()
    for words in per_image:
        label_count.update({canonical[w] for w in words})
    ranked = sorted((label for label, count in label_count.items() if count >= min_count and label not in stops),
                    key=lambda label: (-label_count[label], label))[:size]
    if not ranked and not frequency:  # images read, but not one word among their captions
        raise DataError("the caption files hold no caption words: a .jsonl needs a 'captions' list or a 'caption' "
                        "string of text on its lines, a .txt one caption per line")
    if not ranked:
        hint = "; lower --min-count" if min_count > 1 else ""
        raise DataError(f"no word occurs in {min_count} or more images after removing stop words{hint}")
    terms = {label: [] for label in ranked}
    for word in sorted(frequency, key=lambda w: (-frequency[w], w)):
        label = canonical[word]
        if label in terms and word != label:
            terms[label].append(word)
    if synonyms is not None:  # the user's own terms of a kept label, seen in the captions or not
        for label in ranked:
            if (index := synonyms.label_of(label)) is not None:
                terms[label] += [t for t in synonyms.synonyms(index) if t not in terms[label] and t != label]
    return Vocabulary(ranked, [terms[label] for label in ranked]), [label_count[label] for label in ranked]
