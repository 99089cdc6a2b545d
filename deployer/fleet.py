"""The serving fleet behind one interface: what the rollout code asks of any backend.

A backend places a Triton model (one built engine of one model version) so that it answers on some
nodes, reports where it answers, and takes it away again. Every call is idempotent: the reconciler
calls them on each pass with the desired state, so a crash between two calls heals on the next pass.

Backends: `deployer.fleet_local.LocalFleet` (N Triton processes on this machine, the embedded
default) and `deployer.kube.KubernetesFleet` (a Triton Deployment + Service + HPA per placed model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class FleetError(RuntimeError):
    """Permanent: asking again will not help (bad engine, unknown target, refused manifest)."""


class FleetNotReady(RuntimeError):
    """Transient: the model is on its way (pods starting, a node restarting); ask again later."""


@dataclass(frozen=True)
class Placement:
    triton_model: str  # the model's name inside Triton, e.g. "digits_v3_cpu-fp32-onnxruntime"
    engine_uri: str  # mlflow-artifacts:/engines/<content key> (holds triton/python/<name>/, triton/onnxruntime/<name>/)
    target: str  # "cpu" or "gpu"
    replicas: int = 1  # the Kubernetes backend's minimum replicas; the local fleet places on every node


class Fleet(Protocol):
    kind: str

    def place(self, placement: Placement) -> list[str]:
        """Make the model answer; return the 'host:port' inference addresses where it is ready now.
        Raises FleetNotReady while it is still loading, FleetError when it cannot be placed."""
        ...

    def remove(self, triton_model: str) -> None:
        """Stop serving the model everywhere (no error when it is not there)."""
        ...

    def placed(self) -> dict[str, list[str]]:
        """Every Triton model the fleet holds now, with the addresses where it answers ready."""
        ...

    def metrics_urls(self) -> list[str]:
        """Prometheus endpoints of the fleet's Triton servers (for rollout analysis)."""
        ...
