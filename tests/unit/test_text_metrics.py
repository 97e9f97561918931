"""Scores of generated text against values computed by hand."""

import pytest

from retain.evaluation import text_metrics as tm
from retain.evaluation.scoring import item_score, mean_stderr
from retain.streams.task import Example


def test_rouge_l_is_the_lcs_f_measure_of_words():
    # LCS of "the cat sat on the mat" / "the cat lay on a mat" is "the cat on mat": 4 of 6 words each side.
    assert tm.rouge_l("the cat lay on a mat", "the cat sat on the mat") == pytest.approx(100 * 4 / 6)
    assert tm.rouge_l("x y", "a b") == 0.0


def test_edit_similarity_is_twice_the_lcs_over_both_lengths():
    # kitten / sitting: LCS "ittn" (4), 2 * 4 / (6 + 7).
    assert tm.edit_similarity("kitten", "sitting") == pytest.approx(100 * 8 / 13)
    assert tm.edit_similarity("return x", "return x") == 100.0
    assert tm.edit_similarity("", "x = 1") == 0.0


def test_sari_unigrams_by_hand():
    # source a b c, output a b d, reference a b e: keep {a, b} right (F1 1), delete {c} right
    # (precision 1), add {d} where {e} was due (F1 0): (1 + 1 + 0) / 3.
    assert tm.sari("a b c", "a b d", ["a b e"], max_n=1) == pytest.approx(100 * 2 / 3)
    # Copying the source when the reference copies it too is perfect: nothing to add or delete.
    assert tm.sari("a b", "a b", ["a b"], max_n=1) == 100.0
    # Deleting what the reference keeps: keep P 1 R 1/2 (F1 2/3), delete precision 0, add 1.
    assert tm.sari("a b", "a", ["a b"], max_n=1) == pytest.approx(100 * (2 / 3 + 0 + 1) / 3)


def test_sari_bigrams_average_over_orders():
    # Unigrams as the first case (2/3); bigrams: source {ab, bc}, output {ab, bd}, ref {ab, be}:
    # keep {ab} good (F1 1), delete {bc} good (1), add {bd} wrong (0): also 2/3.
    assert tm.sari("a b c", "a b d", ["a b e"], max_n=2) == pytest.approx(100 * 2 / 3)


def test_two_references_weight_kept_grams():
    # Source a b, output a b, references "a b" and "a": b is kept by one reference of two.
    # Keep: P = (1 + 1/2) / 2 = 3/4; R = (2 + 1) / (2 + 1) = 1; F1 = 6/7. Delete: none (1).
    # Add: none output, none due (1).
    assert tm.sari("a b", "a b", ["a b", "a"], max_n=1) == pytest.approx(100 * (6 / 7 + 1 + 1) / 3)


def test_numbers_from_worked_answers():
    assert tm.extract_number("so she has 3 + 4 = 7 apples.\n#### 1,234") == 1234.0
    assert tm.extract_number("The answer is 42.") == 42.0
    assert tm.extract_number("It costs -3.5 dollars") == -3.5
    assert tm.extract_number("no digits") is None
    assert tm.numbers_match("I think 12.0", "#### 12") and not tm.numbers_match("13", "12")


def test_choice_letters_from_generated_answers():
    assert tm.extract_choice("The answer is (C) because ...") == "C"
    assert tm.extract_choice("B. It melts") == "B"
    assert tm.extract_choice("answer: d") == "D"
    assert tm.extract_choice("A cat is an animal") == "A"  # a lone capital letter counts
    assert tm.extract_choice("Because of gravity") is None
    assert tm.choices_match("(B)", "B. The sample has more particles.")


def test_item_scores_and_their_standard_error():
    ex = Example("x = 1", "return x", None)
    assert item_score("edit_similarity", " return x\nmore", ex) == 100.0
    assert item_score("exact_match", "Return X.", ex) == 100.0
    assert item_score("number", "about 7", Example("q", "#### 7")) == 100.0
    assert mean_stderr([100, 100, 100, 0]) == pytest.approx(25.0)
    assert mean_stderr([5.0]) is None
