"""The command line: `app` (Typer) and `main` (the console script).

`app.py` holds the commands (parse -> flow -> render), `options.py` the flags (their help is the
spec's own documentation), `progress.py` the live display, `output.py` where output and files go.
"""

from batchprobe.cli.app import app, main

__all__ = ["app", "main"]
