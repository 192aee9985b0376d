"""The commands the crash campaign kills, each with its baseline repository and its promises.

``Lab(work, backend, sizes)`` generates the source folders once (device A on day 1 and day 2, device B),
builds baseline repositories once per backend (copied for every trial), and ``lab.scenario(name)``
returns a :class:`~ibsync.testing.crash.Scenario` for one of :data:`COMMANDS`:

===============  =====================  ==============================================  ========================
command          baseline               killed command                                  must survive
===============  =====================  ==============================================  ========================
import           A1                     ``import B``                                    A1
backup           P (captured)           ``backup --device Q`` (simulated usbmuxd)       P
copy             A1 (copied)            ``copy --from-repo SRC`` (SRC: A1, A2)          A1
forget           A1, A2                 ``forget --keep-last 1 --prune``                A2 (A1 may go)
prune            A1 (forgotten), A2     ``prune --repack-threshold 0``                  A2
repair-index     A1, A2                 ``repair index``                                A1, A2
key-add          A1; password a         ``key add`` (new password b)                    a works
key-passwd       A1; password a         ``key passwd`` (a -> b)                         a or b works
key-remove       A1; passwords a, b     ``key remove <b>`` with a                       a works
restore          A1, A2                 ``restore A2 OUT``                              A1, A2; OUT completes
===============  =====================  ==============================================  ========================
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .crash import (
    Backend,
    Reference,
    Scenario,
    Target,
    Trial,
    add_key,
    child_env,
    digest_difference,
    init_repo,
    run,
    tree_digest,
)

COMMANDS = [
    "import",
    "backup",
    "copy",
    "forget",
    "prune",
    "repair-index",
    "key-add",
    "key-passwd",
    "key-remove",
    "restore",
]
PASSWORD_A, PASSWORD_B, PASSWORD_C = "crash-password-a", "crash-password-b", "crash-password-c"
DEST_PASSWORD = "crash-destination-password"


@dataclass(frozen=True)
class Sizes:
    """MiB of the generated folders: A (day 1 and day 2), B (the one an import or capture sends)."""

    a: int = 8
    b: int = 16
    device_p: int = 4
    device_q: int = 12


@dataclass
class Source:
    folder: Path
    digest: dict[str, tuple]
    udid: str
    date: str


def _expect_ok(r, what: str) -> Any:
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {r.returncode}): {r.stderr.strip()}")
    return json.loads(r.stdout) if r.stdout.strip().startswith(("{", "[")) else r.stdout


def device_verifier(device) -> Any:
    """A restored capture holds exactly the device's payloads at ``xx/<fileID>``."""
    expected = device.payloads()

    def verify(restored: Path) -> str | None:
        got = {
            p.name: p.read_bytes() for d in restored.iterdir() if d.is_dir() and len(d.name) == 2 for p in d.iterdir()
        }
        if got == expected:
            return None
        missing = set(expected) - set(got)
        differ = [k for k in set(expected) & set(got) if expected[k] != got[k]]
        return f"{len(missing)} payloads missing, {len(differ)} different, {len(set(got) - set(expected))} extra"

    return verify


