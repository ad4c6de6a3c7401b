"""The ``.npz`` container every refattn file uses, read safely: no pickle, a size cap checked against
each member's zip entry and ``.npy`` header before anything is allocated or decompressed, files that
are no zip archive named for what they are, JSON text depth-limited (``specs/case-format.md``)."""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
import zlib

from numpy.lib import format as npy_format

from refattn._validate import RefAttnError, as_int

__all__ = ["MAX_BYTES", "MAX_JSON_DEPTH", "parse_json", "read_npz", "read_text", "readable_size"]

MAX_BYTES = 2 * 2**30  # default cap on the arrays of one file (their .npy headers' sizes, in all)
_NPY_HEADER_ROOM = 1 << 16  # a .npy header (read up to numpy's 10 000-byte limit) beside its data
MAX_JSON_DEPTH = 64  # nesting of a JSON text (a valid options object nests 2 deep: {"window": [l, r]})


def read_text(data, key, path, default=""):
    """A text entry of a read ``.npz``: the 0-d unicode array under ``key``, as a str.

    Parameters
    ----------
    data : mapping of str to ndarray
        What :func:`read_npz` returned.
    key : str
        The entry.
    path : str
        The file's name, for error messages.
    default : str, default ""
        Returned when ``key`` is absent.

    Returns
    -------
    str

    Raises
    ------
    RefAttnError
        The entry is not a 0-d unicode string.
    """
    if key not in data:
        return default
    a = data[key]
    if a.dtype.kind != "U" or a.ndim != 0:
        raise RefAttnError(f"{path}: key '{key}': expected a 0-d unicode string, got dtype {a.dtype} shape {a.shape}")
    return str(a)


_JSON_STRUCTURE = re.compile(r'[\[\]{}"\\]')


def _json_depth_exceeds(text, limit):
    """Whether ``text`` nests arrays/objects deeper than ``limit`` (brackets inside strings do not
    count); linear, stops at the first level past the limit."""
    depth, in_string, skip_to = 0, False, -1
    for m in _JSON_STRUCTURE.finditer(text):
        c, i = m.group(), m.start()
        if in_string:
            if i < skip_to:  # the character after a backslash
                continue
            if c == "\\":
                skip_to = i + 2
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth -= 1
    return False


