"""A real Redis Cluster for tests: 3 primaries and 3 replicas on free ports, and ways to hurt it.

``LocalCluster(tmp_dir).start()`` runs six ``redis-server --cluster-enabled yes``
(each a :class:`~tests.redis_server.RedisServer`, so each can be killed, frozen
and restarted), joins them with ``redis-cli --cluster create --cluster-replicas
1``, and returns once every node says ``cluster_state:ok``, agrees on the slot
map and every replica's link is up. ``cluster-node-timeout`` is short (1 s by
default) so a killed primary is replaced within a few seconds, and
``cluster-require-full-coverage no`` keeps the other shards serving meanwhile.
The methods block: from async tests call them through
``anyio.to_thread.run_sync``.

Fixtures: ``redis_cluster`` (one per test session, shared: use a unique prefix)
and ``redis_cluster_factory`` (fresh clusters for tests that break them).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from tests.redis_server import REDIS_SERVER, RedisServer

__all__ = ["LocalCluster", "redis_cluster", "redis_cluster_factory", "topic_slot", "wait_until"]

REDIS_CLI = shutil.which("redis-cli")


def topic_slot(topic: str) -> int:
    """The cluster slot of a topic's keys and channel (they share the hash tag ``{topic}``)."""
    return int(key_slot(topic.encode()))


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition of processes outside the event loop (set-up and fault steps, not a test's sync)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {what} within {timeout}s")
        time.sleep(0.05)


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free right now (held open together while they are picked)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class ClusterNode(RedisServer):
    """One cluster node: a RedisServer with ``--cluster-enabled`` and a bus port of its own."""

    def __init__(self, directory: Path, *, node_timeout: int, extra: tuple[str, ...] = ()) -> None:
        super().__init__(directory, appendonly=True)
        self.node_timeout = node_timeout
        self.options = extra
        self.use_ports(*_free_ports(2))

    def use_ports(self, port: int, bus_port: int) -> None:
        self.port, self.bus_port = port, bus_port
        self.extra = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.directory / "nodes.conf"),
            "--cluster-port",
            str(self.bus_port),
            "--cluster-node-timeout",
            str(self.node_timeout),
            "--cluster-require-full-coverage",
            "no",
            "--cluster-allow-replica-migration",
            "no",
            *self.options,
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def execute(self, *args: Any) -> Any:
        with self.client() as client:
            return client.execute_command(*args)

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as client:
            return dict(client.info(section))

    def node_id(self) -> str:
        return str(self.execute("CLUSTER", "MYID").decode())


