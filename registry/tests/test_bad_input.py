"""Bad input gets a clear 4xx and leaves nothing registered: not in the platform's tables, not in MLflow."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from registry import archives
from registry.archives import ArchiveError, check_relative_path, parse_source_uri
from registry.mlflow_store import registry_store
from registry.models import ModelVersion, RegisteredModel

RUN_ID = "0123456789abcdef0123456789abcdef"
SKLEARN_MLMODEL = "flavors:\n  sklearn:\n    pickled_model: model.pkl\n    serialization_format: cloudpickle\n"


# ---- helpers ------------------------------------------------------------------------------------

def post_archive(client: Any, name: str, data: bytes, filename: str = "model.tar.gz") -> Any:
    upload = SimpleUploadedFile(filename, data, content_type="application/octet-stream")
    return client.post(f"/api/v1/models/{name}/versions/", {"archive": upload}, format="multipart")


def post_source(client: Any, name: str, source: str) -> Any:
    return client.post(f"/api/v1/models/{name}/versions/", {"source": source}, format="json")


def mlflow_versions(name: str) -> list[int]:
    return sorted(int(mv.version) for mv in registry_store().search_model_versions(f"name = '{name}'"))


def assert_refused(resp: Any, status: int, *words: str) -> str:
    assert resp.status_code == status, resp.content
    message = resp.json()["error"]["message"]
    for word in words:
        assert word.lower() in message.lower(), message
    return message


def assert_nothing_registered(name: str) -> None:
    assert not ModelVersion.objects.filter(model__name=name).exists()
    model = RegisteredModel.objects.filter(name=name).first()
    assert model is None or (model.version_count == 0 and model.latest_version == 0)
    assert mlflow_versions(name) == []


def tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]], compress: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if compress else "w") as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tf.addfile(info, io.BytesIO(member[1]))
    return buf.getvalue()


def zip_bytes(members: list[zipfile.ZipInfo | tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED,
              link_to: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for member in members:
            if isinstance(member, zipfile.ZipInfo):
                zf.writestr(member, link_to)
            else:
                zf.writestr(member[0], member[1])
    return buf.getvalue()


def folder_as(folder: Path, fmt: str) -> bytes:
    """A model folder as a .tar.gz, .tar or .zip, files at the archive root."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    members = [(p.relative_to(folder).as_posix(), p.read_bytes()) for p in files]
    if fmt == "zip":
        return zip_bytes(members)  # type: ignore[arg-type]
    return tar_bytes(members, compress=fmt == "tar.gz")  # type: ignore[arg-type]


def with_member(fmt: str, member_name: str) -> bytes:
    """A valid-looking model archive plus one extra member called `member_name`."""
    members = [("MLmodel", SKLEARN_MLMODEL.encode()), (member_name, b"owned")]
    return zip_bytes(members) if fmt == "zip" else tar_bytes(members)  # type: ignore[arg-type]


