"""Fixtures of the distributed tests."""

import pytest

from tests.distributed.jobs import kill_all


@pytest.fixture
def jobs():
    """A list for :class:`tests.distributed.jobs.Job` (``jobs=jobs``): whatever is still running is killed after the test."""
    started = []
    yield started
    kill_all(started)
