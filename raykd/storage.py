"""Paths and URIs: local files, s3:// (any S3-compatible endpoint) and pkg:// (package data).

Everything returns a `pyarrow.fs.FileSystem` plus a path on it, the form Ray Data and
Ray Train both take. S3 endpoints travel inside the URI
(`s3://bucket/key?endpoint_override=127.0.0.1:9000&scheme=http`) because pyarrow ignores
`AWS_ENDPOINT_URL`; credentials come from the usual AWS environment variables.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from raykd.errors import UserError

_GLOB_CHARS = "*?["


def resolve_pkg(uri: str, key: str = "") -> str:
    """`pkg://DIST/path/in/it` -> the absolute path of that file in the installed package."""
    import importlib.metadata as md

    rest = uri[len("pkg://"):]
    dist_name, _, inner = rest.partition("/")
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        where = f"{key}: " if key else ""
        raise UserError(
            f"{where}package '{dist_name}' in {uri} is not installed "
            f"(pip install --no-deps {dist_name})"
        ) from None
    return str(Path(str(dist.locate_file(""))) / inner)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith(("pkg://", "file://"))


def local_path(uri: str, key: str = "") -> str:
    """A pkg://, file:// or plain path as an absolute local path."""
    if uri.startswith("pkg://"):
        return resolve_pkg(uri, key)
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return str(Path(uri).expanduser().absolute())


def filesystem(uri: str, key: str = "") -> tuple[pafs.FileSystem, str]:
    """URI or path -> (pyarrow filesystem, path on it)."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), local_path(uri, key)
    parts = urlsplit(uri)
    path = f"{parts.netloc}{parts.path}".rstrip("/")
    if parts.scheme == "s3":
        return s3_filesystem(parts.query, key, uri), path
    root = f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
    try:
        fs, _ = pafs.FileSystem.from_uri(root)
    except (pa_errors() + (ValueError,)) as e:
        raise UserError(f"{key}: cannot open {uri}: {e}") from None
    return fs, path


# Every S3 call gives up after S3_ATTEMPTS tries of S3_TIMEOUT_S each, so a lost store
# fails a run within minutes, with a message, instead of hanging it.
S3_ATTEMPTS = 3


def s3_timeout_s() -> float:
    return float(os.environ.get("RAYKD_S3_TIMEOUT_S", "30"))


def s3_filesystem(query: str, key: str, uri: str) -> pafs.S3FileSystem:
    """An S3 filesystem for `?endpoint_override=HOST:PORT&scheme=http&region=R` with bounded
    retries and timeouts; credentials come from the AWS environment variables."""
    from urllib.parse import parse_qs

    q = {k: v[-1] for k, v in parse_qs(query).items()}
    unknown = set(q) - {"endpoint_override", "scheme", "region"}
    if unknown:
        raise UserError(f"{key}: unsupported option {sorted(unknown)[0]!r} in {uri} "
                        "(endpoint_override, scheme and region are understood)")
    region = q.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return pafs.S3FileSystem(
        endpoint_override=q.get("endpoint_override"), scheme=q.get("scheme", "https"),
        region=region or ("us-east-1" if q.get("endpoint_override") else None),
        connect_timeout=min(10.0, s3_timeout_s()), request_timeout=s3_timeout_s(),
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS))


def check_store(uri: str, key: str) -> None:
    """Fail fast, in one line, when a remote store for outputs is missing, unreachable or
    refuses us: list it, then write and delete a marker."""
    if not is_remote(uri):
        return
    fs, path = filesystem(uri, key)
    bucket = path.split("/", 1)[0]
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise UserError(f"{key}: bucket '{bucket}' of {uri} does not exist")
        marker = f"{path}/.raykd-write-check"
        with fs.open_output_stream(marker) as f:
            f.write(b"ok")
        fs.delete_file(marker)
    except UserError:
        raise
    except pa_errors() as e:
        raise UserError(f"{key}: cannot use {uri}: {_short(e)}") from None


def pa_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (pa.ArrowException, OSError)


@dataclass
class FileSet:
    """Files matched by the data sources, on one filesystem."""

    fs: pafs.FileSystem
    paths: list[str]  # full paths on fs
    names: list[str]  # stable names relative to each pattern's fixed prefix (for sample ids)
    sizes: list[int] = field(default_factory=list)  # bytes as listed, -1 unknown (preflight)


def expand(patterns: list[str], key: str) -> FileSet:
    """Expand files, directories and glob patterns; every pattern must match something."""
    fs_seen: pafs.FileSystem | None = None
    paths: list[str] = []
    names: list[str] = []
    sizes: list[int] = []
    for pattern in patterns:
        fs, path = filesystem(pattern, key)
        if fs_seen is not None and fs.type_name != fs_seen.type_name:
            raise UserError(f"{key}: all sources must be on one filesystem; {pattern} is not")
        fs_seen = fs
        found = _match(fs, path, pattern, key)
        if not found:
            if not any(c in path for c in _GLOB_CHARS):
                raise UserError(f"{key}: directory {pattern} holds no files")
            raise UserError(f"{key}: no files match {pattern}")
        base = _fixed_prefix(path)
        for p, size in found:
            paths.append(p)
            names.append(Path(p).name if p == path else os.path.relpath(p, base))
            sizes.append(size)
    assert fs_seen is not None
    return FileSet(fs=fs_seen, paths=paths, names=names, sizes=sizes)


def _match(fs: pafs.FileSystem, path: str, pattern: str, key: str) -> list[tuple[str, int]]:
    """(path, size) of every file `pattern` names, sorted by path."""
    try:
        if not any(c in path for c in _GLOB_CHARS):
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                return [(path, _size(info))]
            if info.type == pafs.FileType.NotFound:
                raise UserError(f"{key}: {pattern} does not exist")
            return sorted(
                (i.path, _size(i))
                for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                if i.type == pafs.FileType.File and not Path(i.path).name.startswith(".")
            )
        base = _fixed_prefix(path)
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return sorted(
            (i.path, _size(i)) for i in infos
            if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, path)
        )
    except UserError:
        raise
    except pa_errors() as e:
        raise UserError(f"{key}: cannot list {pattern}: {_short(e)}") from None


def _size(info: pafs.FileInfo) -> int:
    """Bytes in a listed file; -1 where the filesystem does not say (never "empty")."""
    return info.size if info.size is not None else -1


def _fixed_prefix(path: str) -> str:
    """The directory part of a pattern before its first glob character."""
    cut = min((path.index(c) for c in _GLOB_CHARS if c in path), default=None)
    if cut is None:
        return path
    return path[:cut].rsplit("/", 1)[0]


def _short(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
