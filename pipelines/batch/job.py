"""The Ray Data skeleton every batch job shares (generate; later embed, score, denoise): a request
split into deterministic blocks, an actor pool that loads its model once and runs a job's block
function, per-block atomic writes, a marker per finished block, then `manifest.json` + `_SUCCESS`.
Reruns skip finished blocks and remove what an interrupted run left behind. Not here: what a block
computes or which columns it writes (the job's module supplies that).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import ConfigError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SUCCESS_NAME = "_SUCCESS"
REQUEST_NAME = "_request.json"  # written before any block: a rerun can tell its own unfinished run from another's
MARKERS_DIR = "_blocks"
# the manifest lists every file only up to this many; past it (a million PNG files would make a ~150 MB
# manifest written in one piece) it keeps one digest per block and the files stay listed in the markers
MANIFEST_FILES_LIMIT = 10_000
LOCK_NAME = ".vaepipe.lock"  # held (flock) by the run writing into the folder; empty, hidden from readers
TMP_SUFFIX = ".tmp"  # temporaries are ".NAME.tmp": hidden from pyarrow/Ray readers, swept on the next run
# block_fn_kwargs naming folders the actors need (a few MB each): shipped through Ray's object store, so an
# actor's node need not see the driver's disk
BLOCKS_STREAM = 1  # SeedSequence spawn key of the per-block noise (generate's labels use 0: never the same numbers)
SHIPPED_FOLDERS = ("model_dir", "filter_classifier")


class OutputExistsError(ValueError):
    """The output folder holds another request's data (or data that is not a batch job's)."""


class BlockRefused(ValueError):
    """A block function's verdict on the request (e.g. a filter that too few samples pass): the actor
    returns its message instead of failing (Ray Data would bury it in a traceback), and the driver
    raises it as one line once the pool is done. Blocks that finished stay done for a rerun."""


class BlockFn(Protocol):
    """A job's per-block compute, built once per actor with the job's `block_fn_kwargs`.

    Called with one block spec (the dict from the plan) and a BlockWriter; writes the block's
    files only through the writer and returns its row counts per key (e.g. per label).
    """

    def __call__(self, block: dict[str, Any], writer: "BlockWriter") -> dict[str, int]: ...


@dataclass(frozen=True)
class BatchJob:
    name: str  # "generate": names progress lines and the manifest's "job"
    out: Path  # output folder (created); the job owns `owned_dirs`, _blocks/, the manifest and _SUCCESS
    request: dict[str, Any]  # JSON values that fix the output bytes; equal requests -> identical files
    blocks: list[dict[str, Any]]  # JSON-able specs, block["index"] = 0..n-1; a pure function of the request
    block_fn: type  # a BlockFn class; must be importable by Ray workers (module level)
    block_fn_kwargs: dict[str, Any] = field(default_factory=dict)
    owned_dirs: tuple[str, ...] = ()  # subfolders of out that only block files live in
    workers: int = 2  # actor pool size
    use_gpu: bool = False  # one GPU per actor
    metadata: dict[str, Any] = field(default_factory=dict)  # extra manifest keys (shapes, columns, ...)
    overwrite: bool = False  # replace another request's data in `out`
    # summed BlockWriter.tallies of all blocks -> extra manifest keys (e.g. generate's filter acceptance rates)
    summarize: Callable[[dict[str, dict[str, int]]], dict[str, Any]] | None = None


@dataclass(frozen=True)
class BatchResult:
    manifest: dict[str, Any]
    skipped: bool  # the output was already complete for this request: nothing was touched
    blocks_written: int


# ----------------------------------------------------------------------------------------------
# Writing: every file goes to a temporary name and is renamed into place, so a reader (or a rerun)
# never sees half a file under a final name.
# ----------------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class BlockWriter:
    """Writes one block's files under `out` and records each one's rows, size and sha256."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.files: list[dict[str, Any]] = []
        self.tallies: dict[str, dict[str, int]] = {}  # name -> key -> count, summed over blocks for the manifest
        self._dirs: set[Path] = set()

    def tally(self, name: str, key: str, count: int) -> None:
        """Count something besides rows (e.g. draws a filter rejected); the marker keeps it."""
        per_key = self.tallies.setdefault(name, {})
        per_key[key] = per_key.get(key, 0) + int(count)

    def write_bytes(self, relpath: str, data: bytes, rows: int = 1) -> None:
        path = self.out / relpath
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        write_atomic(path, data)
        self.files.append({"path": relpath, "rows": rows, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})

    def write_parquet(self, relpath: str, table: pa.Table, **options: Any) -> None:
        """Same table + same options -> same bytes (pyarrow writes no timestamps)."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **options)
        self.write_bytes(relpath, sink.getvalue().to_pybytes(), rows=table.num_rows)


def block_seed(seed: int, index: int) -> int:
    """Block `index`'s noise seed: a pure function of (seed, index), 63 bits so it fits int64."""
    state = np.random.SeedSequence(seed, spawn_key=(BLOCKS_STREAM, index)).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def spec_sha256(block: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(block, sort_keys=True).encode()).hexdigest()


