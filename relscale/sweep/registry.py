"""The sweep directory: run listing, run states, leases and heartbeats, shared by many workers.

This module writes the folder; the file names and the reader API for other parts are the
contract in relscale.sweep.layout.

Layout (every write is atomic: a temp file in the same folder, then os.replace / os.link)::

    SWEEP_DIR/sweep.json        the sweep config (written once; a different config is refused)
    SWEEP_DIR/runs.json         every run: grid row, folder, TrainConfig as overrides of a base
    SWEEP_DIR/marks/            finished states, one small file per fact, named <run_id>.<state>:
                                .done / .diverged / .failed (terminal; JSON result row inside),
                                .fail-<k> (attempt k raised), .lost-<k> (attempt k's worker died)
    SWEEP_DIR/leases/<run_id>   held while a worker trains the run: owner token + heartbeat time
    SWEEP_DIR/runs/<folder>/    the trainer's out_dir, plus spec.json, attempts.jsonl, error-<k>.txt
    SWEEP_DIR/workers/          one JSON-lines log per worker (claims, timings)
    SWEEP_DIR/results.parquet   the results index (relscale.sweep.results)

Why this shape: a run's state is the presence of a file, so the state of 10,000 runs is two
directory listings (marks/ and leases/) instead of 10,000 reads; and every transition uses a
primitive that is atomic on NFS-like shared file systems: a lease is created with os.link of a
fully written file (fails if the lease exists: exactly one claimer wins), and a stale lease
(heartbeat older than the timeout, or owner process dead on this host) is taken over by first
renaming it to a name unique to the taker -- only one rename of a given file can succeed -- and
then claiming afresh.

Heartbeats are a compare-and-set on the lease's inode, never a rewrite of the name: the owner
keeps a second, private hard link ``leases/.<run_id>.own-<token>`` to its lease and heartbeats by
touching that inode's mtime (the heartbeat time is the mtime; the JSON keeps the claim's). It
owns the run while ``leases/<run_id>`` is that same inode. A late heartbeat of a stalled worker
therefore only ever refreshes its own (possibly already renamed-away) inode: it can never
overwrite the lease of the worker that took the run over, and it reports the loss. A taker
judges staleness on the inode it renamed away, so a heartbeat that lands before that judgement
keeps the lease with its owner, and one that lands after it changes nothing.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from relscale.atomic import atomic_write_text, default_file_mode
from relscale.config import merge, train_config_from_dict
from relscale.errors import ConfigError, RelscaleError
from relscale.sweep.layout import (  # noqa: F401 (TERMINAL, STATES re-exported for older callers)
    DEFAULT_LEASE_TIMEOUT_S,
    LEASES_DIR,
    MARKS_DIR,
    RUN_LISTING,
    RUNS_DIR,
    STATES,
    SWEEP_CONFIG,
    TERMINAL,
    WORKERS_DIR,
    mark_name,
    parse_mark_name,
)

FORMAT_VERSION = 1
DEFAULT_HEARTBEAT_S = 10.0


# ---------------------------------------------------------------------------------------------
# Atomic file helpers


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically, flushed to disk first (other hosts read it)."""
    atomic_write_text(path, text, fsync=True)