class LocalCluster:
    """Six cluster nodes on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        *,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout: int = 1000,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.replicas = replicas
        self.nodes = [
            ClusterNode(directory / f"node-{i}", node_timeout=node_timeout, extra=extra)
            for i in range(primaries * (1 + replicas))
        ]
        ports = _free_ports(2 * len(self.nodes))
        for i, node in enumerate(self.nodes):
            node.use_ports(ports[2 * i], ports[2 * i + 1])

    @property
    def url(self) -> str:
        """Any node's URL (the first one's): a cluster client finds the others."""
        return self.nodes[0].url

    def start(self) -> LocalCluster:
        assert REDIS_CLI is not None
        for node in self.nodes:
            for attempt in range(3):  # another process may take a port between picking and binding
                try:
                    node.start()
                    break
                except RuntimeError:
                    node.process = None
                    if attempt == 2 or b"Address already in use" not in node.log.read_bytes():
                        raise
                    node.use_ports(*_free_ports(2))
        command = [REDIS_CLI, "--cluster", "create", *(n.address for n in self.nodes)]
        command += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        subprocess.run(command, check=True, capture_output=True, timeout=60)
        self.wait_stable()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the cluster's view --------------------------------------------------------

    def _view(self, node: ClusterNode) -> list[dict[str, Any]]:
        """``CLUSTER NODES`` as ``node`` sees it: id, address, flags, primary id, slots."""
        rows = []
        for line in node.execute("CLUSTER", "NODES").decode().splitlines():
            parts = line.split()
            slots: list[int] = []
            for part in parts[8:]:
                if part.startswith("["):
                    continue  # a migration in progress
                low, _, high = part.partition("-")
                slots.extend(range(int(low), int(high or low) + 1))
            rows.append(
                {
                    "id": parts[0],
                    "address": parts[1].split("@")[0],
                    "flags": set(parts[2].split(",")),
                    "primary": parts[3],
                    "slots": slots,
                }
            )
        return rows

    def _by_address(self, address: str) -> ClusterNode:
        return next(node for node in self.nodes if node.address == address)

    def primaries(self) -> list[ClusterNode]:
        """The nodes that hold slots now (as a running node sees it)."""
        view = self._view(self._any_running())
        return [self._by_address(row["address"]) for row in view if "master" in row["flags"] and row["slots"]]

    def replica_of(self, primary: ClusterNode) -> ClusterNode:
        view = self._view(self._any_running())
        primary_id = next(row["id"] for row in view if row["address"] == primary.address)
        return next(self._by_address(row["address"]) for row in view if row["primary"] == primary_id)

    def owner(self, slot: int) -> ClusterNode:
        """The primary that holds ``slot`` (as a running node sees it)."""
        for row in self._view(self._any_running()):
            if "master" in row["flags"] and slot in row["slots"]:
                return self._by_address(row["address"])
        raise LookupError(f"no primary holds slot {slot}")

    def slots_of(self, primary: ClusterNode) -> list[int]:
        view = self._view(self._any_running())
        return next(row["slots"] for row in view if row["address"] == primary.address)

    def _any_running(self) -> ClusterNode:
        return next(node for node in self.nodes if node.running() and self._answers(node))

    @staticmethod
    def _answers(node: ClusterNode) -> bool:
        try:
            node.execute("PING")
        except redis.RedisError:
            return False
        return True

    def _stable(self) -> bool:
        views = []
        for node in self.nodes:
            if not node.running():
                continue
            try:
                if b"cluster_state:ok" not in node.execute("CLUSTER", "INFO"):
                    return False
                view = self._view(node)
                replication = node.info("replication")
            except redis.RedisError:
                return False
            if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                return False
            known = {n.address: n for n in self.nodes}
            for row in view:
                failing = row["flags"] & {"fail", "fail?"}
                if failing and (row["address"] not in known or known[row["address"]].running()):
                    return False
            owners = {
                slot: row["address"]
                for row in view
                if "master" in row["flags"] and not row["flags"] & {"fail", "fail?"}
                for slot in row["slots"]
            }
            views.append(owners)
        return bool(views) and all(view == views[0] for view in views) and len(views[0]) == 16384

    def wait_stable(self, timeout: float = 30.0) -> None:
        """Until every running node says ``cluster_state:ok``, they agree on every slot's
        primary, and every running replica's link to its primary is up."""
        wait_until(self._stable, timeout, "a stable cluster")

    # --- faults and operations -------------------------------------------------------

    def failover(self, replica: ClusterNode, *, mode: str = "") -> None:
        """``CLUSTER FAILOVER [FORCE|TAKEOVER]`` on ``replica``; returns once it is a primary
        (at once if the cluster already promoted it by itself)."""
        wait_until(lambda: self._answers(replica), 10, f"{replica.address} answering")
        if replica.info("replication")["role"] != "master":
            replica.execute("CLUSTER", "FAILOVER", *([mode] if mode else []))
        wait_until(lambda: replica.info("replication")["role"] == "master", 20, f"{replica.address} promoted")

    def reshard(self, source: ClusterNode, target: ClusterNode, slots: int) -> None:
        """``redis-cli --cluster reshard``: move ``slots`` slots (with their keys) from source to target."""
        assert REDIS_CLI is not None
        command = [
            REDIS_CLI,
            "--cluster",
            "reshard",
            source.address,
            "--cluster-from",
            source.node_id(),
            "--cluster-to",
            target.node_id(),
            "--cluster-slots",
            str(slots),
            "--cluster-yes",
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=120)


def _require_cluster_tools() -> None:
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server and redis-cli are not installed (apt-get install redis-server)")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One shared cluster for the session: tests must use their own key prefix and not break it."""
    _require_cluster_tools()
    with LocalCluster(tmp_path_factory.mktemp("redis-cluster-shared")) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_factory(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    """Start fresh clusters (stopped at the end of the test): ``factory(node_timeout=1000)``."""
    _require_cluster_tools()
    clusters: list[LocalCluster] = []

    def make(**options: Any) -> LocalCluster:
        cluster = LocalCluster(tmp_path / f"cluster-{len(clusters)}", **options)
        clusters.append(cluster)
        return cluster.start()

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.stop()
