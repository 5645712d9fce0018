"""
The small piece every script shares: turn the hyperparameter dataclass at the top of a
script into `--field value` flags (with optional named presets), and report user errors
(UserError) as one line instead of a traceback. Standard library only.
"""
import argparse
import dataclasses
import inspect
import json
import re
import sys
import textwrap
import typing


class UserError(ValueError):
    """Bad input or settings: a missing file, a malformed record, a flag out of range. run_guarded
    reports it as one line; any other exception is a bug and keeps its traceback."""


def die(message: str, code: int = 1):
    """Print `error: message` to stderr and exit: the way scripts report bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def never_fail_on_encoding():
    """A console or pipe that cannot show a character (Chinese on a Windows code page, say) gets a
    replacement character instead of a UnicodeEncodeError in the middle of a run."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def run_guarded(entry, cfg, errors=()):
    """Call entry(cfg) as a script's main: a UserError (or one of `errors`, such as model.py's
    ModelError) becomes one line and exit 1, Ctrl-C a quiet exit 130."""
    never_fail_on_encoding()
    try:
        return entry(cfg)
    except (UserError, *errors) as e:
        die(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line that ^C interrupted
        sys.exit(130)


def _parser_for(tp):
    """A function that turns a command-line string into a value of the field's type."""
    if typing.get_origin(tp) is typing.Union:  # Optional[X]
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        parse = _parser_for(inner)
        return lambda s: None if s.lower() in ("none", "null", "") else parse(s)
    if tp is bool:
        def parse_bool(s):
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
        return parse_bool
    if tp in (int, float, str):
        return tp
    return json.loads  # dicts and lists are given as JSON


FIELD_LINE = re.compile(r"^    (\w+)\s*:[^#]*?(?:\s#\s?(.*))?$")  # `    name: type = value  # comment`
MORE_COMMENT = re.compile(r"^\s{5,}#\s?(.*)$")  # a comment line indented past the fields: the one above goes on


def field_comments(cls) -> dict:
    """The comment beside each field of a dataclass and of the dataclasses it extends (with the comment lines
    that continue it), by field name: the comments a user reads at the top of a script are also its --help."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = textwrap.dedent(inspect.getsource(klass)).splitlines()
        except (OSError, TypeError):  # no source to read (a frozen application): --help without them
            continue
        field = None
        for line in lines:
            more = MORE_COMMENT.match(line)
            if more and field:
                comments[field] = f"{comments.get(field, '')} {more.group(1).strip()}".strip()
                continue
            match = FIELD_LINE.match(line)
            field = match.group(1) if match else None
            if match and match.group(2):
                comments[field] = match.group(2).strip()
            elif match:
                comments.pop(field, None)  # a subclass restating a field without a comment
    return comments


def parse_config(cls, argv=None, presets: typing.Optional[dict] = None, description: str = ""):
    """Build `cls` from the command line. Field defaults come from the dataclass, then the
    chosen `--preset` (a dict of overrides), then explicit flags. A field named `preset`, if
    the dataclass has one, receives the chosen preset's name."""
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=description)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="start from a named set of hyperparameters; other flags override it")
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if presets and f.name == "preset":  # filled in below from --preset
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        by_preset = "".join(f", {name}: {p[f.name]}" for name, p in (presets or {}).items() if f.name in p)
        explained = f.metadata.get("help", comments.get(f.name, "")).replace("%", "%%")  # argparse formats help
        parser.add_argument(f"--{f.name}", type=_parser_for(hints[f.name]), default=None,
                            help=f"{explained} (default: {default}{by_preset})".strip())
    args = parser.parse_args(argv)
    values = dict(presets[args.preset]) if presets and args.preset else {}
    values.update({k: v for k, v in vars(args).items() if k != "preset" and v is not None})
    if presets and args.preset and "preset" in hints:  # a config that acts on its preset's name keeps it
        values["preset"] = args.preset
    return cls(**values)
