"""Redis servers a test starts, freezes, kills and restarts itself (never the shared 6379 or 7000-7005).

``RedisServer`` is one ``redis-server`` on a free loopback port in a temp dir (optionally with
TLS and an ACL user); ``RedisClusterNodes`` is a 3-master + 3-replica cluster of them with a
short node timeout, so a killed master fails over in about two seconds. Every wait is bounded.
``tls_files`` makes a throwaway CA and a server certificate for 127.0.0.1 with openssl.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .conftest import skip_or_fail

START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port below 55536 whose cluster bus port (+10000) is free too (Redis Cluster needs both)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports for a cluster node")


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        skip_or_fail(f"{binary} is not installed (.ci/services installs it)")
    return path  # type: ignore[return-value]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def tls_files(directory: Path, name: str = "ca") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate (127.0.0.1) signed by it: (ca.crt, server.crt, server.key)."""
    openssl = _require("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / f"{name}.key", directory / f"{name}.crt"
    key, csr, crt, ext = (directory / f"{name}-server.{s}" for s in ("key", "csr", "crt", "ext"))
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca_crt, "-days", "1",
         "-subj", f"/CN=llm-executor test {name}"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial", "-out", crt,
         "-days", "1", "-extfile", ext],
    ):
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True, timeout=30)
    return ca_crt, crt, key


class RedisServer:
    """One redis-server of the test's own.

    Args:
        directory: where its files go.
        args: extra ``redis-server`` arguments.
        tls: (ca.crt, server.crt, server.key) to serve TLS only.
    """

    def __init__(self, directory: Path, *args: str, tls: tuple[Path, Path, Path] | None = None,
                 port: int | None = None) -> None:
        self.binary = _require("redis-server")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.args = list(args)
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [self.binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.directory), "--logfile", str(self.directory / f"redis-{self.port}.log")]
        if self.tls is None:
            cmd += ["--port", str(self.port)]
        else:
            ca, crt, key = self.tls
            cmd += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(crt),
                    "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        return cmd + self.args

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / f"redis-{self.port}.log")
                tail = log.read_text()[-2000:] if log.exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server on {self.port} did not start: {tail}")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """SIGKILL: the store is gone, with everything in it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen server must be able to die
            self.proc.kill()
            self.proc.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def stop(self) -> None:
        self.kill()
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisClusterNodes:
    """A Redis Cluster of the test's own: ``masters`` masters with one replica each.

    Args:
        directory: where the nodes' files go.
        masters: number of masters (each gets one replica).
        node_timeout_ms: ``cluster-node-timeout``: how long a master may not answer before its
            replica takes over.
    """

    def __init__(self, directory: Path, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        self.cli = _require("redis-cli")
        self.nodes = [RedisServer(directory / f"node{i}", "--cluster-enabled", "yes",
                                  "--cluster-config-file", "nodes.conf",
                                  "--cluster-node-timeout", str(node_timeout_ms),
                                  # A replica that never finished its first sync cannot take over:
                                  # sync at once rather than after the default 5 s delay.
                                  "--repl-diskless-sync-delay", "0", port=free_cluster_port())
                      for i in range(2 * masters)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port},127.0.0.1:{self.nodes[1].port}"

    def start(self) -> RedisClusterNodes:
        for node in self.nodes:
            node.start()
        subprocess.run([self.cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
                        "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self.wait_ok()
        return self

    def cli_call(self, port: int, *args: str) -> str:
        done = subprocess.run([self.cli, "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True,
                              text=True, timeout=10, check=False)
        return done.stdout

    def wait_ok(self, timeout_s: float = 30.0, without: int | None = None) -> None:
        """Wait until every running node (but ``without``) reports cluster_state:ok and every replica is in sync."""
        deadline = time.monotonic() + timeout_s
        while True:
            ports = [n.port for n in self.nodes if n.proc is not None and n.proc.poll() is None and n.port != without]
            replication = [self.cli_call(p, "info", "replication") for p in ports]
            if (all("cluster_state:ok" in self.cli_call(p, "cluster", "info") for p in ports)
                    and all("master_link_status:up" in r for r in replication if "role:slave" in r)):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def master_of(self, key: str, other_than: RedisServer | None = None, timeout_s: float = 10.0) -> RedisServer:
        """The node that serves ``key``'s slot now, in the view of the running nodes.

        Right after a failover one node's view may still lack the promotion (it travels by
        gossip): the old master is flagged as failed and the new one not yet a master there. So
        every running node is asked, until one names a master (other than ``other_than``: the
        caller waits for the slot to move) or ``timeout_s`` passes.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            alive = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
            slot = int(self.cli_call(alive[0].port, "cluster", "keyslot", key).strip())
            for node in alive:
                found = self._master_in_view(node.port, slot)
                if found is not None and found is not other_than:
                    return found
            if time.monotonic() > deadline:
                raise RuntimeError(f"no master serves the slot of {key!r} in any node's view after {timeout_s}s")
            time.sleep(0.05)

    def _master_in_view(self, port: int, slot: int) -> RedisServer | None:
        for line in self.cli_call(port, "cluster", "nodes").splitlines():
            fields = line.split()
            if len(fields) < 3 or "master" not in fields[2] or "fail" in fields[2]:
                continue
            for span in fields[8:]:
                lo, _, hi = span.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    served = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                    return next((n for n in self.nodes if n.port == served), None)
        return None

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterNodes:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
