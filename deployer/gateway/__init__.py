"""The inference gateway: the single entry point for clients (KServe v2 / Triton HTTP protocol), routing
each request to a model's stable or canary version by weight, from a table the deployer publishes in Redis.

    python -m deployer.gateway --port 8080 --routes-from redis://127.0.0.1:6379/0

A native data plane (dataplane/, Rust) serves the requests; the Python command is its control plane
(dataplane.py, __main__.py). The deployer side is `publish_routes(redis_client, table)`.
"""

from deployer.gateway.routing import (
    ROUTES_CHANNEL,
    ROUTES_KEY,
    ROUTES_VERSION_KEY,
    Arm,
    Capture,
    ModelRoute,
    load_routes,
    parse_table,
    publish_routes,
)
from monitoring.samples import SAMPLES_STREAM

__all__ = ["ROUTES_CHANNEL", "ROUTES_KEY", "ROUTES_VERSION_KEY", "SAMPLES_STREAM", "Arm", "Capture", "ModelRoute",
           "load_routes", "parse_table", "publish_routes"]
