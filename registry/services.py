"""Writes to the registry. Each public function is one atomic action: it changes the platform's
tables and MLflow together, writes the audit row in the same transaction, and enqueues follow-up
work only after commit. If MLflow was written and the platform's part then fails, the MLflow side
is undone, so nothing is left half-registered."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError, transaction
from django.db.models import F
from django.db.models.functions import Greatest

from registry import archives, locks, samples, selectors
from registry import mlflow_store as mlflow
from registry.audit import SYSTEM, Actor, audit_record
from registry.errors import RegistryError
from registry.lifecycle import Lifecycle
from registry.models import VERSION_TRANSITIONS, ModelVersion, RegisteredModel, VersionOrigin, VersionStatus
from registry.outbox import outbox_enqueue
from registry.signals import version_ready

log = logging.getLogger(__name__)


# The database went away (restarting, unreachable, a connection cut): transient, so a request answers
# 503 and a task tries again, rather than recording a failure that did not happen.
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError)


def _clean_tags(tags: Any) -> dict[str, str]:
    if tags is None:
        return {}
    if not isinstance(tags, dict):
        raise RegistryError("tags must be an object of string keys and values")
    out: dict[str, str] = {}
    for key, value in tags.items():
        if not isinstance(key, str) or not key or len(key) > 250:
            raise RegistryError(f"tag key {key!r} must be a non-empty string of at most 250 characters")
        if key == mlflow.REGISTRATION_TAG:
            raise RegistryError(f"tag key {key!r} is the platform's own (it marks the versions it registers)")
        if not isinstance(value, (str, int, float, bool)):
            raise RegistryError(f"tag {key!r} must have a string value")
        out[key] = str(value)[:5000]
    return out


def _model_view(model: RegisteredModel) -> dict[str, Any]:
    return {"name": model.name, "description": model.description, "tags": model.tags}


def _version_view(v: ModelVersion) -> dict[str, Any]:
    return {"model": v.model.name, "version": v.version, "status": v.status, "description": v.description,
            "tags": v.tags, "source": v.source, "origin": v.origin}


# ---- registered models --------------------------------------------------------------------------

def _get_or_create_model_row(actor: Actor, name: str, description: str = "",
                             tags: dict[str, str] | None = None) -> tuple[RegisteredModel, bool]:
    existing = RegisteredModel.objects.filter(name=name).first()
    if existing is not None:
        return existing, False
    try:
        with transaction.atomic():
            model = RegisteredModel.objects.create(name=name, description=description, tags=tags or {},
                                                   created_by=actor.user_or_none)
    except IntegrityError:
        return RegisteredModel.objects.get(name=name), False
    audit_record(actor, "model.create", "model", name, after=_model_view(model))
    return model, True


@transaction.atomic
def model_create(actor: Actor, name: str, description: str = "", tags: Any = None) -> RegisteredModel:
    archives.check_model_name(name)
    clean = _clean_tags(tags)
    if RegisteredModel.objects.filter(name=name).exists():
        raise RegistryError(f"model {name!r} already exists", 409)
    mlflow.ensure_registered_model(name, description)
    mlflow.set_registered_model_tags(name, {}, clean)
    model, _ = _get_or_create_model_row(actor, name, description, clean)
    return model


@transaction.atomic
def model_update(actor: Actor, model: RegisteredModel, description: str | None = None,
                 tags: Any = None) -> RegisteredModel:
    locked = RegisteredModel.objects.select_for_update().get(pk=model.pk)
    before = _model_view(locked)
    if description is not None and description != locked.description:
        mlflow.update_registered_model_description(locked.name, description)
        locked.description = description
    if tags is not None:
        clean = _clean_tags(tags)
        mlflow.set_registered_model_tags(locked.name, locked.tags, clean)
        locked.tags = clean
    locked.save(update_fields=["description", "tags", "updated_at"])
    if _model_view(locked) != before:
        audit_record(actor, "model.update", "model", locked.name, before=before, after=_model_view(locked))
    return locked


# ---- versions -----------------------------------------------------------------------------------

@contextmanager
def _model_row(actor: Actor, name: str) -> Iterator[RegisteredModel]:
    """The model's row, inside the transaction that records a version. No lock of ours: MLflow
    numbers versions as max+1 after updating the registered model's row in the same transaction,
    so its own row lock serialises creators and numbers come out gap-free and unique (proved by
    registry/tests/test_concurrency.py); the platform records each number once (unique per model).
    The transaction holds the model's registration lock, shared (registrations do not wait for each
    other): while it is held, registry_reconcile leaves the model's unrecorded versions alone."""
    with transaction.atomic():
        locks.hold_shared_until_commit("model.register", locks.name_key(name))
        model = RegisteredModel.objects.filter(name=name).first()
        yield model if model is not None else _get_or_create_model_row(actor, name)[0]


