"""check: is every snapshot fully readable?

Structure: every index object and snapshot opens, every tree is readable and holds only entries
a restore may write (names of one path component, each once per folder; a snapshot's device
folder name likewise), every blob a snapshot references is in the index, and every pack the
index names exists and is large enough.
With ``read_data``, every pack is read whole: its name must be the BLAKE3 of its tail, its
header must agree with the index, its blobs must fill it up to the header, and every blob must
decrypt, decompress and match its id. ``subset`` reads a part of the packs the same way, so a
large remote repository can be read in full over several runs.

Errors are what affects a snapshot or the index; the exit status reflects only them. A pack no
index lists cannot affect any snapshot: it is a warning, as a leftover of an interrupted run
(its header authenticates; prune removes it) or as a file that is not an ibsync pack of this
repository (left in place: nothing deletes what it cannot prove is ours). Files where objects
live that are not objects (the storage's ``strays``) are warnings too.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import IbsyncError, InvalidData, NotFound, UserError
from ..format.pack import BlobType, pack_name, split_tail
from ..model import name_problem, reports
from ..progress import NULL_PROGRESS, Progress
from ..reader.walk import join
from ..repo.repository import Repository
from ..storage import Kind, object_path
from .repair import read_pack_header
from .used import BlobMarks

STRAY_KINDS = (Kind.CONFIG, Kind.KEYS, Kind.LOCKS, Kind.SNAPSHOTS, Kind.INDEX, Kind.PACKS)


@dataclass
class CheckResult:
    snapshots: int = 0
    packs: int = 0
    blobs: int = 0
    packs_read: int = 0
    bytes_read: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    damaged_packs: list[str] = field(default_factory=list)  # indexed packs --read-data found damaged
    strays: list[str] = field(default_factory=list)  # paths where objects live that are not objects

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def problems(self) -> list[str]:
        """What needs attention (the errors; warnings cannot affect a snapshot)."""
        return list(self.errors)

    def to_dict(self) -> dict:
        """What ``check --json`` prints (keys in this order)."""
        return {
            "ok": self.ok,
            "snapshots": self.snapshots,
            "packs": self.packs,
            "blobs": self.blobs,
            "packs_read": self.packs_read,
            "bytes_read": self.bytes_read,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "damaged_packs": list(self.damaged_packs),
            "strays": list(self.strays),
        }


@dataclass(frozen=True)
class Subset:
    """Which packs `--read-data-subset` reads: the n-th of t groups (by the pack name's first
    byte, so consecutive runs 1/t ... t/t together read every pack once), or a random fraction."""

    n: int = 1
    t: int = 1
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str, *, what: str = "--read-data-subset") -> Subset:
        """``N%`` or ``n/t``; ``what`` names the option or config key in the error."""
        text = text.strip()
        try:
            if text.endswith("%"):
                pct = float(text[:-1])
                if not 0 < pct <= 100:
                    raise ValueError
                return cls(fraction=pct / 100)
            n_s, t_s = text.split("/")
            n, t = int(n_s), int(t_s)
            if not 1 <= n <= t <= 256:
                raise ValueError
            return cls(n, t)
        except ValueError:
            raise UserError(f"{what} takes N% (0 < N <= 100) or n/t (1 <= n <= t <= 256), not '{text}'") from None

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return f"{self.n}/{self.t}"

    def following(self) -> Subset:
        """The group to read next time: n/t -> n+1/t, t/t -> 1/t (a random N% stays N%)."""
        if self.fraction is not None:
            return self
        return Subset(self.n % self.t + 1, self.t)

    def select(self, names: list[str]) -> list[str]:
        if self.fraction is not None:
            k = max(1, round(len(names) * self.fraction)) if names else 0
            return sorted(random.sample(names, k))
        return [name for name in names if int(name[:2], 16) % self.t == self.n - 1]


def check(
    repo: Repository,
    *,
    read_data: bool = False,
    subset: Subset | None = None,
    progress: Progress = NULL_PROGRESS,
    workers: int = 2,
) -> CheckResult:
    """Check the structure; with ``read_data`` every pack's data, or with ``subset`` a part of them."""
    result = CheckResult()
    # Index objects, one by one, so a damaged one is reported rather than fatal.
    for info in repo.storage.list(Kind.INDEX):
        if info.name in repo.loaded_index:
            continue
        try:
            repo.add_index_object(info.name)
        except IbsyncError as e:
            result.errors.append(f"index {info.name[:12]}: {e}")

    stored_packs = {info.name: info.size for info in repo.storage.list(Kind.PACKS)}
    pack_ends: dict[bytes, int] = {}
    for _, loc in repo.index.entries():
        end = loc.offset + loc.length
        if end > pack_ends.get(loc.pack_id, 0):
            pack_ends[loc.pack_id] = end
    result.blobs = len(repo.index)
    result.packs = len(stored_packs)
    for pack_id, end in pack_ends.items():
        size = stored_packs.get(pack_id.hex())
        if size is None:
            result.errors.append(f"pack {pack_id.hex()[:12]} is in the index but missing from the repository")
        elif size < end:
            result.errors.append(f"pack {pack_id.hex()[:12]} is {size} bytes, shorter than its index says ({end})")
    unindexed = {name: size for name, size in stored_packs.items() if not repo.index.has_pack(bytes.fromhex(name))}
    foreign = _check_unindexed(repo, unindexed, result)
    _check_strays(repo, result)

    # Snapshots and every tree they reach; a tree shared by several snapshots is read once.
    seen_trees = BlobMarks(len(repo.index))
    for info in repo.storage.list(Kind.SNAPSHOTS):
        try:
            snap = repo.load_snapshot(info.name)
        except IbsyncError as e:
            result.errors.append(f"snapshot {info.name[:8]}: {e}")
            continue
        result.snapshots += 1
        problem = name_problem(snap.folder_name)
        if problem:
            result.errors.append(
                f"snapshot {snap.short_id}: its device folder '{str(snap.folder_name)[:300]}' is unsafe "
                f"({problem}); restore refuses it"
            )
        _check_tree(repo, snap.tree, f"snapshot {snap.short_id}", seen_trees, result)

    if read_data or subset is not None:
        # what does not authenticate was named above and is no ibsync pack: nothing to verify
        chosen = [n for n in (subset or Subset()).select(sorted(stored_packs)) if n not in foreign]
        _read_packs(
            repo,
            {name: stored_packs[name] for name in chosen},
            _indexed_blobs(repo, chosen),
            set(unindexed),
            result,
            progress,
            workers,
        )
    return result


