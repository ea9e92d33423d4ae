"""Command-line plumbing shared by main.py, inference.py, export.py and bench.py.

- `UserError`: the one error type that means "bad input": a command prints its message
  as one line and exits 2. Anything else is a bug and keeps its traceback.
- `ArgumentParser`: argparse that reports a bad command line in one line, exit 2.
- `setting(...)` / `add_setting_flags` / `settings_from_flags`: a dataclass field
  declared with `setting` becomes a flag with its type, range check and help (which
  states the default), so the recipe dataclasses are the single source of defaults.
- `choose_device`: the device is chosen once, here, and passed in.
"""

import argparse
import dataclasses
import math
import os
import shlex
import signal
import sys

import torch


class UserError(Exception):
    """Bad input from the user; the message is one line: what, where, how to fix."""


def one_line(text) -> str:
    """`text` with its line breaks shown as \\n, so a message quoting a user's value stays one line."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def shell_word(text) -> str:
    """`text` as one word that bash or zsh reads back as the same bytes, for printed commands:
    shlex.quote's, or $'...' with \\xHH escapes where `text` holds a control character or a
    byte that is not UTF-8 (argv keeps those as surrogates), which shlex.quote would print raw."""
    if text.isprintable():
        return shlex.quote(text)
    escaped = "".join(chr(byte) if 32 <= byte < 127 and chr(byte) not in "\\'" else f"\\x{byte:02x}"
                      for byte in os.fsencode(text))
    return f"$'{escaped}'"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line and exits 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def setting(default, help, low=None, high=None, high_open=False, flag=None, choices=None):
    """A dataclass field that is also a command-line flag.

    low/high: inclusive range (high exclusive with high_open); floats must also be finite.
    flag: the flag's name when it is not the field's name with dashes.
    """
    return dataclasses.field(default=default, metadata=dict(
        help=help, low=low, high=high, high_open=high_open, flag=flag, choices=choices))


def flag_name(field):
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _range_text(meta):
    low, high = (None if v is None else str(v) if isinstance(v, int) else f"{v:g}" for v in (meta["low"], meta["high"]))
    if low is not None and high is not None:
        return f"in [{low}, {high}{')' if meta['high_open'] else ']'}"
    return f"at least {low}" if low is not None else f"at most {high}"


def _checked(kind, meta):
    """An argparse `type` that parses `kind` and enforces the setting's range (finite floats)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}")
        low, high = meta["low"], meta["high"]
        out_of_range = ((kind is float and not math.isfinite(value))
                        or (low is not None and value < low)
                        or (high is not None and (value >= high if meta["high_open"] else value > high)))
        if out_of_range:
            raise argparse.ArgumentTypeError(f"{text} is out of range; it must be {_range_text(meta)}")
        return value
    return parse


def ranged(kind, low=None, high=None):
    """An argparse `type` for a plain flag: parses `kind` within [low, high] (finite floats)."""
    return _checked(kind, dict(low=low, high=high, high_open=False))


def path_argument(text):
    """An argparse `type` for a path: '' (an unset shell variable, say) is refused, naming the flag."""
    if not text:
        raise argparse.ArgumentTypeError("is empty; give a path")
    return text


