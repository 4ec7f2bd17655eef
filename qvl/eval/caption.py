"""Captions scored with the COCO caption metrics, as the paper's ``evaluate_caption.py`` does
through ``pycocoevalcap``: its PTB tokenizer (Stanford CoreNLP, run with Java), then BLEU-1..4,
METEOR (Java too), ROUGE-L and CIDEr, each called on its own — ``COCOEvalCap.evaluate()`` would
also run SPICE, whose first call downloads CoreNLP models.

Without Java the PTB tokenizer and METEOR cannot run: the text is then tokenized by
``simple_tokenize`` (lower case, the PTB tokenizer's punctuation tokens removed, split on
whitespace), METEOR is left out, and the scores are marked ``comparable: false`` — close to,
but not the numbers the paper's tables hold.
"""

from __future__ import annotations

import re
import shutil

# the tokens pycocoevalcap's PTBTokenizer drops after tokenizing
PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
               ";"}
_TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def simple_tokenize(text: str) -> str:
    return " ".join(t for t in _TOKEN.findall(text.lower()) if t not in PUNCTUATION)


def java_available() -> bool:
    return shutil.which("java") is not None


def score(references: dict[str, list[str]], predictions: dict[str, str], use_java: bool | None = None) -> dict:
    """Corpus metrics and per-image CIDEr for ``predictions`` (id -> caption) against
    ``references`` (id -> captions). ``use_java``: None = when Java is installed."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = sorted(predictions)
    java = java_available() if use_java is None else use_java
    tokenizer = "ptb"
    gts = res = None
    if java:
        try:
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

            ptb = PTBTokenizer()
            gts = ptb.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
            res = ptb.tokenize({i: [{"caption": predictions[i]}] for i in ids})
        except (OSError, RuntimeError, ValueError) as e:  # a read-only install, a broken Java
            java, tokenizer = False, f"simple (the PTB tokenizer failed: {str(e)[:120]})"
    if not java:
        tokenizer = tokenizer if tokenizer != "ptb" else "simple (no Java)"
        gts = {i: [simple_tokenize(c) for c in references[i]] for i in ids}
        res = {i: [simple_tokenize(predictions[i])] for i in ids}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, per_image = Cider().compute_score(gts, res)
    metrics = {"cider": float(cider), "bleu1": float(bleu[0]), "bleu2": float(bleu[1]), "bleu3": float(bleu[2]),
               "bleu4": float(bleu[3]), "rouge_l": float(rouge), "meteor": None}
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()  # a Java process, ended when the scorer is collected
        metrics["meteor"] = float(meteor.compute_score(gts, res)[0])
        del meteor
    return {"metrics": metrics, "per_image": {i: float(s) for i, s in zip(ids, per_image)},
            "tokenizer": tokenizer, "comparable": tokenizer == "ptb"}
