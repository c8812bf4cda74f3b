"""The life of a request inside an Executor, one idea per module.

* ``request``: one accepted request — its Future, its one settle authority, its log line.
* ``lane``: one provider's lane — bounded heap, admission, worker accounting, the 429 pause.
* ``runner``: the worker loop and the attempt runner — retries (tenacity), repairs, the holds
  of an attempt (slot, TPM reservation, rate token), fallback hand-off.
* ``reaper``: fails requests at their deadline, queued or running.
* ``routing``: provider "auto" and fallback capability checks, from memory only.
* ``engine``: lanes, admission, worker start-up, shutdown, fork; owned by ``Executor``.

Arrows run from ``llm_executor.executor`` (the facade) down into this package, and inside it
from ``engine`` down to ``request``; nothing here imports the facade.
"""
