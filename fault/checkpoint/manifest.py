"""The on-disk contract of a checkpoint directory, and the file-system steps that make a
commit atomic.

    <run_dir>/checkpoints/
        LATEST                   "step-00001230": the newest commit (a hint for people and tools;
                                 resume scans the directories and trusts only manifests)
        step-00001230/           committed: renamed from step-00001230.tmp/ after manifest.json
            manifest.json        every other file with its size and SHA-256, step, layout, versions
            .metadata            DCP metadata (pickled by DCP; read only through safe_load)
            __0_0.distcp ...     DCP tensor data, one file per rank
            train_state.json     step, data sampler, LR schedule, guard, config, layout
            rng/rank00000.json   each rank's RNG states
        step-00001240.tmp/       being written, or torn by a crash: never read
        step-00001100.abandoned/ rolled back past by the loss guard: kept for people, never resumed

A directory counts as a checkpoint only under its final name with a manifest whose every
file verifies; anything else is reported with the reason and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "suanli-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "LATEST"
TRAIN_STATE = "train_state.json"
DCP_METADATA = ".metadata"
REQUIRED = (DCP_METADATA, TRAIN_STATE)

STEP_RE = re.compile(r"^step-(\d{8})$")
OTHER_RE = re.compile(r"^step-(\d{8})\.(tmp|abandoned|replaced|deleting)$")
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, torn, corrupt or unsafe; the message names the file and the fix."""


def step_dir_name(step: int) -> str:
    return f"step-{int(step):08d}"