def marker_path(out: Path, index: int) -> Path:
    return out / MARKERS_DIR / f"block-{index:06d}.json"


def build_with_shipped_files(block_fn: type, block_fn_kwargs: dict[str, Any],
                             shipped_files: dict[str, dict[str, bytes]]) -> Any:
    """`block_fn(**block_fn_kwargs)` with each shipped folder written to a local temporary folder
    first (it came through Ray's object store: this node need not see the driver's disk). Block
    functions load what they need in their constructor, so the copies are removed as soon as it
    returns (or raises): an actor killed later leaves nothing behind in the node's temp dir."""
    import shutil
    import tempfile

    copies = []
    try:
        for kwarg, files in shipped_files.items():
            local = Path(tempfile.mkdtemp(prefix=f"vaepipe-actor-{kwarg.replace('_', '-')}-"))
            copies.append(local)
            for name, data in files.items():
                (local / name).write_bytes(data)
            block_fn_kwargs = {**block_fn_kwargs, kwarg: str(local)}
        return block_fn(**block_fn_kwargs)
    finally:
        for local in copies:
            shutil.rmtree(local, ignore_errors=True)


class BlockActor:
    """One per actor in the pool: builds the job's block function once (loading its model), then
    runs blocks; each block's marker is written after all its files, so a marker means complete."""

    def __init__(self, out: str, block_fn: type, block_fn_kwargs: dict[str, Any],
                 shipped_files: dict[str, dict[str, bytes]] | None = None):
        self.out = Path(out)
        self.fn = build_with_shipped_files(block_fn, block_fn_kwargs, shipped_files or {})

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        indices, rows, refused = [], [], []
        for spec_json in batch["block"]:
            block = json.loads(spec_json)
            writer = BlockWriter(self.out)
            try:
                counts = {str(k): int(v) for k, v in self.fn(block, writer).items()}
            except BlockRefused as exc:  # no marker: the block is redone (and its strays swept) on a rerun
                indices.append(block["index"])
                rows.append(0)
                refused.append(str(exc))
                continue
            marker = {"index": block["index"], "spec_sha256": spec_sha256(block), "counts": counts,
                      "files": writer.files}
            if writer.tallies:  # only then: markers of jobs that tally nothing keep their bytes
                marker["tallies"] = writer.tallies
            write_atomic(marker_path(self.out, block["index"]), json.dumps(marker, indent=1).encode())
            indices.append(block["index"])
            rows.append(sum(counts.values()))
            refused.append("")
        return {"index": indices, "rows": rows, "refused": refused}


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------


def run_batch_job(job: BatchJob) -> BatchResult:
    """Run the blocks not yet done on a Ray Data actor pool, then write the manifest and _SUCCESS.
    One run at a time per folder: a second run into the same `out` is refused while the first holds it."""
    with _exclusive(job):
        return _run_locked(job)


@contextmanager
def _exclusive(job: BatchJob) -> Iterator[None]:
    """Hold an exclusive lock on OUT/.vaepipe.lock for the run. Two runs of even the same request
    would sweep each other's unfinished files; the kernel drops the lock when a run dies."""
    import fcntl

    out = job.out
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK_NAME, "a+")
    except PermissionError as exc:
        raise OutputExistsError(f"out {out} is not writable ({exc.strerror}: {exc.filename}); choose a folder "
                                "you can write") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputExistsError(f"out {out} is in use by another {job.name} run; wait for it to finish "
                                    "or choose another out") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_locked(job: BatchJob) -> BatchResult:
    out = job.out
    request = json.loads(json.dumps(job.request))  # compare as the manifest stores it
    finished = _read_json(out / MANIFEST_NAME) if (out / SUCCESS_NAME).is_file() else None
    if finished is not None and finished.get("request") == request:
        _log(job, f"{out} is already complete for this request: nothing to do")
        return BatchResult(finished, skipped=True, blocks_written=0)
    _claim(job, request, finished)

    done = {b["index"] for b in job.blocks if _block_done(out, b)}
    removed = _sweep(job, done)
    if removed:
        _log(job, f"removed {removed} file(s) left by an interrupted run")
    todo = [b for b in job.blocks if b["index"] not in done]
    _log(job, f"{len(job.blocks)} blocks: {len(done)} already done, {len(todo)} to run on {job.workers} worker(s)")
    if todo:
        _run_blocks(job, todo)
    missing = [b["index"] for b in job.blocks if not _block_done(out, b)]
    if missing:
        raise RuntimeError(f"{job.name}: blocks {missing[:10]} have no complete output after the run")

    manifest = _manifest(job, request)
    write_atomic(out / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())
    write_atomic(out / SUCCESS_NAME, b"")  # last: its presence means the manifest and every file are complete
    _log(job, f"done: {manifest['total']} rows in {manifest['num_files']} files under {out}")
    return BatchResult(manifest, skipped=False, blocks_written=len(todo))


