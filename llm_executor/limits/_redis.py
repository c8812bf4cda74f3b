"""Redis backend: limits shared by every process on every host that reaches one Redis or one Redis Cluster.

Keys of one lane share the hash tag ``{namespace:provider[:key hash]}``, so on a cluster they
live in one slot and every script below touches one node:
  ``{…}:rate``  a sorted set of request starts (score: start in ms on the Redis clock);
  ``{…}:tpm``   a hash of tokens per 1 s bucket;
  ``{…}:slots`` a sorted set of in-flight holders scored by lease expiry (ms, Redis clock);
  ``{…}:learned`` a hash of the lane's learned limits (version, changed_ms, data), see ``learn.py``.
Every script reads Redis ``TIME``: windows are computed on the store's clock, so hosts whose
clocks disagree, step or slew still count one window. The arithmetic is ``_backend.py``'s,
ported line for line (``admit_decide``, ``rate_wait_ms``, ``tpm_decide``, ``tpm_refund_plan``).

No lock is held across a call: a frozen Redis holds only the threads that are talking to it, each
for at most its socket timeout (redis-py's connection pool hands every thread its own connection).
Imports: ``_backend``, ``errors``, redis-py (the ``redis`` extra).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..config import REDIS_URL_OPTIONS, mask_url
from ..errors import ConfigError
from ._backend import (
    LEARNED_TTL_MS,
    SLOT_POLL_MS,
    TPM_BUCKET_MS,
    TPM_WINDOW_BUCKETS,
    Admitted,
    Ask,
    BackendLostError,
    LearnedRecord,
    Rate,
    Verdict,
)

__all__ = ["CLUSTER_SCHEMES", "RedisBackend", "build_client"]

T = TypeVar("T")

# Connect and read timeouts: a lost Redis must fail a request in about a second, not hang it.
# Every call is bounded by them: redis-py retries a broken connection once on a fresh one (a
# server that closed an idle connection), never a timeout.
SOCKET_CONNECT_TIMEOUT_S = 1.0
SOCKET_TIMEOUT_S = 2.0

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

# ARGV[1] is the clock: '' reads Redis TIME (always, outside tests); a number replaces it so the
# property suite can drive every backend through the same instants.
_CLOCK = """
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Keys expire once nothing in them can count any more; an expiry is only ever pushed later.
local function extend(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

# Live TPM buckets of KEYS[2] (dead ones deleted), their sum and ascending order.
_TPM_LIVE = """
local function tpm_live(key, now, bucket_ms, window)
  local since = math.floor(now / bucket_ms) - (window - 1)
  local flat = redis.call('HGETALL', key)
  local live, order, used = {}, {}, 0
  for i = 1, #flat, 2 do
    local b, v = tonumber(flat[i]), tonumber(flat[i + 1])
    if b < since then
      redis.call('HDEL', key, flat[i])
    else
      live[b] = v
      order[#order + 1] = b
      used = used + v
    end
  end
  table.sort(order)
  return live, order, used
end
"""

# KEYS: rate, tpm, slots. ARGV: now, member, max_wait_ms, tokens, tpm_limit|'', holder, cap|'',
# ttl_ms, bucket_ms, window_buckets, slot_poll_ms, n_rates, (limit, interval_ms) x n_rates.
# -> {taken 0|1, wait_ms, blocked_by, now}. Mirrors _backend.admit_decide and what MemoryBackend.admit takes.
ADMIT = _CLOCK + _TPM_LIVE + """
local cap, tpm_limit, tokens = ARGV[7], ARGV[5], tonumber(ARGV[4])
local ttl, bucket_ms, window = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
if cap ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  local held = redis.call('ZSCORE', KEYS[3], ARGV[6])
  if not held and redis.call('ZCARD', KEYS[3]) >= tonumber(cap) then
    return {0, tonumber(ARGV[11]), 'slot', now}
  end
end
if tpm_limit ~= '' then
  local live, order, used = tpm_live(KEYS[2], now, bucket_ms, window)
  local limit = tonumber(tpm_limit)
  if used + tokens > limit then
    local freed, wait = 0, window * bucket_ms
    for _, b in ipairs(order) do
      freed = freed + live[b]
      if used - freed + tokens <= limit then
        wait = math.max(1, (b + window) * bucket_ms - now)
        break
      end
    end
    return {0, wait, 'tokens', now}
  end
end
local n = tonumber(ARGV[12])
local start, longest = now, 0
if n > 0 then
  for i = 1, n do longest = math.max(longest, tonumber(ARGV[12 + 2 * i])) end
  redis.call('ZREM', KEYS[1], ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - longest))
  local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if newest[2] and tonumber(newest[2]) > start then start = tonumber(newest[2]) end
  for i = 1, n do
    local limit, interval = tonumber(ARGV[11 + 2 * i]), tonumber(ARGV[12 + 2 * i])
    local blocking = redis.call('ZRANGE', KEYS[1], -limit, -limit, 'WITHSCORES')
    if blocking[2] and tonumber(blocking[2]) + interval + 1 > start then
      start = tonumber(blocking[2]) + interval + 1
    end
  end
  if start - now > tonumber(ARGV[3]) then
    return {0, start - now, 'rate', now}
  end
end
if cap ~= '' then
  redis.call('ZADD', KEYS[3], now + ttl, ARGV[6])
  extend(KEYS[3], 2 * ttl)
end
if tpm_limit ~= '' and tokens > 0 then
  redis.call('HINCRBY', KEYS[2], math.floor(start / bucket_ms), tokens)
  extend(KEYS[2], (window + 1) * bucket_ms + (start - now))
end
if n > 0 then
  redis.call('ZADD', KEYS[1], start, ARGV[2])
  extend(KEYS[1], (start - now) + longest + 1000)
end
return {1, start - now, '', now}
"""

# KEYS: rate, tpm, slots. ARGV: now, ttl_ms, bucket_ms, window_buckets, longest_interval_ms,
# n_entries, (member, age_ms) x n, n_tpm, (age_ms, tokens) x n_tpm, holder... -> 1.
# Adds what a local fallback took while Redis was lost, placed on Redis's clock by its age.
RECORD = _CLOCK + """
local ttl, bucket_ms, window, longest = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local i = 6
local n = tonumber(ARGV[i])
local newest = now
for k = 1, n do
  local start = now - tonumber(ARGV[i + 2 * k])
  redis.call('ZADD', KEYS[1], start, ARGV[i + 2 * k - 1])
  if start > newest then newest = start end
end
if n > 0 then extend(KEYS[1], (newest - now) + longest + 1000) end
i = i + 2 * n + 1
local m = tonumber(ARGV[i])
for k = 1, m do
  local start = now - tonumber(ARGV[i + 2 * k - 1])
  redis.call('HINCRBY', KEYS[2], math.floor(start / bucket_ms), tonumber(ARGV[i + 2 * k]))
end
if m > 0 then extend(KEYS[2], (window + 1) * bucket_ms) end
i = i + 2 * m + 1
for k = i, #ARGV do
  redis.call('ZADD', KEYS[3], now + ttl, ARGV[k])
end
if #ARGV >= i then extend(KEYS[3], 2 * ttl) end
return 1
"""

# KEYS: tpm. ARGV: now, bucket_ms, window, delta -> tokens in the window after the change
# (see tpm_refund_plan).
TPM_ADJUST = _CLOCK + _TPM_LIVE + """
local bucket_ms, window, delta = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local live, order, used = tpm_live(KEYS[1], now, bucket_ms, window)
if delta > 0 then
  redis.call('HINCRBY', KEYS[1], math.floor(now / bucket_ms), delta)
  extend(KEYS[1], (window + 1) * bucket_ms)
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

# KEYS: slots. ARGV: now, ttl_ms, holder... -> the holders whose lease had expired (lost).
SLOT_RENEW = _CLOCK + """
local ttl = tonumber(ARGV[2])
local lost = {}
for i = 3, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i])
  else
    redis.call('ZREM', KEYS[1], ARGV[i])
    lost[#lost + 1] = ARGV[i]
  end
end
extend(KEYS[1], 2 * ttl)
return lost
"""

# KEYS: slots. ARGV: now -> unexpired leases.
SLOT_COUNT = _CLOCK + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""


# KEYS: learned (a hash: version, changed_ms, data). ARGV: now, expected_version, min_age_ms, data,
# ttl_ms -> {applied 0|1, version, changed_ms, data, now}. Mirrors _backend.learned_decide.
LEARNED = _CLOCK + """
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local changed = tonumber(redis.call('HGET', KEYS[1], 'changed_ms') or '0')
local expected, min_age = tonumber(ARGV[2]), tonumber(ARGV[3])
if version == expected and (version == 0 or now - changed >= min_age) then
  redis.call('HSET', KEYS[1], 'version', version + 1, 'changed_ms', now, 'data', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
  return {1, version + 1, now, ARGV[4], now}
end
return {0, version, changed, redis.call('HGET', KEYS[1], 'data') or '', now}
"""


def _split_cluster_url(url: str) -> tuple[str, list[tuple[str, int]]]:
    """``rediss+cluster://u:p@h1:7000,h2:7001/?q`` -> (``rediss://u:p@h1:7000/?q``, [(h1, 7000), (h2, 7001)])."""
    scheme, rest = url.split("://", 1)
    netloc, sep, tail = rest.partition("/")
    if not sep:
        netloc, sep, tail = rest.partition("?")
        tail = "?" + tail if sep else ""
    else:
        tail = "/" + tail
    userinfo, at, hosts = netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for part in hosts.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon:
            host, port = part.strip(), "6379"
        nodes.append((host.strip("[]"), int(port)))
    first = f"{nodes[0][0]}:{nodes[0][1]}"
    return f"{scheme.replace('+cluster', '')}://{userinfo}{at}{first}{tail}", nodes


def build_client(url: str) -> Any:
    """A redis-py client for ``url``: ``redis.Redis`` or, for ``redis+cluster://``, ``RedisCluster``.

    TLS (``rediss://``, ``rediss+cluster://``) takes its CA from ``?ssl_ca_certs=/path/ca.pem``
    (and a client certificate from ``ssl_certfile``/``ssl_keyfile``); ACL users and passwords
    come from the URL's user part. Timeouts default to SOCKET_CONNECT_TIMEOUT_S/SOCKET_TIMEOUT_S.

    Raises:
        ConfigError: the URL is malformed (the message masks the password).
    """
    # A broken connection is retried once on a fresh one; a timeout is not (it would double
    # the time a frozen Redis holds the caller).
    retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
    defaults: dict[str, Any] = {"socket_connect_timeout": SOCKET_CONNECT_TIMEOUT_S,
                                "socket_timeout": SOCKET_TIMEOUT_S}
    try:
        scheme = url.split("://", 1)[0]
        query_keys = {k for k, _ in parse_qsl(urlsplit(url).query)}
        if query_keys - REDIS_URL_OPTIONS:
            raise ValueError(f"unknown option(s) {sorted(query_keys - REDIS_URL_OPTIONS)}; expected some of "
                             f"{sorted(REDIS_URL_OPTIONS)}")
        if not scheme.startswith("rediss") and any(k.startswith("ssl_") for k in query_keys):
            raise ValueError("ssl_* options need a TLS scheme (rediss:// or rediss+cluster://)")
        if scheme not in CLUSTER_SCHEMES:
            return redis.Redis.from_url(url, retry=retry, **defaults)
        from redis import cluster, connection

        node: Any = cluster.ClusterNode  # redis-py leaves these two untyped
        parse_url: Any = connection.parse_url
        first, nodes = _split_cluster_url(url)
        parsed: dict[str, Any] = parse_url(first)
        if parsed.get("db", 0) != 0:
            raise ValueError("a cluster has only database 0")
        # rediss: becomes ssl=True (the nodes' clients pick their connection class from it).
        options = {k: v for k, v in parsed.items() if k not in ("host", "port", "db", "path", "connection_class")}
        return cluster.RedisCluster(startup_nodes=[node(h, p) for h, p in nodes], retry=retry,
                                    ssl=scheme.startswith("rediss"), **{**defaults, **options})
    except (ValueError, TypeError, redis.exceptions.RedisError) as exc:
        # redis-py's messages name the option, never the password; ours too. No chaining: the
        # original exception's arguments may hold the URL.
        message = str(exc).replace(url, mask_url(url))
        raise ConfigError(f"LLM_EXECUTOR_RATE_BACKEND={mask_url(url)!r}: {message}") from None


class RedisBackend:
    """Shared limits of one lane in Redis or Redis Cluster.

    Args:
        url: ``redis://[user:password@]host:port/db``, ``rediss://…?ssl_ca_certs=…``, ``unix://…``,
            ``redis+cluster://host:port[,host:port…]`` or ``rediss+cluster://…``.
        lane_key: the namespaced lane key (becomes the hash tag of the lane's keys).
        client: an existing redis-py client (tests); None = one from ``url``.
        now_ms: a clock for the scripts (the property suite); None = Redis ``TIME``.

    Raises:
        BackendLostError: Redis does not answer.
        ConfigError: the URL is malformed.
    """

    def __init__(self, url: str, lane_key: str, *, client: Any = None,
                 now_ms: Callable[[], int] | None = None) -> None:
        self.url = mask_url(url)  # the password lives in the client's connection settings only
        self.lane_key = lane_key
        self.is_cluster = url.split("://", 1)[0] in CLUSTER_SCHEMES
        self._now_arg: Callable[[], str] = (lambda: "") if now_ms is None else (lambda: str(now_ms()))
        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ClusterError,
            redis.exceptions.ResponseError, OSError)
        self._client = client if client is not None else build_client(url)
        tag = "{" + lane_key + "}"
        self._keys = [tag + ":rate", tag + ":tpm", tag + ":slots", tag + ":learned"]
        self._admit = self._client.register_script(ADMIT)
        self._record = self._client.register_script(RECORD)
        self._tpm_adjust = self._client.register_script(TPM_ADJUST)
        self._slot_renew = self._client.register_script(SLOT_RENEW)
        self._slot_count = self._client.register_script(SLOT_COUNT)
        self._learned = self._client.register_script(LEARNED)
        self._calls_lock = threading.Lock()
        self.round_trips = 0  # guarded by _calls_lock: calls to Redis (a script call is one)
        self.ping()

    def _call(self, fn: Callable[[], T]) -> T:
        with self._calls_lock:
            self.round_trips += 1
        try:
            return fn()
        except self._errors as exc:
            # The driver's message names the host and port, never the password; the chained
            # exception stays (for debugging) and carries no URL either.
            raise BackendLostError(f"{type(exc).__name__}: {exc}") from exc

    # -- admission ---------------------------------------------------------------------------
    def admit(self, ask: Ask) -> Verdict:
        args: list[Any] = [self._now_arg(), ask.member, ask.max_wait_ms, ask.tokens,
                           "" if ask.tpm_limit is None else ask.tpm_limit, ask.holder,
                           "" if ask.cap is None else ask.cap, ask.ttl_ms, TPM_BUCKET_MS, TPM_WINDOW_BUCKETS,
                           SLOT_POLL_MS, len(ask.rates)]
        for rate in ask.rates:
            args += [rate.limit, rate.interval_ms]
        taken, wait_ms, blocked_by, now_ms = self._call(lambda: self._admit(keys=self._keys[:3], args=args))
        return Verdict(bool(taken), int(wait_ms),
                       blocked_by.decode() if isinstance(blocked_by, bytes) else str(blocked_by), int(now_ms))

    def cancel(self, member: str) -> None:
        self._call(lambda: self._client.zrem(self._keys[0], member))

    def rate_wait_s(self, rates: Sequence[Rate]) -> float:
        return self.admit(Ask(rates=tuple(rates), max_wait_ms=-1)).wait_ms / 1000.0

    def record(self, usage: Admitted, rates: Sequence[Rate], ttl_ms: int) -> None:
        longest = max((r.interval_ms for r in rates), default=0)
        args: list[Any] = [self._now_arg(), ttl_ms, TPM_BUCKET_MS, TPM_WINDOW_BUCKETS, longest,
                           len(usage.rate_entries)]
        for member, age in usage.rate_entries:
            args += [member, age]
        args.append(len(usage.tpm_ages_ms))
        for age, tokens in usage.tpm_ages_ms:
            args += [age, tokens]
        args += list(usage.holders)
        self._call(lambda: self._record(keys=self._keys[:3], args=args))

    # -- TPM -----------------------------------------------------------------------------------
    def adjust_tokens(self, delta: int) -> None:
        if delta:
            self._call(lambda: self._tpm_adjust(keys=[self._keys[1]],
                                                args=[self._now_arg(), TPM_BUCKET_MS, TPM_WINDOW_BUCKETS, delta]))

    def tpm_used(self) -> int:
        """Tokens counted in the window now."""
        return int(self._call(lambda: self._tpm_adjust(
            keys=[self._keys[1]], args=[self._now_arg(), TPM_BUCKET_MS, TPM_WINDOW_BUCKETS, 0])))

    # -- slots ---------------------------------------------------------------------------------
    def renew_slots(self, holders: Iterable[str], ttl_ms: int) -> set[str]:
        wanted = list(holders)
        if not wanted:
            return set()
        lost = self._call(lambda: self._slot_renew(keys=[self._keys[2]], args=[self._now_arg(), ttl_ms, *wanted]))
        return {h.decode() if isinstance(h, bytes) else str(h) for h in lost}

    def release_slot(self, holder: str) -> None:
        self._call(lambda: self._client.zrem(self._keys[2], holder))

    def slots_held(self) -> int:
        """Unexpired leases now (for tests and stats)."""
        return int(self._call(lambda: self._slot_count(keys=[self._keys[2]], args=[self._now_arg()])))

    # -- learned limits --------------------------------------------------------------------------
    def learned(self, expected_version: int, data: str, min_age_ms: int) -> LearnedRecord:
        applied, version, changed, current, now = self._call(lambda: self._learned(
            keys=[self._keys[3]], args=[self._now_arg(), expected_version, min_age_ms, data, LEARNED_TTL_MS]))
        text = current.decode() if isinstance(current, bytes) else str(current)
        return LearnedRecord(int(version), int(changed), text, int(now), applied=bool(applied))

    def ping(self) -> None:
        # A cluster pings every node; what matters is the node that owns the lane's slot, so ask it.
        if self.is_cluster:
            self._call(lambda: self._client.exists(self._keys[0]))
        else:
            self._call(self._client.ping)

    def close(self) -> None:
        try:
            self._client.close()
        except self._errors:
            pass