def _indexed_blobs(repo: Repository, names: list[str]) -> dict[bytes, list[tuple[bytes, int, int]]]:
    """(blob id, offset, stored length) of every index entry of the packs to read, to compare with
    their headers; only those packs, so a check of one seventh holds one seventh of them."""
    wanted = {bytes.fromhex(n) for n in names}
    out: dict[bytes, list[tuple[bytes, int, int]]] = {}
    for blob_id, loc in repo.index.entries():
        if loc.pack_id in wanted:
            out.setdefault(loc.pack_id, []).append((blob_id, loc.offset, loc.length))
    return out


def _check_unindexed(repo: Repository, unindexed: dict[str, int], result: CheckResult) -> set[str]:
    """Warn about packs no index lists (no snapshot can use them); returns those whose tail does
    not authenticate: not ibsync packs of this repository, which prune leaves in place."""
    leftovers, foreign = 0, set()
    for name, size in sorted(unindexed.items()):
        try:
            read_pack_header(repo, name, size)
            leftovers += 1
        except NotFound:
            continue  # gone since the listing
        except InvalidData as e:
            foreign.add(name)
            result.warnings.append(
                f"{object_path(Kind.PACKS, name)}: not an ibsync pack ({e}), left in place; "
                "no index lists it, so no snapshot uses it"
            )
        except IbsyncError as e:
            result.warnings.append(
                f"{object_path(Kind.PACKS, name)}: in no index, and its header could not be read: {e}"
            )
    if leftovers:
        result.warnings.append(
            f"{leftovers} pack(s) not in any index (left by an interrupted run or a repair; harmless, prune removes them)"
        )
    return foreign


