"""Apps of a backup and what a person calls each domain.

A backup names its apps in two plists: Manifest.plist ``Applications`` (bundle id ->
``CFBundleIdentifier``, ``CFBundleVersion``, ``Path`` of the ``.app``) and iTunes' Info.plist
``Applications`` (bundle id -> ``iTunesMetadata``, a plist with ``itemName`` and
``bundleShortVersionString``, or ``CFBundleDisplayName``/``Name`` in other writers). Both are
the backup's words: every value is type-checked and a missing or odd one falls back to the
bundle id. Domains are tied to apps by their names: ``AppDomain-<id>``,
``AppDomainGroup-group.<id>[.suffix]`` and ``AppDomainPlugin-<id>.<extension>``.
"""

from __future__ import annotations

import plistlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

GROUPS = ("Apps", "Photos & media", "Messages & home", "System")

_TITLES = {
    "CameraRollDomain": ("Camera Roll", "Photos & media"),
    "MediaDomain": ("Media", "Photos & media"),
    "BooksDomain": ("Books", "Photos & media"),
    "TonesDomain": ("Ringtones", "Photos & media"),
    "HomeDomain": ("Home", "Messages & home"),
    "HomeKitDomain": ("HomeKit", "Messages & home"),
    "HealthDomain": ("Health", "Messages & home"),
    "KeychainDomain": ("Keychain", "System"),
    "RootDomain": ("Root", "System"),
    "WirelessDomain": ("Wireless", "System"),
    "SystemPreferencesDomain": ("System preferences", "System"),
    "ManagedPreferencesDomain": ("Managed preferences", "System"),
    "MobileDeviceDomain": ("Mobile device", "System"),
    "DatabaseDomain": ("Databases", "System"),
    "KeyboardDomain": ("Keyboard", "System"),
    "InstallDomain": ("Installation", "System"),
    "NetworkDomain": ("Network", "System"),
    "ProtectedDomain": ("Protected", "System"),
}

APP, GROUP, PLUGIN = "AppDomain-", "AppDomainGroup-", "AppDomainPlugin-"


@dataclass(frozen=True)
class AppInfo:
    bundle_id: str
    name: str  # display name from the backup's plists, else the bundle id
    version: str | None
    domains: tuple[str, ...]  # AppDomain-<id>, AppDomainGroup-<its groups>, AppDomainPlugin-<id>.* ...


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _metadata(entry: dict) -> dict:
    """iTunes' ``iTunesMetadata``: a plist inside the plist (bytes), or already a dict."""
    raw = entry.get("iTunesMetadata")
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, (bytes, bytearray)):
        try:
            got = plistlib.loads(bytes(raw))
        except Exception:  # the backup's bytes: an unreadable one costs only the name
            return {}
        return got if isinstance(got, dict) else {}
    return {}


def app_names(manifest_plist: dict, info_plist: dict) -> dict[str, tuple[str | None, str | None]]:
    """bundle id -> (display name or None, version or None) from both plists."""
    out: dict[str, tuple[str | None, str | None]] = {}
    sources = []
    for plist in (manifest_plist, info_plist):
        apps = plist.get("Applications") if isinstance(plist, dict) else None
        if isinstance(apps, dict):
            sources.append(apps)
    installed = info_plist.get("Installed Applications") if isinstance(info_plist, dict) else None
    ids = [b for b in installed if isinstance(b, str)] if isinstance(installed, list) else []
    for apps in sources:
        ids += [b for b in apps if isinstance(b, str)]
    for bundle in dict.fromkeys(ids):
        name = version = None
        for apps in sources:
            entry = apps.get(bundle)
            if not isinstance(entry, dict):
                continue
            meta = _metadata(entry)
            name = (
                name
                or _text(entry.get("CFBundleDisplayName"))
                or _text(entry.get("Name"))
                or _text(meta.get("itemName"))
                or _text(meta.get("CFBundleDisplayName"))
            )
            if name is None:
                path = _text(entry.get("Path"))
                if path and path.endswith(".app") and "/" in path:
                    name = _text(path.rsplit("/", 1)[1][: -len(".app")])
            version = (
                version
                or _text(entry.get("CFBundleShortVersionString"))
                or _text(meta.get("bundleShortVersionString"))
                or _text(entry.get("CFBundleVersion"))
                or _text(meta.get("bundleVersion"))
            )
        out[bundle] = (name, version)
    return out


def owner(domain: str, bundles: Iterable[str]) -> str | None:
    """The bundle id a domain belongs to (the longest that fits), or None."""
    if domain.startswith(APP):
        rest = domain[len(APP) :]
        return rest if rest in bundles else None
    if domain.startswith(GROUP):
        rest = domain[len(GROUP) :]
        rest = rest.removeprefix("group.")
    elif domain.startswith(PLUGIN):
        rest = domain[len(PLUGIN) :]
    else:
        return None
    best = None
    for b in bundles:
        if (rest == b or rest.startswith(b + ".")) and (best is None or len(b) > len(best)):
            best = b
    return best


def build_apps(manifest_plist: dict, info_plist: dict, domains: Iterable[str]) -> dict[str, AppInfo]:
    """bundle id -> AppInfo: every app the plists name or an AppDomain- holds, with its domains."""
    domains = list(domains)
    names = app_names(manifest_plist, info_plist)
    for d in domains:
        if d.startswith(APP) and d[len(APP) :] and d[len(APP) :] not in names:
            names[d[len(APP) :]] = (None, None)
    owned: dict[str, list[str]] = {b: [] for b in names}
    for d in domains:
        b = owner(d, names)
        if b is not None:
            owned[b].append(d)
    return {b: AppInfo(b, name or b, version, tuple(sorted(owned[b]))) for b, (name, version) in names.items()}


def describe(domain: str, app: AppInfo | None) -> tuple[str, str]:
    """(title, group) of a domain."""
    if domain.startswith((APP, GROUP, PLUGIN)):
        if app is None:
            return domain.split("-", 1)[1] or domain, "Apps"
        if domain.startswith(GROUP):
            return f"{app.name} (shared)", "Apps"
        if domain.startswith(PLUGIN):
            extension = domain[len(PLUGIN) + len(app.bundle_id) + 1 :]
            return f"{app.name} (extension {extension})", "Apps"
        return app.name, "Apps"
    known = _TITLES.get(domain)
    if known is not None:
        return known
    for prefix, title in (
        ("SysContainerDomain-", "System container "),
        ("SysSharedContainerDomain-", "Shared system container "),
    ):
        if domain.startswith(prefix):
            return title + domain[len(prefix) :], "System"
    return domain, "System"
