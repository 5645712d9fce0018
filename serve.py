"""
Serve one checkpoint over an OpenAI-compatible HTTP API, with a chat page at /.

  python serve.py                                   # out/distill/best.pt on http://127.0.0.1:8000
  python serve.py --ckpt out/pretrain/best.pt --port 8001 --api_key secret

  POST /v1/chat/completions   messages -> a reply; stream true: server-sent events
  POST /v1/completions        prompt -> its continuation (for base models); stream too
  GET  /v1/models             the one model (id: --model_name, else from the checkpoint path)
  GET  /                      serve.html, a chat page that uses the API

Any OpenAI client works (base_url http://127.0.0.1:8000/v1). Understood: messages (system, developer,
user, assistant, tool; content a string or a list of text parts), tools and tool_choice (below), max_tokens (or
max_completion_tokens), temperature, top_p, stop, seed, stream, stream_options.include_usage, n (1 only), and
chat_template_kwargs.enable_thinking as vLLM and SGLang take it (false: an answer without reasoning; true:
reasoning first; absent or null: the /think or /no_think ending the latest user message that has one, Qwen3's
soft switch, else the model decides; the tags are cut before the model reads the messages); model is ignored;
top_k and repetition_penalty are the server's flags. A request without a setting gets the flag's.

The reasoning, between <think> and </think>, comes apart from the answer, in reasoning_content as
DeepSeek's API has it; content holds only the answer, both without the newlines the template puts
around them. Stop strings apply to the answer and are cut from it. Messages are rendered with the
chat template (tokenizer.render_prompt), a completion prompt as inference.py encodes it; a prompt
that leaves no room in the context is refused, and max_tokens is cut to the room left.

Tools, as OpenAI's API has them (the server never runs one): the request's tools are listed in the system turn, and
the history's assistant tool_calls and tool messages (tool_call_id dropped: results answer the calls in order) are
rendered as the template has them (records.chat_messages converts them); a tokenizer without the tool tags refuses
them. tool_choice: "auto", the default, offers the tools and the model decides; "none" offers none; "required" opens
the reply with <tool_call>, a named function ({"type": "function", "function": {"name": ...}}) with that function's
call up to its arguments, and the opening is part of the reply. A call the model writes, between <tool_call> and
</tool_call>, comes back in the message's tool_calls ({"id", "type": "function", "function": {"name", "arguments": a
JSON string}}), content holding the text outside the calls (null when there is none), and finish_reason is
"tool_calls". A stream sends each call whole, in one tool_calls delta, once its </tool_call> has come. A call that
does not parse as {"name": ..., "arguments": {...}}, or one the reply ends inside, stays in content as the text it
is, tags and all.

Requests generate together (continuous batching): one model thread decodes up to --batch_size of them
in one batch, each in a row of one KV cache at its own positions. A new request's prompt fills a
free row at the next step while the others go on decoding, and further requests wait for a row,
first come first served; a step decodes the rows up to the last one in use (rows are taken lowest
first), so a request alone costs one row, not the batch. Each row samples with its own request's
settings and seed, so a request gets the tokens it would get alone (past the trained context,
--max_seq_len's dynamic RoPE scaling rotates a step's rows by the longest one's length: then one
request decodes at a time). A request that ends, or whose client goes away mid-stream, frees its
row at the next step. Errors are OpenAI's JSON ({"error": {"message", "type", "param", "code"}})
with their status; a bug is a 500 with its traceback on stderr, and the server goes on. One line
per request to stderr: method, path, status, tokens, seconds.

The API itself (chat_completion, text_completion, models) takes a request's JSON body and gives OpenAI's
JSON, or its stream's chunks, as dicts; Handler only carries them over HTTP.
"""
import contextlib
import hmac
import ipaddress
import json
import math
import queue
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import torch

import records
from cli import UserError
from inference import Counted, LoadSettings, load_for_inference, prompt_ids, run_script
from model import sample
from tokenizer import (TOOL_PIECES, StreamDecoder, Tokenizer, render_prompt, reply_pieces, special_ids,
                       thinking_switch)
from tools import parse_call

PAGE = Path(__file__).with_name("serve.html")