def _record_version(actor: Actor, model: RegisteredModel, number: int, origin: str, lineage: mlflow.Lineage,
                    files: archives.ModelFiles | None, description: str, tags: dict[str, str],
                    sample: samples.ReferenceSample | None = None) -> ModelVersion:
    mlmodel = files.mlmodel if files else _mlmodel_or_empty(lineage.mlmodel_text)
    signature = files.signature if files else _signature_or_none(mlmodel)
    note = f"given with the registration ({len(sample.rows)} rows)" if sample else ""
    if sample is None and lineage.run_id:  # a dataset the run logged (mlflow.log_input), if it is readable
        from_run = samples.sample_from_run(lineage.run_id, signature)
        sample, note = from_run.sample, from_run.note
    version = ModelVersion.objects.create(
        model=model, version=number, origin=origin, source=lineage.source,
        storage_location=lineage.storage_location, run_id=lineage.run_id, experiment_id=lineage.experiment_id,
        flavors=mlmodel.get("flavors") or {}, signature=signature,
        input_example=files.input_example if files else lineage.input_example,
        params=lineage.params, metrics=lineage.metrics, run_tags=lineage.run_tags,
        description=description, tags=tags, created_by=actor.user_or_none,
        reference_sample_uri=samples.store_sample(sample) if sample else "",
        reference_sample_rows=len(sample.rows) if sample else 0, reference_sample_note=note,
    )
    RegisteredModel.objects.filter(pk=model.pk).update(
        version_count=F("version_count") + 1, latest_version=Greatest(F("latest_version"), number)
    )
    audit_record(actor, "version.register", "model_version", f"{model.name}/{number}",
                 after={**_version_view(version), "reference_sample": note})
    outbox_enqueue("registry.tasks.version_validate", [version.pk])
    return version


def _mlmodel_or_empty(text: str) -> dict[str, Any]:
    try:
        return archives.parse_mlmodel(text) if text else {}
    except archives.ArchiveError:
        return {}


