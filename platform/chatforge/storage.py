"""Paths that are local directories or object-store URIs (``s3://``, ``gs://``, ...), through pyarrow's filesystems.

A cluster whose nodes share no disk keeps datasets, checkpoints and models in an object store. Ray Data and Ray Train
read and write URIs themselves; this module covers what chatforge does beside them: listing and reading curation's
input files, checking that a curated dataset is there, reading its manifest, copying a directory to or from a store. Credentials and endpoints are the
filesystem's usual ones (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL`` for an S3-compatible server, an instance role).
"""

from __future__ import annotations

import fnmatch
import io
import os
import posixpath
from typing import BinaryIO


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
    import shutil
    import tempfile

    if not is_uri(path):
        return path
    target = os.path.join(cache, uri_key(path))
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


def _uri(path: str, inner: str) -> str:
    """``inner`` (a path inside ``path``'s filesystem) as a URI of ``path``'s scheme."""
    return f"{path.split('://', 1)[0]}://{inner}"


def open_binary(path: str) -> BinaryIO:
    """A file opened for reading bytes, seekable, with ``readline``: a local path or an object-store URI (read in
    ranges as it is read)."""
    if not is_uri(path):
        return open(path, "rb")
    fs, inner = filesystem(path)
    return io.BufferedReader(fs.open_input_file(inner), buffer_size=1 << 20)


def size(path: str) -> int:
    if not is_uri(path):
        return os.path.getsize(path)
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).size


def files_under(path: str) -> list[str]:
    """Every file under the directory ``path`` (recursively), as URIs of its scheme when it is one."""
    import pyarrow.fs

    if not is_uri(path):
        return [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    fs, inner = filesystem(path)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True))
    return [_uri(path, info.path) for info in infos if info.type == pyarrow.fs.FileType.File]


def glob_uri(pattern: str) -> list[str]:
    """The files an object-store URI pattern matches: the objects under the pattern's fixed prefix, matched with
    `fnmatch` (whose ``*`` also crosses ``/``, so ``**`` and ``*`` match alike)."""
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    base = f"{scheme}://{'/'.join(parts[:fixed])}"
    return [path for path in files_under(base) if fnmatch.fnmatchcase(path, pattern)] if isdir(base) else []


def uri_key(uri: str) -> str:
    """A directory name for ``uri``: a hash of it (its local copy's or twin's)."""
    import hashlib

    return hashlib.blake2b(uri.encode(), digest_size=8).hexdigest()


def publish_dir(local: str, target: str, last: str) -> None:
    """Replace the object-store directory ``target``'s contents with the local directory ``local``'s. A store has no
    rename, so ``last`` (a file of ``local``: a manifest) marks a complete copy: ``target``'s own goes first and the
    new one is written after everything else. A copy that fails part way leaves ``target`` without ``last``, which
    readers that require it (training requires a manifest) refuse."""
    import pyarrow.fs

    fs, inner = filesystem(target)
    marker = posixpath.join(inner, last)
    if fs.get_file_info(marker).type == pyarrow.fs.FileType.File:
        fs.delete_file(marker)
    if fs.get_file_info(inner).type == pyarrow.fs.FileType.Directory:
        fs.delete_dir_contents(inner)
    for entry in sorted(os.listdir(local)):
        if entry == last:
            continue
        source = os.path.join(local, entry)
        destination = join(target, entry)
        if os.path.isdir(source):
            copy_dir(source, destination)
        else:
            pyarrow.fs.copy_files(source, posixpath.join(inner, entry), destination_filesystem=fs)
    pyarrow.fs.copy_files(os.path.join(local, last), marker, destination_filesystem=fs)


def common_dir(paths: list[str]) -> str:
    """The deepest directory holding every one of ``paths`` (local paths or URIs of one store)."""
    if not is_uri(paths[0]):
        return os.path.commonpath(paths) if len(paths) > 1 else paths[0]
    if len(paths) == 1:
        return paths[0]
    split = [path.split("/") for path in paths]
    common = [parts[0] for parts in zip(*split, strict=False) if len(set(parts)) == 1]
    return "/".join(common)