def create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists; True if this call created it.

    os.link of a complete temp file is atomic and exclusive (also on NFS), so no reader ever sees
    a half-written file and exactly one of several racing creators wins.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp's 0600 would hide results from teammates
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here: O_EXCL is the next best exclusive create
            try:
                out = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # umask applies
            except FileExistsError:
                return False
            with os.fdopen(out, "w") as f:
                f.write(text)
            return True
    finally:
        _unlink(Path(tmp))


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _read_json(path: Path) -> Any:
    """A JSON file of the sweep directory; RelscaleError naming it when it is unreadable."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RelscaleError(f"{path}: unreadable JSON ({err})") from err


def _race_point(point: str) -> None:
    """No-op hook between the read and the write of a lease transition; tests replace it to force
    an interleaving of two workers (``"takeover:judged"``, ``"heartbeat:touched"``)."""


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------------------------
# Workers and leases


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


HOST = socket.gethostname()
# Two containers may share a host name but not a PID namespace: a pid is only checked for
# liveness when both match, so a run is never taken from a live worker that we cannot see.
HOST_KEY = f"{HOST}|{_pid_namespace()}"


def new_worker_id() -> str:
    """A worker name unique across hosts and processes: ``<host>-<pid>-<6 hex>``."""
    return f"{HOST}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class Lease:
    """A worker's hold on one run: the content of ``leases/<run_id>``.

    ``started``/``heartbeat``: Unix times in seconds (the heartbeat is the file's mtime);
    ``host_key``: host name and PID namespace, so liveness is only judged on the same host."""

    run_id: str
    token: str
    worker: str
    host_key: str
    pid: int
    attempt: int
    started: float
    heartbeat: float
    # False where the file system has no hard links: then heartbeats fall back to rewriting the
    # lease after comparing its token (not a compare-and-set). Not written to the lease file.
    linked: bool = field(default=True, repr=False, compare=False)

    def to_json(self) -> str:
        """The lease file's JSON text (without ``linked``)."""
        data = asdict(self)
        data.pop("linked")
        return json.dumps(data)

    def owner_alive(self) -> bool | None:
        """False if the owner process is known dead (same host and PID namespace), else None."""
        if self.host_key != HOST_KEY:
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return None
        return None

    def is_stale(self, timeout_s: float, now: float | None = None) -> bool:
        """True if the last heartbeat is more than ``timeout_s`` seconds before ``now`` (default:
        the current time), or the owner process is known to be dead."""
        now = time.time() if now is None else now
        return now - self.heartbeat > timeout_s or self.owner_alive() is False


def _parse_lease(path: Path, run_id: str) -> Lease | None:
    """The lease at ``path``; its heartbeat time is the file's mtime (a heartbeat touches the
    inode). None if there is no lease file."""
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        data.pop("linked", None)
        lease = Lease(**data)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        # Unreadable content (a foreign or truncated file): judge it by its modification time.
        return Lease(run_id, "", "?", "", -1, 0, mtime, mtime)
    lease.heartbeat = mtime  # the heartbeat touches the inode; the JSON keeps the claim time
    return lease


# ---------------------------------------------------------------------------------------------
# Run records


@dataclass
class RunRecord:
    """One run of a sweep as listed in runs.json: its grid row and how to rebuild its TrainConfig."""

    run_id: str
    folder: str
    row: dict[str, Any]
    train_overrides: dict[str, Any]


@dataclass
class RunState:
    """A run's state (one of relscale.sweep.layout.STATES), its counts of failed and lost
    attempts (fail-<k> and lost-<k> marks), and the lease while it is held."""

    run_id: str
    state: str  # one of STATES
    failures: int = 0
    lost: int = 0
    lease: Lease | None = None


@dataclass
class Claim:
    """What :meth:`Sweep.claim` hands a worker: the run, its lease, its run folder, the failed and
    lost attempts before this one, and whether the lease was taken over from a stale worker."""

    record: RunRecord
    lease: Lease
    run_dir: Path
    previous_failures: int
    previous_lost: int
    took_over: bool = False


def _diff(base: Any, full: Any) -> Any:
    """The parts of ``full`` that differ from ``base`` (nested dicts; other values whole)."""
    if isinstance(base, dict) and isinstance(full, dict):
        out = {}
        for key, value in full.items():
            if key not in base:
                out[key] = value
            elif base[key] != value:
                out[key] = _diff(base[key], value)
        return out
    return full


class Sweep:
    """A sweep directory. Cheap to open; the run listing is read once and cached."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.marks = self.root / MARKS_DIR
        self.leases = self.root / LEASES_DIR
        self.runs_dir = self.root / RUNS_DIR
        self.workers_dir = self.root / WORKERS_DIR
        self._records: list[RunRecord] | None = None
        self._base_train: dict[str, Any] | None = None

    # -- creation ----------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        """``SWEEP_DIR/sweep.json``."""
        return self.root / SWEEP_CONFIG

    def exists(self) -> bool:
        """Whether the directory is an initialised sweep (sweep.json, written last, exists)."""
        return self.config_path.is_file()

    def read_config(self) -> dict[str, Any]:
        """The stored sweep config (the JSON of relscale.sweep.spec.sweep_config_to_dict).

        Raises RelscaleError naming the folder or file when there is no sweep.json, when it is
        unreadable, or when its format is not this version's."""
        if not self.exists():
            raise RelscaleError(f"{self.root}: not a sweep directory (no sweep.json); "
                                f"start it with `relscale sweep run {self.root} --config SWEEP.toml`")
        meta = _read_json(self.config_path)
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise RelscaleError(f"{self.config_path}: not a sweep config (no 'config' object)")
        if meta.get("format") != FORMAT_VERSION:
            raise RelscaleError(f"{self.config_path}: format {meta.get('format')} is not {FORMAT_VERSION}")
        return meta["config"]

    @classmethod
    def create(cls, root: str | Path, config: dict[str, Any], base_train: dict[str, Any],
               runs: Iterable[tuple[str, str, dict[str, Any], dict[str, Any]]],
               wait_s: float = 60.0) -> Sweep:
        """Initialise ``root`` from a config, or open it if it holds the same config.

        ``runs``: (run_id, folder, grid row, full TrainConfig dict) per run. Several processes
        may call this at once: one creates (behind an exclusive init lock), the others wait for
        sweep.json and compare. A different config is refused, naming the keys that differ.
        """
        sweep = cls(root)
        if not sweep.exists():
            sweep.root.mkdir(parents=True, exist_ok=True)
            lock = sweep.root / "init.lock"
            if create_exclusive(lock, json.dumps({"pid": os.getpid(), "host": HOST, "time": time.time()})):
                try:
                    for folder in (sweep.marks, sweep.leases, sweep.runs_dir, sweep.workers_dir):
                        folder.mkdir(exist_ok=True)
                    listing = [
                        {"run_id": run_id, "folder": folder, "row": row,
                         "train_overrides": _diff(base_train, train)}
                        for run_id, folder, row, train in runs
                    ]
                    listing_text = json.dumps({"base_train": base_train, "runs": listing},
                                              separators=(",", ":"))
                    write_atomic(sweep.root / RUN_LISTING, listing_text)
                    # sweep.json last: its presence says the directory is complete.
                    write_atomic(sweep.config_path, json.dumps(
                        {"format": FORMAT_VERSION, "config": config, "created": time.time()}, indent=1))
                finally:
                    _unlink(lock)
            else:
                deadline = time.time() + wait_s
                while not sweep.exists():
                    if time.time() > deadline:
                        raise RelscaleError(f"{root}: another process is initialising this sweep "
                                            f"(remove {lock} if it died)")
                    time.sleep(0.05)
        sweep.check_same_config(config)
        return sweep

    def check_same_config(self, config: dict[str, Any]) -> None:
        """Refuse ``config`` (a sweep_config_to_dict dict) unless it equals the stored one.

        The one comparison of a given config with a sweep directory's: ConfigError listing the
        keys that differ (existing -> given, at most 20); RelscaleError if there is no sweep."""
        from relscale.sweep.spec import config_differences

        differences = config_differences(self.read_config(), config)
        if differences:
            raise ConfigError(f"{self.root} holds a sweep with another config; differences "
                              "(existing -> given): " + "; ".join(differences[:20])
                              + ("" if len(differences) <= 20 else f"; ... {len(differences) - 20} more"))

    # -- runs --------------------------------------------------------------------------------

    def _load(self) -> None:
        path = self.root / RUN_LISTING
        try:
            data = _read_json(path)
        except FileNotFoundError:
            raise RelscaleError(f"{path}: missing; the sweep directory is incomplete") from None
        try:
            self._base_train = data["base_train"]
            self._records = [RunRecord(**r) for r in data["runs"]]
        except (KeyError, TypeError) as err:
            raise RelscaleError(f"{path}: not a run listing ({type(err).__name__}: {err})") from None
        self._by_id = {r.run_id: r for r in self._records}

    @property
    def records(self) -> list[RunRecord]:
        """Every run of the listing, in grid order (read once; RelscaleError if unreadable)."""
        if self._records is None:
            self.read_config()
            self._load()
        return self._records  # type: ignore[return-value]

    def record(self, run_id: str) -> RunRecord:
        """The listing's record of ``run_id`` (KeyError if the sweep has no such run)."""
        self.records  # noqa: B018 (loads the listing)
        return self._by_id[run_id]

    def train_config(self, record: RunRecord, out_dir: str | Path):
        """The run's full, validated TrainConfig, writing into ``out_dir``."""
        self.records  # noqa: B018
        data = merge(self._base_train, record.train_overrides)  # type: ignore[arg-type]
        data["out_dir"] = str(out_dir)
        return train_config_from_dict(data)

    def run_dir(self, record: RunRecord) -> Path:
        """``SWEEP_DIR/runs/<folder>``: the run's trainer out_dir."""
        return self.runs_dir / record.folder

    # -- states ------------------------------------------------------------------------------

    def _scan_marks(self) -> tuple[dict[str, str], Counter, Counter]:
        terminal: dict[str, str] = {}
        failures: Counter = Counter()
        lost: Counter = Counter()
        for name in _listdir(self.marks):
            if name.startswith("."):
                continue
            run_id, _, kind = name.partition(".")
            if kind in TERMINAL:
                # done/diverged win over failed if both exist (a late result of a retried run)
                if kind != "failed" or run_id not in terminal:
                    terminal[run_id] = kind
            elif kind.startswith("fail-"):
                failures[run_id] += 1
            elif kind.startswith("lost-"):
                lost[run_id] += 1
        return terminal, failures, lost

    def _leased(self) -> set[str]:
        return {name for name in _listdir(self.leases) if "." not in name}

    def read_lease(self, run_id: str) -> Lease | None:
        """The run's current lease (heartbeat = the file's mtime), or None when nobody holds it."""
        return _parse_lease(self.leases / run_id, run_id)

    def states(self, lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S) -> dict[str, RunState]:
        """The state of every run: two directory listings plus one read per held lease."""
        terminal, failures, lost = self._scan_marks()
        leased = self._leased()
        now = time.time()
        out = {}
        for record in self.records:
            rid = record.run_id
            state = RunState(rid, "pending", failures[rid], lost[rid])
            if rid in terminal:
                state.state = terminal[rid]
            elif rid in leased:
                state.lease = self.read_lease(rid)
                if state.lease is not None:
                    state.state = "stale" if state.lease.is_stale(lease_timeout_s, now) else "running"
            out[rid] = state
        return out

    # -- claiming ----------------------------------------------------------------------------

    def _new_lease(self, run_id: str, worker: str, attempt: int) -> Lease:
        now = time.time()
        return Lease(run_id, uuid.uuid4().hex, worker, HOST_KEY, os.getpid(), attempt, now, now)

    def _attempts_started(self, record: RunRecord) -> int:
        path = self.run_dir(record) / "attempts.jsonl"
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return 0
        return sum(1 for line in lines if '"event": "start"' in line)

    def _is_terminal(self, run_id: str) -> bool:
        return any((self.marks / f"{run_id}.{kind}").exists() for kind in TERMINAL)

    def claim(self, worker: str, *, max_retries: int = 2, max_lost: int = 5,
              lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S) -> Claim | None:
        """Take the next run nobody holds (in listing order), else take over a stale lease.

        Returns None when no run is free right now (all finished, or held by live workers).
        """
        terminal, failures, lost = self._scan_marks()
        leased = self._leased()
        held = []
        for record in self.records:
            rid = record.run_id
            if rid in terminal:
                continue
            if rid in leased:
                held.append(record)
                continue
            claim = self._try_claim(record, worker, failures[rid], lost[rid], max_retries, max_lost)
            if claim is not None:
                return claim
        for record in held:
            lease = self.read_lease(record.run_id)
            if lease is None or not lease.is_stale(lease_timeout_s):
                continue
            claim = self._take_over(record, lease, worker, failures[record.run_id], lost[record.run_id],
                                    max_retries, max_lost, lease_timeout_s)
            if claim is not None:
                return claim
        return None

    def _try_claim(self, record: RunRecord, worker: str, failures: int, lost: int,
                   max_retries: int, max_lost: int, took_over: bool = False) -> Claim | None:
        lease = self._new_lease(record.run_id, worker, 0)
        if not self._create_lease(lease):
            return None
        # Between our listing and our lease another worker may have finished the run (it marks
        # first, then releases), so look again now that nobody else can start it.
        if self._is_terminal(record.run_id):
            self._release(lease)
            return None
        if failures > max_retries or lost > max_lost:
            # Retries used up (e.g. raised by a worker started with a higher limit): finish it.
            self.mark(record.run_id, "failed", {"reason": f"{failures} failed and {lost} lost attempts",
                                                 "error": self.last_error(record.run_id)})
            self._release(lease)
            return None
        run_dir = self.run_dir(record)
        run_dir.mkdir(parents=True, exist_ok=True)
        spec = run_dir / "spec.json"
        if not spec.exists():
            write_atomic(spec, json.dumps({"run_id": record.run_id, "folder": record.folder, **record.row,
                                           "train_overrides": record.train_overrides}, indent=1))
        lease.attempt = self._attempts_started(record) + 1
        self.heartbeat(lease)
        self.log_attempt(run_dir, {"event": "start", "attempt": lease.attempt, "worker": worker,
                                   "took_over": took_over})
        return Claim(record, lease, run_dir, failures, lost, took_over)

    def _take_over(self, record: RunRecord, stale: Lease, worker: str, failures: int, lost: int,
                   max_retries: int, max_lost: int, lease_timeout_s: float) -> Claim | None:
        rid = record.run_id
        grave = self.leases / f"{rid}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.leases / rid, grave)  # of racing takers, exactly one renames this file
        except FileNotFoundError:
            return None
        taken = _parse_lease(grave, rid)  # judged on the inode we hold: its owner touches it
        _race_point("takeover:judged")
        if taken is None or taken.token != stale.token or not taken.is_stale(lease_timeout_s):
            # The lease changed after we looked (its owner heartbeated, or another taker already
            # re-claimed it): put it back unless its owner has re-created it meanwhile.
            try:
                os.link(grave, self.leases / rid)
            except FileExistsError:
                pass
            _unlink(grave)
            return None
        # The stale owner's private link goes first: its late heartbeats then fail at once.
        _unlink(self._private(rid, taken.token))
        _unlink(grave)
        self.mark(rid, f"lost-{max(stale.attempt, 1)}-{uuid.uuid4().hex[:6]}",
                  {"worker": stale.worker, "heartbeat": stale.heartbeat, "taken_by": worker})
        self.log_attempt(self.run_dir(record), {"event": "lost", "attempt": stale.attempt,
                                                "worker": stale.worker, "taken_by": worker})
        return self._try_claim(record, worker, failures, lost + 1, max_retries, max_lost, took_over=True)

    # -- heartbeats, release, marks ----------------------------------------------------------

    def _private(self, run_id: str, token: str) -> Path:
        """The owner's private hard link to its lease (hidden: names with a dot are not leases)."""
        return self.leases / f".{run_id}.own-{token}"

    def _create_lease(self, lease: Lease) -> bool:
        """Create ``leases/<run_id>`` for ``lease`` unless a lease exists; True if this call won.

        The lease is written under the owner's private name first and then hard-linked to the
        public name (exclusive and atomic, also on NFS); the private link stays for heartbeats."""
        public, private = self.leases / lease.run_id, self._private(lease.run_id, lease.token)
        fd = os.open(private, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        with os.fdopen(fd, "w") as f:
            f.write(lease.to_json())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(private, public)
            return True
        except FileExistsError:
            _unlink(private)
            return False
        except OSError:  # no hard links on this file system: a plain exclusive create
            _unlink(private)
            lease.linked = False
            return create_exclusive(public, lease.to_json())

    def _same_file(self, lease: Lease) -> bool | None:
        """Whether ``leases/<run_id>`` is our lease's inode (None: no lease file right now;
        False also when our private link is gone, i.e. a taker removed it)."""
        try:
            mine = os.stat(self._private(lease.run_id, lease.token))
        except FileNotFoundError:
            return False
        try:
            public = os.stat(self.leases / lease.run_id)
        except FileNotFoundError:
            return None
        return (public.st_dev, public.st_ino) == (mine.st_dev, mine.st_ino)

    def heartbeat(self, lease: Lease) -> bool:
        """Refresh our lease; False if it is no longer ours (taken over after going stale).

        A compare-and-set: touch our own inode (through the private link), then check that the
        public name is still that inode. See the module docstring for why this cannot leave
        two owners whatever a taker does in between."""
        if not lease.linked:
            return self._heartbeat_by_content(lease)
        now = time.time()
        try:
            os.utime(self._private(lease.run_id, lease.token), (now, now))
        except FileNotFoundError:
            return False  # a taker removed our private link: the run is someone else's
        lease.heartbeat = now
        _race_point("heartbeat:touched")
        for _ in range(20):
            same = self._same_file(lease)
            if same is not None:
                return same
            # Briefly absent while a taker judges it (and renames it back if it is fresh).
            time.sleep(0.05)
        # Absent for a second: nobody holds it (a taker died mid-way); put our inode back.
        try:
            os.link(self._private(lease.run_id, lease.token), self.leases / lease.run_id)
        except (FileExistsError, FileNotFoundError):
            pass
        return bool(self._same_file(lease))

    def _heartbeat_by_content(self, lease: Lease) -> bool:
        """The heartbeat without hard links: compare the token, rewrite the file."""
        path = self.leases / lease.run_id
        for _ in range(20):
            current = _parse_lease(path, lease.run_id)
            if current is None:
                time.sleep(0.05)
                continue
            if current.token != lease.token:
                return False
            lease.heartbeat = time.time()
            write_atomic(path, lease.to_json())
            return True
        lease.heartbeat = time.time()
        return create_exclusive(path, lease.to_json())

    def owns(self, lease: Lease) -> bool:
        """Whether ``lease`` still holds its run."""
        if lease.linked:
            return bool(self._same_file(lease))
        current = self.read_lease(lease.run_id)
        return current is not None and current.token == lease.token

    def _release(self, lease: Lease) -> None:
        if self.owns(lease):
            _unlink(self.leases / lease.run_id)
        _unlink(self._private(lease.run_id, lease.token))

    def release(self, claim: Claim) -> None:
        """Give up the claim's lease (only if it is still ours); the run stays as its marks say."""
        self._release(claim.lease)

    def last_error(self, run_id: str) -> str | None:
        """The error line of the run's latest failed attempt (from its fail-<k> marks), if any."""
        best: tuple[int, str] | None = None
        for name in _listdir(self.marks):
            rid, _, kind = name.partition(".")
            if rid == run_id and kind.startswith("fail-") and kind[5:].isdigit():
                if best is None or int(kind[5:]) > best[0]:
                    best = (int(kind[5:]), name)
        if best is None:
            return None
        try:
            error = _read_json(self.marks / best[1]).get("error")
        except (OSError, RelscaleError, AttributeError):
            return None
        return " ".join(error) if isinstance(error, list) else error

    def mark(self, run_id: str, kind: str, payload: dict[str, Any]) -> bool:
        """Record a fact about a run; a mark is never overwritten (False if it already existed)."""
        return create_exclusive(self.marks / mark_name(run_id, kind), json.dumps(payload, default=str))

    def read_mark(self, run_id: str, kind: str) -> dict[str, Any] | None:
        """A mark's JSON payload; None if absent, {} (with a warning) if unreadable."""
        try:
            payload = _read_json(self.marks / mark_name(run_id, kind))
        except FileNotFoundError:
            return None
        except RelscaleError as err:
            warnings.warn(f"{err}; using the run's grid row instead", stacklevel=2)
            return {}
        return payload if isinstance(payload, dict) else {}

    def log_attempt(self, run_dir: Path, event: dict[str, Any]) -> None:
        """Append to the run's attempt log (only the lease holder writes it, so appends don't race)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": time.time(), "host": HOST, "pid": os.getpid(), **event}, default=str)
        with open(run_dir / "attempts.jsonl", "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def log_worker(self, worker: str, event: dict[str, Any]) -> None:
        """Append ``event`` (with the time) to ``workers/<worker>.jsonl``."""
        self.workers_dir.mkdir(exist_ok=True)
        with open(self.workers_dir / f"{worker}.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), **event}, default=str) + "\n")


@dataclass
class Heartbeat:
    """Refreshes a lease every ``interval_s`` from a background thread until stopped."""

    sweep: Sweep
    lease: Lease
    interval_s: float = DEFAULT_HEARTBEAT_S
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{self.lease.run_id}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.sweep.heartbeat(self.lease):
                    self.lost = True
                    return
            except OSError:
                pass  # a transient file-system error: try again at the next beat

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
