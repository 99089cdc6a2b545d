"""Adapter to MLflow's stores: the only module (with mlflow_server) that imports mlflow.

The platform talks to MLflow's SQL stores and artifact repository in-process, the same objects
MLflow's own server uses, configured from the same settings, so a version written here is exactly
what an `mlflow` client sees through the server mount and the other way round.
"""

from __future__ import annotations

import functools
import os
import posixpath
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings

ARTIFACT_SCHEME = "mlflow-artifacts:"
UPLOAD_EXPERIMENT = "platform-registrations"
# Written on every version the platform creates, in the same insert (its value: "api" or "mlflow-client").
# A version in MLflow that carries it and that the platform never recorded was cut off between MLflow's
# commit and the platform's: its caller got an error, or no answer, so it must not stay behind
# (services.registry_reconcile deletes it). The platform's own record of the version's tags leaves it out.
REGISTRATION_TAG = "platform.registration"


class MlflowError(Exception):
    """MLflow refused or failed an operation; the message is MLflow's, fit to show."""


class SourceNotFound(MlflowError):
    pass


def backend_store_uri() -> str:
    """SQLAlchemy URI of MLflow's store (psycopg 3 driver). Defaults to the platform's database."""
    uri = settings.MLFLOW_BACKEND_STORE_URI or settings.DATABASE_URL
    scheme, _, rest = uri.partition("://")
    if scheme in {"postgres", "postgresql", "pgsql"}:
        scheme = "postgresql+psycopg"
    return f"{scheme}://{rest}"


def artifacts_destination() -> str:
    dest = settings.MLFLOW_ARTIFACTS_URI
    if "://" not in dest and not dest.startswith("file:"):
        Path(dest).mkdir(parents=True, exist_ok=True)
        return str(Path(dest).resolve())
    return dest


def configure_server_environment() -> None:
    """Set the variables MLflow's Flask app reads at import: store, artifact proxy, destination."""
    from mlflow.server import constants

    os.environ[constants.BACKEND_STORE_URI_ENV_VAR] = backend_store_uri()
    os.environ[constants.REGISTRY_STORE_URI_ENV_VAR] = backend_store_uri()
    os.environ[constants.ARTIFACT_ROOT_ENV_VAR] = "mlflow-artifacts:/"
    os.environ[constants.ARTIFACTS_DESTINATION_ENV_VAR] = artifacts_destination()
    os.environ[constants.SERVE_ARTIFACTS_ENV_VAR] = "true"


@functools.cache
def tracking_store() -> Any:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    return SqlAlchemyStore(backend_store_uri(), "mlflow-artifacts:/")


# A registered model as MLflow's REST API returns it, in one statement whatever its number of
# versions: the model row, its tags and aliases, and the latest version of each stage (with tags).
# The stages are found by a skip scan over STAGE_INDEX (one index probe per stage present), and each
# stage's latest version is one more probe, so nothing here reads all of a model's versions.
STAGE_INDEX = "platform_model_versions_stage"
_MODEL_SQL = """
select rm.name, rm.creation_time, rm.last_updated_time, rm.description, rm.workspace,
  (select coalesce(json_agg(json_build_array(t.key, t.value)), '[]'::json) from registered_model_tags t
    where t.workspace = rm.workspace and t.name = rm.name) as tags,
  (select coalesce(json_agg(json_build_array(a.alias, a.version)), '[]'::json) from registered_model_aliases a
    where a.workspace = rm.workspace and a.name = rm.name) as aliases,
  (select coalesce(json_agg(row_to_json(latest) order by latest.version), '[]'::json) from (
    with recursive stages(stage) as (
      select min(current_stage) from model_versions where workspace = :workspace and name = :name
      union all
      select (select min(current_stage) from model_versions
              where workspace = :workspace and name = :name and current_stage > stages.stage)
      from stages where stages.stage is not null
    )
    select mv.name, mv.version, mv.creation_time, mv.last_updated_time, mv.description, mv.user_id,
      mv.current_stage, mv.source, mv.run_id, mv.status, mv.status_message, mv.run_link, mv.workspace,
      (select coalesce(json_agg(json_build_array(vt.key, vt.value)), '[]'::json) from model_version_tags vt
        where vt.workspace = mv.workspace and vt.name = mv.name and vt.version = mv.version) as tags
    from stages cross join lateral (
      select * from model_versions m where m.workspace = :workspace and m.name = :name
        and m.current_stage = stages.stage order by m.version desc limit 1) mv
    where stages.stage is not null and stages.stage <> :deleted
  ) latest) as latest
from registered_models rm where rm.workspace = :workspace and rm.name = :name
"""