@dataclass
class ServeConfig(LoadSettings):
    ckpt: str = "out/distill/best.pt"
    model_name: str = field(default="", metadata={
        "help": "the model's id in the API (empty: from the checkpoint path, out/distill/best.pt: distill-best)"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "the address to listen on; 0.0.0.0: every interface (then set --api_key)"})
    port: int = field(default=8000, metadata={"help": "0: any free port (printed)"})
    api_key: str = field(default="", metadata={
        "help": "when set, every API request must send the header Authorization: Bearer KEY"})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "larger request bodies are refused (413)"})
    max_tokens: int = field(default=0, metadata={
        "help": "new tokens for a request that does not say; 0: up to the end of the context"})
    temperature: float = field(default=0.7, metadata={"help": "for a request that does not say; 0: greedy"})
    top_p: float = field(default=0.9, metadata={"help": "for a request that does not say; 1: off"})
    top_k: int = field(default=50, metadata={"help": "every request samples from the k likeliest tokens; 0: off"})
    repetition_penalty: float = field(default=1.05, metadata={
        "help": "every request: > 1 discourages tokens already in the text; 1: off"})
    batch_size: int = field(default=8, metadata={
        "help": "requests decoded together, each in a row of one KV cache (batch_size x the context, allocated at "
                "the start); more wait for a free row"})


class ApiError(Exception):
    """A request the server refuses: the HTTP status and the fields of OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def json(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# -- the API: request bodies in, OpenAI's JSON out, as dicts; no HTTP


def number(body: dict, name: str, default, low=None, high=None, integer=False):
    """body[name], else the default when absent or null; refused unless a finite number (an integer if asked)
    from low to high."""
    value = body.get(name)
    if value is None:
        return default
    ok = not isinstance(value, bool) and (isinstance(value, int) or not integer and isinstance(value, float) and
                                          math.isfinite(value))  # JSON allows NaN, and integers past any float
    if not ok or low is not None and value < low or high is not None and value > high:
        within = "" if low is None else f" from {low} to {high}" if high is not None else f" of at least {low}"
        raise ApiError(400, f"{name}: expected {'an integer' if integer else 'a number'}{within}, got "
                            f"{json.dumps(value)}", param=name)
    return value


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# developer: OpenAI's newer name for system


def chat_messages(body: dict) -> list:
    """The request's messages as the template's [{"role", "content"}], an assistant's calls as "tool_calls":
    [{"name", "arguments": {...}}] (records.chat_messages reads OpenAI's): text parts joined, reasoning_content
    dropped (as Chat keeps only answers in its history)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of messages", param="messages")
    plain = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"{where}: expected a message whose role is system, developer, user, assistant or "
                                f"tool", param=where)
        content, calls = m.get("content"), m.get("tool_calls") if m["role"] == "assistant" else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                             isinstance(p.get("text"), str) for p in content):
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str) and not (content is None and calls):  # null beside calls, as OpenAI sends
            raise ApiError(400, f"{where}.content: expected a string or a list of text parts (the model reads text "
                                f"only)", param=f"{where}.content")
        plain.append({"role": ROLES[m["role"]], "content": content, "tool_calls": calls})
    try:
        return records.chat_messages({"messages": plain})[1]
    except records.BadRecord as e:  # a call that is not {"name", "arguments"}, its arguments not JSON
        raise ApiError(400, str(e), param="messages") from None


def request_tools(body: dict) -> list:
    """The request's tools, in OpenAI's form ([] without any)."""
    tools = body.get("tools")
    if tools is None or tools == []:
        return []
    try:
        return records.tool_list(tools)
    except records.BadRecord as e:
        raise ApiError(400, str(e), param="tools") from None


def tool_choice(body: dict, tools: list, enable_thinking) -> tuple:
    """(the tools the prompt offers, the text the reply opens with) by tool_choice: "auto" (the default) offers them
    and the model decides, "none" offers none, "required" opens the reply with a call, and a named function with
    that function's call up to its arguments; such an opening leaves no place for reasoning before it, so it is
    refused with enable_thinking true. The opening ends before the space ahead of the arguments, where a trained
    call's tokens split too (a space starts the token after it), so the model goes on as it learned to."""
    choice = body.get("tool_choice")
    if choice in (None, "auto", "none"):
        return ([] if choice == "none" else tools), ""
    names = [tool["function"]["name"] for tool in tools]
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if choice != "required" and not isinstance(name, str):
        raise ApiError(400, 'tool_choice: expected "auto", "none", "required" or {"type": "function", "function": '
                            '{"name": ...}}', param="tool_choice")
    if choice == "required" and not tools:
        raise ApiError(400, "tool_choice: required, but the request has no tools", param="tool_choice")
    if choice != "required" and name not in names:
        raise ApiError(400, f"tool_choice: no tool named {json.dumps(name)} in tools (the request's: "
                            f"{', '.join(names) or 'none'})", param="tool_choice")
    if enable_thinking:
        raise ApiError(400, "tool_choice: the reply opens with the call, so it cannot open with reasoning too: leave "
                            "out enable_thinking true (and /think)", param="tool_choice")
    opening = f"{TOOL_PIECES['tool_call']}\n"
    return tools, opening if choice == "required" else \
        opening + '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments":'


