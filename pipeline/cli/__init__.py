"""``streamlabel``: the composition root, a package of thin command modules.

Each module (``model``, ``run``, ``demo``, ``feed`` for replay/produce, ``bench``, ``alerts``) wires config,
consumers and producers for its commands, importing them inside the command so ``--help`` stays instant;
rendering lives beside its command. This module builds the typer app and ``main()``, the one place that turns
every user error into one line on stderr, ``error: where: what (what to do)``, and an exit code:

    2    a user error: a bad flag or value, a missing file or topic, an unreachable broker or Redis
    3    a refused quality gate (``model build``)
    130  stopped by Ctrl-C (SIGINT); 143 by SIGTERM (``run`` and ``alerts run``: SIGTERM is their normal stop, 0)

Parse errors come from the click that typer bundles (``typer._click``) or from click itself, whichever is
in use; both are handled. Unexpected exceptions (bugs) keep their traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated

import typer

from pipeline.cli import alerts, bench, demo, feed, model, run, top
from pipeline.cli.common import Interrupted, raise_interrupted
from pipeline.errors import StreamlabelError

PROG = "streamlabel"

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("streamlabel")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"{PROG} {version()}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the version and exit.")] = False,
) -> None:
    """Label live text streams in milliseconds."""


app.add_typer(model.app, name="model")
app.command("run")(run.run_cmd)
app.command("demo")(demo.demo_cmd)
app.command("replay")(feed.replay_cmd)
app.command("produce")(feed.produce_cmd)
app.command("bench")(bench.bench_cmd)
app.add_typer(alerts.app, name="alerts")
app.command("top")(top.top_cmd)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run one command; user errors become one line and an exit code, never a traceback."""
    import logging

    # aiokafka logs a refused connection as an ERROR line of its own; the command says it once, in its words.
    # (Commands that run workers configure logging again from the settings.)
    logging.getLogger("aiokafka").propagate = False
    previous = _install_sigterm()
    args = list(sys.argv[1:] if argv is None else argv)
    cmd = typer.main.get_command(app)
    try:
        rv = cmd.main(args=args, prog_name=PROG, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except StreamlabelError as exc:
        _error(exc.render())
        return exc.exit_code
    except Interrupted as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        handled = _click_error(exc, _command_path(cmd, args))
        if handled is not None:
            return handled
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
            # a file, directory or port the user named: say which, no traceback
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            _error(f"{where}{exc.strerror or exc}")
            return 2
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The ``streamlabel`` script: ``main``, then exit with its code.

    A model build imports torch's Triton, whose nanobind bindings print hundreds of "leaked instance" lines
    at interpreter shutdown (harmless, and not ours); when it is loaded, and everything is flushed and
    closed, the process ends without the interpreter's teardown.
    """
    rc = main()
    if "triton" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


def _install_sigterm():
    """SIGTERM unwinds like Ctrl-C (cleanup runs, exit 143); event loops install their own handler on top."""
    try:
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, raise_interrupted)
        return previous
    except ValueError:  # not the main thread (an embedding host): leave signals alone
        return None


def _error(line: str) -> None:
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(line)}")
    else:
        sys.stderr.write(f"error: {line}\n")
        sys.stderr.flush()


# ------------------------------------------------------------------------------------------ parse errors
def _click_modules() -> list:
    mods = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        mod = sys.modules.get(name)  # only a click that is in use can have raised
        if mod is not None:
            mods.append(mod)
    return mods


def _command_path(cmd, args: list[str]) -> str:
    """``streamlabel model eval`` from the arguments (for errors that come without a context)."""
    path = [PROG]
    for a in args:
        sub = getattr(cmd, "commands", {}).get(a) if not a.startswith("-") else None
        if sub is None:
            break
        path.append(a)
        cmd = sub
    return " ".join(path)


def _click_error(exc: BaseException, fallback_path: str = PROG) -> int | None:
    """A click/typer exception as one line (or the help text); ``None`` when ``exc`` is not one."""
    for mod in _click_modules():
        no_args = getattr(mod, "NoArgsIsHelpError", None)
        if no_args is not None and isinstance(exc, no_args):
            sys.stdout.write(exc.ctx.get_help() + "\n")  # bare `streamlabel` / `streamlabel model`: the help
            return 0
        if isinstance(exc, mod.UsageError):
            _error(_usage_line(exc, mod, fallback_path))
            return 2
        if isinstance(exc, mod.ClickException):
            _error(f"{PROG}: {_sentence(exc.format_message())}")
            return exc.exit_code or 1
    if isinstance(exc, typer.Abort) or type(exc).__name__ == "Abort":
        _error(f"{PROG}: aborted")
        return 1
    return None


def _usage_line(exc, mod, fallback_path: str = PROG) -> str:
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else fallback_path
    where = path.split(" ", 1)[1] if " " in path else path
    param = getattr(exc, "param", None)
    see = f"see '{path} --help'"
    if isinstance(exc, mod.MissingParameter):
        what = f"missing {getattr(param, 'param_type_name', 'parameter')} {_param_name(param)}" if param else \
            _sentence(exc.format_message())
    elif isinstance(exc, mod.BadParameter):
        if param is not None:
            where = f"{where} {_param_name(param)}"
        what = _bad_value(exc)
    elif isinstance(exc, mod.NoSuchOption):
        what = f"no such option {exc.option_name}"
        if exc.possibilities:
            see = f"did you mean {' or '.join(sorted(exc.possibilities))}? {see}"
    else:
        what = _sentence(exc.format_message())
    return f"{where}: {what} ({see})"


def _param_name(param) -> str:
    if param is None:
        return ""
    if getattr(param, "param_type_name", "") == "argument":
        return (getattr(param, "metavar", None) or param.name or "").upper()
    opts = list(getattr(param, "opts", None) or [])
    long = [o for o in opts if o.startswith("--")]
    return (long or opts or [f"--{param.name}"])[0]


_KINDS = {"int_parsing": "a whole number", "int_from_float": "a whole number", "float_parsing": "a number",
          "bool_parsing": "true or false"}


def _bad_value(exc) -> str:
    """What was wrong with a value; typer's pydantic coercion errors get the value the user typed."""
    errors = getattr(exc.__cause__, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
        except (IndexError, TypeError):
            first = None
        if first:
            kind = _KINDS.get(first.get("type", ""))
            got = first.get("input")
            if kind:
                return f"expected {kind}, got {got!r}"
            msg = _sentence(str(first.get("msg") or exc.message).removeprefix("Value error, "))
            return msg if repr(got) in msg else f"{msg}, got {got!r}"
    return _sentence(exc.message)


def _sentence(text: str) -> str:
    text = " ".join(str(text).split()).rstrip(".")
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text
