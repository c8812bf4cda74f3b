"""pytest plugin (entry point ``pytest11: llm_executor``): the ``llm_emulator`` fixture.

Installed with the package, so any test can ask for it::

    def test_my_pipeline_keeps_limits(llm_emulator):
        cfg = ExecutorConfig(providers={"openai": ProviderConfig(
            base_url=llm_emulator.url("openai"), api_key="test", max_parallel=2, qps=5)})
        with Executor(cfg) as ex:
            run_my_pipeline(ex)
        assert llm_emulator.stats("openai").max_concurrency <= 2

The fixture starts a fresh ``Emulator`` (no limits, no faults, seed 0) on a free port and stops
it after the test. For limits or faults, mark the test::

    @pytest.mark.llm_emulator(providers={"openai": ProviderSim(rps=2, fault_rate=0.2)}, seed=7)
    def test_retries(llm_emulator): ...

or build your own: ``with Emulator(...) as emu:``. This module imports nothing heavy at load
time: pytest loads it in every session of every project that installs llm_executor.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .emulator import Emulator

__all__ = ["llm_emulator", "pytest_configure"]


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``llm_emulator`` marker (so ``--strict-markers`` accepts it)."""
    config.addinivalue_line(
        "markers",
        "llm_emulator(providers=None, seed=0): settings of the llm_emulator fixture's Emulator",
    )


@pytest.fixture
def llm_emulator(request: pytest.FixtureRequest) -> Iterator[Emulator]:
    """A started ``llm_executor.testing.Emulator``, stopped after the test.

    Settings come from the test's ``@pytest.mark.llm_emulator(providers=..., seed=...)``, if any.
    """
    from .emulator import Emulator

    marker = request.node.get_closest_marker("llm_emulator")
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    with Emulator(**kwargs) as emu:
        yield emu