def check_tool_pieces(tok: Tokenizer, messages: list, tools: list):
    """A chat with tools, offered or in its history, is refused where the tokenizer lacks their tags."""
    if tools or any(m["role"] == "tool" or "tool_calls" in m for m in messages):
        try:
            tok.check_tool_pieces()
        except UserError as e:
            raise ApiError(400, str(e)) from None


def thinking(body: dict, messages: list) -> tuple:
    """(the messages with the /think or /no_think ending a user message cut, the template's enable_thinking): the
    request's chat_template_kwargs.enable_thinking where it is given, else the latest of those switches (Qwen3's
    soft switch holds until the next), else None (the model decides)."""
    kwargs = body.get("chat_template_kwargs")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise ApiError(400, "chat_template_kwargs: expected an object", param="chat_template_kwargs")
    asked = kwargs.get("enable_thinking")  # the other keys are for templates of other models
    if not isinstance(asked, (bool, type(None))):
        raise ApiError(400, f"chat_template_kwargs.enable_thinking: expected true or false, got {json.dumps(asked)}",
                       param="chat_template_kwargs.enable_thinking")
    out, switched = [], None
    for m in messages:
        content, switch = thinking_switch(m["content"]) if m["role"] == "user" else (m["content"], None)
        out.append({**m, "content": content})
        switched = switched if switch is None else switch
    return out, switched if asked is None else asked


def stop_strings(body: dict) -> list:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop: expected a string or a list of strings", param="stop")
    return [s for s in stop if s]


class PartText:
    """One part of a reply (the reasoning, the answer) as it streams out: stripped of surrounding whitespace if asked
    (the template's newlines around the reasoning and before the answer), and cut before the first stop string. Text
    that could still be trailing whitespace or the start of a stop string is held back until it cannot, so the
    streamed pieces join to exactly the text a non-streaming answer gets."""

    def __init__(self, stops=(), strip=True):
        self.stops, self.strip = stops, strip
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, piece: str) -> str:
        """The text that can be handed out now."""
        if self.stopped:
            return ""
        self.text += piece.lstrip() if self.strip and not self.text else piece
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self.rest()
        held = max((k for s in self.stops for k in range(len(s) - 1, 0, -1) if self.text.endswith(s[:k])), default=0)
        ready = self.text[:len(self.text) - held]
        end = len(ready.rstrip()) if self.strip else len(ready)
        new, self.sent = self.text[self.sent:end], max(self.sent, end)
        return new

    def rest(self) -> str:
        """At the end of the reply: what was held back, less trailing whitespace."""
        end = len(self.text.rstrip()) if self.strip else len(self.text)
        new, self.sent = self.text[self.sent:end], max(self.sent, end)
        return new


def completion_pieces(tok: Tokenizer, tokens) -> Iterator[tuple]:
    """A base model's continuation as ("answer", text) pieces in whole characters, up to the end of the document."""
    text = StreamDecoder(tok)
    for token in tokens:
        if token == tok.eos_id:
            break
        yield "answer", text.add(token)
    yield "answer", text.rest()


def calls_apart(pieces, parse: bool) -> Iterator[tuple]:
    """reply_pieces' pieces with each tool call whole, once it has ended: ("call", {"name", "arguments"}) when parse
    is asked for and the call is closed by its </tool_call> and parses, else its text as written, tags and all, as a
    piece of the answer (a malformed call, one the reply ends or another marker cuts short, calls not asked for)."""
    call = None  # the text of the call being written, None outside one
    for part, text in pieces:
        if call is not None and part == "call" and text:
            call += text
            continue
        if call is not None:  # it ends here: closed by an answer's "" (its </tool_call>), or cut short
            yield call_piece(call, part == "answer" and not text, parse)
            call = None
        if part == "call":  # its <tool_call>
            call = ""
        else:
            yield part, text
    if call is not None:
        yield call_piece(call, False, parse)


def call_piece(text: str, closed: bool, parse: bool) -> tuple:
    """An ended call's piece for calls_apart."""
    if parse and closed:
        with contextlib.suppress(ValueError):
            return "call", parse_call(text)
    return "answer", TOOL_PIECES["tool_call"] + text + (TOOL_PIECES["end_tool_call"] if closed else "")


