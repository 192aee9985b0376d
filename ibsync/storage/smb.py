"""SMB shares (Windows, macOS, Samba on a NAS) through smbprotocol.

- URL ``smb://[user[:password]@]host[:port]/share/folder``; credentials are better given as
  storage options (config file) than in the URL.
- Writes go to ``.tmp-<random>``, then SMB2 rename: without the replace flag the server refuses
  an existing target (STATUS_OBJECT_NAME_COLLISION), which makes exclusive creates atomic;
  with it (``smbclient.replace``) an object is replaced atomically.
- smbprotocol raises ``SMBOSError`` with an errno but not the matching ``OSError`` subclass, so
  errors are translated here. fsspec's ``ls`` stats every entry with its own request; listings
  use one directory query instead (``scandir``), which matters for thousands of packs.
- smbprotocol keeps connections in a process-wide pool and does not notice a server restart;
  after a transient error the pooled connection to this server is dropped before the retry.
- Writes go in 1 MiB pieces: with 4 MiB pieces and four uploading threads, the server's credit
  grant ran out ("Request requires 1 credits but only 0 credits are available").
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from .remote import FsspecStorage, RemoteEntry, mtime_of

T = TypeVar("T")

_FILE_ATTRIBUTE_DIRECTORY = 0x10
_FILE_ATTRIBUTE_REPARSE_POINT = 0x400  # a symbolic link or junction on the server


def _translated(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            if type(e) is OSError or type(e).__name__ == "SMBOSError":
                if e.errno == errno.ENOENT:
                    raise FileNotFoundError(*e.args) from e
                if e.errno == errno.EEXIST:
                    raise FileExistsError(*e.args) from e
            raise

    return wrapper


class SmbStorage(FsspecStorage):
    def _connect(self) -> tuple[Any, str]:
        from fsspec.implementations.smb import SMBFileSystem
        from fsspec.utils import infer_storage_options

        parts = infer_storage_options(self._url)
        kwargs = {k: parts[k] for k in ("port", "username", "password") if parts.get(k)}
        kwargs.update(self._options)
        # our own retry policy decides how long to try; don't stack fsspec's on top of it
        kwargs.setdefault("register_session_retries", 0)
        fs = SMBFileSystem(parts["host"], skip_instance_cache=True, **kwargs)
        return fs, parts["path"].rstrip("/")

    def _unc(self, path: str) -> str:
        return "\\\\" + self.fs.host + path.replace("/", "\\")

    def _reconnect(self, error: BaseException) -> None:
        import smbclient

        try:
            smbclient.delete_session(self.fs.host, port=self.fs._port)
        except Exception:
            pass  # already gone with the dead connection
        super()._reconnect(error)

    @_translated
    def _upload(self, path: str, payload: bytes | None, local: str | None) -> None:
        import shutil

        import smbclient

        with smbclient.open_file(self._unc(path), "wb", share_access="rwd", port=self.fs._port) as out:
            if local is None:
                out.write(payload)
            else:
                with open(local, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)

    @_translated
    def _rename(self, src: str, dst: str, *, replace: bool) -> None:
        import smbclient

        move = smbclient.replace if replace else smbclient.rename
        move(self._unc(src), self._unc(dst), port=self.fs._port)

    @_translated
    def _read(self, path: str, offset: int, length: int | None) -> bytes:
        import smbclient

        with smbclient.open_file(self._unc(path), "rb", share_access="rwd", port=self.fs._port) as f:
            f.seek(offset)
            return f.read(-1 if length is None else length)

    @_translated
    def _makedirs(self, folder: str) -> None:
        import smbclient

        smbclient.makedirs(self._unc(folder), exist_ok=True, port=self.fs._port)

    @_translated
    def _remove(self, path: str) -> None:
        import smbclient

        smbclient.remove(self._unc(path), port=self.fs._port)

    @_translated
    def _list_entries(self, folder: str, recursive: bool) -> list[RemoteEntry]:
        import smbclient

        out: list[RemoteEntry] = []
        # the directory query already carries size, times and attributes; DirEntry.stat() would
        # cost a request per entry (and forgets the port)
        for entry in smbclient.scandir(self._unc(folder), port=self.fs._port):
            info = entry.smb_info
            mtime = mtime_of({"mtime": info.last_write_time})
            if info.file_attributes & _FILE_ATTRIBUTE_REPARSE_POINT:
                out.append(RemoteEntry(entry.name, "link", 0, mtime))
            elif info.file_attributes & _FILE_ATTRIBUTE_DIRECTORY:
                if recursive:
                    inner = self._list_entries(f"{folder}/{entry.name}", False)
                    out.extend(RemoteEntry(f"{entry.name}/{e.path}", e.type, e.size, e.mtime) for e in inner)
                else:
                    out.append(RemoteEntry(entry.name, "directory", 0, mtime))
            else:
                out.append(RemoteEntry(entry.name, "file", info.end_of_file, mtime))
        return out
