"""SFTP (any SSH server: a NAS, a Raspberry Pi, a Linux box) through sshfs/asyncssh.

- Writes go to ``.tmp-<random>`` beside the target, then a rename puts them in place:
  ``posix-rename@openssh.com`` replaces atomically; the plain SFTP v3 ``RENAME`` refuses an
  existing target, which makes exclusive creates atomic too (v3 reports it as a generic
  "Failure", so the target's existence decides what it meant).
- Before the rename, each upload is flushed to the server's disk with ``fsync@openssh.com``
  (OpenSSH 6.5+, most NAS servers); a server without the extension gets the rename alone.
- sshfs's ``cat_file`` ignores ranges and returns the whole file; ranges are read with
  open/seek/read on an SFTP channel.
- The server's host key is checked against ``~/.ssh/known_hosts`` (sshfs alone turns checking
  off); pass ``known_hosts`` in the storage options to use another file.
- A dropped connection is not re-established by asyncssh: a transient error makes the storage
  open a new connection before the retry (remote.FsspecStorage._reconnect).
"""

from __future__ import annotations

import os
from typing import Any

from .remote import FsspecStorage


class SftpStorage(FsspecStorage):
    def _connect(self) -> tuple[Any, str]:
        from fsspec.utils import infer_storage_options
        from sshfs import SSHFileSystem

        parts = infer_storage_options(self._url)
        kwargs: dict[str, Any] = {"known_hosts": ()}  # () = asyncssh's default file, None = no check
        for key in ("port", "username", "password"):
            if parts.get(key):
                kwargs[key] = parts[key]
        kwargs.update(self._options)
        # a config file says "~/.ssh/id_ed25519"; asyncssh opens the path as given
        if isinstance(kwargs.get("client_keys"), list):
            kwargs["client_keys"] = [os.path.expanduser(k) if isinstance(k, str) else k for k in kwargs["client_keys"]]
        if isinstance(kwargs.get("known_hosts"), str):
            kwargs["known_hosts"] = os.path.expanduser(kwargs["known_hosts"])
        fs = SSHFileSystem(parts["host"], skip_instance_cache=True, **kwargs)
        return fs, parts["path"].rstrip("/") or "/"

    def _sync(self, make_coro):
        import fsspec.asyn

        return fsspec.asyn.sync(self.fs.loop, make_coro)

    def _upload(self, path: str, payload: bytes | None, local: str | None) -> None:
        from sshfs.utils import WRITE_BLOCK_SIZE

        async def upload() -> None:
            async with self.fs._pool.get() as channel:
                if local is not None:
                    await channel.put(local, path, block_size=WRITE_BLOCK_SIZE)  # pipelined
                # "r+b" for a staged file: any handle's fsync flushes the file, and a write
                # handle is what FlushFileBuffers (Windows' OpenSSH) needs
                async with channel.open(path, "wb" if local is None else "r+b") as f:
                    if payload:
                        await f.write(payload)
                    await _fsync(f)

        self._sync(upload)

    def _rename(self, src: str, dst: str, *, replace: bool) -> None:
        if replace:
            self.fs.mv(src, dst)  # posix-rename
            return

        async def rename() -> None:
            async with self.fs._pool.get() as channel:
                await channel.rename(src, dst)

        try:
            self._sync(rename)
        except Exception:
            if self.fs.exists(dst):
                raise FileExistsError(dst) from None
            raise

    def _read(self, path: str, offset: int, length: int | None) -> bytes:
        async def read() -> bytes:
            async with self.fs._pool.get() as channel:
                async with channel.open(path, "rb") as f:
                    if offset:
                        await f.seek(offset)
                    return await f.read(-1 if length is None else length)

        try:
            return self._sync(read)
        except Exception as e:
            if type(e).__name__ == "SFTPNoSuchFile":
                raise FileNotFoundError(path) from e
            raise


async def _fsync(f: Any) -> None:
    """Durable before it is renamed into place: a power cut on the server after the rename must
    not leave a named object with lost bytes."""
    from asyncssh import SFTPOpUnsupported

    try:
        await f.fsync()
    except SFTPOpUnsupported:
        pass  # the server lacks fsync@openssh.com: its rename is all we get
