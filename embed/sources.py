"""Sources (images, audio, video): a folder of files, a list file of ``id<TAB>path`` lines, WebDataset tar shards.

Every source becomes one ordered list of :class:`ImageRef` before anything is decoded, so ids that
the cache already holds can be skipped and the rest split across processes the same way for every
kind of source. Tar shards are indexed once (member offsets from their headers, see the POSIX
``ustar`` format) and read by offset, so any worker can decode any member: a shard need not be
streamed from its start. Ids follow WebDataset's convention: ``__key__`` is the member name up to
the first dot of its base name (``webdataset.tariterators.base_plus_ext``).

COCO file names such as ``COCO_train2014_000000123456.jpg`` give the id ``123456`` (the integer
in decimal, as in the VQA v2 annotations).
"""

import errno
import logging
import os
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "jfif", "png", "bmp", "gif", "webp", "tif", "tiff",
                              "ppm", "pgm", "pbm", "pnm"})
AUDIO_EXTENSIONS = frozenset({"wav", "flac", "ogg", "oga", "opus", "mp3", "m4a", "aac", "aif", "aiff", "au",
                              "caf", "w64", "wma",
                              # containers: their audio track (PyAV)
                              "mp4", "m4v", "mov", "mkv", "webm", "avi"})
VIDEO_EXTENSIONS = frozenset({"mp4", "m4v", "mov", "mkv", "webm", "avi", "mpg", "mpeg", "ogv", "wmv", "flv"})
EXTENSIONS = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS, "video": VIDEO_EXTENSIONS}
COCO_STEM = re.compile(r"^COCO_[A-Za-z]+\d*_(\d+)$")
_FILE_KINDS = {stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
               stat.S_IFBLK: "block device"}


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes are.

    Attributes:
        id: the image id (the cache key).
        path: the image file, or the tar shard that holds it.
        member: the member's name inside the shard; None for plain files.
        offset: byte offset of the member's data in the shard (-1 for plain files).
        size: the member's size in bytes (-1 for plain files).
    """

    id: str
    path: str
    member: str | None = None
    offset: int = -1
    size: int = -1

    def describe(self) -> str:
        return f"{self.path}:{self.member}" if self.member is not None else self.path


def read_bytes(ref: ImageRef) -> bytes:
    """The encoded image bytes of ``ref`` (raises OSError when they cannot be read)."""
    _check_regular_file(ref.path)
    if ref.member is None:
        with open(ref.path, "rb") as f:
            return f.read()
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        data = f.read(ref.size)
    if len(data) != ref.size:
        raise OSError(f"shard ends after {len(data)} of the member's {ref.size} bytes")
    return data


def _check_regular_file(path: str) -> None:
    """Raise OSError unless ``path`` is a regular file (or a symlink to one), without opening it.

    Opening a FIFO blocks until something writes to it, and a device may never end: either would
    hang the run, so they are refused (and reported) before ``open``.
    """
    mode = os.stat(path).st_mode  # follows symlinks
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not stat.S_ISREG(mode):
        raise OSError(f"not a regular file ({_FILE_KINDS.get(stat.S_IFMT(mode), 'unknown kind')})")


def scan(paths, kind: str = "auto", id_pattern: str | None = None,
         extensions=IMAGE_EXTENSIONS) -> list[ImageRef]:
    """Every file of ``paths`` in a stable order; raises SourceError on duplicate ids.

    Args:
        paths: folders, list files, ``.tar`` shards (brace patterns are expanded) or, with ``kind``
            ``auto``, single files with one of ``extensions``.
        kind: ``auto`` (decide per path), ``folder``, ``list`` or ``wds``.
        id_pattern: a regex with one group, searched in each file name of a folder.
        extensions: file name extensions (lower case, no dot) that folders and shards hold:
            one of :data:`EXTENSIONS` (images, audio, video); list files name their files.
    """
    refs = []
    for path in _expand(paths):
        k = kind if kind != "auto" else _detect(path, extensions)
        if id_pattern is not None and k != "folder":
            raise SourceError(f"--id-pattern applies to folder sources; {path} is read as a {k} source")
        if k == "file":  # one media file named on the command line: id = its stem
            refs.append(ImageRef(id_from_name(Path(path).name), path))
        elif k == "folder":
            refs += scan_folder(path, id_pattern, extensions)
        elif k == "list":
            refs += scan_list(path)
        else:
            refs += scan_tar(path, extensions)
    _refuse_duplicates(refs)
    return refs


def _expand(paths) -> list[str]:
    from braceexpand import (
        braceexpand,  # a webdataset dependency: shard patterns like x-{000..009}.tar
    )

    out = []
    for p in paths:
        out += list(braceexpand(str(p))) if "{" in str(p) else [str(p)]
    return out


def _detect(path: str, extensions=frozenset()) -> str:
    p = Path(path)
    if p.is_dir():
        return "folder"
    if not p.exists():
        raise SourceError(f"{path}: no such file or directory")
    name = p.name.lower()
    if name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        raise SourceError(f"{path}: compressed shards cannot be read by offset; use uncompressed .tar shards")
    if name.endswith(".tar"):
        return "wds"
    if name.rsplit(".", 1)[-1] in extensions:
        return "file"
    return "list"


def id_from_name(name: str, pattern: re.Pattern | None = None) -> str | None:
    """The id of an image file name: the ``--id-pattern`` group, COCO's integer, or the stem."""
    if pattern is not None:
        m = pattern.search(name)
        return m.group(1) if m else None
    stem = name.rsplit(".", 1)[0] if "." in name else name
    m = COCO_STEM.match(stem)
    return str(int(m.group(1))) if m else stem


def scan_folder(root, id_pattern: str | None = None, extensions=IMAGE_EXTENSIONS) -> list[ImageRef]:
    """Files with one of ``extensions`` under ``root`` (recursively, hidden entries skipped), ids from
    their file names."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder")
    pattern = re.compile(id_pattern) if id_pattern is not None else None
    refs, unmatched, ignored = [], [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name.rsplit(".", 1)[-1].lower() not in extensions:
                ignored += not name.startswith(".")
                continue
            image_id = id_from_name(name, pattern)
            path = os.path.join(dirpath, name)
            if image_id is None or image_id == "":
                unmatched.append(path)
            else:
                refs.append(ImageRef(image_id, path))
    if unmatched:
        raise SourceError(f"--id-pattern '{id_pattern}': {len(unmatched)} file name(s) give no id, e.g. "
                          + ", ".join(unmatched[:3]))
    if ignored:
        log.info("%s: ignored %d file(s) without one of the extensions %s", root, ignored,
                 ", ".join(sorted(extensions)))
    return refs


def scan_list(path) -> list[ImageRef]:
    """Lines ``id<TAB>path``; relative paths are relative to the list file's folder.

    Blank lines and lines starting with ``#`` are skipped.
    """
    path = Path(path)
    base = path.parent
    refs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read the list file ({e})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise SourceError(f"{path}:{lineno}: expected 'id<TAB>path', got {line!r}")
        image_id, image_path = parts[0], parts[1]
        refs.append(ImageRef(image_id, str(base / image_path)))
    return refs


def scan_tar(path, extensions=IMAGE_EXTENSIONS) -> list[ImageRef]:
    """One ref per sample of an uncompressed WebDataset shard: its first member with one of ``extensions``."""
    from webdataset.tariterators import base_plus_ext

    refs, seen_keys = [], set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None or ext.lower().rsplit(".", 1)[-1] not in extensions:
                    continue
                if key in seen_keys:  # another file of the same sample: the first one counts
                    continue
                seen_keys.add(key)
                refs.append(ImageRef(key, str(path), member.name, member.offset_data, member.size))
    except (tarfile.TarError, OSError) as e:
        raise SourceError(f"{path}: not a readable uncompressed tar shard ({e})") from None
    return refs


def _refuse_duplicates(refs) -> None:
    first = {}
    dups = []
    for ref in refs:
        if ref.id in first:
            dups.append((ref.id, first[ref.id], ref))
        else:
            first[ref.id] = ref
    if dups:
        examples = "; ".join(f"id {i!r}: {a.describe()} and {b.describe()}" for i, a, b in dups[:3])
        raise SourceError(f"{len(dups)} duplicate image id(s), e.g. {examples} "
                          "(ids must be unique; see --id-pattern)")
