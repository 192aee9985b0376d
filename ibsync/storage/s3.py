"""S3 and S3-compatible servers through s3fs.

- A PUT is atomic: readers see the old object, the new one or nothing, never a part.
- Exclusive create is a conditional PUT (``If-None-Match: *``), which AWS, SeaweedFS, MinIO, R2,
  GCS and moto honour. Some servers reject it with a 412 that lacks the ``<Condition>`` element
  (SeaweedFS), which s3fs turns into ``OSError(EINVAL)`` instead of ``FileExistsError``; both
  mean "already there". A server that ignores the header (rclone serve s3) lets two racing
  ``init`` both write; Repository.init reads the config back and notices (design.md §24).
- Listings are strongly consistent on AWS since 2020 and on every server tested; lock objects
  rely on that.
- Transient errors: botocore's own retries (standard mode, 3 attempts: 5xx, SlowDown, connection
  errors) inside each request, then ibsync's time budget around the whole operation (retry.py).
"""

from __future__ import annotations

import errno
from typing import Any

from ..errors import StorageError
from .remote import FsspecStorage


def _precondition_failed(e: BaseException) -> bool:
    if isinstance(e, FileExistsError):
        return True
    cause = e.__cause__
    response = getattr(cause, "response", None)
    if not isinstance(response, dict):
        return False
    code = response.get("Error", {}).get("Code")
    return code == "PreconditionFailed" or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412


def _no_such_bucket(e: BaseException) -> bool:
    response = getattr(e.__cause__, "response", None)
    return isinstance(response, dict) and response.get("Error", {}).get("Code") == "NoSuchBucket"


class S3Storage(FsspecStorage):
    def _connect(self) -> tuple[Any, str]:
        import s3fs

        options = dict(self._options)
        config = dict(options.pop("config_kwargs", {}) or {})
        # botocore's standard mode retries throttling and 5xx within a request (with its retry
        # quota); s3fs's own loop would multiply that, so it makes one try, and retry.py's time
        # budget covers longer outages
        config.setdefault("retries", {"max_attempts": 3, "mode": "standard"})
        fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs=config, **options)
        fs.retries = 1  # a class attribute in s3fs, not a constructor option
        root = s3fs.S3FileSystem._strip_protocol(self._url).rstrip("/")
        if not root:
            raise StorageError(f"{self.url}: no bucket in the URL (s3://BUCKET/PATH)")
        return fs, root

    def _write_object(self, path: str, payload: bytes | None, local: str | None, exclusive: bool) -> None:
        mode = "create" if exclusive else "overwrite"
        try:
            self._put(path, payload, local, mode)
        except FileNotFoundError as e:
            if not _no_such_bucket(e):
                raise
            # first write of `init` into a bucket that does not exist yet, as restic does
            self._create_bucket(path.split("/", 1)[0])
            self._put(path, payload, local, mode)
        except OSError as e:
            if exclusive and (e.errno == errno.EINVAL or isinstance(e, FileExistsError)) and _precondition_failed(e):
                raise FileExistsError(path) from e
            raise

    def _create_bucket(self, bucket: str) -> None:
        # not fs.mkdir: it sends LocationConstraint=us-east-1 when that is the region, which AWS
        # (and moto) reject; us-east-1 is the one region that must be left out
        region = (self._options.get("client_kwargs") or {}).get("region_name")
        config = (
            {"CreateBucketConfiguration": {"LocationConstraint": region}} if region and region != "us-east-1" else {}
        )
        self.fs.call_s3("create_bucket", Bucket=bucket, **config)
        self.fs.invalidate_cache()

    def _put(self, path: str, payload: bytes | None, local: str | None, mode: str) -> None:
        if local is not None:
            self.fs.put_file(local, path, mode=mode)
        else:
            self.fs.pipe_file(path, payload, mode=mode)
