"""Opening what people upload, without trusting it: model archives and source URIs.

Nothing here unpickles or imports anything from the model. It reads the archive's directory, checks
every member before a byte is written, streams members out under a byte budget (headers can lie
about sizes), and reads the MLmodel file as plain YAML.
"""

from __future__ import annotations

import gzip
import json
import re
import stat
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote

import yaml
from django.conf import settings

from registry import confinement


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


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise ArchiveError(
            f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


_MAX_DECODINGS = 4


def check_relative_path(path: str, what: str = "path") -> str:
    """Refuse anything that could point outside its folder, however it is spelled or encoded.

    Every percent-decoding of the path is checked (`%252e%252e` -> `%2e%2e` -> `..`); a path that still
    decodes to something new after a few rounds is refused rather than trusted."""
    decoded = path
    for _ in range(_MAX_DECODINGS):
        if "\x00" in decoded:
            raise ArchiveError(f"{what} {path!r} contains a NUL byte")
        if "\\" in decoded:
            raise ArchiveError(f"{what} {path!r} contains a backslash; use '/' separators")
        if decoded.startswith("/") or re.match(r"^[A-Za-z]:", decoded):
            raise ArchiveError(f"{what} {path!r} is absolute; only relative paths are allowed")
        if any(part == ".." for part in PurePosixPath(decoded).parts):
            raise ArchiveError(f"{what} {path!r} climbs out of its folder ('..')")
        nxt = unquote(decoded)
        if nxt == decoded:
            return path
        decoded = nxt
    raise ArchiveError(f"{what} {path!r} is percent-encoded {_MAX_DECODINGS} or more times over; refusing it")


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
    cfg: dict[str, Any] = settings.PLATFORM
    return int(cfg["MAX_UNPACKED_BYTES"]), int(cfg["MAX_ARCHIVE_MEMBERS"]), int(cfg["MAX_COMPRESSION_RATIO"])


class _Budget:
    """What an archive may unpack to: at most MAX_UNPACKED_BYTES, and at most MAX_COMPRESSION_RATIO
    times its own size; at most MAX_ARCHIVE_MEMBERS members. Checked against what the headers claim
    (so a bomb is refused before it is inflated) and against what is actually written (headers lie)."""

    def __init__(self, compressed_size: int) -> None:
        max_bytes, self.max_members, ratio = _limits()
        self.max_bytes = min(max_bytes, max(compressed_size, 1) * ratio)
        self.written = 0
        self.claimed = 0
        self.members = 0

    def _bomb(self, n: int) -> ArchiveError:
        max_bytes, _, ratio = _limits()
        return ArchiveError(
            f"archive unpacks to more than {self.max_bytes} bytes (at least {n}; the limit is {max_bytes} bytes in "
            f"all and {ratio}x the compressed size); refusing a possible archive bomb"
        )

    def add_member(self, claimed_size: int) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise ArchiveError(f"archive has more than {self.max_members} members (PLATFORM_MAX_ARCHIVE_MEMBERS)")
        self.claimed += max(claimed_size, 0)
        if self.claimed > self.max_bytes:
            raise self._bomb(self.claimed)

    def add_bytes(self, n: int) -> None:
        self.written += n
        if self.written > self.max_bytes:
            raise self._bomb(self.written)


def _copy(src: IO[bytes], dst_path: Path, budget: _Budget) -> int:
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    copied = 0
    with open(dst_path, "xb") as dst:
        while chunk := src.read(1024 * 1024):
            budget.add_bytes(len(chunk))
            copied += len(chunk)
            dst.write(chunk)
    return copied


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


class _Seen:
    """Two members unpacking to the same path would silently replace one another: refuse them."""

    def __init__(self) -> None:
        self.files: set[Path] = set()

    def add(self, target: Path | None, name: str, is_dir: bool) -> None:
        if target is None or is_dir:
            return
        if target in self.files:
            raise ArchiveError(f"archive member {name!r} appears more than once")
        self.files.add(target)


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
        elif head[:2] == b"\x1f\x8b":
            with tempfile.TemporaryFile(dir=dest.parent) as tar:
                _gunzip(archive, tar, budget)
                _unpack_tar(tar, dest, budget)
        elif len(head) >= 262 and head[257:262] == b"ustar":
            with open(archive, "rb") as tar:
                _unpack_tar(tar, dest, budget)
        else:
            raise ArchiveError("not a model archive: expected a .zip, .tar or .tar.gz of an MLflow model folder")
    except ArchiveError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        raise ArchiveError(f"the archive is corrupt or truncated: {exc}") from exc


def _gunzip(archive: Path, out: IO[bytes], budget: _Budget) -> None:
    """Inflate a .tar.gz once, to its end: a missing or wrong gzip trailer (a truncated upload) fails
    here, and so does a bomb, before tarfile reads a header. The tar's own headers and padding are
    allowed on top of the byte budget."""
    _, max_members, _ = _limits()
    allowance = budget.max_bytes + 1024 * (max_members + 20)
    inflated = 0
    with gzip.open(archive, "rb") as gz:
        while chunk := gz.read(1024 * 1024):
            inflated += len(chunk)
            if inflated > allowance:
                raise budget._bomb(inflated)
            out.write(chunk)
    out.seek(0)


def _unpack_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        seen = _Seen()
        for info in infos:  # check every member before writing anything
            budget.add_member(info.file_size)
            target = _target(dest, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArchiveError(f"archive member {info.filename!r} is a symbolic link; links are not allowed")
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: the zip tool set no type
                raise ArchiveError(f"archive member {info.filename!r} is a device, FIFO or other special file")
            if info.flag_bits & 0x1:
                raise ArchiveError(f"archive member {info.filename!r} is encrypted")
            seen.add(target, info.filename, info.is_dir())
        for info in infos:
            target = _target(dest, info.filename)
            if target is None or info.is_dir():
                continue
            with zf.open(info) as src:  # checks each member's CRC as it reads
                _copy(src, target, budget)


def _unpack_tar(fileobj: IO[bytes], dest: Path, budget: _Budget) -> None:
    with tarfile.open(fileobj=fileobj, mode="r:") as tf:
        members: list[tarfile.TarInfo] = []
        seen = _Seen()
        # Read headers one by one so a member count or claimed size over the limit stops at once.
        while (member := tf.next()) is not None:
            budget.add_member(member.size)
            target = _target(dest, member.name)
            if member.issym() or member.islnk():
                raise ArchiveError(f"archive member {member.name!r} is a link; links are not allowed")
            if not (member.isfile() or member.isdir()):
                raise ArchiveError(f"archive member {member.name!r} is a device, FIFO or other special file")
            if member.sparse is not None:
                raise ArchiveError(f"archive member {member.name!r} is a sparse file; sparse files are not allowed")
            seen.add(target, member.name, member.isdir())
            members.append(member)
        if not members:
            raise ArchiveError("the archive holds no files")
        _check_tar_end(tf, fileobj)
        for member in members:
            target = _target(dest, member.name)
            if target is None or member.isdir():
                continue
            src = tf.extractfile(member)
            if src is None:
                raise ArchiveError(f"archive member {member.name!r} cannot be read")
            with src:
                if _copy(src, target, budget) != member.size:
                    raise ArchiveError(f"archive member {member.name!r} is truncated")


def _check_tar_end(tf: tarfile.TarFile, fileobj: IO[bytes]) -> None:
    """tarfile takes a file that stops at (or inside) a header for the archive's end; a real tar ends
    with a zero block. Without it the upload was cut short and members may be missing."""
    fileobj.seek(tf.offset)
    block = fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise ArchiveError("the archive is corrupt or truncated: it ends without the tar end-of-archive marker")


def model_root(unpacked: Path) -> Path:
    """The folder holding MLmodel: the archive root, or its single top-level folder."""
    if (unpacked / "MLmodel").is_file():
        return unpacked
    entries = [p for p in unpacked.iterdir() if not p.name.startswith("__MACOSX")]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "MLmodel").is_file():
        return entries[0]
    raise ArchiveError("no MLmodel file at the archive root or in its single top-level folder; "
                       "upload the folder written by mlflow.<flavor>.save_model")


MAX_MLMODEL_BYTES = 1024 * 1024


class _MLmodelLoader(yaml.SafeLoader):
    """yaml.safe_load without anchors and aliases: MLflow never writes them, and an alias bomb (a few
    lines that expand to 10^9 items once stored as JSON) would otherwise stall the web process."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in MLmodel", mark)
        return super().compose_node(parent, index)


def parse_mlmodel(text: str) -> dict[str, Any]:
    if len(text) > MAX_MLMODEL_BYTES:
        raise ArchiveError(f"MLmodel is larger than {MAX_MLMODEL_BYTES} bytes; is this an MLflow model?")
    try:
        doc = yaml.load(text, Loader=_MLmodelLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ArchiveError(f"MLmodel is not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ArchiveError("MLmodel is nested too deeply to be an MLflow model") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("flavors"), dict) or not doc["flavors"]:
        raise ArchiveError("MLmodel has no 'flavors' section; is this an MLflow model?")
    if not all(isinstance(name, str) for name in doc["flavors"]):
        raise ArchiveError("MLmodel 'flavors' must map flavor names (text) to their settings")
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
    if uses_pickle(flavors):
        refusal = confinement.refusal()
        if refusal:
            raise PolicyError(refusal)
    return flavors


# pyfunc loaders that only delegate to their own flavor's entry, which is judged on its own.
_DELEGATING_PYFUNC_LOADERS = {
    "mlflow.sklearn": "sklearn", "mlflow.pytorch": "pytorch", "mlflow.xgboost": "xgboost",
    "mlflow.lightgbm": "lightgbm", "mlflow.onnx": "onnx",
}


def uses_pickle(flavors: dict[str, Any]) -> bool:
    """Whether loading this model may unpickle something. Unsure means yes."""
    for name, conf in flavors.items():
        conf = conf if isinstance(conf, dict) else {}
        if name in PICKLE_FREE_FLAVORS:
            continue
        if name == "sklearn" and conf.get("serialization_format") == "skops":
            continue
        if name == "python_function":
            # A pyfunc entry that delegates to another flavor is judged by that flavor's entry; without
            # one the loader falls back to its default format (a pickle for most).
            delegate = _DELEGATING_PYFUNC_LOADERS.get(str(conf.get("loader_module")))
            if delegate is not None and delegate in flavors:
                continue
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
            except (ValueError, RecursionError) as exc:
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
    except (ValueError, RecursionError):
        return None


def read_model_folder(root: Path) -> ModelFiles:
    if (root / "MLmodel").stat().st_size > MAX_MLMODEL_BYTES:
        raise ArchiveError(f"MLmodel is larger than {MAX_MLMODEL_BYTES} bytes; is this an MLflow model?")
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
ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


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
    if "?" in rest or "#" in rest:
        raise ArchiveError(f"source URI {uri!r} has a query or fragment ('?', '#'); give a plain path")
    rest = rest.lstrip("/")
    if scheme == "runs":
        run_id, _, path = rest.partition("/")
        if not RUN_ID_RE.match(run_id):
            raise ArchiveError(f"{run_id!r} is not an MLflow run id (32 hexadecimal characters)")
        return SourceUri(kind="run", run_id=run_id, artifact_path=path.strip("/"))
    if "@" in rest and "/" not in rest:
        name, _, alias = rest.partition("@")
        check_model_name(name)
        if not ALIAS_RE.match(alias):
            raise ArchiveError(f"model alias {alias!r} must be 1-255 letters, digits, '_' or '-'")
        return SourceUri(kind="model", model_name=name, version_or_alias=alias)
    name, _, version = rest.partition("/")
    check_model_name(name)
    if not version.isdigit():
        raise ArchiveError(f"models:/ URI needs a version number or @alias, got {uri!r}")
    return SourceUri(kind="model", model_name=name, version_or_alias=version)