# ---------------------------------------------------------------- durable file-system steps


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in `path` durable (POSIX needs the directory synced too)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write-to-temp, fsync, rename, fsync the directory: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def hash_file(path: str | os.PathLike, sync: bool = False) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file, read once; with sync=True the file is fsynced as well."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def list_files(root: Path) -> list[str]:
    """Relative paths of the regular files under `root`, sorted (the manifest's order)."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            out.append(str((Path(dirpath) / name).relative_to(root)))
    return sorted(out)


def build_manifest(step_dir: Path, step: int, **info) -> dict:
    """Fsync and hash every file in a finished (not yet renamed) step directory."""
    files = {}
    for rel in list_files(step_dir):
        if rel == MANIFEST:
            continue
        size, digest = hash_file(step_dir / rel, sync=True)
        files[rel] = {"size": size, "sha256": digest}
    for dirpath, _dirs, _files in os.walk(step_dir):
        fsync_dir(dirpath)
    return {"format": FORMAT, "version": FORMAT_VERSION, "step": int(step), **info, "files": files}


def write_manifest(step_dir: Path, manifest: dict) -> None:
    with open(step_dir / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(step_dir)


# ---------------------------------------------------------------- reading and verifying


def read_manifest(step_dir: Path) -> dict:
    path = step_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{step_dir.name}: no {MANIFEST} (torn: the save never committed)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{step_dir.name}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{step_dir.name}: {MANIFEST} is not a {FORMAT} manifest")
    if not isinstance(m.get("version"), int) or m["version"] > FORMAT_VERSION:
        raise CheckpointError(f"{step_dir.name}: manifest format version {m.get('version')!r} is newer than this "
                              f"suanli reads ({FORMAT_VERSION}); upgrade suanli")
    files = m.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise CheckpointError(f"{step_dir.name}: {MANIFEST} has a malformed 'files' table")
    return m


def _safe_relpath(rel: str) -> bool:
    # A crafted manifest must not make verification (or DCP) read outside the directory.
    p = Path(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts


def verify_files(step_dir: Path, hashes: bool = True) -> tuple[dict | None, list[str]]:
    """(manifest, problems). No problems means every listed file is present with the recorded
    size (and, with hashes=True, SHA-256), the required files are listed, and nothing else
    is in the directory."""
    try:
        m = read_manifest(step_dir)
    except CheckpointError as e:
        return None, [str(e)]
    problems = []
    m_step = STEP_RE.match(step_dir.name)
    if m_step and m.get("step") != int(m_step.group(1)):
        problems.append(f"{MANIFEST}: says step {m.get('step')!r} but the directory is {step_dir.name}")
    for req in REQUIRED:
        if req not in m["files"]:
            problems.append(f"{req}: missing from the manifest")
    for rel, rec in m["files"].items():
        path = step_dir / rel
        if not _safe_relpath(rel):
            problems.append(f"{rel}: path escapes the checkpoint directory")
        elif path.is_symlink() or not path.is_file():
            problems.append(f"{rel}: missing" if not path.is_symlink() else f"{rel}: is a symlink")
        elif path.stat().st_size != rec["size"]:
            problems.append(f"{rel}: size {path.stat().st_size} but the manifest says {rec['size']} "
                            "(truncated or corrupt)")
        elif hashes and hash_file(path)[1] != rec["sha256"]:
            problems.append(f"{rel}: SHA-256 mismatch (corrupt)")
    for rel in list_files(step_dir):
        if rel != MANIFEST and rel not in m["files"]:
            problems.append(f"{rel}: not in the manifest (unexpected file)")
    return m, problems


@dataclass
class CheckpointInfo:
    """One entry of a checkpoints directory, as found on disk."""

    step: int
    path: Path
    status: str                  # committed | ok | corrupt | torn | uncommitted | abandoned | leftover
    problems: list[str] = field(default_factory=list)
    manifest: dict | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def size_bytes(self) -> int:
        if self.manifest:
            return sum(f["size"] for f in self.manifest["files"].values())
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file() and not p.is_symlink())

    def as_dict(self) -> dict:
        return {"step": self.step, "name": self.name, "status": self.status, "problems": self.problems,
                "size_bytes": self.size_bytes()}


def scan(ckpt_dir: Path) -> list[CheckpointInfo]:
    """Every step-* entry, newest step first; committed ones only checked for a manifest
    (cheap); `inspect` checks files."""
    out = []
    if not ckpt_dir.is_dir():
        return out
    for p in ckpt_dir.iterdir():
        if not p.is_dir():
            continue
        if m := STEP_RE.match(p.name):
            status = "committed" if (p / MANIFEST).is_file() else "torn"
            out.append(CheckpointInfo(int(m.group(1)), p, status,
                                      [] if status == "committed" else [f"no {MANIFEST} (the save never committed)"]))
        elif m := OTHER_RE.match(p.name):
            kind = m.group(2)
            status = {"tmp": "uncommitted", "abandoned": "abandoned"}.get(kind, "leftover")
            reason = {"tmp": "still being written, or torn by a crash (never read)",
                      "abandoned": "rolled back past by the loss guard (kept for inspection, never resumed)"
                      }.get(kind, "left over from an interrupted replace/delete (never read)")
            out.append(CheckpointInfo(int(m.group(1)), p, status, [reason]))
    order = {"committed": 0, "torn": 0, "uncommitted": 1, "abandoned": 2, "leftover": 3}
    return sorted(out, key=lambda c: (-c.step, order.get(c.status, 9)))


def inspect(info: CheckpointInfo, hashes: bool = True) -> CheckpointInfo:
    """Check a committed entry's files: status becomes ok or corrupt (torn if no manifest)."""
    if info.status not in ("committed", "ok", "corrupt"):
        return info
    manifest, problems = verify_files(info.path, hashes=hashes)
    info.manifest, info.problems = manifest, problems
    info.status = "torn" if manifest is None else ("corrupt" if problems else ("ok" if hashes else "committed"))
    return info


def read_latest(ckpt_dir: Path) -> str | None:
    try:
        return (ckpt_dir / LATEST).read_text().strip() or None
    except OSError:
        return None


__all__ = ["CheckpointError", "CheckpointInfo", "step_dir_name", "scan", "inspect", "verify_files", "read_manifest",
           "build_manifest", "write_manifest", "atomic_write_text", "fsync_dir", "hash_file", "read_latest",
           "MANIFEST", "LATEST", "TRAIN_STATE", "DCP_METADATA", "STEP_RE"]
