"""The local cluster: Redis, N api replicas and nginx as processes on this machine.

One small API for everything that drives a cluster (the `scripts/cluster` CLI, the
benchmarks, the tests):

    cluster = Cluster(run_dir)                 # state, logs, rendered nginx.conf live here
    cluster.start(replicas=4, ports=Ports.auto())
    cluster.status()                            # Status: components, pids, health
    cluster.scale(2); cluster.restart(); cluster.stop()
"""

from localcluster.cluster import Cluster
from localcluster.ports import Ports, free_port, port_free
from localcluster.processes import ClusterError
from localcluster.state import Status

__all__ = ["Cluster", "ClusterError", "Ports", "Status", "free_port", "port_free"]
