"""Object storage beside local paths: ``s3://``, ``gs://``, ``hf://``, ``file://`` … through fsspec.

An object store has no rename, so a qvl output there is committed the one way a bucket allows:
every object first, then ``_QVL_COMMITTED.json`` (each object's name, size and ETag) last. Readers
trust only a committed folder, and only objects the manifest names as they were committed; a folder
without the manifest is a run still writing or one that died.

Commands work in a local staging folder (``output``), where the local guarantees hold as they
are (atomic files, markers, resume); on success it is published: the objects not already in the
bucket are uploaded, then the manifest. A run killed mid-work resumes from the staging folder; one
killed mid-upload uploads the rest on the next run. Inputs that are qvl outputs are mirrored into
a local cache (``input_folder``) from their manifest, only what changed. Credentials and endpoint
come from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, profiles …) and are never
printed or written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import types
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from qvl.common import storage
from qvl.common.progress import console, progress_bar
from qvl.errors import QvlError

COMMITTED = "_QVL_COMMITTED.json"
MAX_MANIFEST_BYTES = 64 << 20  # ~500k files' names, sizes and ids
STAGED_FROM = ".qvl-remote.json"  # in a staging or mirror folder: the manifest it matches
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_FLATTENED = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):/(?!/)")  # what pathlib makes of "s3://b/k"


class RemoteError(QvlError):
    """A bucket or object that cannot be used; the message names the URL, never a credential."""


def location(value: str | Path | None) -> str | Path | None:
    """A command-line location as given: a URL stays a string (its scheme in lower case, ``.``
    and ``..`` resolved), ``file://`` and plain paths become Paths. A URL that went through
    ``pathlib`` (``s3:/b/k``, ``file:/abs``) is mended."""
    if value is None or (isinstance(value, Path) and not _FLATTENED.match(str(value))):
        return value
    text = str(value)
    if text[:5].lower() == "file:":  # file:///abs, or file:/abs after pathlib
        return Path("/" + text[5:].lstrip("/"))
    text = _FLATTENED.sub(r"\1://", text) if not _SCHEME.match(text) else text
    match = _SCHEME.match(text)
    if not match or len(match.group(1)) == 1:  # C:/… on Windows is a path
        return Path(text)
    rest = posixpath.normpath(text[match.end():]).lstrip("/") if text[match.end():].strip("/") else ""
    if not rest or rest.startswith(".."):
        raise RemoteError(f"{value}: names no bucket (write {match.group(1).lower()}://BUCKET/FOLDER)")
    return f"{match.group(1).lower()}://{rest}"


def is_remote(value: str | Path | None) -> bool:
    return isinstance(location(value), str)


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for ``url``; listings are not cached, since other
    processes write the same bucket."""
    import fsspec

    try:
        kwargs = {"use_listings_cache": False, "skip_instance_cache": True} if url.startswith("s3://") else {}
        return fsspec.core.url_to_fs(url, **kwargs)
    except (ImportError, ValueError) as e:
        raise RemoteError(f"{url}: cannot open this kind of URL ({e}); s3:// needs s3fs, gs:// gcsfs") from None


