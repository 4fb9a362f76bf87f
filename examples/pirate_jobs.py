"""The jobs of the pirate example: importable by the worker processes, like any job module."""

from __future__ import annotations

import json
import os
import re
import time

WORDS = {"hello": "ahoy", "my": "me", "friend": "matey", "friends": "hearties", "is": "be", "are": "be",
         "the": "th'", "you": "ye", "your": "yer", "yes": "aye", "money": "doubloons", "stop": "avast"}


def convert_post_to_pirate_talk(blog_dir: str, post_id: int) -> None:
    """Rewrite one post in pirate talk (a normal job: these run in parallel)."""
    path = os.path.join(blog_dir, "posts", f"{post_id}.json")
    with open(path) as f:
        post = json.load(f)
    post["body"] = re.sub(r"[A-Za-z]+", lambda m: WORDS.get(m.group(0).lower(), m.group(0)), post["body"])
    time.sleep(0.05)  # pretend this takes a moment
    with open(path + ".tmp", "w") as f:
        json.dump(post, f)
    os.replace(path + ".tmp", path)


def commit_solr(blog_dir: str) -> None:
    """Index every converted post (the first finalization job)."""
    posts = sorted(os.listdir(os.path.join(blog_dir, "posts")))
    with open(os.path.join(blog_dir, "index.txt"), "w") as f:
        f.write("\n".join(posts) + "\n")


def unlock_blog(blog_dir: str) -> None:
    """Unlock the blog (the second finalization job: runs after the index is committed)."""
    os.remove(os.path.join(blog_dir, "LOCKED"))
