"""
The project's data files, read and written in one place.

  iter_json_records(path)  every record of a .jsonl file, or of a .json file holding one array
  file_sha256(path)        a file's content hash, for sidecars that must notice a changed input
  Skipped                  the one rule for damaged records: warn about the first five, count the rest
  chat_messages(record)    a chat record in any of the four formats -> (format, messages, other keys)
  preference_pair(record)  a preference record in any of the three formats -> (format, prompt messages,
                           chosen reply, rejected reply, other keys)
  read_conversations(path) every conversation of a chat file (any format) as a Conversation, the damaged ones
                           warned about and skipped; conversation_of / pair_of: one record, as the readers take it
  atomic_write(path)       write to a temporary file and rename it into place (atomic_path: the same,
                           for a library that writes the file by name)

Chat formats, told apart record by record:
  conversations  {"conversations": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}  (ours)
  messages       {"messages": [{"role": ..., "content": ...}, ...]}                                (OpenAI)
  sharegpt       {"conversations": [{"from": "system"|"human"|"gpt"|"function_call"|"observation", "value": ...}]}
  alpaca         {"instruction": ..., "input": ..., "output": ...}, optional "history": [[user, reply], ...]
A top-level "system" string (alpaca, LLaMA-Factory's sharegpt) becomes the first turn.

Tools. A record may offer tools: "tools", OpenAI's list [{"type": "function", "function": {"name", "description",
"parameters"}}], or LLaMA-Factory's JSON string of a list of functions; kept with the other keys as a list in OpenAI's
form (the template lists them in the system turn). The assistant's calls become "tool_calls": [{"name": ...,
"arguments": {...}}] on its message: OpenAI's "tool_calls" ([{"id", "type": "function", "function": {"name",
"arguments": a JSON string}}], content null or text) or ours, and ShareGPT's function_call turn (its value a JSON
{"name", "arguments"} or a list of them). A result is a {"role": "tool", "content"} message: OpenAI's tool message
(its tool_call_id dropped: results answer the calls in order) or ShareGPT's observation turn. A call or tool list
that is not valid JSON makes the record damaged (warned about, counted, skipped).

Preference formats (a prompt and two assistant replies, the chosen one better), told apart the same way:
  prompt         TRL: {"prompt", "chosen", "rejected"}, each a string (a prompt string is one user turn) or a list
                 of messages (the prompt's: the history; a reply's: ending with the assistant's message). Reply
                 lists that repeat the conversation first hold the history themselves and need no "prompt" (TRL's
                 implicit prompt; its hh-rlhf-trl-style keeps only the first user turn under "prompt").
  conversations  LLaMA-Factory, MedicalGPT: a chat record above holding the history (our conversations, ShareGPT,
                 OpenAI messages, alpaca instruction/input) + "chosen"/"rejected": strings or single messages
                 ({"role", "content"} or {"from", "value"}); reported under the history's chat format.
  hh             Anthropic HH: {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": ...}, two transcripts
                 that share the conversation up to the last "\n\nAssistant:"; the rest of each is its reply.
"""
import contextlib
import hashlib
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass

from tqdm import tqdm

from cli import UserError

MAX_WARNINGS = 5  # damaged records reported one by one; the rest are only counted
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool"}
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")  # what starts an HH turn (the marker is split out)
HH_REPLY = "\n\nAssistant:"


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


def json_object(record) -> dict:
    if not isinstance(record, dict):
        raise BadRecord("not valid JSON" if record is None else f"a JSON {type(record).__name__}, not an object")
    return record


def is_sharegpt(turns) -> bool:
    """ShareGPT turns are told apart from ours by their "from" key, under any key."""
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]


def detect_format(record: dict):
    """(format, key holding the turns) for a record, or None."""
    for key in ("conversations", "messages"):
        if key in record:
            return ("sharegpt" if is_sharegpt(record[key]) else key), key
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
    return as_messages(turns)