def chat_reply(tok: Tokenizer, opening: list, in_think: bool, calls: bool, tokens) -> Iterator[tuple]:
    """A chat reply's pieces from its tokens: reply_pieces' (the opening the prompt ended with first, as the reply's
    own), each tool call whole (calls_apart, parsed when calls are asked for)."""
    return calls_apart(reply_pieces(tok, chain(opening, tokens), in_think), calls)


def openai_call(call: dict) -> dict:
    """A parsed call ({"name", "arguments"}) in OpenAI's form, with an id of its own."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


class Request:
    """One request in the batch. Its own thread reads the tokens that the model thread puts in `out` (None: the end;
    an exception: raised there), and sets `gone` when it stops reading early; the rest is the model thread's."""

    def __init__(self, prompt: list, settings: dict):
        self.prompt, self.settings = prompt, settings
        self.out, self.gone = queue.SimpleQueue(), False
        self.seen = self.logits = None  # (vocab_size,) each: the tokens of its text (for the repetition penalty), and
        # the logits of its next token
        self.made, self.last = 0, None  # tokens sampled so far, and the latest


class Batch:
    """Continuous batching, on the model's own thread (torch.compile's CUDA graphs keep per-thread state and are not
    safe across threads: pytorch issue 123177). The requests in flight decode together, each in a row of one KV cache
    of batch_size rows x the model's context, allocated once. A request joins at the next step, its prompt prefilled
    into a free row (through a view of that row: the others are untouched), or waits for one, first come first
    served. Each step samples a token for every row in use, with its request's own settings and generator, then runs
    one decode step over the rows up to the last one in use, each at its own position. A row is freed when its
    request is done or its caller has gone. Rows never mix, so a request's tokens are the ones it would get alone."""

    def __init__(self, model, batch_size: int, device):
        self.model, self.device = model, device
        self.rows = [None] * batch_size  # the Request decoding in each row of the cache, None: free (model thread's)
        self.waiting = deque()  # requests for a row, in the order they came
        self.changed = threading.Condition()  # guards waiting and closing; notified when either changes
        self.closing = False
        self.most_rows = 0  # the most rows in use in one decode step: how much batching there has been
        self.thread = threading.Thread(target=self.run, name="model")
        self.thread.start()

    def tokens(self, prompt: list, settings: dict) -> Iterator[int]:
        """A request's tokens (settings: sampling()'s) as the model thread samples them. Closed before their end,
        they free the request's row at the next step."""
        request = Request(prompt, settings)
        with self.changed:
            self.waiting.append(request)
            self.changed.notify()
        try:
            while (token := request.out.get()) is not None:
                if isinstance(token, Exception):
                    raise token
                yield token
        finally:
            request.gone = True

    def close(self):
        """Stop the model thread after its step; requests still in flight get an error."""
        with self.changed:
            self.closing = True
            self.changed.notify()
        self.thread.join()

    @torch.no_grad()
    def run(self):
        """The model thread: steps while there is work, until the server closes."""
        self.model.eval()
        B = len(self.rows)
        cache = self.model.decode_cache(self.model.cfg.max_seq_len, B)  # compiled: kept, at a static address
        if self.model.compiled_decoding:  # a batch of B rows has its own graph: compiled now, not in the first answer
            self.model.decode_step(*[torch.zeros(B, 1, dtype=torch.long, device=self.device)] * 2, cache)
        while self.wait():
            self.step(cache)
        with self.changed:
            for request in [r for r in self.rows if r is not None] + list(self.waiting):
                request.out.put(ApiError(503, "the server is shutting down", kind="server_error"))

    def wait(self) -> bool:
        """Block while no row is in use and no request waits; False once the server closes."""
        with self.changed:
            self.changed.wait_for(lambda: self.closing or self.waiting or any(r is not None for r in self.rows))
            return not self.closing

    def step(self, cache):
        """Free the rows whose caller has gone, prefill waiting requests into the free rows, sample a token for every
        row in use (freeing those whose request is done), and decode the rows that go on. An exception fails only the
        requests it touched; the batch goes on."""
        for b, request in enumerate(self.rows):
            if request is not None and request.gone:
                self.rows[b] = None
        for b in self.admit():
            try:
                self.prefill(b, cache)
            except Exception as e:
                self.end(b, e)
        for b, request in enumerate(self.rows):
            if request is not None:
                try:
                    self.next_token(b)
                except Exception as e:
                    self.end(b, e)
        if in_use := [b for b, request in enumerate(self.rows) if request is not None]:
            try:  # compiled: every row, the shape its graph was compiled for
                self.decode(cache, len(self.rows) if self.model.compiled_decoding else in_use[-1] + 1)
            except Exception as e:
                for b in in_use:
                    self.end(b, e)

    def admit(self) -> list:
        """The rows given to waiting requests, first come first served (those whose caller has gone dropped)."""
        admitted = []
        with self.changed:
            for b in range(len(self.rows)):
                while self.rows[b] is None and self.waiting:
                    request = self.waiting.popleft()
                    if not request.gone:
                        self.rows[b] = request
                        admitted.append(b)
        return admitted

    def prefill(self, b: int, cache):
        """Row b's prompt in one forward through that row's view of the cache: the logits of its first token."""
        request = self.rows[b]
        prompt = torch.tensor(request.prompt, device=self.device)  # (T,)
        logits = self.model(prompt[None], cache=cache.rows(b, b + 1), last_only=True,
                            positions=torch.arange(len(prompt), device=self.device))[0]  # (1, 1, vocab_size)
        request.logits = logits[0, -1].float()
        request.seen = torch.zeros(self.model.cfg.vocab_size, dtype=torch.bool, device=self.device)
        request.seen[prompt] = True

    def next_token(self, b: int):
        """Row b's next token, handed to its request; the row freed when the request is done: a stop id, or its
        max_new_tokens, which sampling() cuts to the room left in the context."""
        request = self.rows[b]
        s = request.settings
        token = sample(request.logits, s["temperature"], s["top_k"], s["top_p"], s["repetition_penalty"],
                       request.seen, s["generator"])
        request.out.put(token)
        request.made, request.last = request.made + 1, token
        request.seen[token] = True
        if token in s["stop_ids"] or request.made == s["max_new_tokens"]:
            self.end(b)

    def decode(self, cache, n: int):
        """One decode step for the first n rows: the latest token of a row in use at its position, and in a free row
        a dummy token at position 0 (what it writes there, the next prefill overwrites); each row's next logits.
        Rows are taken lowest first, so one stream alone decodes one row, not --batch_size."""
        rows = self.rows[:n]
        tokens = torch.tensor([[0 if r is None else r.last] for r in rows], device=self.device)  # (n, 1)
        positions = torch.tensor([[0 if r is None else len(r.prompt) + r.made - 1] for r in rows],
                                 device=self.device)  # (n, 1)
        part = cache if n == len(self.rows) else cache.rows(0, n)  # all rows: the cache it was compiled for
        logits = self.model.decode_step(tokens, positions, part)  # (n, vocab_size)
        for b, request in enumerate(rows):
            if request is not None:
                request.logits = logits[b]
        self.most_rows = max(self.most_rows, len(rows) - rows.count(None))

    def end(self, b: int, outcome=None):
        """Free row b, then tell its request (so it finds its row free): None, done; an exception, failed."""
        request, self.rows[b] = self.rows[b], None
        request.out.put(outcome)


