"""What the server tests share: one torch thread per module, and a collector of one job's events from the scheduler
thread. A module takes the fixture by importing it (``from tests.unit.lab.serve_helpers import one_thread``)."""

from __future__ import annotations

import threading

import pytest
import torch

from tokensieve.serve.engine import Delta, Done, Failed


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny models gain nothing from two, the scheduler thread and the test share the machine's
    cores, and on a loaded machine every op of a two-thread pool waits for the second thread to be scheduled."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
