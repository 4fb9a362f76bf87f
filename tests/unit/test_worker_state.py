"""The worker's state objects, alone."""

from __future__ import annotations

import logging

from litemultistep.worker import Pending, RunTally, Schedule


def test_pending_takes_everything_and_restores_it_in_order():
    pending = Pending(give_back=[1, 2], put_back=[3])
    assert pending
    taken = pending.take()
    assert not pending and taken.give_back == [1, 2] and taken.put_back == [3]
    pending.give_back.append(9)
    pending.restore(taken)
    assert pending.give_back == [1, 2, 9] and pending.put_back == [3]


def test_schedule_names_the_next_duty():
    s = Schedule(heartbeat=5.0, maintenance=3.0)
    assert s.next_duty() == 3.0  # no retry scheduled, no stop asked for
    s.stop = 4.0
    s.maintenance = 9.0
    assert s.next_duty() == 4.0
    s.promote = 1.0
    assert s.next_duty() == 1.0


def test_the_summary_line_tells_crashed_runs_from_failures(caplog):
    tally = RunTally()
    tally.ran("a~1", 3)
    tally.ran("a~1", 1, failed=True)
    tally.ran("a~1", 2, crashed=True)
    tally.ran("b~2", 1, crashed=True)
    with caplog.at_level(logging.INFO, logger="litemultistep.worker"):
        tally.say(7)
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("worker 7 ran 7 job(s) in ")
    assert line.endswith(": a~1: 3 done, 1 failed, 2 crashed; b~2: 0 done, 1 crashed")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="litemultistep.worker"):
        tally.say(7)  # nothing since: no line
    assert caplog.records == []
