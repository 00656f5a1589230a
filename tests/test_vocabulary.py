"""Label vocabularies: captions with hashtags, synonyms and stop words -> labels; `wildssl vocab build`;
multi-hot targets from captions or from a manifest's labels."""

import gzip
import json

import pytest
import torch

from wildssl.cli import main
from wildssl.data.multilabel import batch_labels, multi_hot
from wildssl.data.vocabulary import Vocabulary, caption_tokens
from wildssl.data.vocabulary_build import build_vocabulary, read_caption_files
from wildssl.errors import DataError


def _vocabulary():
    return Vocabulary(["dog", "person", "beach", "surfing"],
                      [["dogs", "puppy", "puppies"], ["people", "man", "men", "woman"], ["#beachlife"],
                       ["surf", "surfer"]])


def test_caption_with_hashtags_synonyms_and_stop_words_maps_to_the_expected_labels():
    vocabulary = _vocabulary()
    caption = "Two PUPPIES and a man on the #BeachLife, #surf #nofilter with the dog"
    assert caption_tokens(caption)[:4] == ["two", "puppies", "and", "a"]
    # puppies, dog -> dog (0); man -> person (1); #beachlife -> beach (2, a listed hashtag); #surf -> surfing
    # (3: an unlisted hashtag falls back to its word); two, and, a, on, the, with, #nofilter -> nothing.
    assert vocabulary.labels_of(caption) == [0, 1, 2, 3]
    assert vocabulary.labels_of("a cat on a sofa") == []
    # all captions of an image together
    assert vocabulary.labels_of(["a woman", "the puppy"]) == [0, 1]


def test_vocabulary_file_round_trips_and_rejects_a_term_owned_by_two_labels(tmp_path):
    vocabulary = _vocabulary()
    vocabulary.save(tmp_path / "v.txt", header="test")
    loaded = Vocabulary.load(tmp_path / "v.txt")
    assert loaded.labels == vocabulary.labels and loaded.terms == vocabulary.terms
    (tmp_path / "bad.txt").write_text("dog: puppy\ncat: puppy\n")
    with pytest.raises(DataError, match=r"'puppy' belongs to both 'dog' and 'cat'"):
        Vocabulary.load(tmp_path / "bad.txt")
    (tmp_path / "two_words.txt").write_text("hot dog: frank\n")
    with pytest.raises(DataError, match=r"two_words.txt:1: label 'hot dog' is not one word"):
        Vocabulary.load(tmp_path / "two_words.txt")


def test_build_counts_images_drops_stop_words_and_folds_plurals_and_synonyms():
    images = [["A dog on the beach.", "Two dogs on a beach"],  # "dog" counts once for this image
              ["Puppies playing #dogs"], ["A man surfing"], ["Men and women"], ["the beach at night"]]
    synonyms = Vocabulary(["dog"], [["puppy"]])
    vocabulary, counts = build_vocabulary(images, size=3, synonyms=synonyms)
    # dog: images 0, 1 (puppies -> puppy -> dog, #dogs -> dogs -> dog); man: 2, 3 (men); beach: 0, 4
    assert vocabulary.labels == ["beach", "dog", "man"] and counts == [2, 2, 2]
    assert set(vocabulary.synonyms(1)) == {"dogs", "puppies", "puppy"}
    assert "men" in vocabulary.synonyms(2)
    assert vocabulary.label_of("the") is None and vocabulary.label_of("a") is None


def test_vocab_build_command_writes_a_vocabulary_of_the_most_frequent_words(tmp_path, capsys):
    captions = tmp_path / "captions.jsonl.gz"
    with gzip.open(captions, "wt") as handle:
        for caption in ["a red bus", "the red car", "a red bus on the road", "a blue bus"]:
            handle.write(json.dumps({"captions": [caption]}) + "\n")
    stops = tmp_path / "stops.txt"
    stops.write_text("road\n")
    out = tmp_path / "vocab.txt"
    assert main(["vocab", "build", str(captions), "--size", "3", "--out", str(out), "--stop-words", str(stops)]) == 0
    assert Vocabulary.load(out).labels == ["bus", "red", "blue"]  # blue and car tie at 1: by name
    assert "3 labels" in capsys.readouterr().out
    assert main(["vocab", "build", str(tmp_path / "missing.jsonl"), "--size", "3", "--out", str(out)]) == 2
    assert "caption file not found" in capsys.readouterr().err
    # --out in a folder that does not exist yet is made; a folder as --out is one line (was a traceback)
    assert main(["vocab", "build", str(captions), "--size", "3", "--out", str(tmp_path / "new" / "v.txt")]) == 0
    assert Vocabulary.load(tmp_path / "new" / "v.txt").labels == ["bus", "red", "blue"]
    capsys.readouterr()
    assert main(["vocab", "build", str(captions), "--size", "3", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"wildssl: error: --out {tmp_path} is a folder; give a file name, e.g. {tmp_path / 'out'}"]
    # a missing synonyms file is named as such (it pointed to `vocab build`); captions without words say so (it
    # said to lower --min-count, already at its least)
    assert main(["vocab", "build", str(captions), "--size", "3", "--out", str(out), "--synonyms",
                 str(tmp_path / "syn.txt")]) == 2
    assert capsys.readouterr().err.strip() == (f"wildssl: error: synonyms file not found: {tmp_path / 'syn.txt'} "
                                               "(one group per line, 'label: term, term')")
    wordless = tmp_path / "wordless.jsonl"
    wordless.write_text(json.dumps({"file": "a.jpg"}) + "\n" + json.dumps({"file": "b.jpg", "caption": "the a"}) + "\n")
    assert main(["vocab", "build", str(wordless), "--size", "3", "--out", str(out)]) == 2
    assert "the caption files hold no caption words" in capsys.readouterr().err
    assert main(["vocab", "build", str(captions), "--size", "3", "--out", str(out), "--min-count", "0"]) == 2
    assert "--min-count 0: a label is held by at least 1 image" in capsys.readouterr().err


def test_caption_files_in_shared_data_are_read_one_image_per_line(shared_data):
    images = list(read_caption_files([shared_data / "coco_mini" / "annotations.jsonl"]))
    assert len(images) == 239 and all(len(captions) >= 5 for captions in images)


def test_multi_hot_targets_from_captions_and_from_manifest_labels():
    batch = {"captions": [["a dog"], [], ["people surfing"]], "caption": ["a dog", "", "people surfing"],
             "labels": [[1], [0, 2], []]}
    vocabulary = _vocabulary()
    assert batch_labels(batch, vocabulary) == [[0], [], [1, 3]]
    assert batch_labels(batch, None) == [[1], [0, 2], []]
    target = multi_hot(batch_labels(batch, None), 3)
    assert torch.equal(target, torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 0, 0]]))
    with pytest.raises(DataError, match="label index 3 is outside the 3 labels"):
        multi_hot([[3]], 3)


def test_vocab_build_refuses_an_out_that_is_one_of_its_inputs(tmp_path, capsys):
    """`--out captions.txt` replaced the captions by the vocabulary read from them."""
    from wildssl.cli import main

    captions = tmp_path / "captions.txt"
    captions.write_text("a dog on grass\na dog in snow\n")
    stops = tmp_path / "stop.txt"
    stops.write_text("a on in\n")
    for out, extra in ((captions, []), (stops, ["--stop-words", str(stops)])):
        before = out.read_text()
        assert main(["vocab", "build", str(captions), "--size", "2", "--out", str(out), *extra]) == 2
        assert "is one of the files the vocabulary is read from" in capsys.readouterr().err
        assert out.read_text() == before