def _registered_model_entity(row: Any) -> Any:
    from mlflow.entities.model_registry import (
        ModelVersion,
        ModelVersionTag,
        RegisteredModel,
        RegisteredModelAlias,
        RegisteredModelTag,
    )

    latest = [ModelVersion(v["name"], v["version"], v["creation_time"], v["last_updated_time"], v["description"],
                           v["user_id"], v["current_stage"], v["source"], v["run_id"], v["status"],
                           v["status_message"], [ModelVersionTag(k, val) for k, val in v["tags"]], v["run_link"],
                           [], workspace=v["workspace"])
              for v in row.latest]
    return RegisteredModel(row.name, row.creation_time, row.last_updated_time, row.description, latest,
                           [RegisteredModelTag(k, v) for k, v in row.tags],
                           [RegisteredModelAlias(a, v) for a, v in row.aliases], workspace=row.workspace)


@functools.cache
def registry_store() -> Any:
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    class RegistryStore(SqlAlchemyStore):  # type: ignore[misc]
        """MLflow's store, except that reading a registered model does not load all its versions
        (MLflow's own does, so its cost grows with the number of versions): see _MODEL_SQL."""

        def get_registered_model(self, name: str) -> Any:
            import sqlalchemy
            from mlflow.entities.model_registry.model_version_stages import STAGE_DELETED_INTERNAL
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
            from mlflow.utils.validation import _validate_model_name

            if self.engine.dialect.name != "postgresql":
                with self.ManagedSessionMaker() as session:
                    model = self._get_registered_model(session, name, eager=True)
                    latest = self._get_latest_versions_for_models(session, [name]).get(name, [])
                    return model.to_mlflow_entity(preloaded_latest_versions=latest)
            _validate_model_name(name)
            with self.engine.connect() as conn:
                row = conn.execute(sqlalchemy.text(_MODEL_SQL), {
                    "workspace": self._get_active_workspace(), "name": name, "deleted": STAGE_DELETED_INTERNAL,
                }).first()
            if row is None:
                raise MlflowException(f"Registered Model with name={name} not found", RESOURCE_DOES_NOT_EXIST)
            return _registered_model_entity(row)

        def create_model_version(self, name: str, source: str, run_id: str | None = None, tags: Any = None,
                                 run_link: str | None = None, description: str | None = None,
                                 local_model_path: str | None = None, model_id: str | None = None) -> Any:
            """MLflow's numbering in two statements instead of its ORM round trips: the UPDATE of the
            registered model's row takes its row lock (as MLflow's own flush does), so concurrent
            creators queue there and max(version) + 1 is gap-free and unique. Sources that MLflow
            resolves itself (models:/ URIs, logged models) and other databases take MLflow's path."""
            if self.engine.dialect.name != "postgresql" or model_id or source.startswith("models:"):
                return super().create_model_version(name, source, run_id, tags, run_link, description,
                                                    local_model_path, model_id)
            import sqlalchemy as sa
            from mlflow.entities.model_registry import ModelVersion, ModelVersionTag
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
            from mlflow.store.model_registry.dbmodels.models import (
                SqlModelVersion,
                SqlModelVersionTag,
                SqlRegisteredModel,
            )
            from mlflow.utils.time import get_current_time_millis
            from mlflow.utils.validation import _validate_model_name, _validate_model_version_tag

            _validate_model_name(name)
            tag_values = {tag.key: tag.value for tag in tags or []}
            for key, value in tag_values.items():
                _validate_model_version_tag(key, value)
            workspace = self._get_active_workspace()
            rm, mv = SqlRegisteredModel.__table__, SqlModelVersion.__table__
            now = get_current_time_millis()
            with self.engine.begin() as conn:
                locked = conn.execute(sa.update(rm).where(rm.c.workspace == workspace, rm.c.name == name)
                                      .values(last_updated_time=now))
                if locked.rowcount == 0:
                    raise MlflowException(f"Registered Model with name={name} not found", RESOURCE_DOES_NOT_EXIST)
                next_number = (sa.select(sa.func.coalesce(sa.func.max(mv.c.version), 0) + 1)
                               .where(mv.c.workspace == workspace, mv.c.name == name).scalar_subquery())
                version = conn.execute(sa.insert(mv).values(
                    workspace=workspace, name=name, version=next_number, creation_time=now, last_updated_time=now,
                    source=source, storage_location=source, run_id=run_id, run_link=run_link,
                    description=description,
                ).returning(mv.c.version, mv.c.current_stage, mv.c.status)).one()
                if tag_values:
                    conn.execute(sa.insert(SqlModelVersionTag.__table__), [
                        {"workspace": workspace, "name": name, "version": version.version, "key": k, "value": v}
                        for k, v in tag_values.items()])
            # A number never used before has no alias pointing at it (MLflow checks versions exist).
            return ModelVersion(name, version.version, now, now, description, None, version.current_stage, source,
                                run_id, version.status, None, [ModelVersionTag(k, v) for k, v in tag_values.items()],
                                run_link, [], workspace=workspace)

    return RegistryStore(backend_store_uri())


