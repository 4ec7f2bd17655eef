"""Adversarial inputs whose cost must grow linearly: one function per case, taking a scale
factor ``n`` and running the input of size n x base (``bad_input_scaling.py`` times them)."""

from __future__ import annotations


def eval_grounding_open_parens(n: int) -> None:
    """An answer of 80 KB x n of ``(``: the paper's ``\\((.*?)\\),\\((.*?)\\)`` tried every ``(``
    against the rest of the line (21 s at 80 KB); the scanner reads it once."""
    from qvl.eval import grounding

    grounding.score("(" * 80_000 * n, [0, 0, 10, 10], 100, 100)


def eval_grounding_open_boxes(n: int) -> None:
    """An answer of 80 KB x n of ``(1,2),(`` with no closing ``)``: every ``),(`` a candidate."""
    from qvl.eval import grounding

    grounding.score("(1,2),(" * (80_000 * n // 7), [0, 0, 10, 10], 100, 100)


def eval_vqa_normalize_parens(n: int) -> None:
    """The VQAv2 answer cleanup of 80 KB x n of ``(``, ``.`` and digits mixed."""
    from qvl.eval import vqa

    answer = "(1.,(a." * (80_000 * n // 7)
    vqa.vqa_accuracy(answer, ["yes"] * 10)
    vqa.gqa_accuracy(answer, ["yes"])
