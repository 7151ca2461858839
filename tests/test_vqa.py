"""VQA: answer normalisation and the official soft accuracy (hand-computed), the VQA v2 file
format, the embedded shape questions."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from semmim import synthetic
from semmim.downstream.vqa_data import (
    answer_vocabulary,
    load_vqa,
    normalize_answer,
    soft_scores,
    synthetic_vqa,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("Two", "2"),
        ("none", "0"),
        ("The dog.", "dog"),
        ("a red circle", "red circle"),
        ("yes!", "yes"),
        ("dont know", "don't know"),
        ("isnt it", "isn't it"),
        ("1,000", "1000"),  # digit-comma-digit: punctuation is deleted, not spaced
        ("2.5", "2.5"),  # a period before a digit stays
        ("red/blue", "red blue"),  # punctuation not touching a space becomes a space
        ("red / blue", "red blue"),  # ... and touching a space is deleted
        ("  Tennis\tRacket\n", "tennis racket"),
        ("well", "well"),  # a word that is not a dropped-apostrophe contraction stays
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "matches,expected",
    [
        # leave-one-out over 10 answers, min(matches / 3, 1) averaged:
        (0, 0.0),
        (1, 9 * (1 / 3) / 10),  # 9 subsets keep the match (1/3), 1 drops it (0)
        (2, (8 * (2 / 3) + 2 * (1 / 3)) / 10),  # = 0.6
        (3, (7 * 1 + 3 * (2 / 3)) / 10),  # = 0.9
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_soft_accuracy_hand_computed(matches, expected):
    humans = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("2", humans) == pytest.approx(expected)


def test_accuracy_normalises_both_sides():
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy("the dog", ["Dog."] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["two", "2", "3"] + ["4"] * 7) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="human_answers"):
        vqa_accuracy("x", [])


def _write_vqa(tmp_path, with_stray=False):
    for image_id in (42, 7):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / f"COCO_val2014_{image_id:012d}.jpg")
    questions = {
        "info": {},
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "data_subtype": "val2014",
        "license": {},
        "questions": [
            {"image_id": 42, "question": "What color is the bus?", "question_id": 420},
            {"image_id": 42, "question": "How many people?", "question_id": 421},
            {"image_id": 7, "question": "Is it raining?", "question_id": 70},
            {"image_id": 99, "question": "Where is it?", "question_id": 990},  # no image file
        ],
    }

    def answers(words):
        return [
            {"answer": w, "answer_confidence": "yes", "answer_id": i + 1}
            for i, w in enumerate(words)
        ]

    anns = [
        {
            "question_id": 420,
            "image_id": 42,
            "question_type": "what color is the",
            "answer_type": "other",
            "multiple_choice_answer": "red",
            "answers": answers(["red"] * 8 + ["Red.", "orange"]),
        },
        {
            "question_id": 421,
            "image_id": 42,
            "question_type": "how many",
            "answer_type": "number",
            "multiple_choice_answer": "2",
            "answers": answers(["two"] * 5 + ["2"] * 3 + ["3"] * 2),
        },
        {
            "question_id": 70,
            "image_id": 7,
            "question_type": "is it",
            "answer_type": "yes/no",
            "multiple_choice_answer": "no",
            "answers": answers(["no"] * 10),
        },
    ]
    if with_stray:
        anns.append({**anns[0], "question_id": 12345})
    qf, af = tmp_path / "questions.json", tmp_path / "annotations.json"
    qf.write_text(json.dumps(questions))
    af.write_text(json.dumps({"info": {}, "annotations": anns}))
    return qf, af


def test_vqa_v2_files(tmp_path):
    qf, af = _write_vqa(tmp_path)
    from semmim.data import SkipLog

    skips = SkipLog()
    recs = load_vqa(str(qf), str(af), skips=skips)
    assert [r.question_id for r in recs] == [420, 421, 70]
    assert skips.summary() == {"missing image": 1, "total": 1}
    r = recs[1]
    assert r.caption == "How many people?" and r.key == "42" and r.answer_type == "number"
    assert r.image.endswith("COCO_val2014_000000000042.jpg") and len(r.answers) == 10
    vocab = answer_vocabulary(recs, 10)
    assert sorted(vocab) == ["2", "no", "red"]
    index = {a: i for i, a in enumerate(vocab)}
    # "two" x5 + "2" x3 all normalise to "2" (8 matches -> 1.0); "3" x2 is not in the vocabulary
    assert soft_scores(r, index) == [(index["2"], 1.0)]
    # test questions: no annotations file
    assert [r.answers for r in load_vqa(str(qf))] == [(), (), ()]


def test_vqa_files_errors(tmp_path):
    qf, af = _write_vqa(tmp_path, with_stray=True)
    with pytest.raises(ValueError, match="do not belong together"):
        load_vqa(str(qf), str(af))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "x"}]))
    with pytest.raises(ValueError, match="questions file"):
        load_vqa(str(bad))


def test_vqa_typed_fields_skip_and_count_naming_the_entry(tmp_path, caplog):
    """issue 19 §3: no "None" / "7" questions, no truncated ids, no duplicate ids scored against
    another question's answers, no tracebacks on malformed entries."""
    from semmim.data import DataError, SkipLog

    qf, af = _write_vqa(tmp_path)
    questions = json.loads(qf.read_text())
    questions["questions"] += [
        {"image_id": 42, "question": None, "question_id": 500},
        {"image_id": 42, "question": 7, "question_id": 501},
        {"image_id": 42.0, "question": "float image id?", "question_id": 502},
        {"image_id": 7, "question": "same id as the rain question", "question_id": 70},
        {"image_id": None, "question": "null image id", "question_id": 503},
        {"image_id": 7, "question": "no id"},
        ["not", "an", "object"],
    ]
    qf.write_text(json.dumps(questions))
    skips = SkipLog()
    recs = load_vqa(str(qf), str(af), skips=skips)
    assert [r.question_id for r in recs] == [420, 421]  # both questions 70 are ambiguous: out
    assert all(isinstance(r.caption, str) and r.caption not in ("None", "7") for r in recs)
    assert skips.summary() == {
        "'image_id' must be an integer, got float": 1,
        "'image_id' must be an integer, got null": 1,
        "'question' must be a string, got int": 1,
        "'question' must be a string, got null": 1,
        "duplicate question_id": 2,
        "entry must be an object, got list": 1,
        "entry without 'question_id'": 1,
        "missing image": 1,
        "total": 9,
    }
    assert ("duplicate question_id", "questions.json:questions[2]") in skips.keys
    assert "question_id 70 is used 2 times" in caplog.text  # the warning names the id
    af.write_bytes(af.read_bytes()[:-30])
    with pytest.raises(DataError, match=r"VQA annotations file .*annotations\.json.* ends early"):
        load_vqa(str(qf), str(af))
    qf.write_bytes(b'{"questions": [{"question": "caf\xe9"}]}')
    with pytest.raises(DataError, match=r"VQA questions file .*questions\.json.* not valid UTF-8"):
        load_vqa(str(qf))


