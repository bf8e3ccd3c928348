"""`Checkpointer`: async, sharded, atomic checkpoints and verified resume.

Save (every rank, `save_async`): wait for the previous save; write this rank's RNG (and,
on rank 0, the JSON train state) into `step-N.tmp/`; snapshot model and optimizer shards
to host memory (the only time the training loop blocks); `dcp.async_save` writes them in a
background thread over a dedicated gloo group, so its collectives never interleave with
training's. DCP's save ends with a gather-and-broadcast through rank 0, so when rank 0's
write returns every rank's data is on disk; only then does rank 0 commit:

    fsync + SHA-256 every file -> manifest.json (fsync) -> rename step-N.tmp -> step-N
    (fsync parent) -> LATEST via temp + rename -> retention.

A SIGKILL at any instant leaves either the previous commit as the newest valid
checkpoint or the new one complete: `.tmp` directories are never read, and `latest_valid`
trusts no pointer, only a manifest whose every file verifies.

The snapshot is taken synchronously on purpose: copying in the background while the next
step runs would be faster only as long as nothing else touches the weights before the next
optimizer step, a promise no hook registered after ours has made. Its host buffers are
kept between saves (pinned on accelerators), so only the first save pays to allocate them.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import signal
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from .manifest import (DCP_METADATA, LATEST, TRAIN_STATE, CheckpointError, CheckpointInfo, atomic_write_text,
                       build_manifest, fsync_dir, inspect, scan, step_dir_name, write_manifest)
from .safe_load import SafeFileSystemReader, SafeLoadPlanner, load_metadata
from .state import TrainState, capture_rng, restore_rng, tensor_state, apply_tensor_state

log = logging.getLogger("suanli.checkpoint")
# Single-process use (CLI, benchmarks) is deliberate here; DCP warns about it on every call.
warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized",
                        category=UserWarning)

# Test hook: SIGKILL this process at a named point of the commit, to prove a crash there
# leaves a resumable directory (tests/test_checkpoint_crash.py).
CRASH_ENV = "SUANLI_CKPT_CRASH_AT"


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _write_json(path: Path, obj) -> None:
    # No fsync here, in the loop's path: closing makes the file visible to rank 0 (also
    # over NFS), and the commit fsyncs every file before it writes the manifest.
    with open(path, "w") as f:
        json.dump(obj, f)


def _versions() -> dict:
    import suanli

    return {"suanli": suanli.__version__, "torch": torch.__version__, "python": platform.python_version()}


class Checkpointer:
    """Periodic checkpoints of a training run in `dir` (normally `<run_dir>/checkpoints`).

    every_steps: save when step % every_steps == 0 (and at the last step); 0 disables.
    keep_last: committed checkpoints kept (newest first); 0 keeps all.
    keep_every: also keep every step divisible by this forever; 0: none.
    async_save: False makes `save_async` wait for the commit (a synchronous save).
    Constructing one is collective when torch.distributed is initialised (it creates the
    checkpoint process group): every rank must construct it, in the same order.
    """

    def __init__(self, dir: str | os.PathLike, every_steps: int = 50, keep_last: int = 3, keep_every: int = 0, *,
                 async_save: bool = True, process_group: dist.ProcessGroup | None = None) -> None:
        for name, v in (("every_steps", every_steps), ("keep_last", keep_last), ("keep_every", keep_every)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"checkpoint.{name}: must be an integer >= 0, got {v!r}")
        self.dir = Path(dir)
        self.every_steps, self.keep_last, self.keep_every = every_steps, keep_last, keep_every
        self.async_save = async_save
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        # A group of its own: DCP's save collectives run in a background thread and must
        # never interleave with the training loop's on the same group.
        self.pg = (process_group or dist.new_group(backend="gloo")) if self.distributed else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="suanli-ckpt")
        self._pending: Future | None = None
        self._stager = None
        self.last_committed: int | None = None
        self.last_stall_s: float | None = None     # how long the last save blocked its caller
        self.skipped: list[CheckpointInfo] = []     # what the last latest_valid() passed over, and why
        if self.rank == 0:
            self._clean_stale()
        self._barrier()

    # ------------------------------------------------------------------ saving

    def should_save(self, step: int, last: bool = False) -> bool:
        return self.every_steps > 0 and step > 0 and (step % self.every_steps == 0 or last)

    def save_async(self, step: int, state: TrainState) -> None:
        """Snapshot `state` at `step` and write it in the background (collective)."""
        self.wait()
        start = time.perf_counter()
        tmp = self.dir / f"{step_dir_name(step)}.tmp"
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        _write_json(tmp / "rng" / f"rank{self.rank:05d}.json", capture_rng(state.accelerator))
        for name, obj in state.per_rank.items():
            # Written here, in the loop's stall: small for the states it holds today.
            (tmp / "per_rank").mkdir(exist_ok=True)
            torch.save(obj.state_dict(), tmp / "per_rank" / f"{name}-rank{self.rank:05d}.pt")
        if self.rank == 0:
            _write_json(tmp / TRAIN_STATE, self._train_state(step, state))
        response = dcp.async_save(tensor_state(state), storage_writer=FileSystemWriter(tmp, sync_files=True),
                                  planner=None, process_group=self.pg, async_stager=self._get_stager(state),
                                  no_dist=not self.distributed)
        upload = getattr(response, "upload_completion", response)  # AsyncSaveResponse or a Future
        self.last_stall_s = time.perf_counter() - start
        self._pending = self._executor.submit(self._finish, step, tmp, upload, self._manifest_info(state))
        if not self.async_save:
            self.wait()

    def save(self, step: int, state: TrainState) -> int:
        """Save and wait for the commit."""
        self.save_async(step, state)
        return self.wait()

    def wait(self) -> int | None:
        """Block until the save in flight (if any) is committed; returns the newest committed
        step. A failed save raises here, on the next save, or at close."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                self.last_committed = pending.result()
            except Exception as e:
                raise CheckpointError(f"checkpoint save failed: {e}; the newest committed checkpoint is still "
                                      f"{self.last_committed}. Check free space and permissions of {self.dir}") from e
        return self.last_committed

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)
            if self._stager is not None:
                self._stager.close()
                self._stager = None

    def _get_stager(self, state: TrainState):
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            # Kept across saves: its host buffers are reused (pinned on accelerators, so
            # the device-to-host copy runs at full speed).
            acc = state.accelerator
            on_device = acc is not None and acc.device_type != "cpu" and torch.accelerator.is_available()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=on_device, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=on_device))
        return self._stager

    def _train_state(self, step: int, state: TrainState) -> dict:
        stateful = {}
        for name, obj in state.stateful.items():
            sd = obj.state_dict()
            try:
                json.dumps(sd)
            except (TypeError, ValueError) as e:
                raise TypeError(f"checkpoint: the state of {name!r} is not JSON-serialisable ({e})") from None
            stateful[name] = sd
        return {"step": int(step), "world_size": self.world_size, "stateful": stateful, "meta": state.meta}

    def _manifest_info(self, state: TrainState) -> dict:
        acc = state.accelerator
        return {"world_size": self.world_size, "layout": state.meta.get("layout"), "versions": _versions(),
                "device_type": acc.device_type if acc is not None else "cpu"}

    def _finish(self, step: int, tmp: Path, upload: Future, info: dict) -> int:
        upload.result()
        if self.rank == 0:
            self._commit(step, tmp, info)
        return step

    def _commit(self, step: int, tmp: Path, info: dict) -> None:
        _crash_point("before_manifest")
        write_manifest(tmp, build_manifest(tmp, step, created=round(time.time(), 3), **info))
        _crash_point("before_rename")
        final = self.dir / step_dir_name(step)
        replaced = final.with_name(final.name + ".replaced")
        if final.exists():
            # An earlier save of this step (torn, corrupt, or from a rolled-back
            # trajectory): moved aside first so the new one takes its name atomically.
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(tmp, final)
        fsync_dir(self.dir)
        _crash_point("after_rename")
        atomic_write_text(self.dir / LATEST, final.name + "\n")
        _crash_point("after_latest")
        shutil.rmtree(replaced, ignore_errors=True)
        self._retain(step)

    def _retain(self, newest: int) -> None:
        """Delete committed checkpoints no longer needed: not among the `keep_last` newest up to
        `newest`, not a multiple of `keep_every`. Newer entries (another trajectory) are left."""
        if self.keep_last <= 0:
            return
        committed = [c for c in scan(self.dir) if c.status == "committed" and c.step <= newest]
        keep = {c.step for c in committed[:self.keep_last]}
        if self.keep_every > 0:
            keep |= {c.step for c in committed if c.step % self.keep_every == 0}
        for c in committed:
            if c.step not in keep:
                doomed = c.path.with_name(c.path.name + ".deleting")
                os.rename(c.path, doomed)   # out of resume's sight first, then delete
                fsync_dir(self.dir)
                _crash_point("mid_retention")
                shutil.rmtree(doomed, ignore_errors=True)

    def _clean_stale(self) -> None:
        """Remove what a crashed process left behind: torn `.tmp` writes and half-done
        replace/delete leftovers (none of them is ever read)."""
        for c in scan(self.dir):
            if c.status in ("uncommitted", "leftover"):
                log.info("removing %s: %s", c.name, c.problems[0])
                shutil.rmtree(c.path, ignore_errors=True)

    # ------------------------------------------------------------------ finding and loading

    def list(self, verify: bool = False) -> list[CheckpointInfo]:
        """Every entry, newest first; committed ones checked by size (or hash with verify=True)."""
        return [inspect(c, hashes=verify) for c in scan(self.dir)]

    def latest_valid(self, max_step: int | None = None) -> CheckpointInfo | None:
        """The newest committed checkpoint (at most `max_step`) whose every file verifies and
        whose metadata parses safely. Torn and corrupt ones are skipped with a logged reason
        (kept in `self.skipped`). Reads files only: call it on one rank and share the answer."""
        found, self.skipped = find_latest_valid(self.dir, max_step)
        return found

    def resume(self, state: TrainState, max_step: int | None = None) -> dict | None:
        """Load the newest valid checkpoint (at most `max_step`) into `state` (collective): rank 0
        picks and verifies, every rank loads. Returns its train state, or None when there is none."""
        self.wait()
        step = -1
        if self.rank == 0:
            info = self.latest_valid(max_step)
            step = info.step if info is not None else -1
        step = self._broadcast_int(step)
        return None if step < 0 else self.load(step, state, verify=False)

    def load(self, step: int, state: TrainState, verify: bool = True) -> dict:
        """Load checkpoint `step` into `state` (collective), resharding to this layout; returns
        its train state (`step`, `stateful`, `meta`, and `notes` on what could not apply)."""
        self.wait()
        path = self.dir / step_dir_name(step)
        if verify:
            problems = []
            if self.rank == 0:
                problems = verify_checkpoint(CheckpointInfo(step, path, "committed")).problems
            if self._broadcast_int(len(problems)):
                raise CheckpointError(f"checkpoint {path} does not verify: {'; '.join(problems) or 'see rank 0'}; "
                                      f"run `suanli ckpt verify` on the run directory, or load another step")
        load_metadata(path / DCP_METADATA)  # refuse an unsafe file with our error, before DCP reads it
        train_state = json.loads((path / TRAIN_STATE).read_text())
        tensors = tensor_state(state)
        dcp.load(tensors, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(),
                 process_group=self.pg, no_dist=not self.distributed)
        apply_tensor_state(state, tensors)
        notes = []
        for name, obj in state.stateful.items():
            if name in train_state["stateful"]:
                obj.load_state_dict(train_state["stateful"][name])
            else:
                notes.append(f"{name}: not in the checkpoint, left as initialised")
        notes += self._restore_rng(path, train_state, state)
        notes += self._restore_per_rank(path, train_state, state)
        train_state["notes"] = notes
        return train_state

    def _restore_per_rank(self, path: Path, train_state: dict, state: TrainState) -> list[str]:
        same = (train_state.get("world_size") == self.world_size
                and train_state["meta"].get("layout") == state.meta.get("layout"))
        notes = []
        for name, obj in state.per_rank.items():
            f = path / "per_rank" / f"{name}-rank{self.rank:05d}.pt"
            if not same or not f.is_file():
                notes.append(f"{name}: per-rank state not restored (" + ("not in the checkpoint" if same else
                             "the checkpoint was written with another parallel layout") + "), starts fresh")
                continue
            obj.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
        return notes

    def _restore_rng(self, path: Path, train_state: dict, state: TrainState) -> list[str]:
        # Per-rank random streams only mean the same thing in the same layout.
        same = (train_state.get("world_size") == self.world_size
                and train_state["meta"].get("layout") == state.meta.get("layout"))
        rng_file = path / "rng" / f"rank{self.rank:05d}.json"
        if not same or not rng_file.is_file():
            return ["RNG states not restored: the checkpoint was written with another parallel layout"]
        note = restore_rng(json.loads(rng_file.read_text()), state.accelerator)
        return [note] if note else []

    # ------------------------------------------------------------------ collectives (main thread only)

    def _barrier(self) -> None:
        if self.distributed and self.world_size > 1:
            dist.barrier(group=self.pg)

    def _broadcast_int(self, value: int) -> int:
        if not self.distributed or self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(t, src=0, group=self.pg)
        return int(t.item())


