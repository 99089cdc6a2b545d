"""Migrate and seed the registry for the benchmark (run in its own process, so that no connection to MLflow's
database outlives it and the database can be copied afterwards).

Version 1 of each model is registered for real through the platform's service (a small sklearn
model: real run, artifacts, MLmodel, lineage). Versions 2..N are copies of its rows, inserted with one
SQL statement per table into both MLflow's `model_versions` and the platform's `registry_modelversion`,
so 10,000 versions take seconds.

    python -m bench.registry.seed --out seed.json --model bench-100=100 --model bench-10000=10000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

SCIENTIST = "bench-scientist"


def build_archive(workdir: Path) -> Path:
    """A logistic regression on scikit-learn's bundled digits, saved as an MLflow model, zipped."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    X, y = load_digits(return_X_y=True)
    model = LogisticRegression(max_iter=200).fit(X[:1000], y[:1000])
    folder = workdir / "digits-logreg"
    # Requirements given, so MLflow does not spend seconds inferring them in a subprocess.
    mlflow.sklearn.save_model(model, str(folder), input_example=X[:5], pip_requirements=["scikit-learn"],
                              signature=infer_signature(X[:5], model.predict(X[:5])))
    return Path(shutil.make_archive(str(workdir / "digits-logreg"), "zip", root_dir=folder))


def _columns(cursor: Any, table: str) -> list[str]:
    cursor.execute("select column_name from information_schema.columns where table_schema = 'public' "
                   "and table_name = %s order by ordinal_position", [table])
    return [row[0] for row in cursor.fetchall()]


def copy_platform_versions(model_id: int, total: int) -> None:
    """Versions 2..total of the platform's model as copies of version 1; counters to match."""
    from django.db import connection, transaction

    with transaction.atomic(), connection.cursor() as cur:
        cols = [c for c in _columns(cur, "registry_modelversion") if c != "id"]
        select = ", ".join("g" if c == "version" else f"mv.{c}" for c in cols)
        cur.execute(
            f"insert into registry_modelversion ({', '.join(cols)}) select {select} "  # noqa: S608 - our own names
            "from registry_modelversion mv, generate_series(2, %s) g where mv.model_id = %s and mv.version = 1",
            [total, model_id],
        )
        cur.execute("update registry_registeredmodel set latest_version = %s, version_count = %s where id = %s",
                    [total, total, model_id])
        cur.execute("analyze registry_modelversion")


def copy_mlflow_versions(name: str, total: int) -> None:
    """Versions 2..total in MLflow's tables, as copies of version 1 (creation times one ms apart)."""
    import psycopg

    url = os.environ.get("MLFLOW_BACKEND_STORE_URI") or os.environ["DATABASE_URL"]
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cols = _columns(cur, "model_versions")
        exprs = {"version": "g", "creation_time": "mv.creation_time + g", "last_updated_time": "mv.creation_time + g"}
        select = ", ".join(exprs.get(c, f"mv.{c}") for c in cols)
        cur.execute(
            f"insert into model_versions ({', '.join(cols)}) select {select} "  # noqa: S608 - our own names
            "from model_versions mv, generate_series(2, %s) g where mv.name = %s and mv.version = 1",
            [total, name],
        )
        cur.execute("update registered_models set last_updated_time = "
                    "(select max(last_updated_time) from model_versions where name = %s) where name = %s",
                    [name, name])
        conn.commit()
        conn.autocommit = True
        cur.execute("analyze model_versions")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.registry.seed")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", action="append", required=True, help="NAME=VERSIONS")
    args = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    t0 = time.perf_counter()
    call_command("migrate", interactive=False, verbosity=0)
    call_command("mlflow_store_init")
    migrate_s = time.perf_counter() - t0

    from registry import services
    from registry.audit import SYSTEM
    from registry.people import user_create
    from registry.roles import Role
    from registry.tokens import token_create

    user = get_user_model().objects.filter(username=SCIENTIST).first()
    if user is None:
        user = user_create(SYSTEM, SCIENTIST, [Role.DATA_SCIENTIST], is_service_account=True)
    token = token_create(SYSTEM, user, "bench", expires_in_days=1).raw

    out: dict[str, Any] = {"token": token, "migrate_s": round(migrate_s, 2), "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-seed-") as tmp:
        archive = build_archive(Path(tmp))
        for spec in args.model:
            name, _, count = spec.partition("=")
            total = int(count)
            t0 = time.perf_counter()
            first = services.version_register_from_archive(SYSTEM, name, archive, description="bench seed")
            if total > 1:
                copy_platform_versions(first.model_id, total)
                copy_mlflow_versions(name, total)
            out["models"][name] = {"versions": total, "source": first.source, "run_id": first.run_id,
                                   "seed_s": round(time.perf_counter() - t0, 2)}
    args.out.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
