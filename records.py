"""
The project's data files, read and written in one place.

  iter_json_records(path)  every record of a .jsonl file, or of a .json file holding one array
  file_sha256(path)        a file's content hash, for sidecars that must notice a changed input
  Skipped                  the one rule for damaged records: warn about the first five, count the rest
  chat_messages(record)    a chat record in any of the four formats -> (format, messages, other keys)
  atomic_write(path)       write to a temporary file and rename it into place (atomic_path: the same,
                           for a library that writes the file by name)

Chat formats, told apart record by record:
  conversations  {"conversations": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  (ours)
  messages       {"messages": [{"role": ..., "content": ...}, ...]}                                (OpenAI)
  sharegpt       {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}
  alpaca         {"instruction": ..., "input": ..., "output": ...}, optional "history": [[user, reply], ...]
A top-level "system" string (alpaca, LLaMA-Factory's sharegpt) becomes the first turn.
"""
import contextlib
import hashlib
import json
import os
import sys

from tqdm import tqdm

from cli import UserError

MAX_WARNINGS = 5  # damaged records reported one by one; the rest are only counted
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}


class BadRecord(Exception):
    """A damaged record: warned about and skipped, not fatal."""


class Skipped:
    """Counts damaged records; the first MAX_WARNINGS are also warned about, one line each."""

    def __init__(self, verbose: bool = True):
        self.count, self.verbose = 0, verbose

    def warn(self, where: str, reason):
        self.count += 1
        if self.verbose and self.count <= MAX_WARNINGS:
            tqdm.write(f"warning: {where}: {reason}; skipped", file=sys.stderr)  # above a progress bar


def json_value(raw: bytes):
    """The JSON value of one line, or None when it is not valid JSON or UTF-8."""
    try:
        return json.loads(raw)
    except ValueError:  # json.JSONDecodeError, UnicodeDecodeError
        return None


def iter_json_records(path: str, parse: bool = True):
    """Yield (where, value, bytes) for each record: `where` is "path line N" (or "path record N" in
    a JSON array), `value` the parsed JSON or None when the line is not valid JSON or UTF-8, `bytes`
    what the record took in the file (blank lines count with the next record; 0 inside an array).
    With parse=False a .jsonl line comes as its raw bytes, for a worker process to parse with
    json_value (the records of a JSON array are parsed either way: the file is one value)."""
    with open(path, "rb") as f:
        if f.read(1024).removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"["):
            f.seek(0)
            try:
                records = json.load(f)
            except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
                raise UserError(f"{path}: not valid JSON ({e})") from None
            yield from ((f"{path} record {i}", r, 0) for i, r in enumerate(records))
            return
        f.seek(0)
        pending = 0
        for lineno, raw in enumerate(f, 1):
            pending += len(raw)
            if not raw.strip():
                continue
            yield f"{path} line {lineno}", json_value(raw) if parse else raw, pending
            pending = 0


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()  # hashlib.file_digest would need Python 3.11
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def detect_format(record: dict):
    """(format, key holding the turns) for a record, or None. ShareGPT turns are told apart from ours by
    their "from" key, under "conversations" or "messages" alike."""
    for key in ("conversations", "messages"):
        if key in record:
            turns = record[key]
            sharegpt = isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]
            return ("sharegpt" if sharegpt else key), key
    if "instruction" in record:
        return "alpaca", None
    return None


def text_field(value, what: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{what} is {'missing' if value is None else type(value).__name__ + ', not a string'}")
    return value


def alpaca_turns(record: dict) -> list:
    """instruction + input (a blank line between) is the user turn, output the reply; "history" pairs come first."""
    prompt = text_field(record["instruction"], '"instruction"')
    extra_input = text_field(record.get("input") or "", '"input"')
    turns = []
    for i, pair in enumerate(record.get("history") or []):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise BadRecord(f'"history"[{i}] is not a [user, reply] pair')
        turns += [("user", text_field(pair[0], f'"history"[{i}][0]')),
                  ("assistant", text_field(pair[1], f'"history"[{i}][1]'))]
    turns.append(("user", prompt + ("\n\n" + extra_input if extra_input else "")))
    if "output" in record:  # without one the record is a prompt (for distill.py), with nothing to train
        turns.append(("assistant", text_field(record["output"], '"output"')))
    return turns


def chat_turns(record: dict, fmt: str, key: str) -> list:
    role_key, content_key, roles = ("from", "value", SHAREGPT_ROLES) if fmt == "sharegpt" else \
        ("role", "content", CHAT_ROLES)
    if not isinstance(record[key], list) or not record[key]:
        raise BadRecord(f'"{key}" is not a non-empty list')
    turns = []
    for i, turn in enumerate(record[key]):
        if not isinstance(turn, dict):
            raise BadRecord(f'"{key}"[{i}] is not an object')
        role = roles.get(turn.get(role_key))
        if role is None:  # a different schema (tools, function calls), not a damaged line: stop
            raise UserError(f'"{key}"[{i}]: unknown role {turn.get(role_key)!r}; expected "{role_key}": '
                            f'{", ".join(roles)}')
        turns.append((role, text_field(turn.get(content_key), f'"{key}"[{i}]["{content_key}"]')))
    return turns


def chat_messages(record) -> tuple:
    """(format, [{"role", "content"}], the record's other keys) of one chat record. BadRecord for a
    damaged one, UserError for a different schema (an unknown role), None format for no known format."""
    if not isinstance(record, dict):
        raise BadRecord("not valid JSON" if record is None else f"a JSON {type(record).__name__}, not an object")
    fmt = detect_format(record)
    if fmt is None:
        return None, [], record
    fmt, key = fmt
    turns = alpaca_turns(record) if fmt == "alpaca" else chat_turns(record, fmt, key)
    consumed = {"instruction", "input", "output", "history"} if fmt == "alpaca" else {key}
    system = record.get("system")
    if isinstance(system, str):
        consumed.add("system")
        if system and turns[0][0] != "system":
            turns.insert(0, ("system", system))
    messages = [{"role": role, "content": content} for role, content in turns]
    return fmt, messages, {k: v for k, v in record.items() if k not in consumed}


@contextlib.contextmanager
def atomic_path(path: str):
    """A temporary path to write `path` through, however the caller writes it: renamed onto `path`
    when the block ends without an error, removed otherwise. An interrupted write never leaves a
    truncated file under the real name (the rename is atomic on POSIX and Windows)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """atomic_path, opened: `with atomic_write("x.json") as f: json.dump(obj, f)`."""
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f
