"""What the server tests share: a collector of one job's events from the scheduler thread."""

from __future__ import annotations

import threading

from tokensieve.serve.engine import Delta, Done, Failed


class Collector:
    """Events of one job, gathered from the scheduler thread."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.done = threading.Event()
        self.first = threading.Event()

    def __call__(self, event: object) -> None:
        self.events.append(event)
        self.first.set()
        if isinstance(event, (Done, Failed)):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Delta))

    @property
    def last(self) -> object:
        """The job's last event (it must have finished)."""
        assert self.done.wait(240), "the job did not finish"
        return self.events[-1]

    @property
    def end(self) -> Done:
        """The job's :class:`Done` (it must have finished without failing)."""
        last = self.last
        assert isinstance(last, Done), last
        return last
