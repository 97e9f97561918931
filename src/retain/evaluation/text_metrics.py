"""Scores of generated text that the field's benchmarks report, each on a 0-100 scale.

ROUGE-L comes from the ``rouge-score`` package and edit similarity from ``rapidfuzz``
(the Indel ratio that fuzzywuzzy's ``fuzz.ratio``, TRACE's metric for Py150, computes).
SARI and answer extraction are written here to their published definitions: no
maintained package computes SARI offline without pulling an evaluation framework.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from typing import Sequence


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words), in points."""
    return 100.0 * _rouge().score(reference, prediction)["rougeL"].fmeasure


def edit_similarity(prediction: str, reference: str) -> float:
    """100 * (1 - Indel distance / total length) = 2 * LCS(chars) / (len a + len b), in points;
    0 when either side is empty (as TRACE counts an empty line)."""
    from rapidfuzz import fuzz

    if not prediction or not reference:
        return 0.0
    return float(fuzz.ratio(prediction, reference))


# -- SARI (Xu et al. 2016, "Optimizing statistical machine translation for text simplification") --

_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1))


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _sari_ngram(source: Counter, output: Counter, refs: list[Counter]) -> tuple[float, float, float]:
    """(keep F1, deletion precision, addition F1) for one n-gram order.

    Counts of the source and the output are scaled by the number of references, so that a
    gram kept by r of R references earns r/R (the reference-weighted counts of the
    definition). An empty set of candidates scores 1 (0/0 := 1: nothing to get wrong)."""
    r = len(refs)
    ref_all: Counter = Counter()
    for ref in refs:
        ref_all.update(ref)
    src = Counter({g: c * r for g, c in source.items()})
    out = Counter({g: c * r for g, c in output.items()})

    kept = src & out  # grams of the source the output keeps
    kept_good = kept & ref_all
    kept_should = src & ref_all  # grams of the source the references keep
    keep_p = sum(kept_good[g] / kept[g] for g in kept) / len(kept) if kept else 1.0
    keep_r = sum(kept_good.values()) / sum(kept_should.values()) if kept_should else 1.0

    deleted = src - out
    deleted_good = deleted - ref_all  # deleted and not kept by the references
    del_p = sum(deleted_good[g] / deleted[g] for g in deleted) / len(deleted) if deleted else 1.0

    added = set(output) - set(source)
    should_add = set(ref_all) - set(source)
    good_added = len(added & should_add)
    add_p = good_added / len(added) if added else 1.0
    add_r = good_added / len(should_add) if should_add else 1.0
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def sari(source: str, prediction: str, references: Sequence[str], max_n: int = 4) -> float:
    """Sentence SARI in points: the mean of keep F1, deletion precision and addition F1, each
    averaged over n-gram orders 1..``max_n`` (lower-cased word and punctuation tokens)."""
    src, out = _tokens(source), _tokens(prediction)
    refs = [_tokens(ref) for ref in references]
    parts = [_sari_ngram(_ngrams(src, n), _ngrams(out, n), [_ngrams(ref, n) for ref in refs])
             for n in range(1, max_n + 1)]
    keep, delete, add = (sum(p[k] for p in parts) / max_n for k in range(3))
    return 100.0 * (keep + delete + add) / 3


# -- answers inside generated text ------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_GSM8K = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def extract_number(text: str) -> float | None:
    """The answer of a worked solution: the number after GSM8K's ``####`` if there is one,
    else the last number in the text (thousands separators dropped)."""
    marked = _GSM8K.search(text)
    found = marked.group(1) if marked else (_NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    try:
        return float(found.replace(",", "").rstrip("."))
    except ValueError:
        return None


def numbers_match(prediction: str, reference: str) -> bool:
    got, want = extract_number(prediction), extract_number(reference)
    return got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))


def extract_choice(text: str, labels: Sequence[str] = ("A", "B", "C", "D", "E")) -> str | None:
    """The option letter a generated answer gives: after "answer is" / "Answer:" when it says
    so, else the first label standing alone ("B", "(B)", "B." or "B)")."""
    alts = "|".join(re.escape(lab) for lab in labels)
    stated = re.search(rf"answer\s*(?:is|:)?\s*\(?({alts})\b", text, re.IGNORECASE)
    if stated:
        return next(lab for lab in labels if lab.lower() == stated.group(1).lower())
    alone = re.search(rf"(?<![A-Za-z])\(?({alts})(?:[).:,]|\s|$)", text)
    return alone.group(1) if alone else None


def choices_match(prediction: str, reference: str) -> bool:
    """Whether the letters of a generated answer and of the reference (its first letter: TRACE's
    ScienceQA answers are a letter and an explanation) agree."""
    want = extract_choice(reference)
    return want is not None and extract_choice(prediction) == want
