#!/bin/sh
# Nightly off-site copy: send the snapshots the off-site repository lacks (and of those, only the
# data it lacks), then verify a seventh of the off-site data, a different seventh each day of the
# week, so all of it is read once a week.
#
#   FROM=home TO=offsite sh examples/nightly-offsite-copy.sh
#
# FROM and TO are repository names from the config file (or paths/URLs); their passwords come
# from the config file's password-file / password-command / password-env, or from
# $IBSYNC_FROM_PASSWORD* (source) and $IBSYNC_PASSWORD* (target). The two may differ.
#
# From cron, every night at 03:30 (it needs the environment your secrets come from):
#   30 3 * * *  FROM=home TO=offsite /path/to/nightly-offsite-copy.sh >>"$HOME/ibsync-copy.log" 2>&1
#
# Exit status: ibsync's own (`ibsync --help` lists them: a locked repository and unreachable
# storage have their own, "try again later"). An interrupted copy loses nothing: the next run
# sends what is still missing.
set -eu

FROM=${FROM:-home}
TO=${TO:-offsite}
# 1/7 on Monday ... 7/7 on Sunday
SUBSET="$(date +%u)/7"

echo "== $(date '+%Y-%m-%d %H:%M:%S') copy $FROM -> $TO"
ibsync copy --from-repo "$FROM" --repo "$TO"

echo "== check $TO, data subset $SUBSET"
ibsync check --repo "$TO" --read-data-subset "$SUBSET"
