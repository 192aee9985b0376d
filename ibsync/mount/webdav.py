"""The tree served read-only over WebDAV (WsgiDAV on cheroot), for Finder and Explorer on
machines without FUSE.

Bound to 127.0.0.1 only. Whoever can reach the port could read the backup, decrypted, and every
program of every user on this computer can reach a loopback port; so the share lives under a
random path (``http://127.0.0.1:PORT/<token>/``) printed once: without it every request is a
404. Finder's "Connect to Server" and Explorer's "Map network drive" take such a URL as it is,
where they would refuse basic authentication over plain HTTP (Windows does by default).

Read-only: WsgiDAV refuses PUT, DELETE, MKCOL, MOVE, COPY and PROPPATCH on a read-only
provider (403), and no lock manager is offered, so Finder mounts the share read-only. The
device's "latest" link is a folder here (WebDAV has no links); the backup's own symbolic links
are left out.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import secrets
import threading
from dataclasses import replace

from ..errors import IbsyncError, NotFound, UserError
from ..ui.text import printable
from .content import ContentFile
from .tree import Entry, MountTree

log = logging.getLogger("ibsync")

HOST = "127.0.0.1"


def _resolve(tree: MountTree, path: str, entry: Entry | None) -> Entry | None:
    """A symbolic link within the tree ("latest") as the folder it stands for; the backup's
    own links as nothing."""
    if entry is None or entry.kind != "symlink":
        return entry
    if entry.alias is None:
        return None
    target = tree.stat(entry.alias)
    return replace(target, name=entry.name) if target is not None else None


def make_provider(tree: MountTree):
    from wsgidav.dav_error import HTTP_FORBIDDEN, HTTP_NOT_FOUND, DAVError
    from wsgidav.dav_provider import DAVCollection, DAVNonCollection, DAVProvider

    def resource(path: str, environ: dict, entry: Entry):
        return Folder(path, environ, entry) if entry.kind == "dir" else File(path, environ, entry)

    def tree_path(path: str) -> str:
        return path.strip("/")

    class Folder(DAVCollection):
        def __init__(self, path: str, environ: dict, entry: Entry) -> None:
            super().__init__(path, environ)
            self.entry = entry

        def get_display_name(self) -> str:
            return printable(self.entry.name or self.name)  # XML takes no control character

        def get_creation_date(self):
            return self.entry.mtime

        def get_last_modified(self):
            return self.entry.mtime

        def _members(self):
            base = tree_path(self.path)
            try:
                for e in tree.iter_list(base):
                    child = f"{base}/{e.name}" if base else e.name
                    e = _resolve(tree, child, e)
                    if e is not None:
                        yield e
            except NotFound:
                raise DAVError(HTTP_NOT_FOUND) from None
            except IbsyncError as err:
                log.warning(f"cannot list {base}: {err}")
                raise DAVError(HTTP_FORBIDDEN, str(err)) from None

        def get_member_names(self):
            return [e.name for e in self._members()]

        def get_member_list(self):
            prefix = self.path.rstrip("/") + "/"
            return [resource(prefix + e.name, self.environ, e) for e in self._members()]

        def get_member(self, name):
            return self.provider.get_resource_inst(self.path.rstrip("/") + "/" + name, self.environ)

    class File(DAVNonCollection):
        def __init__(self, path: str, environ: dict, entry: Entry) -> None:
            super().__init__(path, environ)
            self.entry = entry

        def get_content_length(self):
            return self.entry.size

        def get_content_type(self):
            return mimetypes.guess_type(self.entry.name)[0] or "application/octet-stream"

        def get_display_name(self) -> str:
            return printable(self.entry.name)

        def get_creation_date(self):
            return self.entry.mtime

        def get_last_modified(self):
            return self.entry.mtime

        def get_etag(self):
            key = f"{self.path}\0{self.entry.size}\0{self.entry.mtime}".encode("utf-8", "surrogateescape")
            return hashlib.sha256(key).hexdigest()[:32]

        def support_etag(self):
            return True

        def support_ranges(self):
            return True

        def get_content(self):
            try:
                f = tree.open(tree_path(self.path))
            except NotFound:
                raise DAVError(HTTP_NOT_FOUND) from None
            except IbsyncError as err:
                log.warning(f"cannot open {tree_path(self.path)}: {err}")
                raise DAVError(HTTP_FORBIDDEN, str(err)) from None
            return ContentFile(f)

    class TreeProvider(DAVProvider):
        def is_readonly(self) -> bool:
            return True

        def get_resource_inst(self, path: str, environ: dict):
            self._count_get_resource_inst += 1
            p = tree_path(path)
            try:
                entry = _resolve(tree, p, tree.stat(p))
            except IbsyncError as err:
                log.warning(f"cannot look up {p}: {err}")
                raise DAVError(HTTP_FORBIDDEN, str(err)) from None
            if entry is None:
                return None
            return resource(path, environ, entry)

    return TreeProvider()


class WebDAVServer:
    """The tree at ``http://127.0.0.1:PORT/<token>/`` (``port`` 0: a free one). ``url`` is
    known once constructed; ``serve`` runs until asked to stop."""

    def __init__(self, tree: MountTree, *, port: int = 0, host: str = HOST) -> None:
        from cheroot import wsgi
        from wsgidav.wsgidav_app import WsgiDAVApp

        self.token = secrets.token_hex(16)  # lower case: WsgiDAV matches share names case-insensitively
        config = {
            "host": host,
            "port": port,
            "provider_mapping": {f"/{self.token}": make_provider(tree)},
            "simple_dc": {"user_mapping": {"*": True}},  # the unguessable path is the key
            "lock_storage": False,
            "property_manager": None,
            "verbose": 1,
            "logging": {"enable": False},
            "dir_browser": {
                "enable": True,
                "davmount": False,
                "ms_sharepoint_support": False,
                "response_trailer": False,
                "show_user": False,
            },
            "add_header_MS_Author_Via": False,
            "middleware_stack": [
                "wsgidav.error_printer.ErrorPrinter",
                "wsgidav.http_authenticator.HTTPAuthenticator",
                "wsgidav.dir_browser.WsgiDavDirBrowser",
                "wsgidav.request_resolver.RequestResolver",
            ],
        }
        app = WsgiDAVApp(config)
        self._server = wsgi.Server((host, port), app, numthreads=10, server_name="ibsync")
        try:
            self._server.prepare()  # binds: the port is known from here on
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
        self.port = self._server.bind_addr[1]
        self.url = f"http://{host}:{self.port}/{self.token}/"

    def serve(self, stop: threading.Event) -> None:
        """Serve (on a thread of its own) until ``stop`` is set, then stop the server. The
        caller's signal handlers set ``stop`` instead of raising KeyboardInterrupt into
        cheroot's loop: an exception raised asynchronously can interrupt it anywhere, a held
        lock included (once, under load, the server then did not stop within 30 s of SIGTERM)."""
        thread = threading.Thread(target=self._server.serve, name="ibsync-webdav", daemon=True)
        thread.start()
        try:
            while thread.is_alive() and not stop.wait(0.5):
                pass
        finally:
            self._server.stop()
            thread.join(10)