def parsed_json(value, what: str):
    """A JSON value given as a string (LLaMA-Factory's tools and calls, OpenAI's arguments) parsed; others as they
    are."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise BadRecord(f"{what} is not valid JSON") from None


def one_call(call, what: str) -> dict:
    """{"name", "arguments": {...}} of one call: ours, or OpenAI's {"type": "function", "function": {...}} with its
    arguments as a JSON string."""
    call = call.get("function", call) if isinstance(call, dict) else None
    arguments = parsed_json(call.get("arguments", {}), f"{what} arguments") if isinstance(call, dict) else None
    if not (isinstance(arguments, dict) and isinstance(call.get("name"), str)):
        raise BadRecord(f'{what} is not a call {{"name": ..., "arguments": {{...}}}}')
    return {"name": call["name"], "arguments": arguments}


def tool_calls(value, what: str) -> list:
    """[{"name", "arguments": {...}}] of OpenAI's tool_calls, ours, or a ShareGPT function_call value (a JSON call or
    list of calls)."""
    value = parsed_json(value, what)
    calls = [one_call(call, f"{what}[{i}]") for i, call in enumerate(value if isinstance(value, list) else [value])]
    if not calls:
        raise BadRecord(f"{what} is empty")
    return calls


def tool_list(value) -> list:
    """A record's "tools" (OpenAI's list, or LLaMA-Factory's JSON string of functions) in OpenAI's form."""
    tools = parsed_json(value, '"tools"')
    functions = [t.get("function", t) if isinstance(t, dict) else None for t in tools] if isinstance(tools, list) \
        else [None]
    if not all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in functions):
        raise BadRecord('"tools" is not a list of functions with a "name"')
    return [{"type": "function", "function": f} if "function" not in t else t for t, f in zip(tools, functions)]


def chat_turns(record: dict, key: str) -> list:
    """The messages of the turns under record[key]: ours ({"role", "content"}, OpenAI's tool_calls too) or ShareGPT's
    ("from", "value")."""
    sharegpt = is_sharegpt(record[key])
    role_key, content_key, roles = ("from", "value", SHAREGPT_ROLES) if sharegpt else ("role", "content", CHAT_ROLES)
    if not isinstance(record[key], list) or not record[key]:
        raise BadRecord(f'"{key}" is not a non-empty list')
    messages = []
    for i, turn in enumerate(record[key]):
        where = f'"{key}"[{i}]'
        if not isinstance(turn, dict):
            raise BadRecord(f"{where} is not an object")
        role = roles.get(turn.get(role_key))
        if role is None:  # a different schema, not a damaged line: stop
            raise UserError(f'{where}: unknown role {turn.get(role_key)!r}; expected "{role_key}": '
                            f'{", ".join(roles)}')
        if sharegpt and turn[role_key] == "function_call":
            messages.append({"role": role, "content": "", "tool_calls": tool_calls(turn.get(content_key), where)})
            continue
        calls = turn.get("tool_calls") if role == "assistant" and not sharegpt else None
        content = turn.get(content_key)
        message = {"role": role, "content": "" if calls and content is None else
                   text_field(content, f'{where}["{content_key}"]')}
        if calls:
            message["tool_calls"] = tool_calls(calls, f'{where}["tool_calls"]')
        messages.append(message)
    return messages


def chat_messages(record) -> tuple:
    """(format, [{"role", "content"} (+ "tool_calls")], the record's other keys, "tools" parsed) of one chat record.
    BadRecord for a damaged one, UserError for a different schema (an unknown role), None format for no known
    format."""
    fmt = detect_format(json_object(record))
    if fmt is None:
        return None, [], record
    fmt, key = fmt
    messages = alpaca_turns(record) if fmt == "alpaca" else chat_turns(record, key)
    consumed = {"instruction", "input", "output", "history"} if fmt == "alpaca" else {key}
    system = record.get("system")
    if isinstance(system, str):
        consumed.add("system")
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
    extra = {k: v for k, v in record.items() if k not in consumed}
    tools = extra.pop("tools", None)
    tools = tool_list(tools) if tools not in ("", None) else []
    if tools:  # none offered ("[]" in LLaMA-Factory's plain chats): a plain chat
        extra["tools"] = tools
    return fmt, messages, extra


def as_messages(turns) -> list:
    return [{"role": role, "content": content} for role, content in turns]


def reply_of(value, key: str) -> tuple:
    """(the messages a reply repeats before it, its text) of a "chosen" or "rejected" value: a string, one message,
    or a list of messages ending with the assistant's."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        *history, last = chat_turns({key: value}, key)
        role, text = last["role"], last["content"]
        if role != "assistant":
            raise BadRecord(f'"{key}" does not end with an assistant message')
    else:
        history, text = [], text_field(value, f'"{key}"')
    if not text.strip():
        raise BadRecord(f'"{key}" is empty')
    return history, text


def hh_pair(chosen: str, rejected: str) -> tuple:
    """(prompt messages, chosen reply, rejected reply) of two HH transcripts, cut where their shared part starts
    its last assistant turn: before it the conversation, turns alternating from "Human:"; after it the replies."""
    cut = os.path.commonprefix([chosen, rejected]).rfind(HH_REPLY)
    parts = HH_TURN.split(chosen[:cut])  # ["", "Human", " text", "Assistant", " text", ...]
    roles = [HH_ROLES[who] for who in parts[1::2]]
    replies = [text[cut + len(HH_REPLY):].strip() for text in (chosen, rejected)]
    if cut < 0 or parts[0].strip() or roles != ["user", "assistant"] * (len(roles) // 2) + ["user"] or \
            any("\n\nHuman:" in reply for reply in replies):
        raise BadRecord('"chosen" and "rejected" are not two HH transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...") '
                        'that differ only in their last reply')
    return as_messages(zip(roles, (text.strip() for text in parts[2::2]))), *replies


def preference_pair(record) -> tuple:
    """(format, prompt messages ending with a user turn, chosen reply, rejected reply, the record's other keys) of
    one preference record. BadRecord for a damaged one, UserError for a different schema (an unknown role), None
    format for a record with neither "chosen" nor "rejected"."""
    record = json_object(record)
    if "chosen" not in record and "rejected" not in record:
        return None, [], "", "", record
    keys = ("chosen", "rejected")
    replies, extra = [record.get(k) for k in keys], {k: v for k, v in record.items() if k not in keys}
    if "prompt" in record or isinstance(replies[0], list):  # TRL (message lists alone: its implicit prompt)
        fmt, prompt = "prompt", extra.pop("prompt", None)
        messages = [] if prompt is None else [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
            chat_turns(record, "prompt")
    elif detect_format(extra):
        fmt, messages, extra = chat_messages(extra)
    else:
        fmt = "hh"
        messages, *replies = hh_pair(*(text_field(v, f'"{k}"') for k, v in zip(keys, replies)))
    (history, chosen), (other_history, rejected) = (reply_of(v, k) for k, v in zip(keys, replies))
    if history or other_history:  # the replies repeat the conversation: it is the prompt
        if history != other_history or history[:len(messages)] != messages:
            raise BadRecord('"chosen" and "rejected" repeat different conversations before their replies')
        messages = history
    if not messages or messages[-1]["role"] != "user":
        raise BadRecord("the prompt does not end with a user turn")
    return fmt, messages, chosen, rejected, extra


# -----------------------------------------------------------------------------
# reading a chat or preference file

@dataclass
class Conversation:
    messages: list  # [{"role": "system"|"user"|"assistant"|"tool", "content": str (, "tool_calls": [...])}, ...]
    extra: dict     # the record's other top-level keys, e.g. {"answer": "42"}, "tools" parsed
    where: str      # "data/sft.jsonl line 17", for messages about it


def record_of(where: str, record, first: bool, convert, unknown: str) -> tuple:
    """convert(record) (records.chat_messages or preference_pair) of the record at `where`, its first element the
    format. BadRecord for a damaged record (warned about and skipped); UserError for a different schema: an
    unknown role, or a file whose first record is in no known format (then it is not such a file at all: one
    error, not a warning per line). `unknown` says what was expected."""
    try:
        result = convert(record)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if result[0] is None:
        unknown = f"unknown {unknown.format(keys=', '.join(record) or 'none')}"
        if first:
            raise UserError(f"{where}: {unknown}")
        raise BadRecord(unknown)
    return result


def conversation_of(where: str, record, first: bool) -> tuple:
    """(format, messages, other keys) of one record of a chat file, as record_of; a preference pair is one line."""
    if isinstance(record, dict) and ("chosen" in record or "rejected" in record):
        raise UserError(f"{where}: a preference pair (chosen/rejected): train on it with train_dpo.py")
    return record_of(where, record, first, chat_messages,
                     "chat format (keys: {keys}); expected conversations, messages or instruction/output")


def pair_of(where: str, record, first: bool) -> tuple:
    """(format, prompt messages, chosen reply, rejected reply, other keys) of one record of a preference file, as
    record_of; a chat file is one line."""
    if first and isinstance(record, dict) and "chosen" not in record and "rejected" not in record \
            and detect_format(record):
        raise UserError(f"{where}: a chat conversation, not a preference pair (no chosen/rejected): "
                        f"train on it with train_sft.py")
    return record_of(where, record, first, preference_pair,
                     "preference format (keys: {keys}); expected prompt/chosen/rejected, a chat history with "
                     "chosen/rejected, or HH chosen/rejected transcripts")


def describe_file(path: str, formats: Counter, malformed: int, unit: str = "conversations") -> str:
    """The line that says what a chat (or preference) file held: its formats, conversations (or pairs) and
    skipped records."""
    n = sum(formats.values())
    skipped_note = f", {malformed:,} malformed records skipped" if malformed else ""
    if not n:
        raise UserError(f"{path}: no {unit}{skipped_note}")
    found = " and ".join(f"{f} ({c:,})" for f, c in formats.most_common()) if len(formats) > 1 else next(iter(formats))
    return f"{path}: {found} format{'s' if len(formats) > 1 else ''}, {n:,} {unit}{skipped_note}"


def read_conversations(path: str, verbose: bool = True) -> tuple:
    """All conversations of a chat file as Python objects (for prompts and reports: training reads
    chat shards), and stats: {"formats": Counter, "malformed": int}. With verbose, malformed records
    are warned about on stderr and one line says what was found."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    conversations, formats, skipped = [], Counter(), Skipped(verbose)
    for n, (where, record, _) in enumerate(iter_json_records(path)):
        try:
            fmt, messages, extra = conversation_of(where, record, n == 0)
        except BadRecord as e:
            skipped.warn(where, e)
            continue
        formats[fmt] += 1
        conversations.append(Conversation(messages, extra, where))
    line = describe_file(path, formats, skipped.count)
    if verbose:
        print(line)
    return conversations, {"formats": formats, "malformed": skipped.count}



# -----------------------------------------------------------------------------
# writing files

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