class ServedModel:
    """The model behind the API and what its requests share: the Batch that decodes them."""

    def __init__(self, model, tok: Tokenizer, cfg: ServeConfig, device="cpu"):
        self.model, self.tok, self.cfg, self.device = model, tok, cfg, device
        self.name = cfg.model_name or "-".join(Path(cfg.ckpt).with_suffix("").parts[-2:])
        self.created = int(time.time())
        rows = cfg.batch_size
        if (model.cfg.rope_scaling or {}).get("rope_type") == "dynamic" and rows > 1:
            print("note: dynamic RoPE scaling (--max_seq_len past the trained context) rotates a decode step's rows by "
                  "its longest row's length, so a request's tokens would depend on the others: one request decodes "
                  "at a time", file=sys.stderr)
            rows = 1
        self.batch = Batch(model, rows, device)

    def close(self):
        self.batch.close()


@dataclass
class Tally:
    """One request's tokens, counted as it generates (the log line reads them even when it fails midway), and why
    its generation ended."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def one_choice(body: dict):
    """n: each request generates one reply."""
    if body.get("n", 1) != 1:
        raise ApiError(400, "n: only 1 is supported", param="n")


def sampling(served: ServedModel, body: dict, prompt: list, param: str, stop_id: int) -> dict:
    """This request's sampling settings, named as model.generate_stream's: its own where it gives them, else the
    server's flags; max_new_tokens cut to the room the context leaves after the prompt (`param`), which must leave
    some."""
    cfg, ctx = served.cfg, served.model.cfg.max_seq_len
    room = ctx - len(prompt)
    if room < 1:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens but the model's context is {ctx}, which must "
                            f"leave room for at least 1 new token: shorten the {param}", param=param,
                       code="context_length_exceeded")
    asked = number(body, "max_completion_tokens", None, 1, integer=True) or \
        number(body, "max_tokens", None, 1, integer=True)
    generator = torch.Generator(device=served.device)  # per request: a seed gives the same text every time
    seed = number(body, "seed", None, integer=True)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % 2 ** 64)
    return dict(max_new_tokens=min(asked or cfg.max_tokens or room, room), top_k=cfg.top_k,
                temperature=number(body, "temperature", cfg.temperature, 0, 2),
                top_p=number(body, "top_p", cfg.top_p, 0, 1), repetition_penalty=cfg.repetition_penalty,
                stop_ids=[stop_id], generator=generator)


def generated_pieces(served: ServedModel, prompt: list, settings: dict, decode, texts: dict,
                     tally: Tally) -> Iterator[tuple]:
    """generation's pieces: the request's tokens from the batch, closed (its row freed) when the caller stops early;
    the tally kept up to date. A tool call (a "call" piece) goes out as it is, past the stop strings, which are for
    text."""
    called = False
    with closing(served.batch.tokens(prompt, settings)) as stream:
        tokens = Counted(stream)
        for part, piece in decode(tokens):
            tally.completion_tokens = tokens.n
            if part == "call":
                called = True
                yield part, piece
            elif text := texts[part].add(piece):
                yield part, text
            if texts["answer"].stopped:
                break
        for part, out in texts.items():
            if text := out.rest():
                yield part, text
    tally.completion_tokens = tokens.n
    ended = texts["answer"].stopped or tokens.last in settings["stop_ids"]
    tally.finish_reason = "length" if not ended else "tool_calls" if called else "stop"


def generation(served: ServedModel, body: dict, tally: Tally, prompt: list, param: str, stop_id: int, decode,
               strip: bool) -> Iterator[tuple]:
    """The reply's (part, text) pieces, from decode(its tokens), with the request's settings checked now (before
    any answer is sent), generated in the batch when iterated."""
    settings = sampling(served, body, prompt, param, stop_id)
    texts = {"reasoning": PartText(strip=strip), "answer": PartText(stop_strings(body), strip)}
    tally.prompt_tokens = len(prompt)
    return generated_pieces(served, prompt, settings, decode, texts, tally)


def usage_chunk(head: dict, kind: str, tally: Tally, body: dict) -> Iterator[dict]:
    """OpenAI's last chunk, when stream_options.include_usage asks for it: the usage, no choices."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        yield {**head, "object": kind, "choices": [], "usage": tally.usage()}


