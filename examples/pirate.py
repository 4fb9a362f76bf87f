"""The gem's pirate example, in Python: convert every post of a blog to pirate talk in parallel
worker processes, then commit the search index and unlock the blog, in that order.

    python examples/pirate.py [--posts N] [--db PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pirate_jobs  # noqa: E402

import litemultistep  # noqa: E402
from litemultistep import MultiStepTask, NoSuchMultiStepTask  # noqa: E402


def make_blog(blog_dir: str, posts: int) -> None:
    os.makedirs(os.path.join(blog_dir, "posts"), exist_ok=True)
    for post_id in range(posts):
        with open(os.path.join(blog_dir, "posts", f"{post_id}.json"), "w") as f:
            json.dump({"id": post_id, "body": f"Hello my friend, is your money safe? Post {post_id}."}, f)
    open(os.path.join(blog_dir, "LOCKED"), "w").close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=40, help="posts in the blog (default 40)")
    parser.add_argument("--db", help="the SQLite file (default: a new one in a temporary folder)")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="pirate-")
    try:
        return run(work, args.posts, args.db or os.path.join(work, "pirate.sqlite"))
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the blog and (unless --db) the database


def run(work: str, posts: int, db: str) -> int:
    blog_dir = os.path.join(work, "blog")
    make_blog(blog_dir, posts)
    print(f"blog of {posts} posts in {blog_dir}, tasks in {db}")

    # quiet: the workers log warnings only (quiet is one of the worker options Workers takes)
    with litemultistep.Workers(db, concurrency=2, quiet=True):
        with MultiStepTask.create("pirate-take-over", db=db) as task:
            for post_id in range(posts):
                task.add_job(pirate_jobs.convert_post_to_pirate_talk, blog_dir, post_id)
            task.add_finalization_job(pirate_jobs.commit_solr, blog_dir)
            task.add_finalization_job(pirate_jobs.unlock_blog, blog_dir)
        task_id = task.task_id  # store it, e.g. blog.async_task_id = task.task_id

        # Progress reporting, as another process would do it: find the task by its id.
        last = None
        while True:
            try:
                found = MultiStepTask.find(task_id, db=db)
                percent = round(found.progress().percent)
            except NoSuchMultiStepTask:
                print("100% complete: the task has finished and is gone")
                break
            if percent != last:
                print(f"{percent}% complete")
                last = percent
            if found.progress().blocked:
                print(f"{found.failed_count} failed: see `litemultistep failed {db}`")
                return 1
            time.sleep(0.1)

    with open(os.path.join(blog_dir, "posts", "0.json")) as f:
        print("post 0 now reads:", json.load(f)["body"])
    with open(os.path.join(blog_dir, "index.txt")) as f:
        print(f"index committed with {len(f.read().split())} posts; blog locked: "
              f"{os.path.exists(os.path.join(blog_dir, 'LOCKED'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