def find_latest_valid(ckpt_dir: Path, max_step: int | None = None
                      ) -> tuple[CheckpointInfo | None, list[CheckpointInfo]]:
    """(newest valid checkpoint at most `max_step` or None, the newer ones skipped with reasons)."""
    skipped = []
    for c in scan(Path(ckpt_dir)):
        if (max_step is not None and c.step > max_step) or c.status not in ("committed", "torn"):
            continue
        verify_checkpoint(c)
        if c.status == "ok":
            return c, skipped
        log.warning("skipping checkpoint %s (%s): %s", c.name, c.status, "; ".join(c.problems))
        skipped.append(c)
    return None, skipped


def verify_checkpoint(info: CheckpointInfo, hashes: bool = True) -> CheckpointInfo:
    """Files against the manifest, then the DCP metadata through the restricted unpickler and
    the train state as JSON: status becomes ok, corrupt or torn."""
    inspect(info, hashes=hashes)
    if info.status in ("ok", "committed"):
        try:
            load_metadata(info.path / DCP_METADATA)
            json.loads((info.path / TRAIN_STATE).read_text())
        except CheckpointError as e:
            info.status, info.problems = "corrupt", [str(e)]
        except (OSError, ValueError) as e:
            info.status, info.problems = "corrupt", [f"{TRAIN_STATE}: unreadable ({e})"]
    return info


__all__ = ["Checkpointer", "verify_checkpoint", "find_latest_valid", "CRASH_ENV"]
