"""
cli.py: what every command here shares: a mistake the user can fix is one line (UserError), so are
Ctrl-C, a closed pipe and a want of memory (start_command), and a dataclass's fields are the flags
(add_flags), each field's comment its --help.

    python gemma.py train --help    # the flags, from gemma.py's TrainConfig and GemmaConfig
"""
import argparse
import inspect
import re
import signal
import sys
from dataclasses import fields


class UserError(Exception):
    """A mistake the user can fix (a wrong path, a wrong format, a wrong flag): the one error class
    of every module here, which each command line prints as one line, with no traceback."""


def start_command(program):
    """What every command does alike from its first moment. Ctrl-C ends `program` in one line with
    status 130 (128 + SIGINT), as training's own handler does, not with a KeyboardInterrupt
    traceback; on the way out every `finally` cleans up what it made, and renames that belong
    together finish first (signals_held). A reader that goes away (`| head`) ends it quietly, as it
    ends cat, not with a BrokenPipeError (training undoes this: see checkpoint.start_processes).
    And memory that the machine does not have (a model, a batch or a block of absurd size) is one
    line too: MemoryError, or torch's "can't allocate memory" and OutOfMemoryError."""
    def interrupted(signum, frame):
        """Ctrl-C: one line, and SystemExit, so that every `finally` on the way out runs."""
        print(f"{program}: error: interrupted by Ctrl-C before it finished; nothing is left "
              "half-written: run it again", file=sys.stderr)
        sys.exit(128 + signum)
    signal.signal(signal.SIGINT, interrupted)
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    with_traceback = sys.excepthook

    def out_of_memory(kind, e, tb):
        """An uncaught error: one line if it is a want of memory, else the usual traceback."""
        if not (isinstance(e, MemoryError) or kind.__name__ == "OutOfMemoryError"
                or "can't allocate memory" in str(e)):
            return with_traceback(kind, e, tb)
        asked = re.search(r"allocate (\d+) bytes", str(e))
        asked = f" for {int(asked.group(1)) / 1e9:,.1f} GB" if asked else ""
        print(f"{program}: error: out of memory{asked}: ask for a smaller model, batch or block "
              "(a checkpoint already saved is intact)", file=sys.stderr)
    sys.excepthook = out_of_memory


def add_flags(parser, cls, skip=()):
    """Each field of the dataclass cls as a --flag, its comment as its --help. A tuple field takes
    one value or more, and is required."""
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    for f in (f for f in fields(cls) if f.name not in skip):
        kind = next(t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None))
        how = dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(type=kind)
        if kind is tuple:
            how = dict(nargs="+", required=True, metavar=f.name[:-1].upper())
        help = f"{comments.get(f.name, '')} (default: {f.default})"
        parser.add_argument(f"--{f.name}", help=help, **how)


def check_numbers(config, may_be_zero=(), error=UserError):
    """Every number among a dataclass's flags positive and below 2^63 (NaN and inf are not), those
    named in may_be_zero 0 too: else `error` naming the flag. A bool is a yes or a no here."""
    for f in fields(config):
        value = getattr(config, f.name)
        if type(value) not in (int, float):  # strings, tuples, and bools
            continue
        if not 0 <= value < 2 ** 63 or value == 0 and f.name not in may_be_zero:
            least = "at least 0" if f.name in may_be_zero else "positive"
            raise error(f"--{f.name} must be {least} and below 2^63, not {value}")