@contextlib.contextmanager
def errors(url: str) -> Iterator[None]:
    """Storage errors as one line naming ``url``: missing bucket or object, refused credentials."""
    try:
        yield
    except QvlError:
        raise
    except FileNotFoundError as e:
        raise RemoteError(f"{url}: no such bucket or object ({_brief(e)})") from None
    except PermissionError as e:
        raise RemoteError(f"{url}: access denied — check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile "
                          f"({_brief(e)})") from None
    except OSError as e:
        raise RemoteError(f"{url}: {_brief(e)}") from None
    except Exception as e:  # botocore's NoCredentialsError, EndpointConnectionError …: not OSErrors
        if type(e).__name__ == "NoCredentialsError":
            raise RemoteError(f"{url}: no credentials found — set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                              "AWS_PROFILE (and AWS_ENDPOINT_URL for a store other than AWS)") from None
        if type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs", "gcsfs", "aiohttp", "fsspec"):
            raise RemoteError(f"{url}: {_brief(e)}") from None
        raise


def _brief(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def relative(url: str, path: str) -> str:
    """``path`` (``.``, ``..``, ``a/b``) taken from the folder ``url`` names, as a URL."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path))}"


def cache_root() -> Path:
    """Where staging folders and mirrors live: ``QVL_CACHE``, else ``~/.cache/qvl``."""
    return Path(os.environ.get("QVL_CACHE") or Path.home() / ".cache" / "qvl")


def _cache_folder(kind: str, url: str) -> Path:
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[:60]
    return cache_root() / kind / f"{tail}-{digest}"


# ---------------------------------------------------------------- committed folders


def committed(url: str) -> dict | None:
    """The manifest of the qvl output at ``url``, or None where none is committed."""
    fs, path = filesystem(url)
    with errors(url):
        try:
            with fs.open(join(path, COMMITTED), "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            return None
    try:
        if len(data) > MAX_MANIFEST_BYTES:
            raise ValueError(f"over {MAX_MANIFEST_BYTES >> 20} MiB")
        manifest = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise RemoteError(f"{join(url, COMMITTED)}: not a qvl manifest ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise RemoteError(f"{join(url, COMMITTED)}: not a qvl manifest")
    entries(url, manifest)
    return manifest


def _local_files(folder: Path) -> dict[str, str]:
    """Every finished file under ``folder`` (no ``*.tmp-*`` leftovers): relative name -> its
    local identity (size and modification time: a checkpoint rewritten at the same size differs)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and ".tmp-" not in p.name and p.name != STAGED_FROM:
            st = p.stat()
            out[p.relative_to(folder).as_posix()] = f"{st.st_size}-{st.st_mtime_ns}"
    return out


def _size(identity: str) -> int:
    return int(identity.split("-", 1)[0])


def _record(folder: Path) -> dict:
    """What ``folder`` last synced with its URL: the manifest's digest, and per file its local
    identity then and its id in the manifest."""
    try:
        record = storage.read_json(folder / STAGED_FROM)
        return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else {"files": {}}
    except (OSError, ValueError):
        return {"files": {}}


_URL_OF: dict[str, str] = {}  # staging and mirror folders of this process -> their URLs


def urls_in(text: str) -> str:
    """``text`` with every staging or mirror folder this process used written as its URL: what a
    person reads names the bucket, not this machine's cache."""
    for local in sorted(_URL_OF, key=len, reverse=True):
        text = text.replace(local, _URL_OF[local])
    return text


def _remember(folder: Path, url: str, manifest: dict) -> None:
    _URL_OF[str(folder)] = url
    here = _local_files(folder)
    storage.write_json(folder / STAGED_FROM, {"url": url, "manifest": _digest(manifest), "files": {
        name: {"local": here.get(name), "id": entry["id"]} for name, entry in manifest["files"].items()}})


def _listing(fs, path: str) -> dict[str, tuple[int, str]]:
    """Objects under ``path``: relative name -> (size, ETag or the store's version)."""
    if not fs.exists(path):
        return {}
    root = path.rstrip("/") + "/"
    return {p[len(root):]: (int(info.get("size") or 0), _remote_file(p, info).version)
            for p, info in fs.find(path, detail=True).items() if p.startswith(root)}


def publish(folder: Path, url: str, show_progress: bool = True) -> dict:
    """Upload ``folder`` to ``url`` and commit it. The old manifest goes first (readers stop
    trusting the folder); a file is sent again unless it is unchanged both here and in the
    bucket since the last sync (an object damaged in the bucket is healed); objects the last
    commit or sync named that this run no longer has are deleted — nothing else, whoever wrote
    it; the manifest, with each object's ETag as the bucket reports it, comes last."""
    fs, path = filesystem(url)
    files = _local_files(folder)
    synced = _record(folder)["files"]
    previous = committed(url)
    with errors(url):
        if previous is not None:
            fs.rm_file(join(path, COMMITTED))
        there = _listing(fs, path)
        same = {name for name, identity in files.items()
                if (synced.get(name) or {}).get("local") == identity and name in there
                and there[name][1] == synced[name]["id"]}
        todo = [name for name in files if name not in same]
        with progress_bar(disable=not show_progress or not todo) as bar:
            task = bar.add_task(f"upload {url}", total=sum(_size(files[n]) for n in todo), unit="B")
            for name in todo:
                with errors(join(url, name)):
                    fs.put_file(str(folder / name), join(path, name))
                bar.advance(task, _size(files[name]))
        ours = set(previous["files"] if previous else ()) | set(synced)
        stale = [join(path, name) for name in ours if name not in files and name in there and name != COMMITTED]
        if stale:
            fs.rm(stale)
        after = _listing(fs, path)
        missing = [name for name in files if name not in after]
        if missing:
            raise RemoteError(f"{join(url, missing[0])}: uploaded but not listed by the store")
        manifest = {"written_by": "qvl", "files": {name: {"size": after[name][0], "id": after[name][1]}
                                                   for name in files}}
        with fs.open(join(path, COMMITTED), "wb") as f:
            f.write(json.dumps(manifest, indent=1).encode())
    _remember(folder, url, manifest)
    return manifest


def _digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def entries(url: str, manifest: dict) -> dict[str, dict]:
    """The manifest's files, checked: names inside the folder, sizes and ids as qvl writes them."""
    files = {}
    for name, entry in manifest["files"].items():
        if not isinstance(name, str) or name.startswith("/") or ".." in Path(name).parts or "\x00" in name:
            raise RemoteError(f"{join(url, COMMITTED)}: names a file outside the folder ({name!r})")
        size = entry.get("size") if isinstance(entry, dict) else None
        if not (type(size) is int and 0 <= size < 1 << 50 and isinstance(entry.get("id"), str)
                and len(entry["id"]) <= 200):
            raise RemoteError(f"{join(url, COMMITTED)}: entry {name!r} is not {{size, id}} (not a qvl manifest)")
        files[name] = entry
    return files


def mirror(url: str, folder: Path, show_progress: bool = True, manifest: dict | None = None) -> Path:
    """Make ``folder`` hold the committed output at ``url``: a file is fetched if the manifest's
    id for it is not the one fetched before, or it changed here; files the manifest does not
    name are removed."""
    manifest = manifest or committed(url)
    if manifest is None:
        raise RemoteError(f"{url}: no committed qvl output here (no {COMMITTED}): a run still writing, one that "
                          "stopped before it finished, or not a qvl output")
    fs, path = filesystem(url)
    files = entries(url, manifest)
    have = _local_files(folder) if folder.is_dir() else {}
    synced = _record(folder)["files"]
    for name in have.keys() - files.keys():
        (folder / name).unlink()
    with errors(url):
        there = _listing(fs, path)
    for name, entry in files.items():  # what the bucket holds is what was committed, or nothing is read
        if name not in there:
            raise RemoteError(f"{join(url, name)}: named by {COMMITTED} but not in the bucket (deleted after the "
                              "commit); run the command that wrote it again")
        if there[name] != (entry["size"], entry["id"]):
            raise RemoteError(f"{join(url, name)}: changed after it was committed (size {there[name][0]:,} and "
                              f"ETag {there[name][1]!r}, the manifest says {entry['size']:,} and {entry['id']!r}); "
                              "run the command that wrote it again")
    todo = [name for name, entry in files.items()
            if have.get(name) is None or synced.get(name) != {"local": have[name], "id": entry["id"]}]
    with progress_bar(disable=not show_progress or not todo) as bar:
        task = bar.add_task(f"fetch {url}", total=sum(files[n]["size"] for n in todo), unit="B")
        for name in todo:
            with errors(join(url, name)), storage.atomic_path(folder / name) as tmp:
                fs.get_file(join(path, name), str(tmp))
            if (folder / name).stat().st_size != files[name]["size"]:
                raise RemoteError(f"{join(url, name)}: replaced while being read (its size is not the manifest's)")
            bar.advance(task, files[name]["size"])
    _remember(folder, url, manifest)
    return folder


# ---------------------------------------------------------------- what commands call


def input_folder(value: str | Path, show_progress: bool = True, only: tuple[str, ...] | None = None) -> Path:
    """A local folder holding the input at ``value``: the path itself, or a mirror of the
    committed output at a URL (fetched again only where the bucket changed); with ``only``,
    just the files whose names start with one of those (a download needs a filter run's kept
    rows and report, not its rejects and ledger)."""
    value = location(value)
    if isinstance(value, Path):
        return value
    folder = _cache_folder("mirror", value)
    manifest = committed(value)
    if manifest is not None and only is not None:
        wanted = (*only, storage.MARKER)
        manifest = {**manifest, "files": {n: e for n, e in manifest["files"].items() if n.startswith(wanted)}}
    if manifest is not None and _record(folder).get("manifest") == _digest(manifest):
        return folder
    return mirror(value, folder, show_progress, manifest)


def origin(path: str | Path) -> str:
    """Where ``path`` came from, as a run records it to know its input again: the URL for what
    lies in a mirror or staging folder of a bucket (the cache differs between machines), else
    the resolved local path."""
    p = Path(path).resolve()
    root = cache_root().resolve()
    if root in p.parents:
        for folder in (p, *p.parents):
            if folder == root:
                break
            url = _record(folder).get("url") if (folder / STAGED_FROM).is_file() else None
            if url:
                return url if folder == p else join(url, p.relative_to(folder).as_posix())
    return str(p)


def shown(path: str | Path) -> str:
    """``path`` as a person should read it: the URL for what lies in a mirror or staging folder,
    else the path as given."""
    url = origin(path)
    return url if is_remote(url) else str(path)


def input_file(value: str | Path, show_progress: bool = True) -> Path:
    """A local copy of one file at ``value`` (a preset, a recipe, a checkpoint file)."""
    value = location(value)
    if isinstance(value, Path):
        return value
    fs, path = filesystem(value)
    folder = _cache_folder("files", value)
    target = folder / value.rstrip("/").rsplit("/", 1)[-1]
    with errors(value):
        info = fs.info(path)
        if info.get("type") == "directory":
            raise RemoteError(f"{value}: a folder; a file is expected here")
        version = _remote_file(path, info).version
        fetched = _record(folder)["files"].get(target.name) or {}
        if not (target.is_file() and fetched == {"local": _local_files(folder).get(target.name), "id": version}):
            with storage.atomic_path(target) as tmp:
                fs.get_file(path, str(tmp))
            _remember(folder, value.rstrip("/").rsplit("/", 1)[0],  # origin(target) is then ``value``
                      {"files": {target.name: {"size": target.stat().st_size, "id": version}}})
    return target


_STAGED: dict[Path, str] = {}  # staging folder -> its URL, while a command writes it


def commit_now(folder: Path) -> None:
    """Commit a staging folder mid-run, at a point where it is whole (a trainer's checkpoint):
    a run killed later resumes from this, on any machine. Nothing for a local folder."""
    url = _STAGED.get(Path(folder))
    if url is not None:
        publish(Path(folder), url, show_progress=False)


def input_any(value: str | Path | None, show_progress: bool = True, only: tuple[str, ...] | None = None
              ) -> Path | None:
    """A local path for an input option that is a qvl output, a file, or a folder of objects
    someone uploaded (images, annotations): committed outputs are mirrored from their manifest,
    a qvl output without one is refused (not finished), other folders are copied object by object."""
    value = location(value)
    if value is None or isinstance(value, Path):
        return value
    if committed(value) is not None:
        return input_folder(value, show_progress, only)
    fs, path = filesystem(value)
    with errors(value):
        if fs.isfile(path):
            return input_file(value, show_progress)
        found = fs.find(path, detail=True)
    if not found:
        raise RemoteError(f"{value}: no such file or folder")
    names = {p[len(path.rstrip("/")) + 1:]: {"size": int(info.get("size") or 0), "id": _remote_file(p, info).version}
             for p, info in found.items()}
    if storage.MARKER in names:
        raise RemoteError(f"{value}: a qvl output that was never committed (no {COMMITTED}): its run stopped before "
                          "it finished; run it again to the same URL to complete it")
    return mirror(value, _cache_folder("mirror", value), show_progress, {"files": names})  # ids: the ETags


def _check_writable(url: str, manifest: dict | None) -> None:
    """Before a run, not after it: the bucket is there and these credentials reach it, the URL
    is a folder inside it, and what it holds is a qvl output (qvl only ever replaces what it wrote)."""
    fs, path = filesystem(url)
    bucket = path.strip("/").split("/", 1)[0]
    if "/" not in path.strip("/"):
        raise RemoteError(f"{url}: the root of a bucket; give a folder inside it ({url.rstrip('/')}/run)")
    with errors(url):
        if not fs.exists(bucket):
            raise RemoteError(f"{url}: no such bucket ({bucket})")
        if manifest is None and fs.exists(path):
            names = {p[len(path.rstrip("/")) + 1:] for p in fs.find(path)}
            if names and storage.MARKER not in names:
                raise RemoteError(f"{url}: holds objects qvl did not write (no {COMMITTED}); choose a new or empty "
                                  "--out (qvl only ever replaces what it wrote)")


@contextlib.contextmanager
def output(value: str | Path, show_progress: bool = True) -> Iterator[Path]:
    """The folder a command writes ``value``'s output in: the path itself, or a local staging
    folder published to the URL when the block ends without error. The staging folder starts
    as the bucket's committed output (to resume it, replace it, or add to it) unless it holds a
    run of its own that was not published yet."""
    value = location(value)
    if isinstance(value, Path):
        yield value
        return
    folder = _cache_folder("staging", value)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 stages and commits, the others only use its folder
        yield folder
        return
    manifest = committed(value)
    _check_writable(value, manifest)
    mine = _record(folder).get("manifest")
    if manifest is not None and mine != _digest(manifest) and (mine is not None or not folder.exists()):
        shutil.rmtree(folder, ignore_errors=True)
        mirror(value, folder, show_progress, manifest)
    elif manifest is None and mine is not None:  # the bucket lost what this folder published
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    _STAGED[folder] = _URL_OF[str(folder)] = value
    try:
        yield folder
    finally:
        _STAGED.pop(folder, None)
    publish(folder, value, show_progress)
    console.print(f"committed {value}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- files read in place


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """An input file in a bucket, read in place: ranges for parquet (its footer, then row group
    by row group), a stream for text. Enough of ``Path``'s face (name, suffixes, stat, open)
    for the readers that take local files. ``version`` (the ETag) tells a changed object."""

    url: str
    size: int
    version: str

    @property
    def name(self) -> str:
        return PurePosixPath(self.url).name

    @property
    def suffixes(self) -> list[str]:
        return PurePosixPath(self.url).suffixes

    def __str__(self) -> str:
        return self.url

    def resolve(self) -> RemoteFile:
        return self

    def stat(self):
        return types.SimpleNamespace(st_size=self.size, st_mtime_ns=self.version)

    def open(self, mode: str = "rb", block_size: int = 8 << 20):
        if mode != "rb":
            raise ValueError("remote inputs are read only")
        fs, path = filesystem(self.url)
        with errors(self.url):  # buffered: the text readers call readline(limit), which fsspec's files lack
            return io.BufferedReader(fs.open(path, "rb", block_size=block_size, cache_type="readahead"), 1 << 20)


def _remote_file(url: str, info: dict) -> RemoteFile:
    version = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")
    return RemoteFile(url, int(info.get("size") or 0), version.strip('"'))


def list_files(url: str) -> list[RemoteFile] | RemoteFile:
    """The object at ``url`` (a RemoteFile), or every object under it as a folder (sorted)."""
    fs, path = filesystem(url)
    scheme = url.split("://", 1)[0]
    with errors(url):
        if fs.isfile(path):
            return _remote_file(url, fs.info(path))
        found = fs.find(path, detail=True)
    if not found:
        raise RemoteError(f"{url}: no such file or folder")
    return [_remote_file(f"{scheme}://{p}", info) for p, info in sorted(found.items())]


def open_input(path: Path | RemoteFile):
    """What pyarrow and the text readers are given: a local path as it is, a remote file opened."""
    return path.open("rb") if isinstance(path, RemoteFile) else path
