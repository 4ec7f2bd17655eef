"""VQA answers scored as the paper's scripts score them.

``vqa`` — the VQAv2 accuracy of the official evaluation code (``vqa_eval.py`` in
``eval_mm/``): the answer is cleaned of newlines and tabs, its punctuation removed or spaced,
periods dropped, number words made digits, articles dropped, contractions restored; the
human answers get the same punctuation step only when they disagree; the score is the mean,
over the ten leave-one-out subsets of human answers, of ``min(1, matches / 3)``. Two quirks
of that code are kept because they change scores: its period rule is written with a lookahead
where a lookbehind was meant, and it removes at most 32 periods (``re.UNICODE`` passed as the
count).

``gqa`` — the script's GQA accuracy: the answer cut at the first ``.``, ``,`` or ``!``,
lower-cased, trimmed after ``is ``/``are ``/``a ``/``an ``/``the `` and before `` of``, then an
exact match (case-insensitive) with any reference answer.
"""

from __future__ import annotations

import re

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
           "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official code's pattern
COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")


def punctuation(text: str) -> str:
    out = text
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD.sub("", out, 32)  # sic: re.UNICODE (32) passed where the count goes


def digits_and_articles(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    return digits_and_articles(punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(answer: str, references: list[str]) -> float:
    """VQAv2 accuracy of one answer against its (ten) human answers, in [0, 1]."""
    given = normalize_answer(answer)
    refs = [punctuation(r) for r in references] if len(set(references)) > 1 else list(references)
    scores = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1:]
        scores.append(min(1.0, sum(r == given for r in others) / 3))
    return sum(scores) / len(scores) if scores else 0.0


def gqa_answer(answer: str) -> str:
    response = answer.strip().split(".")[0].split(",")[0].split("!")[0].lower()
    for cue in ("is ", "are ", "a ", "an ", "the "):
        if cue in response:
            response = response.split(cue)[1]
    if " of" in response:
        response = response.split(" of")[0]
    return response.strip()


def gqa_accuracy(answer: str, references: list[str]) -> float:
    cleaned = gqa_answer(answer)
    return float(any(cleaned.strip().lower() == r.strip().lower() for r in references))


METRICS = {"vqa": vqa_accuracy, "gqa": gqa_accuracy}
