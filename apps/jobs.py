"""One running request of the app: its time limit, its client's cancellation, and progress with an ETA.

A :class:`Job` is the ``on_step`` callback of :func:`protect.protect` and :func:`apps.generate.generate`. Before
each step it raises :class:`protect.Cancelled` when the request has run past its time limit or when its client
has gone (disconnected, or pressed Stop), so the work stops at the next step and its queue slot frees; otherwise
it reports the step and the time left to Gradio's progress bar.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from protect import Cancelled, Step

__all__ = ["Job", "Limits", "duration", "gradio_alive"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    """What one request may cost the server (``steerguard app`` flags of the same names).

    Args:
        max_seconds: a request whose estimated time (:mod:`apps.cost`) exceeds this is refused before it starts
            (None: no budget).
        time_limit: a running request is stopped at its next step after this many seconds (None: no limit).
        max_pixels: decoded pixels per request, all its images together, checked from the headers before any
            decoding (the memory bound: a 4096x4096 zlib bomb of 49 KB is refused, not decoded).
        max_files: images per request, and files per upload request.
        output_age: seconds after which protected files and Gradio's cached copies are deleted.
        max_pipelines: generation pipelines kept loaded at once.
        allow_hub: offer every generation model of ``models.txt`` (hub downloads) in the model picker, not just
            the demo models and the one the operator started the app with.
    """

    max_seconds: float | None = 120.0
    time_limit: float | None = 600.0
    max_pixels: int = 2048 * 2048
    max_files: int = 8
    output_age: float = 3600.0
    max_pipelines: int = 2
    allow_hub: bool = False

    def __post_init__(self) -> None:
        for name in ("max_seconds", "time_limit"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"{name} must be positive seconds or None, got {value!r}")
        for name in ("max_pixels", "max_files", "max_pipelines"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.output_age, int | float) and self.output_age > 0):
            raise ValueError(f"output_age must be positive seconds, got {self.output_age!r}")


def duration(seconds: float) -> str:
    """``seconds`` for people: "45 s", "3 min 20 s", "1 h 05 min"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def gradio_alive() -> Callable[[], bool]:
    """A check that the Gradio event running the calling function still has its client.

    Call it from the event's function (Gradio's context variables name the event). The check answers ``False``
    once Gradio has marked the event dead (its client disconnected) or no longer runs it (cancelled by a Stop
    button or ``/cancel``: Gradio frees the slot but cannot stop a worker thread; this lets the thread stop
    itself). Outside an event it always answers ``True``. It reads Gradio's queue (``blocks._queue``, tested
    with gradio 6.31): Gradio offers no public way for a running function to learn this.
    """
    from gradio.context import LocalContext

    event_id, blocks = LocalContext.event_id.get(None), LocalContext.blocks.get(None)
    queue = getattr(blocks, "_queue", None)
    if event_id is None or queue is None or not hasattr(queue, "active_jobs"):
        return lambda: True

    def alive() -> bool:
        for events in list(queue.active_jobs):
            for event in events or ():
                if getattr(event, "_id", None) == event_id:
                    return bool(getattr(event, "alive", True))
        return False

    return alive


class Job:
    """The limits and the progress report of one request (``label`` names it in messages).

    Args:
        time_limit: seconds the request may run (None: no limit); checked before every step.
        alive: answers ``False`` once the client has gone (:func:`gradio_alive`).
        progress: a ``gr.Progress`` (or any ``progress((done, total), desc=...)`` callable).
    """

    def __init__(
        self,
        label: str,
        *,
        time_limit: float | None = None,
        alive: Callable[[], bool] | None = None,
        progress: Callable[..., Any] | None = None,
    ) -> None:
        if time_limit is not None and not time_limit > 0:
            raise ValueError(f"time_limit must be positive seconds or None, got {time_limit!r}")
        self.label, self.time_limit, self.alive, self.progress = label, time_limit, alive, progress
        self.started = time.monotonic()
        self.task = label

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def check(self) -> None:
        """Raise :class:`protect.Cancelled` if the client has gone or the time limit has passed."""
        if self.alive is not None and not self.alive():
            raise Cancelled(f"{self.label}: cancelled (the client disconnected or pressed Stop)")
        if self.time_limit is not None and self.elapsed > self.time_limit:
            raise Cancelled(
                f"{self.label}: stopped at the server's time limit of {duration(self.time_limit)} per request "
                f"(while {self.task}); ask for fewer or smaller images or fewer steps"
            )

    def start(self, task: str, fraction: float = 0.0) -> None:
        """Check the limits, then show that ``task`` starts (``fraction`` of the request done)."""
        self.task = task
        self.check()
        if self.progress is not None:
            self.progress(fraction, desc=task)

    def __call__(self, step: Step) -> None:
        """The ``on_step`` callback: the limits, then "<task>: step i/n, about T left" in the progress bar."""
        self.check()
        if self.progress is not None:
            left = f", about {duration(step.eta)} left" if step.step else ""
            self.progress((step.step, step.total), desc=f"{self.task}: step {step.step}/{step.total}{left}")