def launched_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE), 1 without torchrun."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not (text.isascii() and text.isdecimal()) or int(text) < 1:
        raise UserError(f"WORLD_SIZE={text!r} in the environment is not a process count; unset it "
                        f"or launch with torchrun")
    world_size = int(text)
    if world_size > 1 and not {"RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
        raise UserError(f"WORLD_SIZE={text} is set but not RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; start "
                        f"the processes with torchrun, or unset WORLD_SIZE for one process")
    if world_size > 1:  # set by hand, a bad one would crash or hang in the process group's setup
        ranges = {"RANK": (0, world_size - 1), "LOCAL_RANK": (0, world_size - 1), "MASTER_PORT": (0, 65535),
                  "LOCAL_WORLD_SIZE": (1, world_size)}  # the last, processes on this node, is optional
        for name, (low, high) in ranges.items():
            value = os.environ.get(name, str(low))
            if not (value.isascii() and value.isdecimal()) or not low <= int(value) <= high:
                raise UserError(f"{name}={value!r} in the environment is not a number from {low} to {high}; start "
                                f"the processes with torchrun, or unset WORLD_SIZE for one process")
        if not os.environ["MASTER_ADDR"].strip():
            raise UserError("MASTER_ADDR is empty in the environment; start the processes with torchrun, or unset "
                            "WORLD_SIZE for one process")
    return world_size


def setting_fields(config):
    """Every `setting` field of a dataclass tree, as (owner dataclass instance, field)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            yield from setting_fields(value)
        elif "help" in field.metadata:
            yield config, field


def as_typed(value) -> str:
    """A setting's value as its flag takes it: '16 32 128', 'on'/'off', '0.1'."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def add_setting_flags(parser, config, notes=None):
    """One flag per setting of the dataclass tree `config`; their defaults stay None so an
    unset flag can be told from one set to the default (presets fill the rest).

    notes: {field name: text} appended to a flag's help (e.g. "--preset best: 5").
    """
    for owner, field in setting_fields(config):
        meta, default = field.metadata, getattr(owner, field.name)
        note = f"; {notes[field.name]}" if notes and field.name in notes else ""
        kwargs = dict(help=f"{meta['help']} (default: {as_typed(default)}{note})", default=None, dest=field.name,
                      metavar=None if isinstance(default, bool) or meta["choices"] is not None  # {a,b}: the choices
                      else flag_name(field).strip("-").upper())
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kwargs.update(type=_checked(int, meta), nargs=len(default), metavar="N")  # --widths N N N
        elif meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        else:
            kwargs["type"] = _checked(type(default), meta)
        parser.add_argument(flag_name(field), **kwargs)


def flatten_settings(config):
    """{setting name: value} of every setting in the dataclass tree `config`."""
    return {field.name: getattr(owner, field.name) for owner, field in setting_fields(config)}


def replace_settings(config, values):
    """A copy of the dataclass tree `config` with the settings named in `values` replaced."""
    changes = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            changes[field.name] = replace_settings(value, values)
        elif field.name in values:
            changes[field.name] = tuple(values[field.name]) if isinstance(value, tuple) else values[field.name]
    return dataclasses.replace(config, **changes)


def settings_from_flags(args, config):
    """`config` with every setting flag the user actually gave (not None) applied."""
    names = {field.name for _, field in setting_fields(config)}
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return replace_settings(config, given)


def choose_device(name="auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def fail(error, code=2) -> int:
    """Print `error` as the one line a failed command leaves; returns the exit code."""
    print(f"error: {one_line(error)}", file=sys.stderr)
    return code


def prepare_output():
    """A file name that is not UTF-8 (argv keeps its bytes as surrogates) prints escaped, as
    on stderr, instead of raising where the terminal's stdout is strict (en_US.UTF-8); and
    once the reader of stdout or stderr is gone (`python main.py | head -3`), the run goes on
    unheard."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    for name in ("stdout", "stderr"):  # `2>&1 | head`: the interrupt line must not end in a traceback either
        stream = getattr(sys, name)
        try:
            stream.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file (a notebook's, pytest's): nothing to guard
            continue
        if not isinstance(stream, _QuietOnceUnread):
            setattr(sys, name, _QuietOnceUnread(stream, name))


class LogError(UserError):
    """The run's log (stdout) cannot be written: a full disk under `> log.txt`."""


class _QuietOnceUnread:
    """stdout or stderr that, once it cannot be written, points its file descriptor at /dev/null,
    so every later write (and the flush at exit) succeeds unseen instead of ending the run
    with a traceback. A reader gone (BrokenPipeError) is fine: the run goes on. Any other
    failure of stdout (a full disk under `> log.txt`) stops the command as bad output does: exit 2."""

    def __init__(self, stream, name):
        self._stream, self._name = stream, name

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            self._unwritable(e)
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError as e:
            self._unwritable(e)

    def _unwritable(self, error):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)
        if self._name == "stdout" and not isinstance(error, BrokenPipeError):  # stderr: no line could say so
            reason = os.strerror(error.errno) if error.errno else type(error).__name__
            raise LogError(f"stdout: cannot write ({reason}); send the log to a file or disk that can take it, "
                           f"or to the terminal") from None

    def __getattr__(self, name):  # fileno, isatty, encoding, ...
        return getattr(self._stream, name)


def first_sentence(error, skip=()):
    """The first sentence of an exception's message that says something, for one-line errors."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(skip)] or lines
    if not lines:
        return type(error).__name__
    sentence = lines[0].split(". ")[0]
    return sentence if len(sentence) <= 200 else sentence[:200] + "..."


def run_command(run, args, failures=(), interrupted=None, failed=None) -> int:
    """A command's exit code: 0 when `run(args)` works, 2 for bad input (UserError), 1 for
    the `failures` it names (e.g. a check that did not pass), 130 when interrupted; each
    failure is one line. `interrupted()` says what an interrupt leaves (by default: every
    output whole or as it was), and `failed(error)` may add a line after a UserError's."""
    prepare_output()
    interrupts = sigterm_as_interrupt()
    try:
        with interrupts:
            run(args)
            sys.stdout.flush()  # now, so a log that cannot be written is an error, not a warning at exit
    except UserError as e:
        code = fail(e)
        if failed:
            failed(e)
        return code
    except failures as e:
        return fail(e, code=1)
    except (KeyboardInterrupt, Exception) as e:
        if not interrupts.caused(e):
            raise
        (interrupted or _outputs_whole_or_as_before)()
        return 130
    return 0


def _outputs_whole_or_as_before():
    # outputs are atomic: each one is complete or not there
    print("\ninterrupted; each output is either wholly written or as it was before", file=sys.stderr)


class sigterm_as_interrupt:
    """Within the block SIGTERM stops like Ctrl-C (KeyboardInterrupt); both handlers are
    restored after it, so a notebook kernel that called a command keeps its own. A signal
    the caller ignores (a background job's SIGINT, `nohup`) stays ignored.

    `caused(error)` tells an interrupt also where a library caught the KeyboardInterrupt
    and raised its own error instead (matplotlib, stopped mid-drawing, raises ValueError):
    once a stop was asked for, whatever error ends the run is reported as that stop."""

    def __enter__(self):
        self.received = False
        self.previous = {number: signal.signal(number, self._interrupt) for number in (signal.SIGINT, signal.SIGTERM)
                         if signal.getsignal(number) is not signal.SIG_IGN}
        return self

    def _interrupt(self, number, frame):
        self.received = True
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        return False

    def caused(self, error):
        return isinstance(error, KeyboardInterrupt) or self.received