def _signature_or_none(mlmodel: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return archives.signature_of(mlmodel)
    except archives.ArchiveError:
        return None


def version_register_from_archive(actor: Actor, model_name: str, archive_path: Path, description: str = "",
                                  tags: Any = None, sample: samples.ReferenceSample | None = None) -> ModelVersion:
    archives.check_model_name(model_name)
    limit = settings.PLATFORM["MAX_UPLOAD_BYTES"]
    if archive_path.stat().st_size > limit:
        raise RegistryError(f"the archive is {archive_path.stat().st_size} bytes, over the limit of {limit} bytes "
                            "(PLATFORM_MAX_UPLOAD_BYTES)", 413)
    clean_tags = _clean_tags(tags)
    with tempfile.TemporaryDirectory(prefix="upload-") as tmp:
        unpacked = Path(tmp) / "unpacked"
        unpacked.mkdir()
        archives.unpack(archive_path, unpacked)
        files = archives.read_model_folder(archives.model_root(unpacked))
        # Artifacts go up before the lock (slow I/O need not serialise); undone if anything fails.
        run_id, experiment_id, artifact_uri = mlflow.create_upload_run(model_name)
        try:
            location = mlflow.upload_artifacts(files.root, artifact_uri, "model")
            lineage = mlflow.Lineage(source=location, storage_location=location, run_id=run_id,
                                     experiment_id=experiment_id)
            return _create_version(actor, model_name, location, run_id, VersionOrigin.UPLOAD, lineage, files,
                                   description, clean_tags, sample)
        except BaseException:
            _undo_run(run_id)
            raise


def _undo_run(run_id: str) -> None:
    try:
        mlflow.delete_run(run_id)
    except Exception:  # noqa: BLE001 - best effort; the reconciler never records runs without versions
        log.exception("could not delete run %s while undoing a failed registration", run_id)


def _create_version(actor: Actor, model_name: str, source: str, run_id: str, origin: str, lineage: mlflow.Lineage,
                    files: archives.ModelFiles | None, description: str, tags: dict[str, str],
                    sample: samples.ReferenceSample | None = None) -> ModelVersion:
    number: int | None = None
    created_model = False
    try:
        with _model_row(actor, model_name) as model:
            if model.version_count == 0:  # a model the platform has not registered a version of yet
                created_model = mlflow.ensure_registered_model(model_name)
            number = mlflow.create_model_version(model_name, source, run_id, description,
                                                 {**tags, mlflow.REGISTRATION_TAG: "api"})
            return _record_version(actor, model, number, origin, lineage, files, description, tags, sample)
    except mlflow.MlflowError as exc:
        raise RegistryError(f"MLflow refused the version: {exc}") from exc
    except BaseException:
        if number is not None:
            _undo_version(model_name, number)
        elif created_model:
            _undo_model(model_name)
        raise


def _undo_model(model_name: str) -> None:
    try:
        if mlflow.version_numbers(model_name):
            return  # a concurrent registration put a version in it meanwhile: keep it
        mlflow.delete_registered_model(model_name)
    except Exception:  # noqa: BLE001
        log.exception("could not delete MLflow model %s while undoing a failed registration", model_name)


def _undo_version(model_name: str, number: int) -> None:
    try:
        mlflow.delete_model_version(model_name, number)
    except Exception:  # noqa: BLE001
        log.exception("could not delete MLflow version %s/%s while undoing a failed registration", model_name, number)


def version_register_from_uri(actor: Actor, model_name: str, uri: str, description: str = "",
                              tags: Any = None, sample: samples.ReferenceSample | None = None) -> ModelVersion:
    archives.check_model_name(model_name)
    clean_tags = _clean_tags(tags)
    parsed = archives.parse_source_uri(uri)
    known = _known_version(parsed)
    if known is not None:
        # The source version is the platform's own: its lineage is already recorded.
        lineage = mlflow.Lineage(source=known["source"], storage_location=known["storage_location"],
                                 run_id=known["run_id"], experiment_id=known["experiment_id"], params=known["params"],
                                 metrics=known["metrics"], run_tags=known["run_tags"])
        mlmodel = {"flavors": known["flavors"]}
        files = archives.ModelFiles(root=Path("."), mlmodel=mlmodel, flavors=archives.check_flavors(mlmodel),
                                    signature=known["signature"], input_example=known["input_example"])
        return _create_version(actor, model_name, known["source"], known["run_id"], VersionOrigin.MODEL_URI, lineage,
                               files, description, clean_tags, sample)
    try:
        if parsed.kind == "run":
            resolved = mlflow.resolve_run_source(parsed.run_id, parsed.artifact_path)
            origin = VersionOrigin.RUN_URI
        else:
            resolved = mlflow.resolve_model_version_source(parsed.model_name, parsed.version_or_alias)
            origin = VersionOrigin.MODEL_URI
    except mlflow.SourceNotFound as exc:
        raise RegistryError(str(exc), 404) from exc
    files = _files_at(resolved.location)
    lineage = mlflow.Lineage(source=resolved.source, storage_location=resolved.location, run_id=resolved.run_id)
    _fill_run_lineage(lineage)
    return _create_version(actor, model_name, resolved.source, resolved.run_id, origin, lineage, files,
                           description, clean_tags, sample)


def _known_version(parsed: archives.SourceUri) -> dict[str, Any] | None:
    if parsed.kind != "model" or not parsed.version_or_alias.isdigit():
        return None
    return selectors.version_lineage(parsed.model_name, int(parsed.version_or_alias))


def _files_at(location: str) -> archives.ModelFiles:
    """Parse the MLmodel (and input example) at an artifact location without downloading weights."""
    # Read generously: parse_mlmodel refuses an oversized file with a clear message.
    text = mlflow.read_artifact_text(location, "MLmodel", limit=64 * 1024 * 1024)
    if text is None:
        raise RegistryError(f"no MLflow model at {location} (no MLmodel file)", 404)
    mlmodel = archives.parse_mlmodel(text)
    flavors = archives.check_flavors(mlmodel)
    example = None
    example_rel = archives.input_example_path(mlmodel)
    if example_rel:
        example = archives.parse_input_example(mlflow.read_artifact_text(location, example_rel))
    return archives.ModelFiles(root=Path("."), mlmodel=mlmodel, flavors=flavors,
                               signature=archives.signature_of(mlmodel), input_example=example)


def _fill_run_lineage(lineage: mlflow.Lineage) -> None:
    if not lineage.run_id:
        return
    from_run = mlflow.run_lineage(lineage.run_id)
    lineage.experiment_id = from_run.experiment_id
    lineage.params, lineage.metrics, lineage.run_tags = from_run.params, from_run.metrics, from_run.run_tags


def version_check_mlflow_source(source: str) -> None:
    """Before the MLflow server mount creates a version for an mlflow client: the source must be a
    model in the platform's artifact store whose flavors the platform accepts."""
    try:
        location = mlflow.location_of_source(source)
    except mlflow.SourceNotFound as exc:
        raise RegistryError(str(exc), 400) from exc
    _files_at(location)


def model_record_from_mlflow(actor: Actor, name: str) -> RegisteredModel:
    """The platform's row for a model an mlflow client created through the server mount."""
    with transaction.atomic():
        model, _ = _get_or_create_model_row(actor, name)
    return model


def version_create_via_mlflow(actor: Actor, model_name: str, forward: Callable[[], int | None]) -> None:
    """Let MLflow's own handler create a version (for an mlflow client) under the model lock, and
    record it in the same transaction. `forward` returns the new number, or None if MLflow refused."""
    number: int | None = None
    try:
        with _model_row(actor, model_name) as model:
            number = forward()
            if number is None:
                return
            lineage, files = _lineage_and_files(model_name, number)
            _record_version(actor, model, number, VersionOrigin.MLFLOW_CLIENT, lineage, files,
                            lineage.description, lineage.tags)
    except BaseException:
        if number is not None:
            _undo_version(model_name, number)
        raise


def _lineage_and_files(model_name: str, number: int) -> tuple[mlflow.Lineage, archives.ModelFiles | None]:
    lineage = mlflow.version_lineage(model_name, number)
    try:
        files: archives.ModelFiles | None = _files_at(lineage.storage_location)
    except (RegistryError, archives.ArchiveError, archives.PolicyError):
        files = None
    if files is not None:
        lineage.input_example = files.input_example
    return lineage, files


def version_record_from_mlflow(actor: Actor, model_name: str, number: int,
                               origin: str = VersionOrigin.MLFLOW_CLIENT) -> ModelVersion:
    """Record a version that MLflow already holds (created by an mlflow client through the server
    mount, or found by the reconciler). Safe to call twice."""
    existing = ModelVersion.objects.filter(model__name=model_name, version=number).first()
    if existing is not None:
        return existing
    lineage, files = _lineage_and_files(model_name, number)
    with _model_row(actor, model_name) as model:
        existing = ModelVersion.objects.filter(model=model, version=number).first()
        if existing is not None:
            return existing
        return _record_version(actor, model, number, origin, lineage, files, lineage.description, lineage.tags)


@transaction.atomic
def version_update(actor: Actor, version: ModelVersion, description: str | None = None,
                   tags: Any = None) -> ModelVersion:
    locked = ModelVersion.objects.select_for_update().select_related("model").get(pk=version.pk)
    before = _version_view(locked)
    if description is not None and description != locked.description:
        mlflow.update_model_version_description(locked.model.name, locked.version, description)
        locked.description = description
    if tags is not None:
        clean = _clean_tags(tags)
        mlflow.set_model_version_tags(locked.model.name, locked.version, locked.tags, clean)
        locked.tags = clean
    locked.save(update_fields=["description", "tags", "updated_at"])
    if _version_view(locked) != before:
        audit_record(actor, "version.update", "model_version", f"{locked.model.name}/{locked.version}",
                     before=before, after=_version_view(locked))
    return locked


def _version_followups(v: ModelVersion) -> list[Callable[[], None]]:
    def announce_ready() -> None:
        version_ready.send(sender=ModelVersion, version_id=v.pk)

    return [announce_ready] if v.status == VersionStatus.READY else []


VERSIONS: Lifecycle[ModelVersion] = Lifecycle(
    ModelVersion, VERSION_TRANSITIONS, action="version", target_type="model_version",
    target_id=lambda v: f"{v.model.name}/{v.version}", describe=lambda v: f"{v.model.name} v{v.version}",
    view=lambda v: {"status": v.status, "detail": v.status_detail}, related=("model",),
    after_commit=_version_followups)


def version_transition(version_id: int, to: str, actor: Actor = SYSTEM, detail: str = "",
                       inspection: dict[str, Any] | None = None,
                       on_commit: Callable[[], None] | None = None) -> ModelVersion:
    """Move a version to `to` if its current state allows it (registry/lifecycle.py)."""
    fields: dict[str, Any] = {"status_detail": detail}
    if inspection is not None:
        fields["inspection"] = inspection
    return VERSIONS.move(version_id, to, actor, on_commit=on_commit, **fields)


def registry_reconcile() -> int:
    """Settle MLflow versions the platform never recorded. One the platform created (it carries
    mlflow.REGISTRATION_TAG) was cut off between MLflow's commit and the platform's (a web worker killed
    there): its caller got an error or no answer, and may have registered again, so it is deleted. One
    an mlflow client wrote to MLflow directly is recorded, as `discovered`. Returns how many versions it
    recorded or deleted."""
    settled = 0
    for name in mlflow.model_names():
        if not archives.MODEL_NAME_RE.match(name):
            continue
        known = set(ModelVersion.objects.filter(model__name=name).values_list("version", flat=True))
        for number in sorted(set(mlflow.version_numbers(name)) - known):
            marked, run_id = mlflow.registration_tag_and_run(name, number)
            if marked is None:
                version_record_from_mlflow(SYSTEM, name, number, VersionOrigin.DISCOVERED)
                settled += 1
            elif _delete_cut_off_version(name, number, marked, run_id):
                settled += 1
    return settled


def _delete_cut_off_version(name: str, number: int, marked: str, run_id: str) -> bool:
    with transaction.atomic():
        if not locks.try_exclusive_until_commit("model.register", locks.name_key(name)):
            return False  # a registration of this model is still open: it may yet record this version
        if ModelVersion.objects.filter(model__name=name, version=number).exists():
            return False  # it committed before the lock was free
        mlflow.delete_model_version(name, number)
        if run_id and mlflow.is_upload_run(run_id) and not ModelVersion.objects.filter(run_id=run_id).exists():
            _undo_run(run_id)
        log.warning("deleted MLflow version %s/%s: registered through the platform (%s), cut off before the "
                    "platform recorded it", name, number, marked)
        audit_record(SYSTEM, "version.cut_off_deleted", "model_version", f"{name}/{number}",
                     before={"mlflow_version": number, "registered_through": marked, "run_id": run_id},
                     after={"detail": "the registration was cut off between MLflow's commit and the platform's; "
                                      "its caller got an error or no answer"})
    return True


def model_download(version: ModelVersion, into: Path) -> Path:
    """Download a version's model folder (for the isolated inspection and the engine builds)."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    return mlflow.download_model(version.storage_location, into)


def model_policy_update(actor: Actor, policy_model: Any, model: RegisteredModel, changes: dict[str, Any],
                        action: str) -> Any:
    """Change some fields (validated by the caller) of a model's one-row policy (monitoring, HIL), creating it
    with its defaults first; audited as `action` with before and after."""
    with transaction.atomic():
        policy, _ = policy_model.objects.select_for_update().get_or_create(model=model)
        before = {k: getattr(policy, k) for k in changes}
        for k, v in changes.items():
            setattr(policy, k, v)
        policy.full_clean()
        policy.save()
        audit_record(actor, action, "registered_model", model.name, before=before, after=dict(changes))
    return policy
