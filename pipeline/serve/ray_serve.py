"""`vae serve --ray`: the same app as `vae serve` (pipeline/serve/app.py), deployed on Ray Serve
as N replicas, each with its own onnxruntime session, behind Ray Serve's HTTP proxy.

It joins $RAY_ADDRESS when set (replicas then spread over the cluster's nodes), else starts
a local Ray. The graphs travel to the replicas as bytes, so no node needs the driver's disk.
/metrics is per replica: each answers for the requests it served.
"""
from __future__ import annotations

import signal
import time

from pipeline.ray_connect import connect_ray, local_ray, node_resources, require_room, workers_fit
from pipeline.registry import MODEL_NAME, ModelFiles

DEPLOYMENT = MODEL_NAME


def replica_gpus(nodes: list[dict[str, float]], replicas: int) -> float:
    """The GPU share each replica reserves: the largest, at most one, with which every replica
    still fits on the nodes' GPUs (replicas sharing a GPU each hold a fraction of it; a share
    of the cluster's total may not pack: 2/3 each of two 1-GPU nodes holds two replicas, not
    three); none on a cluster without GPUs."""
    shares = {min(1.0, n["GPU"] / count) for n in nodes if n.get("GPU") for count in range(1, replicas + 1)}
    return next((share for share in sorted(shares, reverse=True) if workers_fit(nodes, replicas, 0, share)), 0.0)


def deployment(graphs: ModelFiles, max_batch: int, replicas: int, replica_cpus: float, gpus: float = 0.0):
    """The Ray Serve application: replicas building the FastAPI app when they start."""
    from ray import serve

    @serve.deployment(name=DEPLOYMENT, num_replicas=replicas,
                      ray_actor_options={"num_cpus": replica_cpus, "num_gpus": gpus})
    @serve.ingress()
    class Graphs:
        def __init__(self, graphs: ModelFiles, batch: int):
            self.graphs, self.batch = graphs, batch

        def __serve_build_asgi_app__(self):
            from pipeline.serve.app import create_app

            return create_app(self.graphs, self.batch)

    return Graphs.bind(graphs, max_batch)


def run(source: str, host: str, port: int, max_batch: int, replicas: int, replica_cpus: float = 1.0) -> None:
    from pipeline.registry import resolve
    from pipeline.serve.app import require_free_port

    if local_ray():  # the proxy listens on this machine (on a cluster, on the head node)
        require_free_port(host, port)  # first: before a registry download, as `vae serve` does
    graphs = resolve(source).read()  # before Ray starts: a file that holds no graph fails in a moment
    connect_ray(num_workers=replicas)  # first of Ray: it decides the local Ray's auth before ray is imported
    from ray import serve

    nodes = node_resources()
    gpus = replica_gpus(nodes, replicas)
    require_room(nodes, replicas, replica_cpus, gpus, None, "replica", "--replicas, --replica-cpus")
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(graphs, max_batch, replicas, replica_cpus, gpus), name=DEPLOYMENT,
              route_prefix="/")
    held = f", {gpus:g} GPU each" if gpus else ""
    print(f"serve: {replicas} Ray Serve replicas of {source} on http://{host}:{port}{held}", flush=True)
    # Serve outlives its driver on a cluster: on Ctrl-C or SIGTERM, take the replicas down.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
