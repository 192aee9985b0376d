#!/bin/sh
# Back up a generated sample iPhone backup folder into an encrypted repository, look at it,
# restore it, and prove the restored folder is byte-identical. Everything happens under a
# temporary folder (or $1), which is left in place for you to look at.
set -eu
work=${1:-$(mktemp -d "${TMPDIR:-/tmp}/ibsync-quickstart.XXXXXX")}
mkdir -p "$work"
export IBSYNC_REPO="$work/repo"
export IBSYNC_PASSWORD="quickstart example password"

echo "== generating a sample backup folder (64 MiB, as Finder writes it)"
device=$(python -m ibsync.testing.generator generate "$work/Backup" --size-mib 64 --seed 1)

echo "== ibsync init"
ibsync init
echo "== ibsync import (first backup)"
ibsync import "$work/Backup"
echo "== the next day: the phone changes a few files; ibsync import again"
python -m ibsync.testing.generator mutate "$device" --seed 1 > /dev/null
ibsync import "$work/Backup"
echo "== ibsync snapshots"
ibsync snapshots
echo "== ibsync restore latest"
ibsync restore latest "$work/restored"
diff -r "$device" "$work/restored/$(basename "$device")"
echo "restored folder is byte-identical to the backup folder"
echo "== ibsync check --read-data"
ibsync check --read-data
echo "== ibsync stats"
ibsync stats
echo "everything is in $work"
