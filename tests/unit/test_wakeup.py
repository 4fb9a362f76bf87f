"""The boot-time alarm a job process's fence sleeps on."""

from __future__ import annotations

import sys

import pytest

from litemultistep._wakeup import BoottimeAlarm
from litemultistep.db import boottime

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's (elsewhere the "
                                "fence naps instead)")


def test_the_alarm_wakes_at_its_moment_and_at_once_for_a_past_one():
    alarm = BoottimeAlarm.make()
    assert alarm is not None
    start = boottime()
    alarm.sleep_until(start + 0.2)
    assert boottime() >= start + 0.2
    before = boottime()
    alarm.sleep_until(before - 5.0)  # past: no sleep at all
    alarm.sleep_until(0.0)  # zero is a moment long past too, not "disarm"
    assert boottime() - before < 5.0
