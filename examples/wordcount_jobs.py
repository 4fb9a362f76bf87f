"""The jobs of examples/wordcount.py: importable by the worker processes that run them."""

from __future__ import annotations

import json
import re
from collections import Counter

import litemultistep

WORD = re.compile(r"[a-z']+")


def count_words(path: str) -> dict[str, int]:
    """One file's word counts. Its task keeps results, so this return value is stored for the finalizer."""
    with open(path, encoding="utf-8") as f:
        return dict(Counter(WORD.findall(f.read().lower())))


def merge_counts(out_path: str, top: int) -> None:
    """The finalizer: merge every file's counts (streamed, in the order the files were added) and write
    the top words. It runs once every count succeeded, and before the results go with the task."""
    total: Counter[str] = Counter()
    files = 0
    for counts in litemultistep.current_task().results():
        total.update(counts)
        files += 1
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"files": files, "words": sum(total.values()), "top": total.most_common(top)}, f, indent=1)