def models(served: ServedModel, model_id: str = None) -> dict:
    """GET /v1/models: the list of the one model; with a model_id, GET /v1/models/{model_id}: that model, if it is
    this one."""
    card = {"id": served.name, "object": "model", "created": served.created, "owned_by": "tinychat"}
    if model_id is None:
        return {"object": "list", "data": [card]}
    if model_id != served.name:
        raise ApiError(404, f"the model {model_id} does not exist: this server has {served.name}",
                       code="model_not_found")
    return card


def chat_completion(served: ServedModel, body: dict, tally: Tally) -> dict | Iterator[dict]:
    """POST /v1/chat/completions: the chat.completion, or with stream true an iterator of its chunks, the tally
    counting its tokens. Refusals (ApiError) come from this call, before any chunk; the reply is generated as the
    chunks are taken."""
    one_choice(body)
    tok = served.tok
    messages, enable_thinking = thinking(body, chat_messages(body))
    tools = request_tools(body)
    check_tool_pieces(tok, messages, tools)
    tools, opening = tool_choice(body, tools, enable_thinking)
    opened = tok.encode(opening)  # the end of the prompt, and the start of the reply
    prompt = render_prompt(tok, messages, add_generation_prompt=True, enable_thinking=enable_thinking, tools=tools)
    pieces = generation(served, body, tally, prompt + opened, "messages", special_ids(tok)["im_end"],
                        partial(chat_reply, tok, opened, enable_thinking is True, bool(tools)), strip=True)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
    if body.get("stream"):
        return chat_chunks(pieces, head, tally, body)
    texts, calls = {"reasoning": [], "answer": []}, []
    with closing(pieces):
        for part, piece in pieces:
            (calls if part == "call" else texts[part]).append(piece)
    content = "".join(texts["answer"])
    message = {"role": "assistant", "content": content if content or not calls else None,  # OpenAI's null
               "reasoning_content": "".join(texts["reasoning"]) or None}
    if calls:
        message["tool_calls"] = [openai_call(call) for call in calls]
    return {**head, "object": "chat.completion", "choices": [
        {"index": 0, "message": message, "finish_reason": tally.finish_reason, "logprobs": None}],
        "usage": tally.usage()}


