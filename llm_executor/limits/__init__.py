"""Limits of one provider lane: QPS/RPM, a TPM budget and an in-flight cap, local or shared.

``make_lane_limiter`` picks the store from ``ExecutorConfig.rate_backend``:

* ``memory``: this process only (pyrate-limiter's InMemoryBucket). N processes get N x the limit.
* ``sqlite:///path``: every process on one host (pyrate's SQLiteBucket with its file lock).
* ``redis://host:port/db``: every process on every host (pyrate's RedisBucket + Lua scripts).

Shared keys are ``{namespace}:{provider}`` plus a short sha256 of the provider's API key when
one is set (never the key), so two teams sharing a Redis do not share limits by accident.

``LaneLimiter`` never sleeps inside a store or inside pyrate-limiter: each backend answers
"taken" or "wait this long", and the limiter waits on the executor's ``stopping`` Event, so a
cancelling shutdown or a request deadline ends every wait at once.

QPS is enforced as "at most floor(QPS) starts in any window of 1 s (+ a safety margin)"; a QPS
below 1 becomes one start per 1/QPS seconds. The margin absorbs the gap between the token and
the moment the request reaches the wire.

A shared store lost mid-run is handled by ``ExecutorConfig.backend_failure``: ``fail_closed``
fails the request with ``ProviderUnavailableError``; ``local`` logs one WARNING, carries on with
limits of this process only, and goes back to the shared store once it answers again.
Imports: ``errors``, ``config``, pyrate-limiter; redis-py only when a redis URL is configured.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from ..config import ExecutorConfig, ProviderConfig, mask_url
from ..errors import (
    ConfigError,
    DeadlineExceededError,
    ExecutorShutdownError,
    InvalidRequestError,
    ProviderUnavailableError,
)
from ._backend import (
    SLOT_POLL_S,
    WINDOW_MARGIN_MS,
    Backend,
    BackendLostError,
    MemoryBackend,
    build_rates,
)

__all__ = [
    "DEFAULT_LEASE_TTL_S",
    "RECOVERY_CHECK_S",
    "WINDOW_MARGIN_MS",
    "LaneLimiter",
    "build_rates",
    "estimate_tokens",
    "lane_key",
    "make_lane_limiter",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# A slot's lease outlives a hung or killed holder by at most this long; the holder renews it
# every third of it while its call runs.
DEFAULT_LEASE_TTL_S = 30.0

# While running on local limits after losing the shared store, ask the store again this often.
RECOVERY_CHECK_S = 3.0

ReleaseSlot = Callable[[], None]


def lane_key(namespace: str, provider: str, api_key: str | None) -> str:
    """The shared-store key of a lane: ``{namespace}:{provider}[:{sha256(api_key)[:12]}]``."""
    key = f"{namespace}:{provider}"
    if api_key:
        key += ":" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:12]
    return key


def estimate_tokens(prompt: str, system: str | None, max_output_tokens: int | None) -> int:
    """A request's token estimate for TPM budgets: characters / 4 plus the output cap."""
    chars = len(prompt) + (len(system) if system else 0)
    return max(1, chars // 4) + (max_output_tokens or 0)


class LaneLimiter:
    """QPS/RPM, TPM and global in-flight gate of one lane.

    Args:
        name: the lane (provider) name.
        cfg: the lane's ProviderConfig.
        backend: the store; None = this process's memory.
        backend_failure: "fail_closed" or "local" (see the module docstring).
        lease_ttl_s: lease of a global in-flight slot (shared stores).
        clock_s: monotonic clock in seconds for deadlines (injectable for tests).
    """

    def __init__(
        self,
        name: str,
        cfg: ProviderConfig,
        *,
        backend: Backend | None = None,
        backend_failure: str = "fail_closed",
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        clock_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self._clock_s = clock_s
        self._rates = build_rates(cfg)
        self._shared: Backend = backend if backend is not None else MemoryBackend(name, self._rates)
        self._is_shared = backend is not None and not isinstance(backend, MemoryBackend)
        self._backend_failure = backend_failure
        self._lease_ttl_ms = max(1, int(lease_ttl_s * 1000))
        self._holder_prefix = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._local: MemoryBackend | None = None  # guarded by _lock: set while the shared store is lost
        self._next_probe_s = 0.0  # guarded by _lock
        self._leases: dict[str, Backend] = {}  # guarded by _lock: held slots and their store
        self._closed = threading.Event()
        self._renewer: threading.Thread | None = None  # guarded by _lock

    # -- properties --------------------------------------------------------------------------
    @property
    def is_limited(self) -> bool:
        """True when the lane has a QPS, RPM or TPM limit or a global in-flight cap."""
        return bool(self._rates) or self.cfg.tpm is not None or self.cfg.global_max_parallel is not None

    @property
    def is_degraded(self) -> bool:
        """True while a lost shared store is replaced by local limits."""
        with self._lock:
            return self._local is not None

    @property
    def backend_url(self) -> str:
        """The store's URL with any password masked."""
        return mask_url(self._shared.url)

    # -- failure policy ------------------------------------------------------------------------
    def _current(self) -> Backend:
        with self._lock:
            if self._local is None:
                return self._shared
            if self._clock_s() < self._next_probe_s:
                return self._local
            self._next_probe_s = self._clock_s() + RECOVERY_CHECK_S
        try:
            self._shared.ping()
        except BackendLostError:
            return self._local
        with self._lock:
            self._local = None
        log.warning("rate backend %s answers again; %s uses shared limits again", self.backend_url, self.name,
                    extra={"provider": self.name})
        return self._shared

    def _lost(self, exc: BackendLostError) -> Backend:
        if self._backend_failure != "local":
            raise ProviderUnavailableError(
                f"rate backend {self.backend_url} is unreachable ({exc}); {self.name} fails closed "
                f"(LLM_EXECUTOR_BACKEND_FAILURE=fail_closed)", provider=self.name, retryable=False,
            ) from exc
        with self._lock:
            if self._local is None:
                self._local = MemoryBackend(self.name, self._rates)
                self._next_probe_s = self._clock_s() + RECOVERY_CHECK_S
                log.warning("rate backend %s is unreachable (%s); %s falls back to limits of this process "
                            "until it answers", self.backend_url, exc, self.name,
                            extra={"provider": self.name})
            return self._local

    def _run(self, op: Callable[[Backend], T]) -> T:
        backend = self._current()
        try:
            return op(backend)
        except BackendLostError as exc:
            if backend is not self._shared:
                raise  # pragma: no cover - the memory backend never loses its store
            return op(self._lost(exc))

    # -- waiting -------------------------------------------------------------------------------
    def _wait(self, attempt: Callable[[], float], what: str, stopping: threading.Event,
              deadline_monotonic: float | None) -> None:
        """Call ``attempt`` until it returns 0; between calls wait on ``stopping``."""
        while True:
            if stopping.is_set():
                raise ExecutorShutdownError(f"executor shut down while {self.name} waited for {what}")
            wait_s = attempt()
            if wait_s <= 0.0:
                return
            if deadline_monotonic is not None and self._clock_s() + wait_s > deadline_monotonic:
                raise DeadlineExceededError(
                    f"request deadline passes before {self.name}'s {what} is free (next in {wait_s:.3f}s)",
                    provider=self.name,
                )
            stopping.wait(wait_s)

    # -- QPS / RPM -----------------------------------------------------------------------------
    def try_acquire(self) -> float:
        """Take a request token if one is free now.

        Returns:
            0.0 when a token was taken, else the seconds to wait before trying again.
        """
        if not self._rates:
            return 0.0
        return self._run(lambda b: b.try_acquire_request())

    def acquire(self, stopping: threading.Event, deadline_monotonic: float | None = None) -> None:
        """Take one request token (QPS and RPM) for one attempt, waiting as the rates require.

        Raises:
            ExecutorShutdownError: ``stopping`` was set while waiting.
            DeadlineExceededError: the token would come after ``deadline_monotonic``.
            ProviderUnavailableError: the shared store is lost and the policy is fail_closed.
        """
        if self._rates:
            self._wait(self.try_acquire, "rate token", stopping, deadline_monotonic)

    def expected_wait_s(self) -> float:
        """Seconds until a request token would be free (0 when one is free now); takes none.

        A lost store (fail_closed) reports an hour, so "auto" routing steers away from the lane.
        """
        if not self._rates:
            return 0.0
        try:
            return self._run(lambda b: b.request_wait_s())
        except ProviderUnavailableError:
            return 3600.0

    # -- TPM -----------------------------------------------------------------------------------
    def check_estimate(self, estimate: int) -> None:
        """Reject a request that could never fit in the TPM budget.

        Raises:
            InvalidRequestError: ``estimate`` exceeds the lane's TPM.
        """
        tpm = self.cfg.tpm
        if tpm is not None and estimate > tpm:
            raise InvalidRequestError(
                f"request needs ~{estimate} tokens, more than LLM_EXECUTOR_{self.name.upper()}_TPM={tpm}; "
                "it could never run", field="prompt",
            )

    def reserve_tokens(self, estimate: int, stopping: threading.Event,
                       deadline_monotonic: float | None = None) -> None:
        """Reserve ``estimate`` tokens of the TPM budget before a call (no-op without a TPM).

        Raises:
            InvalidRequestError: ``estimate`` exceeds the TPM (it would wait forever).
            ExecutorShutdownError, DeadlineExceededError, ProviderUnavailableError: as ``acquire``.
        """
        tpm = self.cfg.tpm
        if tpm is None:
            return
        self.check_estimate(estimate)
        amount = max(0, int(estimate))
        self._wait(lambda: self._run(lambda b: b.try_reserve_tokens(amount, tpm)), "token budget",
                   stopping, deadline_monotonic)

    def settle_tokens(self, reserved: int, actual: int | None) -> None:
        """Reconcile a reservation with the provider's reported usage.

        Args:
            reserved: what ``reserve_tokens`` took for this call.
            actual: the provider's total tokens; None keeps the estimate.

        A debit is never refused (the tokens are spent); a lost store under fail_closed is
        logged, not raised: the call has already succeeded.
        """
        if self.cfg.tpm is None or actual is None or actual == reserved:
            return
        delta = int(actual) - int(reserved)
        try:
            self._run(lambda b: b.adjust_tokens(delta))
        except ProviderUnavailableError as exc:
            log.warning("%s: token settlement of %+d not recorded: %s", self.name, delta, exc,
                        extra={"provider": self.name})

    def tpm_used(self) -> int | None:
        """Tokens counted in the lane's TPM window now (None without a TPM limit)."""
        if self.cfg.tpm is None:
            return None
        return self._run(lambda b: b.tpm_used())

    # -- global in-flight slots ----------------------------------------------------------------
    def acquire_slot(self, stopping: threading.Event,
                     deadline_monotonic: float | None = None) -> ReleaseSlot | None:
        """Take one of the lane's GLOBAL_MAX_PARALLEL in-flight slots (across processes).

        Returns:
            None when the lane has no global cap, else a callable that gives the slot back
            (idempotent; call it in ``finally``).

        Raises:
            ExecutorShutdownError, DeadlineExceededError, ProviderUnavailableError: as ``acquire``.
        """
        cap = self.cfg.global_max_parallel
        if cap is None:
            return None
        holder = f"{self._holder_prefix}:{uuid.uuid4().hex[:12]}"
        taken: list[Backend] = []

        def attempt() -> float:
            def take(backend: Backend) -> float:
                if backend.try_acquire_slot(holder, cap, self._lease_ttl_ms):
                    taken.append(backend)
                    return 0.0
                # Another process's release cannot wake us; look again shortly (or at the deadline).
                return SLOT_POLL_S

            return self._run(take)

        self._wait_slot(attempt, stopping, deadline_monotonic)
        backend = taken[0]
        with self._lock:
            self._leases[holder] = backend
            if backend is self._shared and self._is_shared:
                self._start_renewer()
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._lock:
                self._leases.pop(holder, None)
            try:
                backend.release_slot(holder)
            except BackendLostError:
                pass  # the lease expires on its own within the TTL
        return release

    def slots_held(self) -> int | None:
        """Global in-flight slots held now by every process (None without a global cap)."""
        if self.cfg.global_max_parallel is None:
            return None
        return self._run(lambda b: b.slots_held())

    def _wait_slot(self, attempt: Callable[[], float], stopping: threading.Event,
                   deadline_monotonic: float | None) -> None:
        while True:
            if stopping.is_set():
                raise ExecutorShutdownError(f"executor shut down while {self.name} waited for a global slot")
            wait_s = attempt()
            if wait_s <= 0.0:
                return
            if deadline_monotonic is not None:
                remaining_s = deadline_monotonic - self._clock_s()
                if remaining_s <= 0:
                    raise DeadlineExceededError(
                        f"request deadline passed while {self.name} waited for one of its "
                        f"{self.cfg.global_max_parallel} global in-flight slots", provider=self.name)
                wait_s = min(wait_s, remaining_s)
            stopping.wait(wait_s)

    def _start_renewer(self) -> None:
        """Start the lease renewer (caller holds _lock)."""
        if self._renewer is None and not self._closed.is_set():
            self._renewer = threading.Thread(target=self._renew_leases, daemon=True,
                                             name=f"llm-executor-{self.name}-leases")
            self._renewer.start()

    def _renew_leases(self) -> None:
        while not self._closed.wait(self._lease_ttl_ms / 3000.0):
            with self._lock:
                held = [h for h, b in self._leases.items() if b is self._shared]
            if not held:
                continue
            try:
                lost = self._shared.renew_slots(held, self._lease_ttl_ms)
            except BackendLostError as exc:
                log.debug("%s: lease renewal failed: %s", self.name, exc)
                continue
            for holder in lost:
                log.warning("%s: a global in-flight slot expired before its call ended (stalled > %.1fs); "
                            "the cap may be exceeded by one until it ends", self.name,
                            self._lease_ttl_ms / 1000.0, extra={"provider": self.name})
                with self._lock:
                    self._leases.pop(holder, None)

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the lease renewer, give back held slots and close the store's connections."""
        self._closed.set()
        with self._lock:
            renewer, self._renewer = self._renewer, None
            leases, self._leases = dict(self._leases), {}
        if renewer is not None:
            renewer.join(timeout=5)
        for holder, backend in leases.items():
            try:
                backend.release_slot(holder)
            except BackendLostError:
                pass
        self._shared.close()


def make_lane_limiter(name: str, pcfg: ProviderConfig, ecfg: ExecutorConfig, *,
                      lease_ttl_s: float | None = None) -> LaneLimiter:
    """The limiter of lane ``name`` on the store ``ecfg.rate_backend`` names.

    Args:
        name: the provider (lane) name.
        pcfg: its ProviderConfig (qps, rpm, tpm, global_max_parallel, api_key).
        ecfg: the ExecutorConfig (rate_backend, namespace, backend_failure).
        lease_ttl_s: lease of a global in-flight slot; None takes ``ecfg.lease_ttl_s`` when the
            config has one, else ``DEFAULT_LEASE_TTL_S`` as it is at call time.

    Raises:
        ConfigError: the store is unreachable at start, or redis-py is missing for a redis URL;
            the message names the URL with its password masked.
    """
    if lease_ttl_s is None:
        # The Executor builds its limiters without a TTL argument; reading the config (when it
        # has the field) and the module default here, at call time, is what lets a deployment
        # (or a multi-process test) shorten the lease without touching the executor.
        lease_ttl_s = getattr(ecfg, "lease_ttl_s", None) or DEFAULT_LEASE_TTL_S
    url = ecfg.rate_backend
    rates = build_rates(pcfg)
    key = lane_key(ecfg.namespace, name, pcfg.api_key)
    backend: Backend | None = None
    try:
        if url.startswith("sqlite:///"):
            from ._sqlite import SQLiteBackend

            backend = SQLiteBackend(url, key, rates)
        elif url != "memory":
            try:
                from ._redis import RedisBackend
            except ImportError:
                raise ConfigError(f"LLM_EXECUTOR_RATE_BACKEND={mask_url(url)!r}: a redis backend needs "
                                  "redis-py (pip install 'llm-executor[redis]')") from None
            backend = RedisBackend(url, key, rates)
    except BackendLostError as exc:
        raise ConfigError(f"LLM_EXECUTOR_RATE_BACKEND={mask_url(url)!r}: the rate backend is unreachable "
                          f"({exc}); expected a reachable store") from None
    except ImportError as exc:  # filelock for sqlite
        raise ConfigError(f"LLM_EXECUTOR_RATE_BACKEND={mask_url(url)!r}: {exc}") from None
    return LaneLimiter(name, pcfg, backend=backend, backend_failure=ecfg.backend_failure,
                       lease_ttl_s=lease_ttl_s)
