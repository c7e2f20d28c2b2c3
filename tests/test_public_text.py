"""The english source: Shakespeare, the KJV and GCIDE definitions from pip packages, whole documents held out."""

from __future__ import annotations

import pytest

from archlab.data import public_text
from archlab.data.sources import load_documents
from archlab.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def books():
    return public_text.kjv_books()


def test_the_bible_has_its_66_books_whole(books):
    assert len(books) == 66 and list(books)[0] == "GENESIS" and list(books)[-1] == "REVELATION"
    assert books["GENESIS"].startswith("1. In the beginning God created the heaven and the earth.")
    assert books["REVELATION"].endswith("The grace of our Lord Jesus Christ [be] with you all. Amen.")
    assert books["EXODUS"].startswith("1. Now these [are] the names of the children of Israel")


def test_validation_holds_out_whole_documents(books):
    validation = public_text.kjv("validation")
    train = public_text.kjv("train")
    assert validation == [books[b] for b in books if b in public_text.KJV_VALIDATION_BOOKS]
    assert len(train) == 62 and not set(train) & set(validation)
    letters = public_text.gcide_letters()
    assert len(letters) == 26 and letters["Q"].startswith("q (n.): the seventeenth letter")
    assert public_text.gcide("validation") == [letters[c] for c in public_text.GCIDE_VALIDATION_LETTERS]


def test_the_held_out_plays_never_reach_training():
    from archlab.data.sources import shakespeare

    train = "\n".join(load_documents("english", "train"))
    held_out = shakespeare("validation")
    assert len(held_out) == 3
    for play in held_out:  # Twelfth Night, Richard II, Macbeth: no passage of them is in training
        for at in (0.25, 0.5, 0.75):
            start = int(len(play) * at)
            assert play[start:start + 400] not in train
    assert held_out[0] in load_documents("english", "validation")


def test_bad_parts_are_refused():
    with pytest.raises(ConfigError, match="must name some of shakespeare, kjv, gcide"):
        public_text.english("train", parts=["wiki"])
    with pytest.raises(DataError, match="unknown validation book"):
        public_text.kjv("train", validation_books=["JUBILEES"])
