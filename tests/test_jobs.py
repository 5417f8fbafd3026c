"""apps/jobs.py: a request's job reports progress with an ETA and stops at its time limit or on disconnection."""

from __future__ import annotations

import time

import pytest

from apps.jobs import Job
from protect import Cancelled, Step


def test_job_reports_progress_with_eta_and_stops_at_its_limits():
    shown = []
    job = Job("protect", time_limit=0.2, progress=lambda value, desc: shown.append((value, desc)))
    job.start("protecting a (1/1)")
    job(Step(2, 4, None, 10.0))
    assert shown[-1] == ((2, 4), "protecting a (1/1): step 2/4, about 10 s left")
    time.sleep(0.25)
    with pytest.raises(Cancelled, match=r"time limit of 0 s per request \(while protecting a"):
        job(Step(3, 4, None, 15.0))
    gone = Job("generate", alive=lambda: False)
    with pytest.raises(Cancelled, match="disconnected or pressed Stop"):
        gone.start("generating")
    with pytest.raises(ValueError, match="time_limit"):
        Job("x", time_limit=0)
