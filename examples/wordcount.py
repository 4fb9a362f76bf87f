"""Fan out, then gather: count the words of many files in parallel worker processes, then merge the
counts in a finalizer that reads every job's result, and print the top words.

    python examples/wordcount.py [--files N] [--db PATH_OR_URL]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import wordcount_jobs  # noqa: E402

import litemultistep  # noqa: E402
from litemultistep import MultiStepTask  # noqa: E402

WORDS = ("arr", "matey", "treasure", "ship", "rum", "parrot", "plank", "sea", "captain", "gold", "island", "map")


def make_files(folder: str, n: int) -> list[str]:
    rng = random.Random(7)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"log-{i:04}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(" ".join(rng.choices(WORDS, weights=range(len(WORDS), 0, -1), k=2000)))
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100, help="files to count (default 100)")
    parser.add_argument("--db", help="a SQLite file or a postgresql:// URL (default: a new SQLite file)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="wordcount-")
    try:
        db = args.db or os.path.join(work, "wordcount.sqlite")
        paths = make_files(work, args.files)
        out = os.path.join(work, "top.json")
        with litemultistep.Workers(db, concurrency=2, quiet=True):
            with MultiStepTask.create("wordcount", db=db, keep_results=True) as task:
                for path in paths:
                    task.add_job(wordcount_jobs.count_words, path)
                task.add_finalization_job(wordcount_jobs.merge_counts, out, 5)
            task.wait(timeout=120)
        with open(out, encoding="utf-8") as f:
            report = json.load(f)
        print(f"{report['files']} files, {report['words']:,} words; the top five:")
        for word, n in report["top"]:
            print(f"  {word:10} {n:,}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