def chat_chunks(pieces, head: dict, tally: Tally, body: dict) -> Iterator[dict]:
    """A streamed chat completion: the assistant's role first (sent while the request may still wait its turn),
    then each piece as a content or reasoning_content delta, or a call as a tool_calls delta (whole, numbered by its
    index among the calls), then the finish reason."""
    def chunk(delta, finish_reason=None):
        return {**head, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    yield chunk({"role": "assistant", "content": ""})
    calls = 0
    with closing(pieces):
        for part, piece in pieces:
            if part == "call":
                yield chunk({"tool_calls": [{"index": calls, **openai_call(piece)}]})
                calls += 1
            else:
                yield chunk({"reasoning_content" if part == "reasoning" else "content": piece})
    yield chunk({}, tally.finish_reason)
    yield from usage_chunk(head, "chat.completion.chunk", tally, body)


def text_choice(text: str, finish_reason=None) -> dict:
    return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}


def text_completion(served: ServedModel, body: dict, tally: Tally) -> dict | Iterator[dict]:
    """POST /v1/completions: the prompt's text_completion, or with stream true an iterator of its chunks; refusals
    as chat_completion's."""
    one_choice(body)
    tok, prompt = served.tok, body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:  # a batch of one prompt
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt: expected a string", param="prompt")
    prompt = prompt_ids(tok, prompt)
    pieces = generation(served, body, tally, prompt, "prompt", tok.eos_id, partial(completion_pieces, tok),
                        strip=False)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": served.name}
    if body.get("stream"):
        return text_chunks(pieces, head, tally, body)
    with closing(pieces):
        continuation = "".join(text for _, text in pieces)
    return {**head, "choices": [text_choice(continuation, tally.finish_reason)], "usage": tally.usage()}


def text_chunks(pieces, head: dict, tally: Tally, body: dict) -> Iterator[dict]:
    """A streamed text completion: each piece, then the finish reason."""
    with closing(pieces):
        for _, text in pieces:
            yield {**head, "choices": [text_choice(text)]}
    yield {**head, "choices": [text_choice("", tally.finish_reason)]}
    yield from usage_chunk(head, "text_completion", tally, body)


API_ROUTES = {"/v1/chat/completions": chat_completion, "/v1/completions": text_completion}


# -- HTTP: request bodies read, the API's dicts written as JSON bodies and server-sent events


def parse_body(data: bytes) -> dict:
    try:
        body = json.loads(data)
    except ValueError as e:  # not UTF-8, or not JSON
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


