"""The `camelid` command: the parser, wired from each group's `register(sub)` in commands/, and `main`.

Nothing here imports torch: `camelid --help` and `camelid X --help` answer at once; a command imports
what it needs when it runs."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from .commands import bench, convert, data, model, quantize, serve, templates, train
from .commands import eval as evaluation
from .commands.options import HelpFormatter
from .errors import CamelidError, Terminated, is_disk_full


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors (`camelid: error: ...`, exit code 2) instead of usage + error,
    and help that shows defaults; every subcommand's parser is one of these too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"camelid: error: {message} (see `{self.prog} --help`)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("camelid")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from . import __version__
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="camelid", description="Toolkit for LLaMA-family chat models.")
    parser.add_argument("--version", action="version", version=f"camelid {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model.register(sub)
    serve.register(sub)
    convert.register(sub)
    templates.register(sub)
    train.register(sub)
    data.register(sub)
    quantize.register(sub)
    bench.register(sub)
    evaluation.register(sub)
    return parser


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001
    raise Terminated("terminated")


def _install_signal_handlers() -> dict:
    """SIGTERM becomes an exception (cleanup runs, exit 143); a write over `ulimit -f` raises EFBIG instead of
    killing the process with SIGXFSZ (which torch's C++ writer turned into an abort). Returns the previous handlers."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set handlers (main() called from a library's thread)
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _on_sigterm)}
    if hasattr(signal, "SIGXFSZ"):
        previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return previous


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of what is left cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


class _NamedStdout:
    """sys.stdout, whose write errors name it: a full disk under `> file` or `> /dev/full` is then reported as
    standard output rather than as an anonymous write."""

    def __init__(self, stream):
        self._stream = stream

    def _named(self, method: str, *args):
        try:
            return getattr(self._stream, method)(*args)
        except OSError as e:
            if e.filename is None:
                e.filename = "standard output"
            raise

    def write(self, text: str) -> int:
        return self._named("write", text)

    def flush(self) -> None:
        self._named("flush")

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    previous = _install_signal_handlers()
    stdout = sys.stdout
    sys.stdout = _NamedStdout(stdout)
    try:
        return _run(argv)
    finally:  # as they were, for callers of main() inside a larger program (the tests)
        sys.stdout = stdout
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
        sys.stdout.flush()  # inside the try: a full stdout (> /dev/full) is reported here, not at exit
    except CamelidError as e:
        print(f"camelid: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("camelid: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except OSError as e:
        if not is_disk_full(e):
            raise
        where = e.filename or "a write"
        print(f"camelid: error: {where}: {os.strerror(e.errno) if e.errno else e} (the disk or the file-size limit "
              "is full); free some space and run again", file=sys.stderr)
        _silence_stdout()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
