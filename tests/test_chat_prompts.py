from __future__ import annotations

from collections import Counter

import pytest

from llamba.distill import chat_prompts as cp
from llamba.distill.chat_prompts import (
    CATEGORIES,
    FACT_EVAL,
    OPEN_EVAL,
    PROSE_EVAL,
    all_first_turns,
    eval_leaks,
    labelled_conversations,
    train_conversations,
)


def test_deterministic_and_prefix_stable():
    a = train_conversations(300, seed=3)
    assert a == train_conversations(300, seed=3)
    assert train_conversations(120, seed=3) == a[:120]
    assert train_conversations(300, seed=4) != a
    assert train_conversations(0) == []
    with pytest.raises(ValueError):
        train_conversations(-1)


def test_shapes_and_two_turn_conversations():
    convs = train_conversations(1000)
    assert all(len(c) in (1, 2) and all(isinstance(t, str) and t.strip() for t in c) for c in convs)
    two = sum(len(c) == 2 for c in convs)
    assert 80 < two < 250  # about 15%


def test_category_mix():
    first = Counter(cat for cat, _ in labelled_conversations(200))
    assert set(first) == set(CATEGORIES)
    mix = Counter(cat for cat, _ in labelled_conversations(3000))
    for cat, weight in zip(CATEGORIES, cp.CATEGORY_WEIGHTS, strict=True):
        assert abs(mix[cat] / 3000 - weight / 100) < 0.04, (cat, mix[cat])


def test_many_distinct_prompts():
    firsts = {c[0] for c in train_conversations(3000)}
    assert len(firsts) >= 1500
    assert firsts <= all_first_turns()
    assert len(all_first_turns()) > 3000


def test_eval_sets_sizes():
    assert len(FACT_EVAL) == 40 and len(OPEN_EVAL) == 24 and len(PROSE_EVAL) == 16
    assert len({q for q, _ in FACT_EVAL}) == 40 and len(set(OPEN_EVAL)) == 24 and len(set(PROSE_EVAL)) == 16


def test_no_eval_prompt_in_training():
    assert eval_leaks(train_conversations(5000)) == []
    # the whole space of training turns, not only a sample of it
    space = [[t] for t in all_first_turns()] + [[t] for ups in cp._FOLLOW_UPS.values() for t in ups]
    assert eval_leaks(space) == []


def test_eval_leaks_detects_verbatim_use():
    q = FACT_EVAL[0][0]
    convs = [["hello"], ["  " + q.upper() + " "], [OPEN_EVAL[3], "Why is that?"]]
    assert eval_leaks(convs) == [q, OPEN_EVAL[3]]


def test_fact_eval_answers_and_first_turns():
    firsts = {c[0].strip().casefold() for c in train_conversations(5000)}
    for question, answers in FACT_EVAL:
        assert question.endswith("?")
        assert answers and all(a.strip() for a in answers)
        assert question.strip().casefold() not in firsts


def test_fact_eval_entities_held_out_per_template():
    for key, entity, _ in cp._FACT_EVAL_SPEC:
        assert entity not in cp._POOLS[key], (key, entity)
        if key != "arithmetic":  # the generated sums are filtered; the hand-written lists never hold them
            assert entity not in cp._TEMPLATES[key].entities, (key, entity)
        assert cp._POOLS[key], key


def test_prose_eval_is_plain_paragraphs():
    for p in PROSE_EVAL:
        assert 60 <= len(p.split()) <= 200
        assert "`" not in p and "<|" not in p and "\n" not in p
