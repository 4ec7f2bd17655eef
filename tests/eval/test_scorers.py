"""The scorers on crafted answers whose scores were worked out by hand from the paper's
scripts (``eval_mm/evaluate_grounding.py``, ``vqa_eval.py``, ``evaluate_vqa.py``)."""

from __future__ import annotations

import pytest

from qvl.eval import caption, grounding, vqa

# ---------------------------------------------------------------- grounding

@pytest.mark.parametrize("answer, parsed", [
    ("(100,200),(300,400)", (100.0, 200.0, 300.0, 400.0)),
    ("<ref>a dog</ref>(100,200),(300,400)</box>", (100.0, 200.0, 300.0, 400.0)),
    ("( 100, 200),(300 , 400)", (100.0, 200.0, 300.0, 400.0)),  # float() takes the spaces
    ("(10,10),(20,20) and then (100,200),(300,400)", (10.0, 10.0, 20.0, 20.0)),  # the first box only
    ("(1 00,200),(300,400)", None),  # a space inside a number
    ("(1,2,3),(4,5)", None),  # three numbers on one side
    ("(1;2),(3,4)", None),  # no comma on one side
    ("(a,b),(c,d)", None),
    ("I cannot see it", None),
    ("(12.5,20),(30,40.25)", (12.5, 20.0, 30.0, 40.25)),
])
def test_the_first_box_or_none(answer, parsed):
    assert grounding.parse_box(answer) == parsed


def test_boxes_are_scaled_by_999_and_the_image_size():
    # (0,0),(999,999) on a 500x400 image is the whole image under the script's 999
    whole = grounding.score("(0,0),(999,999)", [0, 0, 500, 400], 500, 400)
    assert whole["box"] == [0, 0, 500, 400] and whole["iou"] == 1.0 and whole["score"] == 1.0
    # training's 1000: 999/1000 of each side, IoU 0.999 ** 2
    assert grounding.score("(0,0),(999,999)", [0, 0, 500, 400], 500, 400, 1000)["iou"] == pytest.approx(0.999 ** 2)


@pytest.mark.parametrize("answer, truth, iou, hit", [
    ("(0,0),(50,100)", [0, 0, 100, 100], 0.5, 1.0),  # exactly 0.5 is a hit
    ("(0,0),(49,100)", [0, 0, 100, 100], 0.49, 0.0),
    ("(300,400),(100,200)", [100, 200, 300, 400], 0.0, 0.0),  # inverted: no intersection
    ("nothing", [10, 10, 20, 20], 0.0, 0.0),  # the zero box
    ("nothing", [0, 0, 0, 0], None, 0.0),  # zero union: NaN, no hit
])
def test_iou_and_hits(answer, truth, iou, hit):
    result = grounding.score(answer, truth, 999, 999)
    assert result["iou"] == (None if iou is None else pytest.approx(iou)) and result["score"] == hit


# ---------------------------------------------------------------- VQA

@pytest.mark.parametrize("answer, normalized", [
    ("Two dogs.", "2 dogs"),  # period dropped, number word to digit
    ("It's a dog!", "it's dog"),  # "!" becomes a space, the article goes
    ("yes, it is", "yes it is"),  # ", " present: the comma is removed
    ("1,000", "1000"),  # a comma inside a number
    ("3.5", "3.5"),  # a period before a digit stays
    ("dont know", "don't know"),  # contraction restored
    ("none", "0"),
    ("the\tcat\non a mat", "cat on mat"),
    ("left/right", "left right"),  # "/" with no space around: replaced by a space
])
def test_vqa_normalization(answer, normalized):
    assert vqa.normalize_answer(answer) == normalized


def test_vqa_accuracy_is_the_mean_over_leave_one_out_subsets():
    refs = ["yes"] * 3 + ["no"] * 7
    # "yes": the 3 subsets without one "yes" hold 2 matches (2/3), the 7 others 3 (1): (3 * 2/3 + 7) / 10
    assert vqa.vqa_accuracy("yes", refs) == pytest.approx(0.9)
    assert vqa.vqa_accuracy("No", refs) == 1.0
    assert vqa.vqa_accuracy("maybe", refs) == 0.0
    # one "yes" of ten: 9 subsets hold it once (1/3), the subset without it none: 9 * (1/3) / 10
    assert vqa.vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(0.3)


def test_reference_punctuation_only_when_the_references_disagree():
    assert vqa.vqa_accuracy("yes", ["yes."] * 10) == 0.0  # all alike: taken as they are
    assert vqa.vqa_accuracy("yes", ["yes."] * 5 + ["yes"] * 5) == 1.0  # they differ: "yes." becomes "yes"


@pytest.mark.parametrize("answer, cleaned", [
    ("The answer is a red car.", "red car"),
    ("Yes, it is.", "yes"),
    ("They are on the left of the table!", "left"),
    ("an apple", "apple"),
])
def test_gqa_cleanup(answer, cleaned):
    assert vqa.gqa_answer(answer) == cleaned


def test_gqa_accuracy_is_an_exact_match():
    assert vqa.gqa_accuracy("It is a Red car.", ["red car"]) == 1.0
    assert vqa.gqa_accuracy("red cars", ["red car"]) == 0.0


# ---------------------------------------------------------------- captions

REFS = {"1": ["A dog runs on the beach.", "a dog running on the sand", "A brown dog on a beach"],
        "2": ["Two cats are sleeping on a sofa.", "two cats asleep on a couch"],
        "3": ["A red bus parked on the street.", "a bus on a city street"]}
PREDS = {"1": "a dog running on the beach", "2": "two cats sleeping on a couch", "3": "a train at the station"}


@pytest.mark.skipif(not caption.java_available(), reason="the PTB tokenizer needs Java")
def test_cider_equals_pycocoevalcap_called_directly():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb = PTBTokenizer()
    gts = ptb.tokenize({i: [{"caption": c} for c in REFS[i]] for i in REFS})
    res = ptb.tokenize({i: [{"caption": PREDS[i]}] for i in PREDS})
    expected, per_image = Cider().compute_score(gts, res)
    result = caption.score(REFS, PREDS)
    assert result["comparable"] and result["tokenizer"] == "ptb"
    assert result["metrics"]["cider"] == pytest.approx(expected)
    assert [result["per_image"][i] for i in sorted(PREDS)] == pytest.approx(list(per_image))
    assert 0 < result["metrics"]["meteor"] < 1 and 0 < result["metrics"]["bleu4"] < 1


def test_without_java_the_scores_say_they_are_not_comparable():
    result = caption.score(REFS, PREDS, use_java=False)
    assert not result["comparable"] and result["tokenizer"] == "simple (no Java)"
    assert result["metrics"]["meteor"] is None and result["metrics"]["cider"] > 0
    assert result["per_image"]["1"] > result["per_image"]["3"]  # the right caption beats the wrong one
    assert caption.simple_tokenize("A dog -- running, on the Beach!") == "a dog running on the beach"