def finished_manifest(job: BatchJob) -> dict[str, Any] | None:
    """The manifest of `job.out` when it is complete for exactly this request (a rerun would do nothing),
    else None. Read without the lock: a caller deciding whether to record a new run asks this first."""
    if not (job.out / SUCCESS_NAME).is_file():
        return None
    finished = _read_json(job.out / MANIFEST_NAME)
    same = finished is not None and finished.get("request") == json.loads(json.dumps(job.request))
    return finished if same else None


def _claim(job: BatchJob, request: dict[str, Any], finished: dict[str, Any] | None) -> None:
    """Make `out` this request's: resume our own unfinished run, refuse anyone else's data
    (or clear it with overwrite), and record the request before any block is written."""
    out = job.out
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"out {out} exists and is not a folder")
    ours = _owned_paths(job)
    if finished is not None:
        other, what = finished.get("request"), "a finished"
    elif (out / REQUEST_NAME).is_file():
        other, what = _read_json(out / REQUEST_NAME), "an unfinished"
    else:
        other, what = None, None
    if what is not None and other != request:
        if not job.overwrite:
            raise OutputExistsError(
                f"out {out} holds {what} {job.name} run of a different request (differs in: "
                f"{', '.join(_differences(other, request))}); choose another out or pass overwrite "
                "(--overwrite) to replace its data")
        _log(job, f"overwrite: removing {what} run of a different request from {out}")
        _remove(ours)
    elif what is None and any(p.exists() for p in ours):
        if not job.overwrite:
            found = ", ".join(p.name for p in ours if p.exists())
            raise OutputExistsError(f"out {out} holds {found} but no {job.name} run record; choose another out "
                                    "or pass overwrite (--overwrite) to replace them")
        _remove(ours)
    (out / MARKERS_DIR).mkdir(parents=True, exist_ok=True)
    if not (out / REQUEST_NAME).is_file():
        write_atomic(out / REQUEST_NAME, (json.dumps(request, indent=1) + "\n").encode())


def _owned_paths(job: BatchJob) -> list[Path]:
    names = [*job.owned_dirs, MARKERS_DIR, MANIFEST_NAME, SUCCESS_NAME, REQUEST_NAME]
    return [job.out / name for name in names]


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _differences(old: Any, new: dict[str, Any]) -> list[str]:
    if not isinstance(old, dict):
        return ["unreadable record"]
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)) or ["nothing visible"]


def _block_done(out: Path, block: dict[str, Any]) -> bool:
    """A block is done when its marker matches its spec and every file it lists is there with its
    sha256 (not just its size: a file damaged in place, same length, must be written again)."""
    marker = _read_json(marker_path(out, block["index"]))
    if not marker or marker.get("spec_sha256") != spec_sha256(block):
        return False
    for entry in marker["files"]:
        path = out / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] \
                or _file_sha256(path) != entry["sha256"]:
            return False
    return True


def _sweep(job: BatchJob, done: set[int]) -> int:
    """Delete every file under the job's folders that no done block's marker lists: temporaries,
    files of blocks that never got their marker, markers of blocks to redo. Returns the count."""
    out = job.out
    keep = {marker_path(out, i) for i in done}
    for i in done:
        keep.update(out / entry["path"] for entry in _read_json(marker_path(out, i))["files"])
    removed = 0
    for folder in (*job.owned_dirs, MARKERS_DIR):
        for root, _, files in os.walk(out / folder):
            for name in files:
                path = Path(root) / name
                if path not in keep:
                    path.unlink()
                    removed += 1
    return removed