def _check_strays(repo: Repository, result: CheckResult) -> None:
    """Name what sits among the objects without being one (a link, a FIFO, a bad name, a pack
    in the wrong fan-out folder): no command reads or deletes it, so it affects no snapshot."""
    for kind in STRAY_KINDS:
        for path in repo.storage.strays(kind):
            result.strays.append(path)
            result.warnings.append(
                f"{path}: not an ibsync object (a link, folder, special file or misplaced or "
                "misnamed file); ignored and left in place"
            )


def _check_tree(repo: Repository, tree_id: bytes, where: str, seen: BlobMarks, result: CheckResult) -> None:
    stack = [(tree_id, "")]
    while stack:
        tid, path = stack.pop()
        if not seen.add(tid):
            continue
        try:
            nodes = repo.load_tree(tid)
        except IbsyncError as e:
            result.errors.append(f"{where}: tree of '{path or '/'}' unreadable: {e}")
            continue
        for name, reason in reports(getattr(nodes, "rejected", [])):
            # restore refuses these by name: a snapshot holding one does not restore whole
            result.errors.append(f"{where}: '{join(path, name)}' is unusable: {reason}")
        for node in nodes:
            child = join(path, node.name)
            if node.type == "dir":
                if node.subtree is None:
                    result.errors.append(f"{where}: folder '{child}' has no tree")
                else:
                    stack.append((node.subtree, child))
            elif node.type == "file":
                missing = [c for c in node.content if not repo.index.has(c)]
                if missing:
                    result.errors.append(f"{where}: '{child}': {len(missing)} blob(s) not in the index")


def _read_packs(
    repo, stored_packs, indexed_blobs, unindexed: set[str], result: CheckResult, progress: Progress, workers: int
) -> None:
    progress.start(sum(stored_packs.values()), len(stored_packs))

    unread: set[str] = set()  # packs whose read failed: that says nothing about their bytes

    def read_one(name: str) -> list[str]:
        errors: list[str] = []
        short = name[:12]
        try:
            data = repo.storage.get(Kind.PACKS, name)
        except InvalidData as e:  # a short read: the pack is shorter than listed
            return [f"pack {short}: {e}"]
        except IbsyncError as e:
            unread.add(name)
            return [f"pack {short}: cannot read: {e}"]
        progress.advance(len(data), files=1)
        try:
            tail = split_tail(data)
            if pack_name(tail) != name:
                return [f"pack {short}: header does not match the pack's name (damaged)"]
            header = repo.pack_header(tail)
        except IbsyncError as e:
            return [f"pack {short}: header unreadable: {e}"]
        if header and header[-1].offset + header[-1].length != len(data) - len(tail):
            errors.append(f"pack {short}: its blobs do not fill the pack up to the header (damaged)")
        by_id = {b.id: b for b in header}
        for blob_id, offset, length in indexed_blobs.get(bytes.fromhex(name), []):
            b = by_id.get(blob_id)
            if b is None or (b.offset, b.length) != (offset, length):
                errors.append(f"pack {short}: index entry for blob {blob_id.hex()[:12]} does not match the pack header")
        view = memoryview(data)
        for b in header:
            try:
                repo.decode_blob(b, view[b.offset : b.offset + b.length])
            except IbsyncError as e:
                kind = "tree" if b.type == BlobType.TREE else "data"
                errors.append(f"pack {short}: {kind} blob {b.id.hex()[:12]}: {e}")
        return errors

    names = sorted(stored_packs)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ibsync-check") as pool:
        for name, errors in zip(names, pool.map(read_one, names)):
            result.packs_read += 1
            if name in unindexed:
                # no snapshot uses it: prune removes it (its header authenticated)
                result.warnings.extend(f"{e} (in no index: no snapshot uses it)" for e in errors)
                continue
            result.errors.extend(errors)
            if errors and name not in unread:
                result.damaged_packs.append(name)
    result.bytes_read = sum(stored_packs.values())
    progress.finish()