@dataclass
class Lab:
    """Source folders, baselines and scenarios for one backend. Close it (context manager) to stop the
    simulated usbmuxd of the backup scenario."""

    work: Path
    backend: Backend
    sizes: Sizes = field(default_factory=Sizes)
    base_env: dict[str, str] = field(default_factory=dict)
    local: Backend | None = None  # copy's source always lives on local disk
    _sources: dict[str, Source] = field(default_factory=dict)
    _baselines: dict[str, Target] = field(default_factory=dict)
    _ids: dict[str, str] = field(default_factory=dict)
    _devices: dict[str, Any] = field(default_factory=dict)  # simulated devices of the backup scenario
    _mux: Any = None  # their simulated usbmuxd, running until the lab is closed
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    # ---- sources ----------------------------------------------------------------------------------------

    def source(self, name: str) -> Source:
        if name not in self._sources:
            self._sources[name] = self._make_source(name)
        return self._sources[name]

    def _make_source(self, name: str) -> Source:
        from ibsync.testing.generator import generate, mutate_folder

        root = self.work / "sources"
        if name == "A2":
            a1 = self.source("A1").folder
            folder = root / "A2" / a1.name
            shutil.copytree(a1, folder, symlinks=True)
            mutate_folder(folder, seed=5)
        else:
            seed, mib = {"A1": (1, self.sizes.a), "B": (2, self.sizes.b)}[name]
            folder = generate(root / name, seed=seed, size_bytes=mib << 20)
        import plistlib

        info = plistlib.loads((folder / "Info.plist").read_bytes())
        manifest = plistlib.loads((folder / "Manifest.plist").read_bytes())
        udid = manifest["Lockdown"]["UniqueDeviceID"].upper()
        return Source(folder, tree_digest(folder), udid, str(info.get("Last Backup Date")))

    # ---- environments and baselines ---------------------------------------------------------------------

    def env(self, target: Target, password: str | None = None, **extra: str) -> dict[str, str]:
        env = {**target.env, **({"IBSYNC_PASSWORD": password} if password else {}), **extra}
        return child_env({**self.base_env, **env})

    def _import(self, target: Target, name: str) -> str:
        doc = _expect_ok(run(["import", self.source(name).folder, "--json"], self.env(target)), f"import {name}")
        return doc["snapshots"][0]["id"]

    def baseline(self, name: str) -> Target:
        if name not in self._baselines:
            self._baselines[name] = self._make_baseline(name)
        return self._baselines[name]

    def _make_baseline(self, name: str) -> Target:
        cache = self.work / "cache-baseline"
        if name in ("A1", "A2"):
            target = self.backend.new_target(f"base-{name}", PASSWORD_A, cache)
            init_repo(target, self.backend)
            # snapshot ids differ per repository: "A1" is A1 in baseline A1, "A2:A1" is A1 in baseline A2
            self._ids["A1" if name == "A1" else "A2:A1"] = self._import(target, "A1")
            if name == "A2":
                self._ids["A2"] = self._import(target, "A2")
            return target
        if name == "prune":
            target = self.backend.clone(self.baseline("A2"), "base-prune", cache)
            _expect_ok(run(["forget", self._ids["A2:A1"]], self.env(target)), "forget A1")
            return target
        if name == "copy-src":
            local = self.local or self.backend
            src = local.new_target("copy-src", PASSWORD_A, cache)
            init_repo(src, local)
            for s in ("A1", "A2"):
                _expect_ok(run(["import", self.source(s).folder], self.env(src)), f"import {s}")
            return src
        if name == "copy-dst":
            src = self.baseline("copy-src")
            dst = self.backend.new_target("copy-dst", DEST_PASSWORD, cache)
            init_repo(dst, self.backend)
            a1 = json.loads(run(["snapshots", "--json"], self.env(src)).stdout)[0]["id"]
            _expect_ok(
                run(["copy", a1, "--from-repo", src.repo], self.env(dst, IBSYNC_FROM_PASSWORD=PASSWORD_A)), "copy A1"
            )
            return dst
        if name == "keys2":
            target = self.backend.clone(self.baseline("A1"), "base-keys2", cache)
            self._ids["key-b"] = add_key(target, self.backend, PASSWORD_B)
            return target
        if name == "capture":
            return self._capture_baseline()
        raise KeyError(name)

    # ---- references -------------------------------------------------------------------------------------

    def references(self, snap: dict) -> Reference | None:
        udid, date = snap["device"]["udid"].upper(), snap["backup_date"]
        for name in ("A1", "A2", "B"):
            s = self._sources.get(name)
            if s is not None and s.udid == udid and _same_date(s.date, date):
                return Reference(digest=s.digest)
        for device in self._devices.values():
            if device.udid.upper() == udid:
                return Reference(verify=device_verifier(device))
        return None

    # ---- trials -----------------------------------------------------------------------------------------

    def _trial(
        self,
        baseline: str,
        work: Path,
        n: int,
        argv: list,
        *,
        password: str = PASSWORD_A,
        must_keep: set[str] = frozenset(),
        **extra: str,
    ) -> Trial:
        tdir = work / f"trial-{n}"
        shutil.rmtree(tdir, ignore_errors=True)
        tdir.mkdir(parents=True)
        target = self.backend.clone(self.baseline(baseline), f"trial-{n}", tdir / "cache")
        return Trial(
            target, [str(a) for a in argv], self.env(target, password, **extra), tdir, target.folder, set(must_keep)
        )

    def scenario(self, name: str) -> Scenario:
        return getattr(self, "_s_" + name.replace("-", "_"))()

    def _s_import(self) -> Scenario:
        self.source("B")
        self.baseline("A1")

        def make(work: Path, n: int) -> Trial:
            return self._trial(
                "A1", work, n, ["import", self.source("B").folder, "--quiet"], must_keep={self._ids["A1"]}
            )

        return Scenario("import", ["locks+1", "packs+1", "packs+3", "index+1", "snapshots+1"], make, self.references)

    def _s_forget(self) -> Scenario:
        self.baseline("A2")

        def make(work: Path, n: int) -> Trial:
            return self._trial(
                "A2",
                work,
                n,
                ["forget", "--keep-last", "1", "--prune", "--repack-threshold", "0", "-q"],
                must_keep={self._ids["A2"]},
            )

        return Scenario(
            "forget", ["locks+1", "snapshots-1", "packs+1", "index+1", "index-1", "packs-1"], make, self.references
        )

    def _s_prune(self) -> Scenario:
        self.baseline("prune")

        def make(work: Path, n: int) -> Trial:
            return self._trial(
                "prune", work, n, ["prune", "--repack-threshold", "0", "-q"], must_keep={self._ids["A2"]}
            )

        return Scenario(
            "prune", ["locks+1", "packs+1", "index+1", "index-1", "packs-1", "packs-3"], make, self.references
        )

    def _s_repair_index(self) -> Scenario:
        self.baseline("A2")

        def make(work: Path, n: int) -> Trial:
            return self._trial(
                "A2", work, n, ["repair", "index", "-q"], must_keep={self._ids["A2:A1"], self._ids["A2"]}
            )

        return Scenario("repair-index", ["locks+1", "index+1", "index-1"], make, self.references)

    def _s_restore(self) -> Scenario:
        self.baseline("A2")
        a2 = self.source("A2")

        def make(work: Path, n: int) -> Trial:
            trial = self._trial(
                "A2",
                work,
                n,
                ["restore", self._ids["A2"], work / f"trial-{n}" / "out", "-q"],
                must_keep={self._ids["A2:A1"], self._ids["A2"]},
            )
            trial.state["out"] = trial.workdir / "out"
            return trial

        def rerun(trial: Trial) -> tuple[int, str, str]:
            r = run([*trial.argv, "--overwrite"], trial.env)
            return r.returncode, r.stderr, "with --overwrite"

        def after_rerun(trial: Trial) -> list[str]:
            diff = digest_difference(a2.digest, tree_digest(trial.state["out"] / a2.folder.name))
            return [f"the re-run's output differs: {diff}"] if diff else []

        return Scenario(
            "restore", ["locks+1", "out+1", "out+100"], make, self.references, rerun=rerun, after_rerun=after_rerun
        )

    def _s_copy(self) -> Scenario:
        self.baseline("copy-dst")
        src = self.baseline("copy-src")

        def make(work: Path, n: int) -> Trial:
            trial = self._trial(
                "copy-dst",
                work,
                n,
                ["copy", "--from-repo", src.repo, "-q"],
                password=DEST_PASSWORD,
                IBSYNC_FROM_PASSWORD=PASSWORD_A,
            )
            trial.must_keep = {s["id"] for s in json.loads(run(["snapshots", "--json"], trial.env).stdout)}
            return trial

        def after_rerun(trial: Trial) -> list[str]:
            snaps = json.loads(run(["snapshots", "--json"], trial.env).stdout)
            return [] if len(snaps) == 2 else [f"after the re-run the destination holds {len(snaps)} snapshots, not 2"]

        return Scenario(
            "copy", ["locks+1", "packs+1", "index+1", "snapshots+1"], make, self.references, after_rerun=after_rerun
        )

    # ---- keys -------------------------------------------------------------------------------------------

    def works(self, trial: Trial, password: str) -> bool:
        return run(["key", "list", "--json"], {**trial.env, "IBSYNC_PASSWORD": password}).returncode == 0

    def _working_env(self, trial: Trial) -> dict[str, str]:
        for pw in (PASSWORD_A, PASSWORD_B, PASSWORD_C):
            if self.works(trial, pw):
                return {**trial.env, "IBSYNC_PASSWORD": pw}
        return trial.env  # none works: the checks then fail and say so

    def _s_key_add(self) -> Scenario:
        self.baseline("A1")

        def make(work: Path, n: int) -> Trial:
            return self._trial(
                "A1", work, n, ["key", "add", "-q"], must_keep={self._ids["A1"]}, IBSYNC_NEW_PASSWORD=PASSWORD_B
            )

        def after_kill(trial: Trial) -> list[str]:
            return [] if self.works(trial, PASSWORD_A) else ["the old password no longer opens the repository"]

        def after_rerun(trial: Trial) -> list[str]:
            return [] if self.works(trial, PASSWORD_B) else ["the added password does not open the repository"]

        return Scenario("key-add", ["keys+1"], make, self.references, after_kill=after_kill, after_rerun=after_rerun)

    def _s_key_passwd(self) -> Scenario:
        self.baseline("A1")

        def make(work: Path, n: int) -> Trial:
            return self._trial(
                "A1", work, n, ["key", "passwd", "-q"], must_keep={self._ids["A1"]}, IBSYNC_NEW_PASSWORD=PASSWORD_B
            )

        def after_kill(trial: Trial) -> list[str]:
            a, b = self.works(trial, PASSWORD_A), self.works(trial, PASSWORD_B)
            trial.state["after_kill"] = {"a": a, "b": b}
            return [] if a or b else ["neither the old nor the new password opens the repository"]

        def rerun(trial: Trial) -> tuple[int, str, str]:
            if trial.state["after_kill"]["a"]:
                r = run(trial.argv, trial.env)
                trial.state["final"] = PASSWORD_B
                return r.returncode, r.stderr, "a -> b"
            r = run(trial.argv, {**trial.env, "IBSYNC_PASSWORD": PASSWORD_B, "IBSYNC_NEW_PASSWORD": PASSWORD_C})
            trial.state["final"] = PASSWORD_C
            return r.returncode, r.stderr, "already changed; b -> c"

        def after_rerun(trial: Trial) -> list[str]:
            problems = (
                [] if self.works(trial, trial.state["final"]) else ["the new password does not open the repository"]
            )
            if self.works(trial, PASSWORD_A):
                problems.append("the old password still opens the repository after the change completed")
            return problems

        return Scenario(
            "key-passwd",
            ["locks+1", "keys+1", "keys-1"],
            make,
            self.references,
            after_kill=after_kill,
            rerun=rerun,
            verify_env=self._working_env,
            after_rerun=after_rerun,
        )

    def _s_key_remove(self) -> Scenario:
        self.baseline("keys2")

        def make(work: Path, n: int) -> Trial:
            return self._trial(
                "keys2", work, n, ["key", "remove", self._ids["key-b"], "-q"], must_keep={self._ids["A1"]}
            )

        def after_kill(trial: Trial) -> list[str]:
            return [] if self.works(trial, PASSWORD_A) else ["the password that was not removed no longer works"]

        def rerun(trial: Trial) -> tuple[int, str, str]:
            keys = json.loads(run(["key", "list", "--json"], trial.env).stdout)
            if not any(k["id"] == self._ids["key-b"] for k in keys):
                return 0, "", "already removed"
            r = run(trial.argv, trial.env)
            return r.returncode, r.stderr, ""

        def after_rerun(trial: Trial) -> list[str]:
            return ["the removed password still works"] if self.works(trial, PASSWORD_B) else []

        return Scenario(
            "key-remove",
            ["locks+1", "keys-1"],
            make,
            self.references,
            after_kill=after_kill,
            rerun=rerun,
            after_rerun=after_rerun,
        )

    # ---- capture ----------------------------------------------------------------------------------------

    def _devices_and_mux(self) -> Any:
        if self._mux is None:
            from ibsync.testing.device import SimDevice, run_sim_usbmuxd
            from ibsync.testing.generator import generate_content

            self._devices = {
                "P": SimDevice.from_content(
                    generate_content(
                        seed=31, size_bytes=self.sizes.device_p << 20, udid="c" * 40, device_name="Crash P"
                    )
                ),
                "Q": SimDevice.from_content(
                    generate_content(
                        seed=32, size_bytes=self.sizes.device_q << 20, udid="d" * 40, device_name="Crash Q"
                    )
                ),
            }
            self._mux = self._stack.enter_context(run_sim_usbmuxd(list(self._devices.values()), self.work / "mux"))
        return self._mux

    def _capture_baseline(self) -> Target:
        mux = self._devices_and_mux()
        target = self.backend.new_target("base-capture", PASSWORD_A, self.work / "cache-baseline")
        init_repo(target, self.backend)
        doc = _expect_ok(
            run(
                ["backup", "--device", self._devices["P"].udid, "--json"],
                self.env(target, **mux.env(home=self.work / "home")),
            ),
            "backup P",
        )
        self._ids["P"] = doc["snapshots"][0]["id"]
        return target

    def _s_backup(self) -> Scenario:
        self.baseline("capture")
        mux = self._mux

        def make(work: Path, n: int) -> Trial:
            return self._trial(
                "capture",
                work,
                n,
                ["backup", "--device", self._devices["Q"].udid, "--quiet"],
                must_keep={self._ids["P"]},
                **mux.env(home=self.work / "home"),
            )

        return Scenario("backup", ["locks+1", "packs+1", "packs+2", "index+1", "snapshots+1"], make, self.references)


def _same_date(plist_date: str, snapshot_date: str) -> bool:
    """Info.plist's date (``2024-01-01 03:00:00`` from plistlib) against the snapshot's ISO UTC date."""
    return plist_date.replace(" ", "T").split("+")[0].rstrip("Z")[:19] == snapshot_date.rstrip("Z")[:19]


def describe_failure(outcome) -> str:
    return (
        f"{outcome.command} on {outcome.backend}, seed {outcome.seed}, trial {outcome.trial}, kill at "
        f"{outcome.kill} ({outcome.at:.3f} s, {'killed' if outcome.killed else 'ended first'}): "
        + "; ".join(outcome.problems)
    )


__all__ = ["COMMANDS", "Lab", "Sizes", "describe_failure"]
