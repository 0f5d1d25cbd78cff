"""A Ray cluster of several nodes on one machine, for the multi-node tests (tests/test_multinode.py).

Each node is its own raylet with its own resources (ray.cluster_utils.Cluster, what Ray's own multi-node tests use),
and each worker node its own loopback address (127.0.0.2, 127.0.0.3, ...: Linux routes all of 127/8 to lo). Ray Train
groups workers into nodes by IP (node_rank, local_rank, local_world_size), so with one shared 127.0.0.1 two Ray
nodes would still look like one host to the training code; with one address per node they look like two hosts and
the gloo rendezvous crosses "hosts" (still the loopback interface: no real network, no NIC bandwidth or latency).

The head has no accelerator resource, so no training worker lands there (as on KubeRay, where the head pod has no
GPU); worker nodes carry {"A100": 2}, the stand-in for two GPUs the jobs ask for through `worker_resources`.
"""

from __future__ import annotations

import itertools
import socket
import time

ACCELERATOR = "A100"


class LocalCluster:
    """A head (1 CPU, no accelerator) plus worker nodes of `cpus` CPUs and {ACCELERATOR: per_node} each."""

    def __init__(self, workers: int = 2, cpus: int = 2, per_node: int = 2):
        from ray.cluster_utils import Cluster

        self.cpus, self.per_node, self._ips = cpus, per_node, (f"127.0.0.{i}" for i in itertools.count(2))
        # a dashboard of its own: Ray Train's placement-group cleaner asks the cluster's dashboard whether the run's
        # controller lives (tests/conftest.py, ray_cluster). On a free port: a Cluster head asks for 8265 and, unlike
        # ray.init, does not move on when it is taken (CI: the other xdist worker's Ray held it)
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                                      "dashboard_port": free_port()})
        self.workers = [self.add_node() for _ in range(workers)]
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self):
        node = self.cluster.add_node(num_cpus=self.cpus, resources={ACCELERATOR: self.per_node},
                                     node_ip_address=next(self._ips))
        return node

    def remove_node(self, node) -> None:
        """The node's raylet and every process on it are killed (a host lost, not drained)."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    def replace_node(self, node):
        self.remove_node(node)
        new = self.add_node()
        self.workers.append(new)
        self.cluster.wait_for_nodes()
        return new

    def shutdown(self) -> None:
        self.cluster.shutdown()


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_ips() -> dict[str, str]:
    """{node id: IP} of every node the cluster has known (dead ones included)."""
    import ray

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}


def train_workers() -> dict[str, str]:
    """{actor id: IP of its node} of every Ray Train worker actor the cluster has run (alive or dead), from Ray's
    state API; the caller diffs two calls to get one run's workers."""
    from ray.util.state import list_actors

    ips = node_ips()
    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10_000, raise_on_missing_output=False)
    return {a.actor_id: ips.get(a.node_id, a.node_id) for a in actors}


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.2):
    """Poll predicate() until it returns a truthy value (returned) or timeout_s passes (AssertionError naming `what`).
    A bound on waiting for a background event, never an assertion on speed."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