class JsonHandler(BaseHTTPRequestHandler):
    """The wire side of a request: its body read whole, the answer written as JSON or as server-sent events, refusals
    as OpenAI's error JSON. self.status keeps the status sent, for the log line."""
    protocol_version = "HTTP/1.1"  # JSON answers keep the connection open; a stream closes it at its end
    server_version = "tinychat"
    disable_nagle_algorithm = True  # each streamed piece goes out at once
    write_timeout = 60  # seconds: a client that stops reading a stream is dropped, and frees its row
    streaming = False  # whether a stream's status line has gone out: an error then can only be one more event

    def read_body(self, limit: int) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", 0))
        except ValueError:
            length = -1
        if length < 0 or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # where the body ends is unknown here
            raise ApiError(411, "send the body with a Content-Length header, its size in bytes (chunked bodies are "
                                "not read)")
        if length > limit:
            left = length
            while left > 0:  # read and dropped: a client that sends it all before reading gets this answer too
                chunk = self.rfile.read(min(left, 1 << 16))
                left = left - len(chunk) if chunk else 0
            raise ApiError(413, f"the request body is {length} bytes, more than this server's {limit} "
                                f"(--max_body_bytes)", code="request_too_large")
        return self.rfile.read(length)

    def send_body(self, status: int, data: bytes, content_type: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, obj: dict, status: int = 200):
        self.send_body(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json")

    def send_stream(self, chunks: Iterator[dict]):
        """Server-sent events, each chunk as soon as it is made, then [DONE]. The chunks are closed even when the
        client has gone: that stops their generation, and frees its row of the batch."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends with the connection
        self.end_headers()
        self.close_connection, self.streaming = True, True
        self.connection.settimeout(self.write_timeout)
        with closing(chunks):
            for chunk in chunks:
                self.send_event(chunk)
        self.wfile.write(b"data: [DONE]\n\n")

    def send_event(self, obj: dict):
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def error(self, e: ApiError):
        """Tell the client: a JSON answer with the status, or, once a stream has started, an event with the error."""
        try:
            if self.streaming:
                self.status = f"200+{e.status}"
                self.send_event(e.json())
            else:
                self.send_json(e.json(), e.status)
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, an unsupported method) in OpenAI's JSON too."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        self.send_json(ApiError(code, message or self.responses.get(code, ("error",))[0]).json(), code)

    def send_response(self, code, message=None):
        self.status = code
        super().send_response(code, message)

    def log_request(self, code="-", size="-"):
        pass  # Handler.answer logs each request once, with its tokens and time


class Handler(JsonHandler):
    """One connection's requests, routed to the API (each connection has its own thread; the model is shared through
    self.server.served)."""

    def do_GET(self):
        self.answer(self.get)

    def do_POST(self):
        self.answer(self.post)

    def answer(self, route):
        """Run one request: refusals and bugs become OpenAI's error JSON; one line on stderr."""
        t0, self.status, self.tally, self.streaming, gone = time.perf_counter(), None, Tally(), False, ""
        try:
            route(urlsplit(self.path).path)
        except ApiError as e:
            self.error(e)
        except (ConnectionError, TimeoutError):  # the client went away (or stopped reading): nothing to tell it
            self.close_connection, gone = True, " (client gone)"
        except Exception as e:
            traceback.print_exc()
            self.error(ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))
        print(f"{self.command} {self.path} {self.status} {self.tally.completion_tokens} tokens "
              f"{time.perf_counter() - t0:.2f}s{gone}", file=sys.stderr, flush=True)

    def get(self, path):
        if path == "/":  # no key asked: the page holds nothing, and asks for the key itself
            return self.send_body(200, self.server.page, "text/html; charset=utf-8")
        self.check_key()
        if path == "/v1/models":
            return self.send_json(models(self.server.served))
        if path.startswith("/v1/models/"):
            return self.send_json(models(self.server.served, path.removeprefix("/v1/models/")))
        raise ApiError(404, f"no such route: GET {path}", code="unknown_url")

    def post(self, path):
        # the body first, whatever the answer: an unread body would be read as the next request
        data = self.read_body(self.server.cfg.max_body_bytes)
        self.check_key()
        if path not in API_ROUTES:
            raise ApiError(404, f"no such route: POST {path}", code="unknown_url")
        answer = API_ROUTES[path](self.server.served, parse_body(data), self.tally)
        if isinstance(answer, dict):
            return self.send_json(answer)
        self.send_stream(answer)

    def check_key(self):
        key = self.server.cfg.api_key
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if key and not hmac.compare_digest(given.encode(), key.encode()):
            problem = "incorrect API key" if given else "no API key"
            raise ApiError(401, f"{problem}: send the header Authorization: Bearer KEY with the server's --api_key",
                           code="invalid_api_key")


class ChatServer(ThreadingHTTPServer):
    """The API over HTTP in front of one ServedModel, each connection in a thread of its own. Closing the server
    closes the connections still open (a client's keep-alive) and waits for their threads: a thread left to wake up
    while the interpreter exits would free the tensors it holds then, and that aborts the process."""
    daemon_threads = False  # server_close() joins them

    def __init__(self, model, tok: Tokenizer, cfg: ServeConfig, device="cpu"):
        self.cfg, self.served = cfg, ServedModel(model, tok, cfg, device)
        self.page = PAGE.read_bytes()
        self.connections = set()  # the sockets of the connections being served
        super().__init__((cfg.host, cfg.port), Handler)  # last: a port it cannot have calls server_close

    def process_request_thread(self, request, client_address):
        self.connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.discard(request)

    def server_close(self):
        for connection in list(self.connections):  # a thread waiting for the next request wakes up and ends
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        super().server_close()
        self.served.close()


def run(cfg: ServeConfig):
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size {cfg.batch_size}: at least 1")
    model, tok, device = load_for_inference(cfg)
    try:
        server = ChatServer(model, tok, cfg, device)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}") from None
    host, port = server.server_address[:2]
    if not ipaddress.ip_address(host).is_loopback and not cfg.api_key:
        print(f"warning: listening on {host}, reachable from other machines, with no --api_key", file=sys.stderr)
    print(f"serving {server.served.name} at http://{host}:{port}/ (API: http://{host}:{port}/v1); Ctrl-C stops",
          file=sys.stderr, flush=True)
    with server:
        server.serve_forever()


def main(argv=None):
    run_script(run, ServeConfig, __doc__, argv)


if __name__ == "__main__":
    main()