def zeros_zip(n_bytes: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("MLmodel", SKLEARN_MLMODEL)
        with zf.open("model.pkl", "w") as fh:
            block = bytes(1024 * 1024)
            for _ in range(n_bytes // len(block)):
                fh.write(block)
    return buf.getvalue()


@pytest.fixture
def platform_settings(settings: Any) -> Callable[..., None]:
    """Override keys of settings.PLATFORM (a dict: replaced whole, restored after the test)."""

    def override(**changes: Any) -> None:
        settings.PLATFORM = {**settings.PLATFORM, **changes}

    return override


pytestmark = pytest.mark.django_db


# ---- the archive itself -------------------------------------------------------------------------

def test_random_bytes_are_not_an_archive(scientist, unique_name):
    resp = post_archive(scientist, unique_name, os.urandom(4096), "model.bin")
    assert_refused(resp, 400, "not a model archive")
    assert_nothing_registered(unique_name)


def test_an_empty_file_is_refused_as_empty(scientist, unique_name):
    resp = post_archive(scientist, unique_name, b"")
    assert_refused(resp, 400, "empty")
    assert_nothing_registered(unique_name)


def test_a_tar_gz_cut_in_half_is_refused_as_truncated(scientist, unique_name, model_archive):
    data = model_archive.read_bytes()
    resp = post_archive(scientist, unique_name, data[: len(data) // 2])
    assert_refused(resp, 400, "corrupt or truncated")
    assert_nothing_registered(unique_name)


def test_a_tar_gz_missing_only_its_gzip_trailer_is_refused_as_truncated(scientist, unique_name, model_archive):
    data = model_archive.read_bytes()
    resp = post_archive(scientist, unique_name, data[:-4])
    assert_refused(resp, 400, "corrupt or truncated")
    assert_nothing_registered(unique_name)


def test_a_tar_cut_between_two_members_is_refused_not_read_as_shorter(scientist, unique_name, sklearn_model_dir):
    # tarfile itself takes a file ending at a header boundary for the end of the archive.
    data = folder_as(sklearn_model_dir, "tar")
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        second = tf.getmembers()[1].offset
    resp = post_archive(scientist, unique_name, data[:second + 100], "model.tar")
    assert_refused(resp, 400, "truncated")
    assert_nothing_registered(unique_name)


def test_a_zip_cut_in_half_is_refused_as_truncated(scientist, unique_name, sklearn_model_dir):
    data = folder_as(sklearn_model_dir, "zip")
    resp = post_archive(scientist, unique_name, data[: len(data) // 2], "model.zip")
    assert_refused(resp, 400, "corrupt or truncated")
    assert_nothing_registered(unique_name)


def test_a_zip_with_a_bad_crc_is_refused_as_corrupt(scientist, unique_name):
    data = bytearray(zip_bytes([("MLmodel", SKLEARN_MLMODEL.encode()), ("model.pkl", bytes(range(256)) * 40)],
                               method=zipfile.ZIP_STORED))
    at = data.index(bytes(range(256))) + 1000
    data[at] ^= 0xFF
    resp = post_archive(scientist, unique_name, bytes(data), "model.zip")
    assert_refused(resp, 400, "corrupt", "crc")
    assert_nothing_registered(unique_name)


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
@pytest.mark.parametrize(("member", "words"), [
    ("../evil", ["climbs out"]),
    ("model/../../evil", ["climbs out"]),
    ("..\\evil", ["backslash"]),
    ("/etc/x", ["absolute"]),
    ("%252e%252e/evil", ["climbs out"]),
    ("%2e%2e%2fevil", ["climbs out"]),
])
def test_an_archive_member_that_points_outside_is_refused(scientist, unique_name, fmt, member, words, tmp_path):
    data = with_member(fmt, member)
    names = zipfile.ZipFile(io.BytesIO(data)).namelist() if fmt == "zip" else tarfile.open(
        fileobj=io.BytesIO(data)).getnames()
    assert member in names  # the archive really holds the hostile name
    resp = post_archive(scientist, unique_name, data, f"model.{fmt}")
    assert_refused(resp, 400, repr(member), *words)
    assert_nothing_registered(unique_name)


def test_a_symlink_in_a_tar_is_refused(scientist, unique_name):
    link = tarfile.TarInfo("model.pkl")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    resp = post_archive(scientist, unique_name, tar_bytes([("MLmodel", SKLEARN_MLMODEL.encode()), link]))
    assert_refused(resp, 400, "'model.pkl'", "link")
    assert_nothing_registered(unique_name)


def test_a_hardlink_in_a_tar_is_refused(scientist, unique_name):
    link = tarfile.TarInfo("model.pkl")
    link.type = tarfile.LNKTYPE
    link.linkname = "MLmodel"
    resp = post_archive(scientist, unique_name, tar_bytes([("MLmodel", SKLEARN_MLMODEL.encode()), link]))
    assert_refused(resp, 400, "'model.pkl'", "link")
    assert_nothing_registered(unique_name)


def test_a_symlink_in_a_zip_is_refused(scientist, unique_name):
    link = zipfile.ZipInfo("model.pkl")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    data = zip_bytes([("MLmodel", SKLEARN_MLMODEL.encode()), link], link_to="/etc/passwd")
    resp = post_archive(scientist, unique_name, data, "model.zip")
    assert_refused(resp, 400, "'model.pkl'", "symbolic link")
    assert_nothing_registered(unique_name)


def test_a_device_file_in_a_tar_is_refused(scientist, unique_name):
    fifo = tarfile.TarInfo("model.pkl")
    fifo.type = tarfile.FIFOTYPE
    resp = post_archive(scientist, unique_name, tar_bytes([("MLmodel", SKLEARN_MLMODEL.encode()), fifo]))
    assert_refused(resp, 400, "special file")
    assert_nothing_registered(unique_name)


def test_a_member_given_twice_is_refused(scientist, unique_name):
    data = tar_bytes([("MLmodel", SKLEARN_MLMODEL.encode()), ("MLmodel", b"flavors: {onnx: {}}\n")])
    resp = post_archive(scientist, unique_name, data)
    assert_refused(resp, 400, "more than once")
    assert_nothing_registered(unique_name)


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    return zeros_zip(200 * 1024 * 1024)


def test_a_zip_bomb_is_refused_before_it_is_inflated(scientist, unique_name, zip_bomb):
    assert len(zip_bomb) < 400 * 1024  # 200 MB of zeros in a few hundred kB
    resp = post_archive(scientist, unique_name, zip_bomb, "model.zip")
    assert_refused(resp, 400, "archive bomb")
    assert_nothing_registered(unique_name)


def test_a_tar_gz_bomb_is_refused(scientist, unique_name):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        info = tarfile.TarInfo("MLmodel")
        info.size = len(SKLEARN_MLMODEL)
        tf.addfile(info, io.BytesIO(SKLEARN_MLMODEL.encode()))
        info = tarfile.TarInfo("model.pkl")
        info.size = 100 * 1024 * 1024
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    bomb = gzip.compress(raw.getvalue(), compresslevel=9)
    assert len(bomb) < 200 * 1024
    resp = post_archive(scientist, unique_name, bomb)
    assert_refused(resp, 400, "archive bomb")
    assert_nothing_registered(unique_name)


def test_the_compression_ratio_limit_is_the_operators_setting(scientist, unique_name, platform_settings):
    small_bomb = zeros_zip(2 * 1024 * 1024)  # ~2 kB holding 2 MB: 1000x
    platform_settings(MAX_COMPRESSION_RATIO=2000)
    assert post_archive(scientist, unique_name, small_bomb, "model.zip").status_code == 201
    other = unique_name + "-b"
    platform_settings(MAX_COMPRESSION_RATIO=100)
    resp = post_archive(scientist, other, small_bomb, "model.zip")
    assert_refused(resp, 400, "archive bomb", "100x")
    assert_nothing_registered(other)


def test_the_unpacked_size_limit_is_the_operators_setting(scientist, unique_name, platform_settings):
    platform_settings(MAX_UNPACKED_BYTES=100_000)
    data = tar_bytes([("MLmodel", SKLEARN_MLMODEL.encode()), ("model.pkl", os.urandom(150_000))])
    resp = post_archive(scientist, unique_name, data)
    assert_refused(resp, 400, "more than 100000 bytes")
    assert_nothing_registered(unique_name)


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_an_archive_with_too_many_members_is_refused(scientist, unique_name, platform_settings, fmt):
    platform_settings(MAX_ARCHIVE_MEMBERS=10)
    members = [("MLmodel", SKLEARN_MLMODEL.encode())] + [(f"extra/{i}.txt", b"x") for i in range(10)]
    data = zip_bytes(members) if fmt == "zip" else tar_bytes(members)  # type: ignore[arg-type]
    resp = post_archive(scientist, unique_name, data, f"model.{fmt}")
    assert_refused(resp, 400, "more than 10 members")
    assert_nothing_registered(unique_name)


def test_an_upload_over_the_size_limit_is_a_413(scientist, unique_name, platform_settings, model_archive):
    platform_settings(MAX_UPLOAD_BYTES=1000)
    resp = post_archive(scientist, unique_name, model_archive.read_bytes())
    assert_refused(resp, 413, "over the limit of 1000 bytes", "PLATFORM_MAX_UPLOAD_BYTES")
    assert_nothing_registered(unique_name)


# ---- what is inside ----------------------------------------------------------------------------

def test_an_archive_without_mlmodel_is_refused(scientist, unique_name):
    resp = post_archive(scientist, unique_name, tar_bytes([("model.pkl", b"\x80\x04N.")]))
    assert_refused(resp, 400, "no MLmodel file")
    assert_nothing_registered(unique_name)


@pytest.mark.parametrize(("mlmodel", "words"), [
    ("flavors: [unclosed\n  - : :", ["not valid YAML"]),
    ("artifact_path: model\nmlflow_version: 3.1.0\n", ["no 'flavors' section"]),
    ("just a sentence", ["no 'flavors' section"]),
    ("flavors: {}\n", ["no 'flavors' section"]),
    ("flavors: {1: {}}\n", ["flavor names"]),
    ("flavors: !!python/object/apply:os.system ['true']\n", ["not valid YAML"]),
    ("flavors:\n  sklearn: &a [1]\n  onnx: *a\n", ["aliases"]),
    ("[" * 5000 + "]" * 5000, ["nested too deeply"]),
])
def test_an_mlmodel_that_is_not_an_mlflow_model_is_refused(scientist, unique_name, mlmodel, words):
    resp = post_archive(scientist, unique_name, tar_bytes([("MLmodel", mlmodel.encode())]))
    assert_refused(resp, 400, *words)
    assert_nothing_registered(unique_name)


def test_an_unknown_flavor_is_refused_by_name(scientist, unique_name):
    data = tar_bytes([("MLmodel", b"flavors:\n  foo_bar: {}\n  python_function: {loader_module: foo}\n")])
    resp = post_archive(scientist, unique_name, data)
    assert_refused(resp, 400, "unknown model flavor", "foo_bar")
    assert_nothing_registered(unique_name)


def test_an_input_example_path_outside_the_model_is_refused(scientist, unique_name):
    mlmodel = SKLEARN_MLMODEL + "saved_input_example_info:\n  artifact_path: ../../etc/passwd\n"
    resp = post_archive(scientist, unique_name, tar_bytes([("MLmodel", mlmodel.encode())]))
    assert_refused(resp, 400, "input example path", "climbs out")
    assert_nothing_registered(unique_name)


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_the_same_model_as_zip_or_plain_tar_is_accepted(scientist, unique_name, sklearn_model_dir, fmt):
    # The other side of every refusal above: well-formed archives of each kind go through.
    resp = post_archive(scientist, unique_name, folder_as(sklearn_model_dir, fmt), f"model.{fmt}")
    assert resp.status_code == 201, resp.content
    assert mlflow_versions(unique_name) == [1]


def test_a_model_in_a_single_top_level_folder_is_accepted(scientist, unique_name, sklearn_model_dir, tmp_path):
    shutil.copytree(sklearn_model_dir, tmp_path / "digits")
    resp = post_archive(scientist, unique_name, folder_as(tmp_path, "tar.gz"))
    assert resp.status_code == 201, resp.content
    assert ModelVersion.objects.filter(model__name=unique_name, version=1).exists()


# ---- source URIs -------------------------------------------------------------------------------

@pytest.mark.parametrize(("source", "words"), [
    ("file:///etc/passwd", ["unsupported source"]),
    ("/abs/path", ["unsupported source"]),
    ("../model", ["unsupported source"]),
    ("http://x/y", ["unsupported source"]),
    ("s3://bucket/model", ["unsupported source"]),
    ("mlflow-artifacts:/1/abc/artifacts/model", ["unsupported source"]),
    (f"runs:/{RUN_ID}/../../etc", ["climbs out"]),
    (f"runs:/{RUN_ID}/..%2f..%2fetc", ["climbs out"]),
    (f"runs:/{RUN_ID}/%252e%252e/x", ["climbs out"]),
    (f"runs:/{RUN_ID}/%25252e%25252e/x", ["climbs out"]),
    (f"runs:/{RUN_ID}\\..\\x", ["backslash"]),
    (f"runs:/{RUN_ID}/model%00", ["NUL"]),
    (f"runs:/{RUN_ID}/model?x=../", ["query"]),
    ("models:/../x/1", ["climbs out"]),
    ("models:/%2e%2e/x/1", ["climbs out"]),
    ("runs:/not-a-run-id/model", ["not an MLflow run id"]),
    (f"runs:/{RUN_ID.upper()}/model", ["not an MLflow run id"]),
    ("models:/some-model/latest", ["version number or @alias"]),
    ("models:/some-model@bad alias", ["alias"]),
    ("", ["source"]),
])
def test_a_hostile_or_malformed_source_uri_is_refused(scientist, unique_name, source, words):
    resp = post_source(scientist, unique_name, source)
    assert_refused(resp, 400, *words)
    assert_nothing_registered(unique_name)


def test_a_run_that_does_not_exist_is_a_404(scientist, unique_name):
    resp = post_source(scientist, unique_name, f"runs:/{RUN_ID}/model")
    assert_refused(resp, 404, RUN_ID, "does not exist")
    assert_nothing_registered(unique_name)


def test_a_model_version_that_does_not_exist_is_a_404(scientist, unique_name):
    resp = post_source(scientist, unique_name, f"models:/{unique_name}-nope/3")
    assert_refused(resp, 404, "does not exist")
    assert_nothing_registered(unique_name)


def test_a_run_path_without_a_model_is_a_404(scientist, unique_name, model_archive):
    with open(model_archive, "rb") as fh:
        first = scientist.post(f"/api/v1/models/{unique_name}/versions/", {"archive": fh}, format="multipart")
    run_id = first.json()["lineage"]["run_id"]
    other = unique_name + "-b"
    resp = post_source(scientist, other, f"runs:/{run_id}/not-there")
    assert_refused(resp, 404, "no MLflow model")
    assert_nothing_registered(other)


# ---- the parsers, unit by unit -----------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "..", "../x", "a/../../x", "a/..", "/x", "C:/x", "c:x", "a\\b", "..\\x",
    "%2e%2e/x", "%2E%2E%2Fx", "%252e%252e/x", "%25252e%25252e/x", "a/%2e%2e", "%5c..%5cx", "%255c..",
    "%2fetc", "%252fetc", "a\x00b", "a%00b", "a%2500b", "%2525252e%2525252e/x",
])
def test_check_relative_path_refuses_every_spelling_of_escape(path):
    with pytest.raises(ArchiveError):
        check_relative_path(path)


@pytest.mark.parametrize("path", ["MLmodel", "a/b.pkl", "./MLmodel", "a..b/c", "...", "data/%20space.txt", "a/b/"])
def test_check_relative_path_accepts_ordinary_relative_paths(path):
    assert check_relative_path(path) == path


@pytest.mark.parametrize(("uri", "expected"), [
    (f"runs:/{RUN_ID}/model", archives.SourceUri(kind="run", run_id=RUN_ID, artifact_path="model")),
    (f"runs:/{RUN_ID}/a/b/", archives.SourceUri(kind="run", run_id=RUN_ID, artifact_path="a/b")),
    (f"runs:/{RUN_ID}", archives.SourceUri(kind="run", run_id=RUN_ID, artifact_path="")),
    ("models:/digits/3", archives.SourceUri(kind="model", model_name="digits", version_or_alias="3")),
    ("models:/digits@champion", archives.SourceUri(kind="model", model_name="digits", version_or_alias="champion")),
])
def test_parse_source_uri_reads_runs_and_models_uris(uri, expected):
    assert parse_source_uri(uri) == expected


@pytest.mark.parametrize("uri", [
    "file:///etc/passwd", "file:/etc/passwd", "/abs/path", "http://x/y", "RUNS:/" + RUN_ID,
    f"runs:/{RUN_ID}/../../etc", f"runs:/{RUN_ID}/..%2f..%2fetc", f"runs:/{RUN_ID}/%252e%252e/x",
    f"runs:/{RUN_ID}\\..\\x", f"runs://{RUN_ID}/%2e%2e", "models:/../x/1", "models:/x/../1", "models:/x/1/..",
    "models:/x@..", "models:/x@a%2fb", "runs:/123/model", "models:/-x/1", "models:/x/", "x" * 1001,
])
def test_parse_source_uri_refuses_escapes_and_other_schemes(uri):
    with pytest.raises(ArchiveError):
        parse_source_uri(uri)
