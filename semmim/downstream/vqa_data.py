"""VQA data: the VQA v2 file format, the official soft accuracy, and embedded shape questions.

**Format** (VQA v2, ``v2_OpenEnded_mscoco_train2014_questions.json`` +
``v2_mscoco_train2014_annotations.json``): the questions file is ``{"data_subtype": "train2014",
"questions": [{"image_id": 458752, "question": "What is this photo taken looking through?",
"question_id": 458752000}, …]}``; the annotations file is ``{"annotations": [{"question_id": …,
"image_id": …, "question_type": "what is this", "answer_type": "other",
"multiple_choice_answer": "net", "answers": [{"answer": "net", "answer_confidence": "maybe",
"answer_id": 1}, … 10 answers]}, …]}``. Images are COCO files ``COCO_train2014_000000458752.jpg``
(looked up in ``image_dir`` and ``image_dir/train2014``; also the 2017 name ``000000458752.jpg``).
Test questions have no annotations file.

**Accuracy** (the official evaluation, re-implemented from its documented rules): both the
predicted and the human answers are normalised (:func:`normalize_answer`); an answer's accuracy
against the 10 human answers is the mean over the 10 leave-one-out subsets of 9 answers of
``min(#subset answers equal to it / 3, 1)`` (:func:`vqa_accuracy`). Normalisation: newlines and
tabs to spaces; punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it
touches a space or the answer holds a digit-comma-digit group, else replaced by a space; a period
not followed by a digit is deleted; then, word by word (lower case): number words zero..ten →
digits ("none" → "0"), the articles a / an / the dropped, apostrophe-less contractions restored
("dont" → "don't"). (The official script skips normalising the human answers when all 10 agree;
here they are always normalised, which only differs for answers the rules would change.)

**Embedded questions** (:func:`synthetic_vqa`): about the built-in shape scenes
(:mod:`semmim.synthetic`), answered from the scene description: the number of objects, the
colour of the (only) object of a shape, the shape or colour of the object at a position, whether
a (colour, shape) object is present (half the time a combination that is absent), and how many
objects of a shape there are. Each has 10 identical "human" answers.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from semmim import synthetic
from semmim.data import (
    DataError,
    Record,
    SkipLog,
    SyntheticRef,
    int_of,
    json_type,
    read_json_file,
    texts_of,
)
from semmim.paths import file_problem

__all__ = [
    "VQARecord",
    "normalize_answer",
    "vqa_accuracy",
    "load_vqa",
    "synthetic_vqa",
    "answer_vocabulary",
    "soft_scores",
]

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@"]
_PUNCT += ["`", ",", "?", "!"]
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    w.replace("'", ""): w
    for w in (
        "aren't can't couldn't couldn't've didn't doesn't don't hadn't hasn't haven't he'd "
        "he'll he's how'd how'll how's i'd i'll i'm i've isn't it'd it'll let's ma'am mightn't "
        "might've mustn't must've needn't o'clock ought've shan't she'd she'll she's "
        "should've shouldn't that's there'd there're there's they'd they'll they're they've "
        "wasn't we'd we'll we're we've weren't what'll what're what's what've when's where'd "
        "where's where've who'd who'll who's who've why'll why're why's won't would've "
        "wouldn't y'all you'd you'll you're you've"
    ).split()
}
# Words whose apostrophe-less spelling is itself a word are not restored.
for _w in ("hell", "ill", "its", "shed", "shell", "wed", "well", "were", "whats"):
    _CONTRACTIONS.pop(_w, None)
_CONTRACTIONS["whats"] = "what's"


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation (see the module docstring)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    delete_all = _COMMA_NUMBER.search(text) is not None
    for p in _PUNCT:
        if delete_all or (p + " " in text) or (" " + p in text):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD.sub("", text)
    words = []
    for w in text.lower().split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, human_answers: Sequence[str], normalized: bool = False) -> float:
    """Official soft accuracy in [0, 1] of ``prediction`` against the human answers (usually 10).

    Mean over the leave-one-out subsets of ``min(matches in the subset / 3, 1)``. With
    ``normalized=True`` the inputs are taken as already normalised.
    """
    if not human_answers:
        raise ValueError("human_answers: empty (a question without annotations has no accuracy)")
    pred = prediction if normalized else normalize_answer(prediction)
    gts = list(human_answers) if normalized else [normalize_answer(a) for a in human_answers]
    if len(gts) == 1:
        return float(gts[0] == pred)
    total = sum(gts[i] == pred for i in range(len(gts)))
    acc = 0.0
    for i in range(len(gts)):
        matches = total - (gts[i] == pred)
        acc += min(1.0, matches / 3)
    return acc / len(gts)


@dataclass(frozen=True)
class VQARecord(Record):
    """One question: ``caption`` holds the question, ``key`` the image id; ``answers`` the
    human answers (raw; empty for test questions)."""

    question_id: int = -1
    answers: tuple[str, ...] = ()
    answer_type: str = ""
    question_type: str = ""


def _image_path(image_dir: str, subtype: str, image_id: int) -> tuple[str | None, str]:
    """(the image file of ``image_id``, or None; the skip reason when there is none)."""
    names = [f"COCO_{subtype}_{image_id:012d}.jpg", f"{image_id:012d}.jpg"]
    problem = "missing image"
    for folder in (image_dir, os.path.join(image_dir, subtype)):
        for name in names:
            path = os.path.join(folder, name)
            found = file_problem(path, "image")
            if found is None:
                return path, ""
            if found != "missing image":
                problem = found  # e.g. a FIFO named like the image: never opened
    return None, problem


def _answers(ann: Any, where: str, skips: SkipLog) -> tuple[str, ...] | None:
    """The human answers of one annotation, or None (counted) when any of them is malformed: a
    question scored against part of its answers would get the wrong accuracy."""
    answers = ann.get("answers")
    if not isinstance(answers, list):
        skips.add(f"'answers' must be a list, got {json_type(answers)}", where)
        return None
    out = []
    for i, a in enumerate(answers):
        at = f"{where}.answers[{i}]"
        if not isinstance(a, dict) or "answer" not in a:
            skips.add("answer without 'answer'", at)
            return None
        text = texts_of(a["answer"], "answer", at, skips, "empty answer", lists=False)
        if not text:
            return None
        out.append(text[0][1])
    return tuple(out)


def load_vqa(
    questions_file: str,
    annotations_file: str | None = None,
    image_dir: str | None = None,
    skips: SkipLog | None = None,
) -> list[VQARecord]:
    """Read a VQA v2 questions file (and its annotations file) into records.

    ``image_dir`` defaults to the questions file's folder. Both files are read by
    :func:`semmim.data.read_json_file` and every field is type-checked as ``json:`` data is;
    what cannot be used is skipped and counted in ``skips`` with the entry named
    (``questions.json:questions[3]``): a missing (or not regular) image file; a question that is
    not a non-empty string (``null`` and numbers are not turned into text); ``image_id`` /
    ``question_id`` missing or not an integer (a float id is refused, not truncated); every
    question sharing a ``question_id`` with another (its answers would be ambiguous); an
    annotation without ``question_id``, with a duplicated one or with a malformed answer; a
    question without answers when annotations are given.

    Raises :class:`semmim.data.DataError` (a ValueError) naming the file: unreadable, truncated,
    not UTF-8 or not JSON; a layout that is not VQA v2; annotations of questions that are not in
    the questions file.
    """
    skips = skips if skips is not None else SkipLog()
    qdata = read_json_file(questions_file, "VQA questions file")
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise DataError(
            f"{questions_file}: expected a VQA questions file {{'questions': [...]}}, got "
            f"{type(qdata).__name__} with keys {sorted(qdata)[:5] if isinstance(qdata, dict) else ''}"
        )
    subtype = qdata.get("data_subtype", "")
    subtype = subtype if isinstance(subtype, str) else ""
    image_dir = image_dir or os.path.dirname(os.path.abspath(questions_file))
    qname = os.path.basename(questions_file)

    questions: list[tuple[str, int, int, str]] = []  # (where, question_id, image_id, question)
    listed: set[int] = set()  # every question id in the file, usable or not
    for n, q in enumerate(qdata["questions"]):
        where = f"{qname}:questions[{n}]"
        if not isinstance(q, dict):
            skips.add(f"entry must be an object, got {json_type(q)}", where)
            continue
        qid = int_of(q, "question_id", where, skips)
        if qid is not None:
            listed.add(qid)
        image_id = int_of(q, "image_id", where, skips) if qid is not None else None
        if image_id is None:
            continue
        text = texts_of(q.get("question"), "question", where, skips, "empty question", False)
        if text:
            questions.append((where, qid, image_id, text[0][1]))
    seen = Counter(qid for _, qid, _, _ in questions)
    for where, qid, _, _ in questions:
        if seen[qid] > 1:
            skips.add(
                "duplicate question_id", where, f"question_id {qid} is used {seen[qid]} times"
            )
    questions = [q for q in questions if seen[q[1]] == 1]

    anns: dict[int, tuple[str, ...]] = {}
    atypes: dict[int, tuple[str, str]] = {}
    rejected: set[int] = set()  # questions whose annotation was skipped (counted there)
    if annotations_file:
        adata = read_json_file(annotations_file, "VQA annotations file")
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise DataError(
                f"{annotations_file}: expected a VQA annotations file {{'annotations': [...]}}"
            )
        aname = os.path.basename(annotations_file)
        by_qid: dict[int, list[tuple[str, dict]]] = {}
        for n, a in enumerate(adata["annotations"]):
            where = f"{aname}:annotations[{n}]"
            if not isinstance(a, dict):
                skips.add(f"entry must be an object, got {json_type(a)}", where)
                continue
            qid = int_of(a, "question_id", where, skips)
            if qid is not None:
                by_qid.setdefault(qid, []).append((where, a))
        stray = sorted(set(by_qid) - listed)
        if stray:
            raise DataError(
                f"{annotations_file}: annotations for {len(stray)} question ids not in "
                f"{questions_file} (e.g. {stray[:3]}): the files do not belong together"
            )
        for qid, found in by_qid.items():
            if len(found) > 1:
                for where, _ in found:
                    skips.add(
                        "duplicate question_id", where, f"question_id {qid} is annotated twice"
                    )
                rejected.add(qid)
                continue
            where, a = found[0]
            answers = _answers(a, where, skips)
            if answers is None:
                rejected.add(qid)
            else:
                anns[qid] = answers
                atypes[qid] = tuple(  # type: ignore[assignment]
                    v if isinstance(v, str) else ""
                    for v in (a.get("answer_type"), a.get("question_type"))
                )
    records = []
    for where, qid, image_id, question in questions:
        if qid in rejected:
            continue
        path, problem = _image_path(image_dir, subtype, image_id)
        if path is None:
            skips.add(problem, f"COCO_{subtype}_{image_id:012d}.jpg", where)
            continue
        answers = anns.get(qid, ())
        if annotations_file and not answers:
            skips.add("question without answers", where, f"question_id {qid}")
            continue
        answer_type, question_type = atypes.get(qid, ("", ""))
        records.append(
            VQARecord(
                path,
                question,
                str(image_id),
                question_id=qid,
                answers=answers,
                answer_type=answer_type,
                question_type=question_type,
            )
        )
    return records


def _scene_rng(seed: int, split: str, index: int) -> random.Random:
    digest = hashlib.blake2b(f"vqa:{seed}:{split}:{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _questions(objects: list[synthetic.SceneObject], rng: random.Random) -> list[tuple]:
    """Every (question, answer, answer_type, question_type) the scene can answer, one per kind."""
    out = []
    out.append(("how many objects are there?", str(len(objects)), "number", "how many objects"))
    shapes = Counter(o.shape for o in objects)
    unique = [o for o in objects if shapes[o.shape] == 1]
    if unique:
        o = rng.choice(unique)
        out.append((f"what color is the {o.shape}?", o.colour, "other", "what color is the"))
    o = rng.choice(objects)
    pos = synthetic.POSITIONS[o.cell]
    out.append((f"what shape is {pos}?", o.shape, "other", "what shape is"))
    o = rng.choice(objects)
    pos = synthetic.POSITIONS[o.cell]
    out.append((f"what color is the shape {pos}?", o.colour, "other", "what color is the"))
    present = {(o.colour, o.shape) for o in objects}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
        answer = "yes"
    else:
        absent = [
            (c, s) for c in synthetic.COLOURS for s in synthetic.SHAPES if (c, s) not in present
        ]
        colour, shape = rng.choice(absent)
        answer = "no"
    out.append((f"is there a {colour} {shape}?", answer, "yes/no", "is there a"))
    shape = rng.choice(synthetic.SHAPES)
    out.append((f"how many {shape}s are there?", str(shapes[shape]), "number", "how many"))
    return out


def synthetic_vqa(seed: int, split: str, n_scenes: int, per_scene: int = 3) -> list[VQARecord]:
    """Questions about scenes 0..n_scenes−1 of the embedded data: ``per_scene`` of the six kinds
    (drawn per scene, deterministically), with question ids ``scene·10 + kind``."""
    records = []
    for i in range(n_scenes):
        objects = synthetic.scene(seed, split, i)
        rng = _scene_rng(seed, split, i)
        qs = _questions(objects, rng)
        kinds = sorted(rng.sample(range(len(qs)), min(per_scene, len(qs))))
        for k in kinds:
            question, answer, atype, qtype = qs[k]
            records.append(
                VQARecord(
                    SyntheticRef(seed, split, i),
                    question,
                    f"{split}/{i}",
                    question_id=i * 10 + k,
                    answers=(answer,) * 10,
                    answer_type=atype,
                    question_type=qtype,
                )
            )
    return records


def answer_vocabulary(records: Sequence[VQARecord], n: int) -> list[str]:
    """The ``n`` most frequent (normalised) most-common human answers, most frequent first."""
    counts: Counter[str] = Counter()
    for r in records:
        if r.answers:
            counts[Counter(normalize_answer(a) for a in r.answers).most_common(1)[0][0]] += 1
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def soft_scores(record: VQARecord, index: dict[str, int]) -> list[tuple[int, float]]:
    """(class, accuracy) for every vocabulary answer among the record's human answers: the soft
    training target (an answer's target is the accuracy it would score)."""
    gts = [normalize_answer(a) for a in record.answers]
    out = []
    for a in sorted(set(gts)):
        if a in index:
            out.append((index[a], vqa_accuracy(a, gts, normalized=True)))
    return out
