"""The worker's state objects, alone."""

from __future__ import annotations

from litemultistep.worker import Pending, Schedule


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
