"""Start a local Ray instance whose every socket listens on loopback; only the HTTP proxy may listen elsewhere.

Measured on Ray 2.60, ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough:

- Ray replaced the node address with the machine's routable IP unless
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` was in the environment before ``import ray`` (Ray reads it
  into a module constant at import), so :func:`configure_ray_env` (run by :mod:`loraswap.serve.app` before it
  imports ray) sets it, and :func:`start_local_ray` refuses to run after ray was imported without it;
- every Serve replica starts an inter-deployment gRPC server on ``[::]:0`` with no option for the
  address; :func:`bind_replica_grpc` (run in every worker process through the job's
  ``worker_process_setup_hook``) rewrites that address to loopback.

Everything else is ``ray.init``'s own options: ``address="local"`` (a new instance, never a stray
cluster found through ``RAY_ADDRESS``), no dashboard, usage stats off.
"""

from __future__ import annotations

import os
import sys

from ..errors import HotswapError

LOOPBACK = "127.0.0.1"
_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


class RayStartError(HotswapError, RuntimeError):
    """Ray cannot be started so that every socket stays on the requested address."""


def configure_ray_env() -> None:
    """Set the environment Ray reads at import (in this process and, inherited, in every worker); the user's own
    values win. Called by :mod:`loraswap.serve.app` before it imports Ray, and by :func:`start_local_ray`;
    never by ``import loraswap``.

    Ray Serve's high-throughput mode (Ray >= 2.55; set ``RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` to opt out): the
    ingress replicas answer HTTP themselves, replicas call each other over gRPC, request logs are buffered.
    ``loraswap bench serve`` (hidden 128 x 2 layers, 2 replicas) measured loraswap 58 -> 74 requests/s with it,
    PEFT 30 -> 34 (docs/benchmarks.md).
    """
    _require_env_before_ray_import()
    for name, value in _RAY_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")


def start_local_ray(num_cpus: int | None = None) -> None:
    """``ray.init`` a new local instance on loopback; no dashboard, no usage stats.

    Only Serve's HTTP proxy may listen elsewhere (``serve.start(http_options={"host": ...})``).
    """
    configure_ray_env()
    os.environ.update(_RAY_ENV)
    # With Ray Serve's high-throughput mode an ingress replica being stopped keeps serving for at least 30 s, so
    # that an external load balancer can deregister it: Ctrl-C took 45 s. A local instance has none in front.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    import ray

    ray.init(
        address="local",
        _node_ip_address=LOOPBACK,
        include_dashboard=False,
        num_cpus=num_cpus,
        log_to_driver=False,
        runtime_env={
            "worker_process_setup_hook": f"{__name__}.bind_replica_grpc",
            "env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)},
        },
    )


def _require_env_before_ray_import() -> None:
    if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        raise RayStartError(
            "ray was imported before loraswap.serve could set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, so Ray would "
            "listen on the machine's routable address; set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment "
            "or import loraswap.serve.app before ray"
        )


def bind_replica_grpc() -> None:
    """Worker setup hook: Serve replicas' internal gRPC server binds loopback instead of ``[::]``."""
    from ray.serve._private import replica

    unbound = replica.add_port_to_grpc_server

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = f"{LOOPBACK}:{address.rsplit(':', 1)[1]}"
        return unbound(server, address)

    replica.add_port_to_grpc_server = add_port


def stop_ray() -> None:
    """Shut Serve and Ray down (both are no-ops when not running)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
