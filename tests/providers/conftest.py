"""Fixtures of the adapter tests.

``responses`` replaces the transport of every ``requests`` session, so no test reaches the
network and none sleeps.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import responses


@pytest.fixture
def wire() -> Iterator[responses.RequestsMock]:
    """A fake wire; any unregistered URL raises ConnectionError instead of reaching the network."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock

