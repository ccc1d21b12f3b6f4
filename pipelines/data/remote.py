"""Shard folders and shards that are local paths or URLs (``https://``, ``s3://``, ``gs://``, ...).

Opening follows webdataset's ``gopen`` and its ``WDS_SECURE`` setting, with two differences:

- ``pipe:`` URLs are refused always: a shard list is data, and data never names a command to run;
- schemes other than ``http``/``https`` open through fsspec (``s3://`` with s3fs, ``gs://`` with
  gcsfs installed), not through webdataset's ``gsutil`` pipe.

``http``/``https`` open through webdataset's own ``gopen`` (curl, with retries). With ``WDS_SECURE=1``
local paths are refused, as webdataset refuses them (``unsafe_gopen is False``), so a secured
process reads only remote shards.
"""

import posixpath
import re
import tarfile
from pathlib import Path
from urllib.parse import urlparse

from webdataset import utils as wds_utils
from webdataset.filters import pipelinefilter
from webdataset.gopen import gopen as wds_gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from ..errors import PipelineError

WEB_SCHEMES = ("http", "https")
CURL_EXITS = {"6": "unknown host", "7": "no connection", "22": "HTTP error (not found?)", "28": "timed out"}


def scheme(location: str) -> str:
    """The URL scheme of ``location`` (``""`` for a local path, also ``C:\\...`` style ones)."""
    s = urlparse(str(location)).scheme
    return s if len(s) > 1 else ""


def is_url(location) -> bool:
    """Whether ``location`` is a URL (with a scheme) rather than a local path."""
    return bool(scheme(str(location)))


def join(base, name: str) -> str:
    """``base/name`` for a folder that is a local path or a URL."""
    base = str(base)
    return posixpath.join(base.rstrip("/"), name) if is_url(base) else str(Path(base) / name)


def check_location(url: str, flag: str = "--shards") -> None:
    """Refuse what this module never opens (``pipe:``; local paths under ``WDS_SECURE=1``).

    Raises:
        PipelineError: naming the URL and the reason.
    """
    s = scheme(url)
    if s == "pipe":
        raise PipelineError(f"{flag} {url}: pipe: URLs run a shell command and are not read; give a path or "
                            "an http(s)://, s3:// or gs:// URL")
    if s in ("", "file") and wds_utils.enforce_security:
        raise PipelineError(f"{flag} {url}: WDS_SECURE=1 forbids local files (webdataset's unsafe_gopen); "
                            "read the shards from a URL, or unset WDS_SECURE")


def open_url(url: str):
    """A binary file object reading ``url`` (see the module docstring for what opens how).

    Raises:
        PipelineError: refused (``pipe:``, local under ``WDS_SECURE``) or a scheme without its fsspec
            package (naming the package to install).
        OSError: the file cannot be read.
    """
    url = str(url)
    check_location(url)
    s = scheme(url)
    if s in ("", "file") or s in WEB_SCHEMES:
        return wds_gopen(url, "rb")
    import fsspec

    try:
        return fsspec.open(url, "rb").open()
    except ImportError as e:  # fsspec names the package, e.g. "Install s3fs to access S3"
        raise PipelineError(f"{url}: {s}:// needs an fsspec backend ({e})") from None
    except ValueError as e:  # "Protocol not known"
        raise PipelineError(f"{url}: cannot open {s}:// URLs ({e})") from None


def reason(error: Exception) -> str:
    """An error reading a URL in a few words: webdataset's curl pipe reports ``... exit 22 (read)``,
    said here as curl's exit status (22: an HTTP error such as 404; 7: no connection)."""
    text = str(error.args[0]) if error.args else str(error)
    found = re.search(r"\bexit (\d+)", text)
    if found and "curl" in text:
        return f"curl exit {found.group(1)}: " + CURL_EXITS.get(found.group(1), "see curl's exit codes")
    strerror = getattr(error, "strerror", None)
    return strerror if isinstance(strerror, str) and strerror else text


def read_bytes(url: str) -> bytes:
    """The whole file at ``url`` (a manifest), local or remote.

    Raises:
        PipelineError: it cannot be read, or reads as nothing.
    """
    try:
        with open_url(url) as f:
            data = f.read()
    except OSError as e:
        raise PipelineError(f"{url}: cannot read it ({reason(e)})") from None
    if not data and is_url(url):  # curl -f -s: a missing file reads as nothing
        raise PipelineError(f"{url}: empty or not found")
    return data


def url_streams(src):
    """Stream stage: ``{"url"}`` -> ``{"url", "stream"}`` through :func:`open_url` (webdataset's
    ``url_opener`` with our opener); an error names the shard."""
    for sample in src:
        url = sample["url"]
        try:
            stream = open_url(url)
        except OSError as e:
            raise PipelineError(f"{url}: cannot read the shard ({reason(e)})") from None
        yield {**sample, "stream": stream}


def _shard_samples(src):
    """webdataset's ``tarfile_samples`` with :func:`url_streams` as the opener; a shard that cannot
    be read is one error naming it (webdataset appends the shard's URL to the error's args)."""
    try:
        yield from group_by_keys(tar_file_expander(url_streams(src)))
    except (OSError, tarfile.TarError) as e:  # a remote file that is not there reads as an empty tar
        url = e.args[-1] if len(e.args) > 1 and isinstance(e.args[-1], str) else "a shard"
        raise PipelineError(f"{url}: cannot read the shard ({reason(e)})") from None


shard_samples = pipelinefilter(_shard_samples)  # tar shards -> {"__key__", "__url__", member: bytes}
