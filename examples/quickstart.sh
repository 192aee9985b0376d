#!/bin/sh
# ibsync without a phone: a simulated iPhone behind a simulated usbmuxd is backed up over the
# same protocol a real one speaks (full, then incremental after the phone changes) and restored;
# then a backup folder as Finder writes it is imported, changed, imported again, restored and
# compared byte for byte. Everything happens under a temporary folder (or $1), left in place.
set -eu
work=${1:-$(mktemp -d "${TMPDIR:-/tmp}/ibsync-quickstart.XXXXXX")}
mkdir -p "$work"
work=$(cd "$work" && pwd)
export IBSYNC_REPO="$work/repo"
export IBSYNC_PASSWORD="quickstart example password"

echo "== ibsync init"
ibsync init

echo "== a simulated iPhone is plugged in (python -m ibsync.testing.device serve)"
python -m ibsync.testing.device serve "$work/phone" --size-mib 16 --seed 2 > "$work/phone.log" 2>&1 &
phone=$!
trap 'kill "$phone" 2>/dev/null || true' EXIT
i=0
until [ -f "$work/phone/env.sh" ]; do
    kill -0 "$phone" 2>/dev/null || { cat "$work/phone.log" >&2; exit 1; }
    i=$((i + 1)); [ "$i" -lt 600 ] || { echo "the simulated phone did not start" >&2; exit 1; }
    sleep 0.1
done
(
    # this phone's usbmuxd, and a HOME inside $work for pymobiledevice3's pairing files
    . "$work/phone/env.sh"
    echo "== ibsync devices"
    ibsync devices
    echo "== ibsync backup (the first one is full)"
    ibsync backup
    echo "== the phone changes overnight; ibsync backup again (incremental: only what changed)"
    kill -HUP "$phone"
    until [ -f "$work/phone/day" ]; do sleep 0.1; done
    ibsync backup
    echo "== ibsync restore latest (a standard backup folder)"
    ibsync restore latest "$work/restored-phone"
)
kill "$phone"; wait "$phone" 2>/dev/null || true
trap - EXIT

echo "== a backup folder as Finder writes it (64 MiB, generated): ibsync import"
device=$(python -m ibsync.testing.generator generate "$work/Backup" --size-mib 64 --seed 1)
ibsync import "$work/Backup"
echo "== the next day: the phone changes a few files; ibsync import again"
python -m ibsync.testing.generator mutate "$device" --seed 1 > /dev/null
ibsync import "$work/Backup"
echo "== ibsync snapshots"
ibsync snapshots
echo "== ibsync restore (the imported device)"
ibsync restore latest "$work/restored" --device "$(basename "$device")"
diff -r "$device" "$work/restored/$(basename "$device")"
echo "restored folder is byte-identical to the backup folder"
echo "== ibsync check --read-data"
ibsync check --read-data
echo "== ibsync stats"
ibsync stats
echo
echo "everything is in $work"
echo "to browse these backups in the web app:"
echo "  IBSYNC_REPO=$work/repo IBSYNC_PASSWORD='$IBSYNC_PASSWORD' ibsync ui"
