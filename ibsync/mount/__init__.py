"""``ibsync mount``: snapshots as a read-only file tree, served over FUSE or WebDAV.

``tree`` lays the snapshots out as ``<device>/<backup date>/<Domain>/<relative path>`` over the
shared browsing layer (``reader.browse.SnapshotView``); ``content`` turns a file's forward-only
stream into reads at any offset; ``fuse`` and ``webdav`` serve the same tree.
"""