def init_store() -> None:
    """Create or upgrade MLflow's tables (MLflow runs its own migrations on first use), and add the
    index the registered-model read above probes (MLflow's tables have none on the stage)."""
    tracking_store()
    store = registry_store()
    if store.engine.dialect.name == "postgresql":
        import sqlalchemy

        with store.engine.begin() as conn:
            conn.execute(sqlalchemy.text(f"create index if not exists {STAGE_INDEX} "
                                         "on model_versions (workspace, name, current_stage, version)"))


def _destination_repo(artifact_uri: str) -> Any:
    """The artifact repository behind an `mlflow-artifacts:/path` URI, as the server resolves it."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    if not artifact_uri.startswith(ARTIFACT_SCHEME):
        raise MlflowError(f"artifacts are expected under {ARTIFACT_SCHEME}/, not at {artifact_uri!r}")
    path = urlsplit(artifact_uri).path.lstrip("/")
    return get_artifact_repository(artifacts_destination().rstrip("/") + "/" + path)


def is_known_location(uri: str) -> bool:
    return uri.startswith(ARTIFACT_SCHEME)


# ---- registered models and versions -------------------------------------------------------------

def ensure_registered_model(name: str, description: str = "") -> bool:
    """Create the registered model unless it exists; True if this call created it."""
    from mlflow.exceptions import MlflowException

    store = registry_store()
    try:
        with store.ManagedSessionMaker() as session:
            store._get_registered_model(session, name)  # one row; no tags, aliases or versions
        return False
    except MlflowException:
        try:
            store.create_registered_model(name, description=description or None)
            return True
        except MlflowException as exc:
            if "already exists" not in str(exc):
                raise MlflowError(exc.message) from exc
            return False


def delete_registered_model(name: str) -> None:
    registry_store().delete_registered_model(name)


def create_upload_run(model_name: str) -> tuple[str, str, str]:
    """A run that owns an uploaded model's artifacts. Returns (run_id, experiment_id, artifact_uri)."""
    from mlflow.entities import RunStatus

    store = tracking_store()
    experiment = store.get_experiment_by_name(UPLOAD_EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else _create_experiment(UPLOAD_EXPERIMENT)
    run = store.create_run(experiment_id, user_id="platform", start_time=_now_ms(), tags=[],
                           run_name=f"register-{model_name}")
    store.update_run_info(run.info.run_id, RunStatus.FINISHED, _now_ms(), None)
    return run.info.run_id, experiment_id, run.info.artifact_uri


def _create_experiment(name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return str(tracking_store().create_experiment(name))
    except MlflowException:
        return str(tracking_store().get_experiment_by_name(name).experiment_id)  # created concurrently


def upload_artifacts(local_dir: Path, artifact_uri: str, artifact_path: str) -> str:
    _destination_repo(artifact_uri).log_artifacts(str(local_dir), artifact_path)
    return f"{artifact_uri.rstrip('/')}/{artifact_path}"


def delete_run(run_id: str) -> None:
    tracking_store().delete_run(run_id)


def create_model_version(name: str, source: str, run_id: str | None, description: str = "",
                         tags: dict[str, str] | None = None) -> int:
    """A new version, its tags written in the same insert (see REGISTRATION_TAG)."""
    from mlflow.entities.model_registry import ModelVersionTag
    from mlflow.exceptions import MlflowException

    try:
        mv = registry_store().create_model_version(name, source, run_id=run_id or None,
                                                   tags=[ModelVersionTag(k, v) for k, v in (tags or {}).items()],
                                                   description=description or None)
    except MlflowException as exc:
        raise MlflowError(exc.message) from exc
    return int(mv.version)


def registration_tag_and_run(name: str, version: int) -> tuple[str | None, str]:
    """A version's REGISTRATION_TAG (None when an mlflow client wrote it to MLflow directly) and run id."""
    mv = registry_store().get_model_version(name, str(version))
    return (mv.tags or {}).get(REGISTRATION_TAG), mv.run_id or ""


def is_upload_run(run_id: str) -> bool:
    """Whether the run is one the platform made to hold an uploaded archive (create_upload_run)."""
    from mlflow.exceptions import MlflowException

    try:
        run = tracking_store().get_run(run_id)
    except MlflowException:
        return False
    experiment = tracking_store().get_experiment(run.info.experiment_id)
    return bool(experiment and experiment.name == UPLOAD_EXPERIMENT)


def delete_model_version(name: str, version: int) -> None:
    registry_store().delete_model_version(name, str(version))


def update_registered_model_description(name: str, description: str) -> None:
    registry_store().update_registered_model(name, description)


def update_model_version_description(name: str, version: int, description: str) -> None:
    registry_store().update_model_version(name, str(version), description)


def set_model_version_tags(name: str, version: int, before: dict[str, str], after: dict[str, str]) -> None:
    from mlflow.entities.model_registry import ModelVersionTag

    store = registry_store()
    for key in set(before) - set(after):
        store.delete_model_version_tag(name, str(version), key)
    for key, value in after.items():
        if before.get(key) != value:
            store.set_model_version_tag(name, str(version), ModelVersionTag(key, str(value)))


def set_registered_model_tags(name: str, before: dict[str, str], after: dict[str, str]) -> None:
    from mlflow.entities.model_registry import RegisteredModelTag

    store = registry_store()
    for key in set(before) - set(after):
        store.delete_registered_model_tag(name, key)
    for key, value in after.items():
        if before.get(key) != value:
            store.set_registered_model_tag(name, RegisteredModelTag(key, str(value)))


def version_numbers(name: str) -> list[int]:
    """All live version numbers of a model in MLflow (for the reconciler)."""
    from mlflow.exceptions import MlflowException

    store = registry_store()
    numbers: list[int] = []
    token = None
    while True:
        try:
            page = store.search_model_versions(f"name = '{_quote(name)}'", max_results=10_000, page_token=token)
        except MlflowException:
            return []
        numbers.extend(int(mv.version) for mv in page)
        token = page.token
        if not token:
            return numbers


def model_names() -> list[str]:
    store = registry_store()
    names: list[str] = []
    token = None
    while True:
        page = store.search_registered_models(max_results=1000, page_token=token)
        names.extend(rm.name for rm in page)
        token = page.token
        if not token:
            return names


def _quote(value: str) -> str:
    return value.replace("'", "''")


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


# ---- lineage ------------------------------------------------------------------------------------

@dataclass
class Lineage:
    source: str
    storage_location: str
    run_id: str = ""
    experiment_id: str = ""
    description: str = ""
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    run_tags: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    mlmodel_text: str = ""
    input_example: Any = None


def version_lineage(name: str, version: int) -> Lineage:
    """Everything the platform keeps about a version: run, params, metrics, MLmodel, input example."""
    from mlflow.exceptions import MlflowException

    try:
        mv = registry_store().get_model_version(name, str(version))
    except MlflowException as exc:
        raise SourceNotFound(exc.message) from exc
    location = registry_store().get_model_version_download_uri(name, str(version))
    tags = dict(mv.tags or {})
    tags.pop(REGISTRATION_TAG, None)
    lineage = Lineage(source=mv.source, storage_location=location, run_id=mv.run_id or "",
                      description=mv.description or "", tags=tags)
    if mv.run_id:
        from_run = run_lineage(mv.run_id)
        lineage.experiment_id = from_run.experiment_id
        lineage.params, lineage.metrics, lineage.run_tags = from_run.params, from_run.metrics, from_run.run_tags
    lineage.mlmodel_text = read_artifact_text(location, "MLmodel") or ""
    return lineage


def run_lineage(run_id: str) -> Lineage:
    """Params, metrics and tags of a run (empty if the run is gone)."""
    from mlflow.exceptions import MlflowException

    lineage = Lineage(source="", storage_location="", run_id=run_id)
    try:
        run = tracking_store().get_run(run_id)
    except MlflowException:
        return lineage
    lineage.experiment_id = run.info.experiment_id
    lineage.params = dict(run.data.params)
    lineage.metrics = {k: float(v) for k, v in run.data.metrics.items()}
    lineage.run_tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.log-model")}
    return lineage


def location_of_source(source: str) -> str:
    """Where the artifacts of a version source live, for sources an mlflow client sends."""
    from mlflow.exceptions import MlflowException

    if source.startswith(ARTIFACT_SCHEME):
        return source
    if source.startswith("models:/m-"):
        model_id = source[len("models:/"):].strip("/")
        try:
            return str(tracking_store().get_logged_model(model_id).artifact_location)
        except MlflowException as exc:
            raise SourceNotFound(f"logged model {model_id!r} does not exist") from exc
    if source.startswith("runs:/"):
        run_id, _, path = source[len("runs:/"):].partition("/")
        return resolve_run_source(run_id, path.strip("/")).location
    raise SourceNotFound(
        f"version source {source!r} is outside the platform's artifact store; log the model through the "
        "platform (MLFLOW_TRACKING_URI=<platform URL>) so its artifacts land in the store"
    )


def read_artifact_text(location: str, relative: str, limit: int = 5 * 1024 * 1024) -> str | None:
    """A small text file from a model's artifact folder, or None if it is not there."""
    if not is_known_location(location):
        return None
    repo = _destination_repo(location)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = repo.download_artifacts(relative, dst_path=tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several types for "missing"
            return None
        path = Path(local)
        if not path.is_file() or path.stat().st_size > limit:
            return None
        return path.read_text(errors="replace")


def download_model(location: str, dst: Path) -> Path:
    repo = _destination_repo(location)
    dst.mkdir(parents=True, exist_ok=True)
    return Path(repo.download_artifacts("", dst_path=str(dst)))


# ---- sources given as URIs ----------------------------------------------------------------------

@dataclass
class ResolvedSource:
    source: str
    run_id: str
    location: str


def resolve_run_source(run_id: str, artifact_path: str) -> ResolvedSource:
    from mlflow.exceptions import MlflowException

    try:
        run = tracking_store().get_run(run_id)
    except MlflowException as exc:
        raise SourceNotFound(f"run {run_id!r} does not exist") from exc
    location = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}" if artifact_path else run.info.artifact_uri
    if read_artifact_text(location, "MLmodel") is None:
        # MLflow 3 logs models as LoggedModels; `runs:/<id>/<name>` may name one of them.
        for logged in _logged_models_of_run(run.info.experiment_id, run_id):
            if logged.name == artifact_path:
                return ResolvedSource(source=f"models:/{logged.model_id}", run_id=run_id,
                                      location=logged.artifact_location)
        raise SourceNotFound(f"run {run_id} has no MLflow model at {artifact_path!r} (no MLmodel file there)")
    return ResolvedSource(source=location, run_id=run_id, location=location)


def _logged_models_of_run(experiment_id: str, run_id: str) -> list[Any]:
    try:
        page = tracking_store().search_logged_models(experiment_ids=[experiment_id],
                                                     filter_string=f"source_run_id = '{run_id}'")
    except Exception:  # noqa: BLE001 - older stores lack logged models
        return []
    return list(page)


def resolve_model_version_source(name: str, version_or_alias: str) -> ResolvedSource:
    from mlflow.exceptions import MlflowException

    store = registry_store()
    try:
        if version_or_alias.isdigit():
            mv = store.get_model_version(name, version_or_alias)
        else:
            mv = store.get_model_version_by_alias(name, version_or_alias)
    except MlflowException as exc:
        raise SourceNotFound(f"model version models:/{name}/{version_or_alias} does not exist") from exc
    location = store.get_model_version_download_uri(name, mv.version)
    return ResolvedSource(source=mv.source, run_id=mv.run_id or "", location=location)


# ---- aliases (the deployer moves `champion` on promotion) -----------------------------------------

CHAMPION = "champion"


def alias_version(name: str, alias: str) -> int | None:
    """The version number an alias points at, or None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return int(registry_store().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def alias_set(name: str, alias: str, version: int) -> None:
    registry_store().set_registered_model_alias(name, alias, str(version))


def alias_delete(name: str, alias: str) -> None:
    registry_store().delete_registered_model_alias(name, alias)


def aliases(name: str) -> dict[str, int]:
    """Every alias of a model and the version it points at."""
    model = registry_store().get_registered_model(name)
    return {alias: int(version) for alias, version in model.aliases.items()}


def download_file(location: str, relative: str, dst_dir: Path) -> Path:
    """One file under an artifact location, into dst_dir."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    return Path(_destination_repo(location).download_artifacts(relative, dst_path=str(dst_dir)))


# ---- datasets a run logged (mlflow.log_input) ---------------------------------------------------

# The input tag mlflow.log_input(dataset, context=...) writes (mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT).
DATASET_CONTEXT_TAG = "mlflow.data.context"


@dataclass(frozen=True)
class RunDataset:
    """A dataset a run logged, as MLflow's tracking store keeps it: metadata, never rows. `source` is
    MLflow's JSON for its source_type (local: {"uri": path}, http: {"url": ...}, code: the run's tags)."""

    name: str
    digest: str
    source_type: str
    source: str
    schema: str
    profile: str
    context: str


def run_datasets(run_id: str) -> list[RunDataset]:
    """The run's dataset inputs, in the order it logged them (empty if the run is gone)."""
    from mlflow.exceptions import MlflowException

    try:
        run = tracking_store().get_run(run_id)
    except MlflowException:
        return []
    found: list[RunDataset] = []
    for dataset_input in (run.inputs.dataset_inputs if run.inputs else None) or []:
        tags = {tag.key: tag.value for tag in dataset_input.tags or []}
        d = dataset_input.dataset
        found.append(RunDataset(name=d.name or "", digest=d.digest or "", source_type=d.source_type or "",
                                source=d.source or "", schema=d.schema or "", profile=d.profile or "",
                                context=tags.get(DATASET_CONTEXT_TAG, "")))
    return found


def log_run_evidence(run_id: str, metrics: dict[str, float], artifact: str, text: str) -> None:
    """Metrics (one batch, now, step 0) and a text file at `artifact` (a path under the run's artifacts)
    on an existing run."""
    from mlflow.entities import Metric

    store = tracking_store()
    uri = store.get_run(run_id).info.artifact_uri
    now = _now_ms()
    store.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())], params=[],
                    tags=[])
    with tempfile.TemporaryDirectory(prefix="evidence-") as tmp:
        path = Path(tmp) / posixpath.basename(artifact)
        path.write_text(text)
        upload_artifacts(Path(tmp), uri, posixpath.dirname(artifact))


def run_artifact_uri(run_id: str) -> str | None:
    """Where the run's artifacts live, or None if the run is gone."""
    from mlflow.exceptions import MlflowException

    try:
        return str(tracking_store().get_run(run_id).info.artifact_uri)
    except MlflowException:
        return None


def artifact_size(location: str, relative: str) -> int | None:
    """The size of one file under an artifact location, read from its listing (nothing is downloaded);
    None when there is no such file there, or the store does not say."""
    if not is_known_location(location):
        return None
    try:
        listing = _destination_repo(location).list_artifacts(posixpath.dirname(relative) or None)
    except Exception:  # noqa: BLE001 - MLflow raises several types for "missing"
        return None
    for info in listing:
        if info.path == relative and not info.is_dir:
            return int(info.file_size) if info.file_size is not None else None
    return None
