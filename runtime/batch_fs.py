"""probres-batch's storage: local paths through os, URIs (s3://, gs://, file://...) through pyarrow.fs.

    probres-batch --engine model.onnx --input s3://bucket/photos/ --output s3://bucket/labels/ --address auto

Location is OUT_DIR (or an input folder): a local directory (fs None: os calls, runtime.fileio's
temp-then-rename writes, exactly as before) or a directory of a pyarrow FileSystem
(FileSystem.from_uri, or any FileSystem object: a SubTreeFileSystem in the tests). A file is
written so that a reader never sees part of it: on a local pyarrow file system to a temp name,
then moved; on an object store (S3, GCS, anything else) streamed to the object itself, which an
object store makes visible only when the upload completes (a PUT, or a multipart upload's
completion, is atomic per object); a write that fails deletes what it may have completed.
read_input gives an input's bytes, or its error worded as probres-infer words it.
"""

from __future__ import annotations

import errno
import io
import os
import posixpath
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator
from urllib.parse import unquote, urlparse

from runtime.decode import MAX_FILE_BYTES, ImageDecodeError, check_path
from runtime.fileio import atomic_open
from runtime.pipeline import is_image_name

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(spec: str) -> bool:
    return bool(_URI.match(spec))


def last_line(e: BaseException) -> str:
    """The last line of an error's message (pyarrow's and Ray's run to several), or the message when empty."""
    text = str(e).strip()
    return text.splitlines()[-1] if text else str(e)


def from_uri(uri: str, cache: dict | None = None) -> tuple[Any, str]:
    """(pyarrow FileSystem, path in it) for `uri`; one FileSystem per scheme://host in `cache` (an S3
    client per input would cost a connection and a region lookup each)."""
    from pyarrow.fs import FileSystem
    u = urlparse(uri)
    path = unquote(u.path) if u.scheme == "file" else (u.netloc + u.path)
    key = (u.scheme, u.netloc)
    if cache is not None and key in cache:
        return cache[key], path
    fs, path = FileSystem.from_uri(uri)
    if cache is not None:
        cache[key] = fs
    return fs, path


@dataclass
class Location:
    """A directory: local (fs None) or `path` in the pyarrow FileSystem `fs`; `name` is what the user gave."""

    path: str
    fs: Any = None
    name: str = ""

    @classmethod
    def of(cls, spec: str) -> "Location":
        if is_uri(spec):
            fs, path = from_uri(spec)
            return cls(path.rstrip("/") or "/", fs, spec)
        return cls(spec, None, spec)

    def join(self, name: str) -> str:
        return os.path.join(self.path, name) if self.fs is None else posixpath.join(self.path, name)

    def shown(self, name: str) -> str:
        """`name` in this directory, as a message shows it (the URI the user gave, or the local path)."""
        return self.join(name) if self.fs is None else f"{self.name.rstrip('/')}/{name}"

    def kind(self, name: str = "") -> str:
        """'missing', 'dir' or 'file' (anything else that exists counts as a file)."""
        p = self.join(name) if name else self.path
        if self.fs is None:
            return "dir" if os.path.isdir(p) else "file" if os.path.lexists(p) else "missing"
        from pyarrow.fs import FileType
        t = self.fs.get_file_info(p).type
        return "missing" if t == FileType.NotFound else "dir" if t == FileType.Directory else "file"

    def names(self) -> list[str]:
        """The names directly in this directory ([] when it does not exist)."""
        if self.fs is None:
            return os.listdir(self.path) if os.path.isdir(self.path) else []
        from pyarrow.fs import FileSelector
        infos = self.fs.get_file_info(FileSelector(self.path, allow_not_found=True))
        return [posixpath.basename(i.path) for i in infos]

    def makedirs(self) -> None:
        if self.fs is None:
            os.makedirs(self.path, exist_ok=True)
        else:
            self.fs.create_dir(self.path, recursive=True)     # object stores: nothing to create

    def open_read(self, name: str) -> BinaryIO:
        return open(self.join(name), "rb") if self.fs is None else self.fs.open_input_file(self.join(name))

    def read_range(self, name: str, offset: int, nbytes: int) -> bytes:
        with self.open_read(name) as f:
            f.seek(offset)
            return f.read(nbytes)

    @contextmanager
    def write(self, name: str, text: bool = False) -> Iterator[Any]:
        """A file written whole or not at all (see the module docstring); `text`: a UTF-8 text stream."""
        if self.fs is None:
            with atomic_open(self.join(name), "w" if text else "wb") as f:
                yield f
            return
        target = self.join(name)
        local = self.fs.type_name == "local"
        where = self.join(f".{name}.{os.getpid()}.tmp") if local else target
        raw = self.fs.open_output_stream(where)
        f = io.TextIOWrapper(raw, encoding="utf-8") if text else raw
        try:
            yield f
            f.close()
        except BaseException:
            try:
                f.close()              # pyarrow has no abort: a closed upload is complete, so delete it
                self.fs.delete_file(where)
            except OSError:            # the upload never completed (nothing to delete), or cannot be reached
                pass
            raise
        if local:
            self.fs.move(where, target)

    def remove(self, name: str) -> None:
        try:
            if self.fs is None:
                os.unlink(self.join(name))
            else:
                self.fs.delete_file(self.join(name))
        except FileNotFoundError:
            pass


def iter_uri_dir(uri: str) -> Iterator[str]:
    """The image files under a URI prefix, recursively, as URIs, in probres-infer's walk order (sorted
    by path component). pyarrow lists a prefix in one call: the listing is in memory while it runs."""
    from pyarrow.fs import FileSelector, FileType
    loc = Location.of(uri)
    infos = loc.fs.get_file_info(FileSelector(loc.path, recursive=True))
    rel = sorted((posixpath.relpath(i.path, loc.path) for i in infos
                  if i.type != FileType.Directory and is_image_name(i.path)), key=lambda r: r.split("/"))
    base = uri.rstrip("/")
    return (f"{base}/{r}" for r in rel)


def read_input(path: str, fs_cache: dict) -> bytes | ImageDecodeError:
    """The encoded bytes of one input (a local path or a URI), or its error in probres-infer's words."""
    if is_uri(path):
        return _read_uri(path, fs_cache)
    try:
        check_path(path)                           # probres-infer's checks and words (runtime.decode)
        with open(path, "rb") as f:
            return f.read()
    except ImageDecodeError as e:
        return e
    except OSError as e:
        return ImageDecodeError(f"{path}: cannot read file ({e.strerror or e})")


def _read_uri(uri: str, fs_cache: dict) -> bytes | ImageDecodeError:
    from pyarrow.fs import FileType
    try:
        fs, p = from_uri(uri, fs_cache)
        info = fs.get_file_info(p)
        if info.type == FileType.NotFound:
            return ImageDecodeError(f"{uri}: cannot read file ({os.strerror(errno.ENOENT)})")
        if info.type == FileType.Directory:
            return ImageDecodeError(f"{uri}: is a directory, not an image")
        if info.size is not None and info.size > MAX_FILE_BYTES:
            return ImageDecodeError(f"{uri}: file too large ({info.size} bytes, limit {MAX_FILE_BYTES})")
        with fs.open_input_stream(p) as f:
            return f.read()
    except (OSError, ValueError) as e:         # pyarrow's errors (ArrowIOError is an OSError), a bad URI
        return ImageDecodeError(f"{uri}: cannot read file ({last_line(e)})")
