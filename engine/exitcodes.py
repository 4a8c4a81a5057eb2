"""The ``pawcam`` command's exit codes, shared by every subcommand.

    from engine.exitcodes import EXIT_OK, EXIT_SOME_FAILED
    return EXIT_SOME_FAILED if summary.errors else EXIT_OK

0 success; 1 some inputs failed (results still written); 2 usage or configuration error;
3 model could not be loaded; 4 the output storage failed (disk full, read-only, ...: the rows
written so far are whole); 130 interrupted.

Its own module, below :mod:`engine.cli` and the subcommands, so that a subcommand module
(``engine.bulk_cli``) and the entry point that loads it do not import each other.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_STORAGE = 4
EXIT_INTERRUPTED = 130
