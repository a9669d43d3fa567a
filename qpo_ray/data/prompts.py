"""What a prompt's text means to the pipeline: its identity ("is this prompt new?") and whether it is
degenerate. Pure text functions, used by collect (screening) and evaluate (reports)."""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\w+|[^\w\s]")
_PUNCT = re.compile(r"[^\w\s]")


def prompt_identity(text: str) -> str:
    """Case folded, punctuation dropped, whitespace collapsed: a changed full stop or capital letter does not
    make a new prompt."""
    return " ".join(_PUNCT.sub(" ", text).split()).casefold()


def is_degenerate(prompt: str, repeats: int = 3, max_ngram: int = 3) -> bool:
    """Empty (after whitespace), or some word, punctuation mark or run of up to ``max_ngram`` of them repeated
    ``repeats`` or more times in a row ("the the the", "step by step by step by")."""
    toks = _TOKEN.findall(prompt.casefold())
    if not toks:
        return True
    for n in range(1, max_ngram + 1):
        for i in range(len(toks) - n * repeats + 1):
            gram = toks[i:i + n]
            if all(toks[i + k * n:i + (k + 1) * n] == gram for k in range(1, repeats)):
                return True
    return False
