"""One path abstraction for local folders and object stores (pyarrow.fs).

S3 settings come from the environment only: the standard AWS variables for
credentials and region, and ``AWS_ENDPOINT_URL`` (or ``SLM_LENS_S3_ENDPOINT``)
for a non-AWS endpoint such as MinIO or a loopback test server.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

T = TypeVar("T")

#: Attempts of every store operation (``SLM_LENS_IO_ATTEMPTS``): ~30 s of backoff at 8.
IO_ATTEMPTS = int(os.environ.get("SLM_LENS_IO_ATTEMPTS", "8"))


class StorageError(OSError):
    """An object-store operation kept failing; names what and where."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path inside it) for a local path, ``file://`` or ``s3://`` URI.

    Split by hand, not as a URL: ``?`` and ``#`` are characters of object keys and
    glob patterns, not a query or a fragment.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    if scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(rest)
    if scheme == "s3":
        return s3_filesystem(), rest.rstrip("/")
    raise ValueError(f"unsupported store URI {uri!r}: use a local path or s3://bucket/prefix")


def s3_filesystem(allow_bucket_creation: bool = False) -> pafs.S3FileSystem:
    endpoint = os.environ.get("SLM_LENS_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {
        "region": os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(
            max_attempts=int(os.environ.get("SLM_LENS_S3_RETRIES", "3"))
        ),
        "connect_timeout": 5,
        "request_timeout": 30,
        "allow_bucket_creation": allow_bucket_creation,
    }
    if endpoint:
        url = urlparse(endpoint)
        kwargs["endpoint_override"] = url.netloc or url.path
        kwargs["scheme"] = url.scheme or "https"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


#: errno values of a network or a server that may answer next time.
_TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EPIPE,
    errno.EAGAIN,
}
#: What pyarrow's S3 client (and curl under it) says about a moment, not a request.
_TRANSIENT_WORDS = (
    "NETWORK_CONNECTION",
    "curlCode",
    "SLOW_DOWN",
    "THROTTLING",
    "SERVICE_UNAVAILABLE",
    "INTERNAL_FAILURE",
    "REQUEST_TIMEOUT",
    "REQUEST_TIME_TOO_SKEWED",
    "timed out",
    "Timeout",
    "Connection reset",
    "Connection refused",
    "HTTP status 500",
    "HTTP status 502",
    "HTTP status 503",
    "HTTP status 504",
)


def is_transient(exc: BaseException) -> bool:
    """True only for errors known to pass: a refused or reset connection, a timeout, a 5xx.

    Everything else (a missing file or bucket, denied access, a full disk, an
    operation the filesystem does not support, errors already retried) is
    permanent: retrying it would only delay the message by half a minute.
    """
    if isinstance(exc, StorageError | FileNotFoundError | PermissionError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if not isinstance(exc, OSError):
        return False
    if getattr(exc, "errno", None) in _TRANSIENT_ERRNOS:
        return True
    return any(word in str(exc) for word in _TRANSIENT_WORDS)


def with_retries(
    fn: Callable[[], T], what: str, *, attempts: int | None = None, first_delay: float = 0.25
) -> T:
    """Run ``fn``, retrying transient I/O errors with jittered exponential backoff.

    Rides out a store that is briefly unreachable (~30 s at the default 8
    attempts); a store that stays down ends in a :class:`StorageError` saying
    what failed and why. Permanent errors (see :func:`is_transient`) are raised
    at once, unchanged.
    """
    attempts = max(1, attempts or IO_ATTEMPTS)
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (OSError, ConnectionError) as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise StorageError(f"{what}: failed {attempts} times, last error: {exc}") from exc
            time.sleep(delay * (1 + random.random() / 2))
            delay = min(delay * 2, 8.0)
    raise AssertionError("unreachable")


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode()


#: What ``link()`` says on filesystems that have no hard links.
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}

#: Suffix of objects being written: readers list only ``.json``/``.parquet`` names.
PARTIAL_SUFFIX = ".partial"


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes, *, exclusive: bool = False) -> bool:
    """Write a small object so that readers see all of it or nothing; True if written.

    On S3 one PUT is atomic. On a local disk the bytes go to a hidden temporary
    name in the same folder, then a rename publishes them: a full disk, a killed
    process or a size limit leaves at most a ``.partial`` file that no reader lists.

    ``exclusive``: publish only if ``path`` does not exist yet, else return False.
    Atomic on a local disk (a hard link fails if the name is taken); on S3 a
    check before the PUT, which two writers can still both pass.
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        if exclusive and exists(fs, path):
            return False
        with fs.open_output_stream(path) as f:
            f.write(data)
        return True
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        if not exclusive:
            fs.move(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            # A mount without hard links (FUSE object stores): check, then rename.
            if exists(fs, path):
                return False
            fs.move(tmp, path)
        return True
    finally:
        with contextlib.suppress(OSError):
            if exists(fs, tmp):
                fs.delete_file(tmp)


def list_files(fs: pafs.FileSystem, path: str, recursive: bool = True) -> list[pafs.FileInfo]:
    if not exists(fs, path):
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    return [i for i in infos if i.type == pafs.FileType.File]
