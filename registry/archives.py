"""Opening what people upload, without trusting it: model archives and source URIs.

Nothing here unpickles or imports anything from the model. It reads the archive's directory, checks
every member before a byte is written, streams members out under a byte budget (headers can lie
about sizes), and reads the MLmodel file as plain YAML.
"""

from __future__ import annotations

import json
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote

import yaml
from django.conf import settings


class ArchiveError(ValueError):
    """The upload is not an acceptable model archive; the message says why."""


class PolicyError(ValueError):
    """The model is well formed but this platform's policy refuses it."""


MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# MLflow's built-in flavors. A flavor outside this list is refused: nothing downstream can load it.
KNOWN_FLAVORS = {
    "python_function", "sklearn", "onnx", "pytorch", "xgboost", "lightgbm", "catboost", "keras",
    "tensorflow", "transformers", "sentence_transformers", "spark", "statsmodels", "prophet",
    "pmdarima", "h2o", "spacy", "paddle", "diviner",
}
# Flavors whose artifacts are not pickles (sklearn counts only when saved with skops).
PICKLE_FREE_FLAVORS = {"onnx"}
PICKLE_FREE_PYFUNC_LOADERS = {"mlflow.onnx"}


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise ArchiveError(
            f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_relative_path(path: str, what: str = "path") -> str:
    """Refuse anything that could point outside its folder, however it is spelled or encoded."""
    if "\x00" in path:
        raise ArchiveError(f"{what} {path!r} contains a NUL byte")
    decoded = path
    for _ in range(4):  # %252e%252e -> %2e%2e -> ..
        if "\\" in decoded:
            raise ArchiveError(f"{what} {path!r} contains a backslash; use '/' separators")
        if decoded.startswith("/") or re.match(r"^[A-Za-z]:", decoded):
            raise ArchiveError(f"{what} {path!r} is absolute; only relative paths are allowed")
        if any(part == ".." for part in PurePosixPath(decoded).parts):
            raise ArchiveError(f"{what} {path!r} climbs out of its folder ('..')")
        nxt = unquote(decoded)
        if nxt == decoded:
            break
        decoded = nxt
    return path


@dataclass
class ModelFiles:
    """An MLflow model folder, unpacked and parsed."""

    root: Path
    mlmodel: dict[str, Any]
    flavors: dict[str, Any] = field(default_factory=dict)
    signature: dict[str, Any] | None = None
    input_example: Any = None
    total_bytes: int = 0


def _limits() -> tuple[int, int, int]:
    cfg = settings.PLATFORM
    return cfg["MAX_UNPACKED_BYTES"], cfg["MAX_ARCHIVE_MEMBERS"], cfg["MAX_COMPRESSION_RATIO"]


class _Budget:
    def __init__(self, compressed_size: int) -> None:
        max_bytes, self.max_members, ratio = _limits()
        self.max_bytes = min(max_bytes, max(compressed_size, 1) * ratio)
        self.written = 0
        self.members = 0

    def add_member(self) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise ArchiveError(f"archive has more than {self.max_members} members")

    def add_bytes(self, n: int) -> None:
        self.written += n
        if self.written > self.max_bytes:
            raise ArchiveError(
                f"archive unpacks to more than {self.max_bytes} bytes (limit: {_limits()[0]} bytes in all and "
                f"{_limits()[2]}x the compressed size); refusing a possible archive bomb"
            )


def _copy(src: IO[bytes], dst_path: Path, budget: _Budget) -> None:
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    with open(dst_path, "xb") as dst:
        while chunk := src.read(1024 * 1024):
            budget.add_bytes(len(chunk))
            dst.write(chunk)


def _target(dest: Path, name: str) -> Path | None:
    check_relative_path(name, "archive member")
    clean = PurePosixPath(name)
    parts = [p for p in clean.parts if p not in ("", ".")]
    if not parts:
        return None
    target = dest.joinpath(*parts)
    if not target.resolve().is_relative_to(dest.resolve()):
        raise ArchiveError(f"archive member {name!r} resolves outside the archive")
    return target


def unpack(archive: Path, dest: Path) -> None:
    """Unpack a .zip, .tar or .tar.gz into dest, refusing anything unsafe or malformed."""
    size = archive.stat().st_size
    if size == 0:
        raise ArchiveError("the uploaded archive is empty")
    with open(archive, "rb") as fh:
        head = fh.read(512)
    budget = _Budget(size)
    try:
        if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
            _unpack_zip(archive, dest, budget)
        elif head[:2] == b"\x1f\x8b" or (len(head) >= 262 and head[257:262] == b"ustar"):
            _unpack_tar(archive, dest, budget)
        else:
            raise ArchiveError("not a model archive: expected a .zip, .tar or .tar.gz of an MLflow model folder")
    except ArchiveError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ArchiveError(f"the archive is corrupt or truncated: {exc}") from exc


def _unpack_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:  # check every name before writing anything
            _target(dest, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArchiveError(f"archive member {info.filename!r} is a symbolic link; links are not allowed")
            if info.flag_bits & 0x1:
                raise ArchiveError(f"archive member {info.filename!r} is encrypted")
        for info in infos:
            budget.add_member()
            target = _target(dest, info.filename)
            if target is None or info.is_dir():
                continue
            with zf.open(info) as src:
                _copy(src, target, budget)


def _unpack_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    with tarfile.open(archive, mode="r:*") as tf:
        members = tf.getmembers()  # reads the whole archive: a truncated one fails here
        for member in members:
            _target(dest, member.name)
            if member.issym() or member.islnk():
                raise ArchiveError(f"archive member {member.name!r} is a link; links are not allowed")
            if not (member.isfile() or member.isdir()):
                raise ArchiveError(f"archive member {member.name!r} is a device, FIFO or other special file")
        for member in members:
            budget.add_member()
            target = _target(dest, member.name)
            if target is None or member.isdir():
                continue
            src = tf.extractfile(member)
            if src is None:
                raise ArchiveError(f"archive member {member.name!r} cannot be read")
            with src:
                _copy(src, target, budget)
                if budget.written and target.stat().st_size != member.size:
                    raise ArchiveError(f"archive member {member.name!r} is truncated")


def model_root(unpacked: Path) -> Path:
    """The folder holding MLmodel: the archive root, or its single top-level folder."""
    if (unpacked / "MLmodel").is_file():
        return unpacked
    entries = [p for p in unpacked.iterdir() if not p.name.startswith("__MACOSX")]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "MLmodel").is_file():
        return entries[0]
    raise ArchiveError("no MLmodel file at the archive root or in its single top-level folder; "
                       "upload the folder written by mlflow.<flavor>.save_model")


def parse_mlmodel(text: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ArchiveError(f"MLmodel is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("flavors"), dict) or not doc["flavors"]:
        raise ArchiveError("MLmodel has no 'flavors' section; is this an MLflow model?")
    return doc


def check_flavors(mlmodel: dict[str, Any]) -> dict[str, Any]:
    flavors: dict[str, Any] = mlmodel["flavors"]
    unknown = sorted(set(flavors) - KNOWN_FLAVORS)
    if unknown:
        raise ArchiveError(
            f"unknown model flavor(s) {', '.join(unknown)}; known flavors: {', '.join(sorted(KNOWN_FLAVORS))}"
        )
    if settings.PLATFORM["REFUSE_PICKLE_FLAVORS"] and uses_pickle(flavors):
        raise PolicyError(
            "this platform refuses pickle-based model flavors (PLATFORM_REFUSE_PICKLE_FLAVORS is on); "
            "register an ONNX model (mlflow.onnx) or a scikit-learn model saved with serialization_format='skops'"
        )
    return flavors


def uses_pickle(flavors: dict[str, Any]) -> bool:
    for name, conf in flavors.items():
        conf = conf if isinstance(conf, dict) else {}
        if name in PICKLE_FREE_FLAVORS:
            continue
        if name == "sklearn" and conf.get("serialization_format") == "skops":
            continue
        if name == "python_function" and conf.get("loader_module") in PICKLE_FREE_PYFUNC_LOADERS:
            continue
        if name == "python_function" and conf.get("loader_module") in {
            "mlflow.sklearn", "mlflow.pytorch", "mlflow.xgboost", "mlflow.lightgbm"
        }:
            continue  # judged by that flavor's own entry
        return True
    return False


def signature_of(mlmodel: dict[str, Any]) -> dict[str, Any] | None:
    sig = mlmodel.get("signature")
    if not isinstance(sig, dict):
        return None
    out: dict[str, Any] = {}
    for key in ("inputs", "outputs", "params"):
        value = sig.get(key)
        if isinstance(value, str):
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ArchiveError(f"MLmodel signature '{key}' is not valid JSON: {exc}") from exc
        elif value is not None:
            out[key] = value
    return out or None


def input_example_path(mlmodel: dict[str, Any]) -> str | None:
    info = mlmodel.get("saved_input_example_info")
    if isinstance(info, dict) and isinstance(info.get("artifact_path"), str):
        return check_relative_path(info["artifact_path"], "input example path")
    return None


def parse_input_example(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def read_model_folder(root: Path) -> ModelFiles:
    mlmodel = parse_mlmodel((root / "MLmodel").read_text(errors="replace"))
    flavors = check_flavors(mlmodel)
    example_rel = input_example_path(mlmodel)
    example = None
    if example_rel:
        path = root / example_rel
        if path.is_file() and path.stat().st_size <= 5 * 1024 * 1024:
            example = parse_input_example(path.read_text(errors="replace"))
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return ModelFiles(root=root, mlmodel=mlmodel, flavors=flavors, signature=signature_of(mlmodel),
                      input_example=example, total_bytes=total)


# ---- source URIs --------------------------------------------------------------------------------

RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class SourceUri:
    kind: str  # "run" or "model"
    run_id: str = ""
    artifact_path: str = ""
    model_name: str = ""
    version_or_alias: str = ""


def parse_source_uri(uri: str) -> SourceUri:
    """Accept `runs:/<run_id>/<path>`, `models:/<name>/<version>` and `models:/<name>@<alias>`."""
    if not isinstance(uri, str) or not uri:
        raise ArchiveError("source URI is empty")
    if len(uri) > 1000:
        raise ArchiveError("source URI is longer than 1000 characters")
    scheme, sep, rest = uri.partition(":/")
    if not sep or scheme not in {"runs", "models"}:
        raise ArchiveError(
            f"unsupported source {uri!r}: give runs:/<run_id>/<artifact_path> or models:/<name>/<version>; "
            "file:, http(s): and local paths are not accepted"
        )
    check_relative_path(rest.lstrip("/"), "source URI path")
    rest = rest.lstrip("/")
    if scheme == "runs":
        run_id, _, path = rest.partition("/")
        if not RUN_ID_RE.match(run_id):
            raise ArchiveError(f"{run_id!r} is not an MLflow run id (32 hexadecimal characters)")
        return SourceUri(kind="run", run_id=run_id, artifact_path=path.strip("/"))
    if "@" in rest and "/" not in rest:
        name, _, alias = rest.partition("@")
        check_model_name(name)
        return SourceUri(kind="model", model_name=name, version_or_alias=alias)
    name, _, version = rest.partition("/")
    check_model_name(name)
    if not version.isdigit():
        raise ArchiveError(f"models:/ URI needs a version number or @alias, got {uri!r}")
    return SourceUri(kind="model", model_name=name, version_or_alias=version)
