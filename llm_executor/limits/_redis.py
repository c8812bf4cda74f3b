"""Redis backend: limits shared by every process on every host that reaches one Redis.

Keys, under ``{namespace}:{provider}[:{key hash}]``:
  ``:rate``  pyrate-limiter's RedisBucket (sorted set of request stamps) for QPS/RPM;
  ``:tpm``   a hash of tokens per 1 s bucket, changed only by the Lua scripts below (atomic);
  ``:slots`` a sorted set of in-flight holders scored by lease expiry (ms, Redis clock).
TPM and slot scripts read Redis ``TIME``, so hosts with skewed clocks agree. The request bucket
takes its stamps from the client (pyrate's script has no clock of its own); we stamp with the
wall clock corrected by the offset to Redis ``TIME``, measured at start and on every leak.
Imports: ``_backend``, pyrate-limiter, redis-py (the ``redis`` extra).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pyrate_limiter import Rate, RedisBucket
from pyrate_limiter.buckets.redis_bucket import LuaScript

from ._backend import TPM_BUCKET_MS, TPM_WINDOW_BUCKETS, BackendLostError, RequestGate

__all__ = ["RedisBackend"]

T = TypeVar("T")

# Connect and read timeouts: a lost Redis must fail a request in about a second, not hang it.
SOCKET_CONNECT_TIMEOUT_S = 1.0
SOCKET_TIMEOUT_S = 2.0

_CLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Shared by both TPM scripts: drop dead buckets, return the live ones and their sum.
_TPM_LIVE = _CLOCK + """
local bucket_ms = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local current = math.floor(now / bucket_ms)
local since = current - (window - 1)
local flat = redis.call('HGETALL', KEYS[1])
local live, order, used = {}, {}, 0
for i = 1, #flat, 2 do
  local b, v = tonumber(flat[i]), tonumber(flat[i + 1])
  if b < since then
    redis.call('HDEL', KEYS[1], flat[i])
  else
    live[b] = v
    order[#order + 1] = b
    used = used + v
  end
end
table.sort(order)
"""

# ARGV: bucket_ms, window, estimate, limit -> 0 (reserved) or ms to wait (see tpm_decide).
TPM_RESERVE = _TPM_LIVE + """
local estimate, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
if used + estimate <= limit then
  redis.call('HINCRBY', KEYS[1], current, estimate)
  redis.call('PEXPIRE', KEYS[1], (window + 1) * bucket_ms)
  return 0
end
local freed = 0
for _, b in ipairs(order) do
  freed = freed + live[b]
  if used - freed + estimate <= limit then
    return math.max(1, (b + window) * bucket_ms - now)
  end
end
return window * bucket_ms
"""

# ARGV: bucket_ms, window, delta -> tokens in the window after the change (see tpm_refund_plan).
TPM_ADJUST = _TPM_LIVE + """
local delta = tonumber(ARGV[3])
if delta > 0 then
  redis.call('HINCRBY', KEYS[1], current, delta)
  redis.call('PEXPIRE', KEYS[1], (window + 1) * bucket_ms)
  return used + delta
end
local refund = -delta
for _, b in ipairs(order) do
  if refund <= 0 then break end
  local take = math.min(refund, math.max(0, live[b]))
  if take > 0 then
    redis.call('HSET', KEYS[1], b, live[b] - take)
    refund = refund - take
    used = used - take
  end
end
return used
"""

# ARGV: holder, cap, ttl_ms -> 1 (taken) or 0 (all held). Expired leases are reclaimed first.
SLOT_ACQUIRE = _CLOCK + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ttl = tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  if redis.call('PTTL', KEYS[1]) < 2 * ttl then redis.call('PEXPIRE', KEYS[1], 2 * ttl) end
  return 1
end
return 0
"""

# ARGV: ttl_ms, holder... -> the holders whose lease had expired (lost; another may hold it now).
SLOT_RENEW = _CLOCK + """
local ttl = tonumber(ARGV[1])
local lost = {}
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i])
  else
    redis.call('ZREM', KEYS[1], ARGV[i])
    lost[#lost + 1] = ARGV[i]
  end
end
if redis.call('PTTL', KEYS[1]) < 2 * ttl then redis.call('PEXPIRE', KEYS[1], 2 * ttl) end
return lost
"""

# pyrate's script counts a window as [now - interval, now], with ``now`` stamped by the client.
# Stamps of several processes reach Redis out of order (a process is preempted between its
# stamp and its EVALSHA), so entries stamped a little after ours were not counted and 4
# processes x 8 threads admitted 23 starts for QPS=20 in a few ms. Counting up to +inf
# (as pyrate's SQLite query does) counts every entry that is already in.
_PUT_ITEM_BOUNDED = "redis.call('ZCOUNT', bucket, window_start, now)"
if _PUT_ITEM_BOUNDED not in LuaScript.PUT_ITEM:  # pragma: no cover - a pyrate-limiter upgrade changed it
    raise ImportError("pyrate_limiter's RedisBucket script changed; review llm_executor.limits._redis")
PUT_ITEM = LuaScript.PUT_ITEM.replace(_PUT_ITEM_BOUNDED, "redis.call('ZCOUNT', bucket, window_start, '+inf')")

SLOT_COUNT = _CLOCK + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""


class RedisBackend:
    """Shared limits of one lane in Redis.

    Args:
        url: ``redis://[user:password@]host:port/db`` (also ``rediss://``, ``unix://``).
        lane_key: the namespaced lane key.
        rates: QPS/RPM rates (may be empty).
        client: an existing ``redis.Redis`` (tests); None = one from ``url``.

    Raises:
        BackendLostError: Redis does not answer.
    """

    def __init__(self, url: str, lane_key: str, rates: list[Rate], *, client: Any = None) -> None:
        import redis

        self.url = url
        self.lane_key = lane_key
        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        self._no_script = redis.exceptions.NoScriptError
        self._client = client if client is not None else redis.Redis.from_url(
            url, socket_connect_timeout=SOCKET_CONNECT_TIMEOUT_S, socket_timeout=SOCKET_TIMEOUT_S)
        self._lock = threading.Lock()  # guards the bucket's last verdict and the clock offset
        self._offset_ms = 0
        self._tpm_key, self._slot_key = lane_key + ":tpm", lane_key + ":slots"
        self._tpm_reserve = self._client.register_script(TPM_RESERVE)
        self._tpm_adjust = self._client.register_script(TPM_ADJUST)
        self._slot_acquire = self._client.register_script(SLOT_ACQUIRE)
        self._slot_renew = self._client.register_script(SLOT_RENEW)
        self._slot_count = self._client.register_script(SLOT_COUNT)
        self._bucket: RedisBucket | None = None
        self._gate: RequestGate | None = None
        self._rate_ttl_ms = 2 * max((r.interval for r in rates), default=0) + 10_000

        def connect() -> None:
            self._client.ping()
            self._sync_clock()
            if rates:
                script_hash = self._client.script_load(PUT_ITEM)
                self._bucket = RedisBucket(rates, self._client, lane_key + ":rate", script_hash)
                self._gate = RequestGate(lane_key, self._bucket, self._now_ms, on_leak=self._on_leak)

        self._call(connect)

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except self._errors as exc:
            raise BackendLostError(type(exc).__name__) from exc

    # -- clock ---------------------------------------------------------------------------------
    def _sync_clock(self) -> None:
        """Offset from our wall clock to Redis TIME, from the fastest of three round trips."""
        best: tuple[float, int] | None = None
        for _ in range(3):
            t0 = time.time_ns()
            seconds, micros = self._client.time()
            t1 = time.time_ns()
            offset = (int(seconds) * 1000 + int(micros) // 1000) - (t0 + t1) // 2_000_000
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, offset)
        assert best is not None
        self._offset_ms = best[1]

    def _now_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self._offset_ms

    def _on_leak(self, now_ms: int) -> None:
        # Refresh the key's expiry so an abandoned namespace disappears, and the clock offset.
        self._client.pexpire(self.lane_key + ":rate", self._rate_ttl_ms)
        self._sync_clock()

    # -- QPS / RPM -----------------------------------------------------------------------------
    def _with_gate(self, fn: Callable[[RequestGate], T]) -> T:
        assert self._gate is not None and self._bucket is not None
        with self._lock:
            try:
                return self._call(lambda: fn(self._gate))  # type: ignore[arg-type]
            except self._no_script:
                # Redis restarted (or SCRIPT FLUSH): load pyrate's script again, once.
                self._bucket.script_hash = self._call(lambda: self._client.script_load(PUT_ITEM))
                return self._call(lambda: fn(self._gate))  # type: ignore[arg-type]

    def try_acquire_request(self) -> float:
        return 0.0 if self._gate is None else self._with_gate(lambda gate: gate.try_acquire())

    def request_wait_s(self) -> float:
        return 0.0 if self._gate is None else self._with_gate(lambda gate: gate.wait_s())

    # -- TPM -----------------------------------------------------------------------------------
    def try_reserve_tokens(self, estimate: int, limit: int) -> float:
        wait_ms = self._call(lambda: self._tpm_reserve(
            keys=[self._tpm_key], args=[TPM_BUCKET_MS, TPM_WINDOW_BUCKETS, estimate, limit]))
        return int(wait_ms) / 1000.0

    def adjust_tokens(self, delta: int) -> None:
        if delta:
            self._call(lambda: self._tpm_adjust(keys=[self._tpm_key],
                                                args=[TPM_BUCKET_MS, TPM_WINDOW_BUCKETS, delta]))

    def tpm_used(self) -> int:
        """Tokens counted in the window now."""
        return int(self._call(lambda: self._tpm_adjust(keys=[self._tpm_key],
                                                       args=[TPM_BUCKET_MS, TPM_WINDOW_BUCKETS, 0])))

    # -- slots ---------------------------------------------------------------------------------
    def try_acquire_slot(self, holder: str, cap: int, ttl_ms: int) -> bool:
        return bool(self._call(lambda: self._slot_acquire(keys=[self._slot_key], args=[holder, cap, ttl_ms])))

    def renew_slots(self, holders: Iterable[str], ttl_ms: int) -> set[str]:
        wanted = list(holders)
        if not wanted:
            return set()
        lost = self._call(lambda: self._slot_renew(keys=[self._slot_key], args=[ttl_ms, *wanted]))
        return {h.decode() if isinstance(h, bytes) else str(h) for h in lost}

    def release_slot(self, holder: str) -> None:
        self._call(lambda: self._client.zrem(self._slot_key, holder))

    def slots_held(self) -> int:
        """Unexpired leases now (for tests and stats)."""
        return int(self._call(lambda: self._slot_count(keys=[self._slot_key])))

    def ping(self) -> None:
        self._call(self._client.ping)

    def close(self) -> None:
        self._client.close()
