"""shapes-vqa is deterministic, its splits are disjoint, and its questions need the image."""

from __future__ import annotations

import numpy as np
import pytest

from mllm_deploy.scenes import shapes_vqa


def test_examples_are_deterministic_and_independent():
    a = shapes_vqa.example("train", 17)
    b = shapes_vqa.examples("train", 3, start=16)[1]
    assert (a.question, a.answer, a.kind) == (b.question, b.answer, b.kind)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_splits_do_not_share_scenes():
    def scenes(split):
        return {np.asarray(e.image).tobytes() for e in shapes_vqa.examples(split, 150)}

    train, val, test = scenes("train"), scenes("validation"), scenes("test")
    assert not (train & val) and not (train & test) and not (val & test)


def test_every_question_kind_and_answer_is_in_the_vocabulary():
    items = shapes_vqa.examples("validation", 300)
    vocab = set(shapes_vqa.vocabulary())
    assert {e.kind for e in items} == set(shapes_vqa.QUESTION_TYPES)
    for e in items:
        assert e.answer in vocab
        assert all(w in vocab for w in e.question.split())
        assert e.image.size == (shapes_vqa.IMAGE_SIZE, shapes_vqa.IMAGE_SIZE)


def test_answers_follow_the_scene():
    """Re-derive answers from the drawn pixels for colour_at questions: the named cell holds that colour."""
    for e in shapes_vqa.examples("test", 60):
        if e.kind != "colour_at":
            continue
        words = e.question.split()
        row = shapes_vqa.ORDINALS.index(words[words.index("row") + 1])
        col = shapes_vqa.ORDINALS.index(words[words.index("column") + 1])
        cell = np.asarray(e.image)[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16].reshape(-1, 3).astype(int)
        target = np.array(shapes_vqa.COLOURS[e.answer])
        assert (np.abs(cell - target).sum(axis=1) < 30).sum() >= 9  # a small object covers 9+ pixels


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split"):
        shapes_vqa.example("dev", 0)


def test_questions_alone_do_not_give_the_answers():
    """The best question-only answerer (majority answer per question kind, learnt on train) stays
    near 41% on test: the accuracy the blank-image ablation of the trained model is held to."""
    from collections import Counter, defaultdict

    majority: dict = defaultdict(Counter)
    for i in range(3000):
        _question, answer, kind = shapes_vqa.question_only("train", i)
        majority[kind][answer] += 1
    test = [shapes_vqa.question_only("test", i) for i in range(1000)]
    blind = sum(majority[kind].most_common(1)[0][0] == answer for _q, answer, kind in test) / len(test)
    assert 0.35 <= blind <= 0.45, blind
    assert all(q == e.question and a == e.answer
               for (q, a, _k), e in zip(test[:5], shapes_vqa.examples("test", 5)))


def test_relevance_maps_mark_the_objects_a_question_names():
    """The training-only attention target: every patch a question marks shows the object it names
    (colour read off the patch label), and a question about a present object marks at least one."""
    colours, shapes = list(shapes_vqa.COLOURS), shapes_vqa.SHAPES
    checked = 0
    for i in range(30):
        sc = shapes_vqa.scene("validation", i, drill=1)
        questions = sc.qas + sc.drill
        assert len(sc.relevance) == len(questions)
        for (question, answer, kind), roles in zip(questions, sc.relevance):
            words = question.split()
            marked = sc.patch_classes[roles == 1]
            drawn = marked[marked > 0]  # the centre patch of a small object may show background
            if kind == "shape_of_colour":
                assert roles.any() and roles.max() == 1
                [named] = [w for w in words if w in colours]
                assert all(colours[(c - 1) // 3] == named for c in drawn)
                assert all(shapes[(c - 1) % 3] == answer for c in drawn)
                checked += 1
            elif kind == "colour_at":
                assert roles.any() and all(colours[(c - 1) // 3] == answer for c in drawn)
                checked += 1
            elif kind in ("left_of", "above"):
                assert (roles == 1).any() and (roles == 2).any()
            elif kind == "exists":
                assert roles.any() == (answer == "yes")
            elif kind == "count":
                assert roles.any() == (answer != "zero")
    assert checked >= 30
