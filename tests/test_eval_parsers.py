"""Answer parsers on tricky free answers; accuracy with unparseable answers counted."""

import pytest

from eval import scoring as S

OPTS = ["protein kinase", "serine protease inhibitor", "ABC transporter", "unknown function"]


@pytest.mark.parametrize("text,expected", [
    ("The answer is (C).", "C"),
    ("B", "B"),
    ("b", "B"),
    ("(A) Binds ATP", "A"),
    ("C) ABC transporter", "C"),
    ("D.", "D"),
    ("Option D is correct because it lacks domains", "D"),
    ("Answer: b", "B"),
    ("I think A, but the correct answer is B.", "B"),  # last explicit statement wins
    ("A protein of unknown role", None),  # article "A" is not a choice
    ("To answer a question like this, (C) fits.", "C"),
    ("Either (A) or (B)", None),  # two bracketed letters: ambiguous
    ("E", None),  # beyond 4 options
    ("", None),
    (None, None),
    ("not sure", None),
])
def test_parse_choice(text, expected):
    assert S.parse_choice(text, 4) == expected


def test_parse_choice_by_option_text():
    assert S.parse_choice("It is a serine protease inhibitor.", 4, OPTS) == "B"
    assert S.parse_choice("A protein kinase or an ABC transporter", 4, OPTS) is None  # two options quoted


@pytest.mark.parametrize("text,expected", [
    ("Yes, it binds DNA.", "yes"),
    ("NO", "no"),
    ("No. Although one might say yes", "yes"),  # SEPIT: the LAST yes/no counts
    ("It is not known; none reported", None),  # not / none / know are not "no"
    ("nonetheless yes-associated", "yes"),  # word boundary at the hyphen
    ("", None),
    (None, None),
])
def test_parse_yes_no(text, expected):
    assert S.parse_yes_no(text) == expected


def test_choice_accuracy_counts_unparseable_and_permutations():
    preds = ["A", "answer is B", "no idea", "(D)", "C", "C", "C", "C"]
    refs = ["A", "B", "C", "A", "C", "C", "C", "C"]
    groups = ["q1"] * 4 + ["q2"] * 4
    r = S.choice_accuracy(preds, refs, groups=groups)
    assert r["accuracy"] == pytest.approx(6 / 8)
    assert r["unparseable"] == 1
    assert r["perm_all_accuracy"] == pytest.approx(0.5)  # q2 all right, q1 not
    assert r["perm_mean_accuracy"] == pytest.approx((0.5 + 1.0) / 2)


def test_yes_no_accuracy_with_missing_reference():
    r = S.choice_accuracy(["yes", "No.", "", "yes"], ["yes", "yes", "no", None], kind="yes_no")
    assert r["accuracy"] == pytest.approx(0.25)
    assert r["unparseable"] == 1 and r["unparseable_references"] == 1
