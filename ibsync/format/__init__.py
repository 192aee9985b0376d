"""Pure codecs for the repository format (docs/design.md). Nothing here does I/O."""