def test_synthetic_questions_answer_from_the_scene():
    recs = synthetic_vqa(0, "train", 40, per_scene=6)
    assert len(recs) >= 40 * 5  # "what color is the <shape>" needs a shape seen once
    kinds = set()
    for r in recs:
        objects = synthetic.scene(0, "train", int(r.key.split("/")[1]))
        q, a = r.caption, r.answers[0]
        assert r.answers == (a,) * 10
        kinds.add(r.question_type)
        if q == "how many objects are there?":
            assert a == str(len(objects))
        elif q.startswith("what shape is"):
            pos = q[len("what shape is ") : -1]
            assert a in {o.shape for o in objects if synthetic.POSITIONS[o.cell] == pos}
        elif q.startswith("what color is the shape"):
            pos = q[len("what color is the shape ") : -1]
            assert a in {o.colour for o in objects if synthetic.POSITIONS[o.cell] == pos}
        elif q.startswith("what color is the"):
            shape = q[len("what color is the ") : -1]
            assert [o.colour for o in objects if o.shape == shape] == [a]
        elif q.startswith("is there a"):
            colour, shape = q[len("is there a ") : -1].split()
            present = any(o.colour == colour and o.shape == shape for o in objects)
            assert a == ("yes" if present else "no")
        elif q.startswith("how many"):
            shape = q[len("how many ") : -len("s are there?")]
            assert a == str(sum(o.shape == shape for o in objects))
        else:
            raise AssertionError(q)
    assert len(kinds) == 5
    yes = sum(r.answers[0] == "yes" for r in recs if r.answer_type == "yes/no")
    no = sum(r.answers[0] == "no" for r in recs if r.answer_type == "yes/no")
    assert yes > 5 and no > 5
    assert synthetic_vqa(0, "train", 5) == synthetic_vqa(0, "train", 5)  # deterministic
