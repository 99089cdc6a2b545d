"""Celery tasks of the deployer: thin, idempotent. The rollout reconciler runs on its own queue ("deployer")
so a rollout never waits behind engine builds. The serving versions' monitoring (drift checks, SLO ticks)
is started here, where the serving versions and the gateways are known, and runs on the default queue."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from deployer import champions, promotions
from deployer.selectors import serving_versions
from deployer.services import live_gateways, redis_client
from deployer.services import rollouts_reconcile as _reconcile
from monitoring import services as monitoring_services
from monitoring import slo


@shared_task(ignore_result=True)
def rollouts_reconcile() -> dict[str, Any]:
    done = _reconcile()
    done["champion_rollbacks"] = champions.champions_guard()
    done["promotions"] = promotions.promotions_reconcile()
    return done


@shared_task
def drift_checks() -> int:
    return monitoring_services.drift_checks(serving_versions())


@shared_task
def slo_tick() -> int:
    """Sample the serving versions' SLO figures at every live gateway and judge their burn rates."""
    gateways = [info["metrics"] for info in live_gateways(redis_client()).values() if info.get("metrics")]
    return slo.slo_tick(gateways, serving_versions())
