"""Paths that are local directories or object-store URIs (``s3://``, ``gs://``, ...), through pyarrow's filesystems.

A cluster whose nodes share no disk keeps datasets, checkpoints and models in an object store. Ray Data and Ray Train
read and write URIs themselves; this module covers what chatforge does beside them: checking that a curated dataset
is there, reading its manifest, copying a model directory to or from a store. Credentials and endpoints are the
filesystem's usual ones (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL`` for an S3-compatible server, an instance role).
"""

from __future__ import annotations

import os
import posixpath


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """A local path made absolute (``~`` expanded); a URI as it is."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def dirname(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if is_uri(path) else os.path.dirname(path)


def filesystem(path: str):
    """(pyarrow filesystem, the path in it) for a local path or a URI."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(absolute(path))


def _type(path: str):
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type


def isdir(path: str) -> bool:
    import pyarrow.fs

    return _type(path) == pyarrow.fs.FileType.Directory


def isfile(path: str) -> bool:
    import pyarrow.fs

    return _type(path) == pyarrow.fs.FileType.File


def read_text(path: str) -> str:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode("utf-8")


def copy_dir(source: str, target: str) -> None:
    """Copy a directory tree between any two of: a local path, an object-store URI."""
    import pyarrow.fs

    source_fs, source_path = filesystem(source)
    target_fs, target_path = filesystem(target)
    pyarrow.fs.copy_files(source_path, target_path, source_filesystem=source_fs, destination_filesystem=target_fs)


def local_copy(path: str, cache: str) -> str:
    """``path`` itself when it is local; else the directory it names, downloaded once under ``cache`` (a directory
    named by a hash of the URI; a download that fails part way leaves nothing behind)."""
    import hashlib
    import shutil
    import tempfile

    if not is_uri(path):
        return path
    target = os.path.join(cache, hashlib.blake2b(path.encode(), digest_size=8).hexdigest())
    if os.path.isdir(target):
        return target
    os.makedirs(cache, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".download-", dir=cache)
    try:
        copy_dir(path, staging)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.isdir(target):
            raise
    return target
