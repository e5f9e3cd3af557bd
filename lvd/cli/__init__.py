"""The `lvd` command line: `main` (the parser and dispatch), one module per sub-command,
shared option groups in `options`, argument and failure checks in `checks`."""
