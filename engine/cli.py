"""The entry points' shared error contract: a user's mistake (a wrong flag, config key, value or path) ends in
ONE line on stderr naming what was wrong and the fix, and exit status 2; a bug keeps its traceback; `--debug`
anywhere on the command line shows the traceback of either.

    @entry_point("train.py")
    def main(argv: list[str]) -> int: ...

    if __name__ == "__main__":
        sys.exit(main())
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from typing import Callable

# What a user's input raises: ConfigError is a ValueError, pipelines.sources.LayoutError a FileNotFoundError, and
# the project's checks raise ValueError with a one-line reason. Anything else (KeyError, TypeError, RuntimeError
# from torch, ...) is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               NotImplementedError)
DEBUG_FLAG = "--debug"


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (torch and YAML messages span several)."""
    if isinstance(exc, OSError) and exc.filename and exc.strerror:   # '[Errno 2] ...': name the path first
        text = f"'{exc.filename}': {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


@contextlib.contextmanager
def one_line_usage_errors():
    """argparse's errors as one line (its default prints the whole usage block first). Patched on the class for
    the duration of the call so that every parser an entry point builds, subcommands' included, follows it
    without each module opting in."""
    original = argparse.ArgumentParser.error

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} -h)\n")

    argparse.ArgumentParser.error = error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


def entry_point(prog: str) -> Callable:
    """Decorate `main(argv: list[str]) -> int`: the wrapper takes `argv=None` (sys.argv[1:]), strips --debug,
    and turns USER_ERRORS into one line on stderr and exit status 2."""
    def wrap(main: Callable[[list[str]], int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = DEBUG_FLAG in argv
            argv = [a for a in argv if a != DEBUG_FLAG]
            with contextlib.nullcontext() if debug else one_line_usage_errors():
                try:
                    rc = main(argv)
                except USER_ERRORS as exc:
                    if debug:
                        raise
                    # under torchrun every process meets the same mistake: one line per node, not one per rank
                    # (a node-specific one, such as a dataset missing on one machine, still shows on that node)
                    if os.environ.get("LOCAL_RANK", "0") == "0":
                        print(f"{prog}: {one_line(exc)}", file=sys.stderr, flush=True)
                    return 2
            return rc if isinstance(rc, int) else 0
        return run
    return wrap