def _run_blocks(job: BatchJob, todo: list[dict[str, Any]]) -> None:
    import ray
    import ray.data

    from pipelines.ray_runtime import ensure_ray

    ensure_ray()  # started only here: a no-op or refused rerun never waits for Ray
    if job.use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        # an actor pool asking for GPUs the cluster lacks would wait forever
        raise ConfigError(f"{job.name}: use_gpu is set but the Ray cluster has no GPU")
    items = [{"block": json.dumps(b, sort_keys=True)} for b in todo]
    # one Ray block per job block, so the pool can hand blocks to idle actors one by one
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    resources = {"num_gpus": 1} if job.use_gpu else {"num_cpus": 1}
    shipped_files = {kwarg: {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
                     for kwarg in SHIPPED_FOLDERS if (folder := job.block_fn_kwargs.get(kwarg))}
    ds = ds.map_batches(
        BlockActor,
        fn_constructor_kwargs={"out": str(job.out), "block_fn": job.block_fn, "block_fn_kwargs": job.block_fn_kwargs,
                               "shipped_files": shipped_files},
        compute=ray.data.ActorPoolStrategy(size=min(job.workers, len(todo))),
        batch_size=1,
        **resources,
    )
    written = ds.take_all()
    refusals = sorted((r["index"], r["refused"]) for r in written if r["refused"])
    _log(job, f"wrote {len(written) - len(refusals)} blocks, {sum(r['rows'] for r in written)} rows")
    if refusals:
        raise BlockRefused(f"{job.name}: block {refusals[0][0]}: {refusals[0][1]}"
                           + (f" (and {len(refusals) - 1} more block(s))" if len(refusals) > 1 else ""))


def _manifest(job: BatchJob, request: dict[str, Any]) -> dict[str, Any]:
    """Counts, tallies and one digest per block (O(blocks) in size); every file too while there are
    at most MANIFEST_FILES_LIMIT of them. Markers are read one at a time, so driver memory does not
    grow with the sample count past the limit."""
    counts: dict[str, int] = {}
    tallies: dict[str, dict[str, int]] = {}
    files: list[dict[str, Any]] | None = []
    digests: list[dict[str, Any]] = []
    num_files = num_bytes = 0
    for block in job.blocks:
        marker = _read_json(marker_path(job.out, block["index"]))
        for key, n in marker["counts"].items():
            counts[key] = counts.get(key, 0) + n
        for name, per_key in marker.get("tallies", {}).items():
            summed = tallies.setdefault(name, {})
            for key, n in per_key.items():
                summed[key] = summed.get(key, 0) + n
        digests.append(block_digest(block["index"], marker["files"]))
        num_files += len(marker["files"])
        num_bytes += digests[-1]["bytes"]
        if files is not None:
            files.extend(marker["files"])
            if len(files) > MANIFEST_FILES_LIMIT:
                files = None
    manifest = {
        "format_version": FORMAT_VERSION,
        "job": job.name,
        "request": request,
        **job.metadata,
        **(job.summarize(tallies) if job.summarize is not None else {}),
        "blocks": len(job.blocks),
        "total": sum(counts.values()),
        "counts": dict(sorted(counts.items(), key=lambda kv: _natural(kv[0]))),
        "num_files": num_files,
        "num_bytes": num_bytes,
        "block_digests": digests,
    }
    if files is not None:
        manifest["files"] = sorted(files, key=lambda f: f["path"])
    else:
        manifest["files_listed_in"] = f"{MARKERS_DIR}/block-NNNNNN.json"
    return manifest


def block_digest(index: int, files: list[dict[str, Any]]) -> dict[str, Any]:
    """One block's entry in the manifest: its rows, file count, bytes and the sha256 of its file
    list (paths, sizes and file sha256s, as its marker holds them), so the manifest pins every file."""
    listing = json.dumps(sorted(files, key=lambda f: f["path"]), sort_keys=True).encode()
    return {"index": index, "rows": sum(f["rows"] for f in files), "files": len(files),
            "bytes": sum(f["bytes"] for f in files), "sha256": hashlib.sha256(listing).hexdigest()}


def _natural(key: str) -> tuple:
    try:
        return (0, int(key), "")
    except ValueError:
        return (1, 0, key)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _log(job: BatchJob, message: str) -> None:
    print(f"[{job.name}] {message}", file=sys.stderr, flush=True)


def verify_files(out: str | Path) -> list[str]:
    """Check every file the output holds against its sha256; returns the paths that fail. The
    files come from the manifest's list or, past MANIFEST_FILES_LIMIT, from the block markers, each
    checked first against its block digest in the manifest (a marker that does not match fails as
    its own path)."""
    out = Path(out)
    manifest = _read_json(out / MANIFEST_NAME)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {out}")
    bad = []
    for entry in _listed_files(out, manifest, bad):
        path = out / entry["path"]
        if not path.is_file() or _file_sha256(path) != entry["sha256"]:
            bad.append(entry["path"])
    return bad


def _listed_files(out: Path, manifest: dict[str, Any], bad: list[str]) -> Iterator[dict[str, Any]]:
    if "files" in manifest:
        yield from manifest["files"]
        return
    for digest in manifest["block_digests"]:
        path = marker_path(out, digest["index"])
        marker = _read_json(path)
        if marker is None or block_digest(digest["index"], marker["files"]) != digest:
            bad.append(str(path.relative_to(out)))
            continue
        yield from marker["files"]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
