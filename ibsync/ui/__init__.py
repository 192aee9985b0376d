"""Terminal output: progress bars, tables and sizes. Only the CLI uses it."""