def parse_json(text, path, key="options"):
    """Parse the JSON text of an entry, its nesting limited to :data:`MAX_JSON_DEPTH` (64) before
    the parser runs (no deep-recursion attack).

    Parameters
    ----------
    text : str
        The JSON text.
    path : str
        The file's name, for error messages.
    key : str, default "options"
        The entry's name, for error messages.

    Returns
    -------
    object
        The parsed value.

    Raises
    ------
    RefAttnError
        Too deeply nested, or not valid JSON.
    """
    if _json_depth_exceeds(text, MAX_JSON_DEPTH):
        raise RefAttnError(
            f"{path}: key '{key}': expected a JSON object nested at most {MAX_JSON_DEPTH} deep, "
            f"got deeper nesting ({len(text)} characters)"
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an integer of too many digits
        raise RefAttnError(f"{path}: key '{key}': not valid JSON ({exc})") from exc


def readable_size(n):
    """A number of bytes in binary units, e.g. ``readable_size(3 * 2**30) == "3.0 GiB"``.

    Parameters
    ----------
    n : int or float
        Bytes, >= 0.

    Returns
    -------
    str
        ``"<x.y> TiB"``, ``GiB``, ``MiB``, ``KiB``, or ``"<n> bytes"`` below 1 KiB.
    """
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _looks_like_text(head):
    """Whether the first bytes of a file read as printable UTF-8 (a character cut at the end is fine)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:
            return False
        text = head[: exc.start].decode("utf-8")
    return bool(text) and all(ch.isprintable() or ch in "\t\r\n" for ch in text)


def _not_a_zip(path, what):
    """What the file is, for a file that is no zip archive."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if not head:
        kind = "an empty file"
    elif head.startswith(npy_format.MAGIC_PREFIX):
        kind = "a .npy file (a single array)"
    elif head.startswith(b"PK"):
        kind = "a damaged or truncated zip archive"
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        kind = "a pickle (refused: pickles are never loaded)"
    else:
        kind = "a text file" if _looks_like_text(head) else f"not a zip archive (it starts with {head[:12]!r})"
    return RefAttnError(f"{path}: {kind}, expected a .npz {what} (a zip archive of .npy arrays, as numpy.savez writes)")


def _member_header(zf, info, path):
    """``(key, shape, dtype, header bytes, data bytes)`` of one zip member, from its ``.npy`` header alone."""
    if not info.filename.endswith(".npy"):
        raise RefAttnError(f"{path}: member {info.filename!r}: expected only .npy arrays in the archive")
    key = info.filename[: -len(".npy")]
    with zf.open(info) as fh:  # decompresses the header's few bytes only
        try:
            version = npy_format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = npy_format.read_array_header_2_0(fh)
            else:
                raise ValueError(f".npy format version {version} is not supported (1.0 and 2.0 are)")
        except ValueError as exc:
            raise RefAttnError(f"{path}: key '{key}': not a readable .npy array ({exc})") from exc
        offset = fh.tell()
    if dtype.hasobject:
        raise RefAttnError(f"{path}: key '{key}': refused: the array holds pickled objects (dtype {dtype})")
    if any(n < 0 for n in shape):
        raise RefAttnError(f"{path}: key '{key}': the header declares a negative dimension, shape {shape}")
    return key, shape, dtype, offset, math.prod(shape) * dtype.itemsize


def read_npz(path, max_bytes=MAX_BYTES, what="case file"):
    """Every array of an ``.npz`` file, read safely: no pickle, and a size cap checked before
    anything is allocated or decompressed.

    Before any array is read, every member's declared uncompressed size and its ``.npy`` header
    (shape, dtype) are read and their sizes summed: over ``max_bytes``, the file is refused.  A
    header that disagrees with its member's size (a truncated or padded array), object arrays,
    duplicate members and non-``.npy`` members are refused; a file that is no zip archive is
    named for what it is (empty, a ``.npy``, a pickle, text).

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    max_bytes : int, default MAX_BYTES (2 GiB)
        The most bytes the arrays may hold in all, >= 1.
    what : str, default "case file"
        What the file should be, for error messages (``"attention-map file"``).

    Returns
    -------
    dict of str to ndarray
        Each member under its key (the member's name without ``.npy``).

    Raises
    ------
    RefAttnError
        Naming the file (and the key): unreadable, no zip, refused as above.
    """
    max_bytes = as_int(max_bytes, "max_bytes", minimum=1)
    cap = (
        f"the size cap max_bytes={max_bytes} ({readable_size(max_bytes)}); "
        "pass a larger max_bytes (refattn: --max-bytes)"
    )
    if os.path.isdir(path):
        raise RefAttnError(f"{path}: a directory, expected a .npz {what}")
    if not os.path.exists(path):
        raise RefAttnError(f"{path}: not a readable .npz file (no such file)")
    try:
        if not zipfile.is_zipfile(path):
            raise _not_a_zip(path, what)
        with zipfile.ZipFile(path) as zf:
            members, total = [], 0
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                twice = sorted({n for n in names if names.count(n) > 1})
                raise RefAttnError(f"{path}: members {twice} appear more than once in the archive")
            for info in infos:
                if info.file_size > max_bytes + _NPY_HEADER_ROOM:  # the zip entry's own declaration
                    raise RefAttnError(
                        f"{path}: member {info.filename!r}: declares {readable_size(info.file_size)} "
                        f"uncompressed, over {cap}"
                    )
                key, shape, dtype, offset, nbytes = _member_header(zf, info, path)
                total += nbytes
                if total > max_bytes:
                    raise RefAttnError(
                        f"{path}: key '{key}': the header declares shape {shape} dtype {dtype} "
                        f"({readable_size(nbytes)}; {readable_size(total)} in all so far), over {cap}"
                    )
                if offset + nbytes != info.file_size:
                    raise RefAttnError(
                        f"{path}: key '{key}': the header declares shape {shape} dtype {dtype} ({nbytes} bytes of "
                        f"data) but the member holds {info.file_size - offset} bytes: truncated or malformed"
                    )
                members.append((key, info))
            data = {}
            for key, info in members:
                with zf.open(info) as fh:
                    data[key] = npy_format.read_array(fh, allow_pickle=False)
            return data
    except RefAttnError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, ValueError) as exc:
        # OSError: unreadable; BadZipFile/zlib/EOF: damaged data (a bad CRC); RuntimeError: encrypted;
        # NotImplementedError: an unknown compression method; ValueError: a malformed array
        raise RefAttnError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
