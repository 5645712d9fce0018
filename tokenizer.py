"""
The tokenizer, in one place: one interface over the two kinds of tokenizer file, the special
pieces every script agrees on, the chat template (rendering, encoding, parsing a reply as it streams),
decoding a stream of ids into text as it is generated, and the dtype token files store ids in.

  tokenizer.model   SentencePiece: ours, made by train_tokenizer.py
  tokenizer.json    Hugging Face's tokenizers library: an imported model's own (SmolLM2, Llama 3.2, ...)

Special pieces are single tokens that are never split: <|im_start|> <|im_end|> (the chat
template), <think> </think> (reasoning), plus the end of a document (eos), bos and pad. Their ids
are always looked up by piece, never hard-coded, so any tokenizer that has them works.
train_tokenizer.py puts them all in its tokenizer.model (<unk>=0 <s>=1 </s>=2 <pad>=3). A
tokenizer.json takes eos, bos and pad from the tokenizer_config.json beside it (else from common
piece names), and add_chat_pieces() appends the markers an imported tokenizer lacks; tokenizer_json() makes
a tokenizer.json that encodes exactly as a tokenizer.model does (convert_hf.py's export).

The chat template (ChatML), the same as CHAT_TEMPLATE_JINJA:
  <|im_start|>{role}\\n{content}<|im_end|>\\n  per turn, then <|im_start|>assistant\\n to ask for a reply,
  which ends at <|im_end|>; reasoning in <think>...</think> at the start of an assistant turn.
  enable_thinking (Qwen3's switch) puts after that header: False, EMPTY_THINK, the empty block an ordinary reply
  opens with; True, an open <think>\\n (it must reason); None, the default, nothing (the model decides).
Ids, turn by turn: the <|im_start|> id, encode(role + "\\n"), encode(content), the <|im_end|> id,
encode("\\n"). Text is encoded piece by piece, so it never merges with a marker or with the next piece.
Markers typed inside content (<think>, even <|im_end|>) become their single ids, as in Hugging Face's tokenizers.
Labels: the id itself for each assistant turn's content and its <|im_end|>; IGNORE_INDEX (no loss) for everything
else: system and user turns, every role header, and the "\\n" after <|im_end|> (so the model learns to stop at
<|im_end|>). Every assistant turn of a conversation is trained.
"""
import functools
import json
import os
import struct
from collections import deque
from multiprocessing import Pool
from typing import Iterator, Optional

import numpy as np
import sentencepiece as spm
import tokenizers

from cli import UserError

# name -> piece; train_tokenizer.py adds them to every vocabulary, add_chat_pieces to an imported one. Every chat needs
# the first four; the tool tags (Qwen's) only a chat with tools, so a tokenizer from before them still chats.
CHAT_PIECES = {"im_start": "<|im_start|>", "im_end": "<|im_end|>", "think": "<think>", "end_think": "</think>"}
TOOL_PIECES = {"tool_call": "<tool_call>", "end_tool_call": "</tool_call>", "tool_response": "<tool_response>",
               "end_tool_response": "</tool_response>"}
SPECIAL_PIECES = {**CHAT_PIECES, **TOOL_PIECES}
# The chat markers are special tokens in every tokenizer we write or extend (hidden by decoders that skip
# special pieces, control tokens in llama.cpp); the think and tool tags are not, so they stay in decoded text.
CHAT_MARKERS = (SPECIAL_PIECES["im_start"], SPECIAL_PIECES["im_end"])
# A tokenizer.json's roles when no tokenizer_config.json names them: the first of these pieces it has
# (Llama 2 and TinyLlama; SmolLM2 and GPT-2; Llama 3).
ROLE_PIECES = {"eos": ("</s>", "<|endoftext|>", "<|end_of_text|>"), "bos": ("<s>", "<|begin_of_text|>"),
               "pad": ("<pad>",)}


class Tokenizer:
    """A tokenizer.model or a tokenizer.json behind one interface (make one with load_tokenizer). encode never
    adds bos or eos, and a special piece typed in the text becomes its one id; decode keeps the chat markers
    visible. vocab_size counts every id the tokenizer can produce; bos_id may be None."""

    def __init__(self, path: str, backend):
        self.path = path
        self.sp = backend if isinstance(backend, spm.SentencePieceProcessor) else None
        self.hf = None if self.sp else backend
        if self.sp:
            self.vocab_size = self.sp.get_piece_size()
            self.eos_id, self.bos_id, pad_id = (i if i >= 0 else None
                                                for i in (self.sp.eos_id(), self.sp.bos_id(), self.sp.pad_id()))
        else:
            self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
            named = configured_roles(path)
            self.eos_id, self.bos_id, pad_id = (self._first_piece_id(named.get(role), *ROLE_PIECES[role])
                                                for role in ("eos", "bos", "pad"))
        # pad only fills rows after their end, under targets the loss skips: without a <pad> piece, eos does
        self.pad_id = self.eos_id if pad_id is None else pad_id

    @functools.cached_property
    def chat_ids(self) -> dict:
        """The ids of the chat markers, looked up by piece, the tool tags (None where the tokenizer lacks them) and
        pad; checked, as a tokenizer without the markers cannot render the template, nor one that puts a space
        before every text it encodes (SentencePiece's dummy prefix, kept by the tokenizer.json of Llama 2 and
        TinyLlama): the template is encoded piece by piece (the chat template below), and would not decode to
        itself. Computed on first use (a failed check is not kept, and raises again), then kept: the template asks
        for it per conversation."""
        ids = {name: self.piece_id(piece) for name, piece in SPECIAL_PIECES.items()}
        for name in CHAT_PIECES:
            if ids[name] is None:
                raise UserError(f"{self.path}: the tokenizer has no {SPECIAL_PIECES[name]} piece; {self.fix}")
        user, newline = self.encode_batch(["user", "\n"])
        if self.decode(user + newline) != "user\n":
            raise UserError(f"{self.path}: the tokenizer puts a space before every text it encodes, so it cannot "
                            f"encode the chat template piece by piece (not supported yet)")
        return {**ids, "pad": self.pad_id}

    @property
    def fix(self) -> str:
        """How to get a tokenizer with every special piece."""
        return "import the model with python convert_hf.py, which adds it" if self.hf else \
            "train one with python train_tokenizer.py"

    def check_tool_pieces(self):
        """UserError unless the tokenizer has the tool tags: a chat with tools needs them."""
        missing = [piece for name, piece in TOOL_PIECES.items() if self.chat_ids[name] is None]
        if missing:
            raise UserError(f"{self.path}: the tokenizer has no {missing[0]} piece, so the model cannot call tools; "
                            f"{self.fix}")

    def encode(self, text: str) -> list:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list) -> list:
        if self.sp:  # one thread: dataset.py's worker pool is the parallelism, and other batches are a few texts
            return self.sp.encode(texts, num_threads=1)
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        # sentencepiece shows its user-defined pieces (the chat markers) and drops <s> </s> <pad>; tokenizers
        # shows the chat markers, special there, only with skip_special_tokens=False (and then eos too)
        return self.sp.decode(ids) if self.sp else self.hf.decode(ids, skip_special_tokens=False)

    def piece_id(self, piece: str) -> Optional[int]:
        """The id of a piece; None when the vocabulary lacks it."""
        if self.hf:
            return self.hf.token_to_id(piece)
        i = self.sp.piece_to_id(piece)  # <unk>'s id for a piece it lacks
        return i if self.sp.id_to_piece(i) == piece else None

    def _first_piece_id(self, *pieces) -> Optional[int]:
        """The id of the first of these pieces the vocabulary has (None is skipped)."""
        return next((i for i in map(self.piece_id, filter(None, pieces)) if i is not None), None)


def configured_roles(path: str) -> dict:
    """{"eos": piece, "bos": ..., "pad": ...} as the tokenizer_config.json beside a tokenizer.json names them
    (transformers writes a string, or {"content": piece}, or null); {} without that file."""
    config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if not os.path.isfile(config):
        return {}
    try:
        with open(config, encoding="utf-8") as f:
            settings = json.load(f)
    except ValueError:
        settings = None
    if not isinstance(settings, dict):
        raise UserError(f"{config}: not a JSON object")
    pieces = {role: settings.get(f"{role}_token") for role in ROLE_PIECES}
    return {role: p.get("content") if isinstance(p, dict) else p for role, p in pieces.items()}


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of a tokenizer.model or (any path ending .json) tokenizer.json file."""
    path = os.fspath(path)
    is_json = path.endswith(".json")
    if not os.path.isfile(path):
        make = "import a model with python convert_hf.py" if is_json else "make one with python train_tokenizer.py"
        raise UserError(f"{path}: no such tokenizer; {make}")
    try:
        backend = tokenizers.Tokenizer.from_file(path) if is_json else spm.SentencePieceProcessor(model_file=path)
    except Exception:  # tokenizers raises a bare Exception for a file it cannot parse
        raise UserError(f"{path}: not a {'tokenizer.json' if is_json else 'SentencePiece model'}") from None
    tok = Tokenizer(path, backend)
    if tok.eos_id is None:
        raise UserError(f"{path}: the tokenizer has no end-of-document piece (eos)")
    return tok


def special_ids(tok: Tokenizer) -> dict:
    """The ids of the chat markers, looked up by piece, and pad (Tokenizer.chat_ids: checked once per tokenizer)."""
    return dict(tok.chat_ids)


def add_chat_pieces(src: str, dst: str) -> list:
    """Write a copy of the tokenizer.json src to dst (which may be src; write through records.atomic_path where
    a half-written file must never stand) with the special pieces it lacks appended; return
    their new ids (the end of the vocabulary, in SPECIAL_PIECES order: a model needs as many more
    embedding rows). The chat markers are special, as in the tokenizers of Qwen and SmolLM2 (hidden by
    decoders that skip special pieces); the think and tool tags are not, so they stay in decoded text."""
    hf = tokenizers.Tokenizer.from_file(src)
    added = []
    for piece in SPECIAL_PIECES.values():
        if hf.token_to_id(piece) is None:
            special = piece in CHAT_MARKERS
            token = tokenizers.AddedToken(piece, special=special, normalized=False, lstrip=False, rstrip=False,
                                          single_word=False)
            (hf.add_special_tokens if special else hf.add_tokens)([token])
            added.append(hf.token_to_id(piece))
    hf.save(dst)
    return added


def without_space_prefix(src: str, dst: str) -> bool:
    """Copy the tokenizer.json src to dst (as add_chat_pieces writes it) without the space a Llama 2 style
    tokenizer puts before every text it encodes (SentencePiece's dummy prefix: a Prepend("▁") normalizer or a
    Metaspace pre-tokenizer that prepends, and the decoder's Strip that takes it off again); return whether it
    had one. The template is
    encoded piece by piece, and its pieces follow a newline or a marker, where pretraining text had no prefix."""
    with open(src, encoding="utf-8") as f:
        spec = json.load(f)
    found = False

    def without(component, key: str, unwanted):
        """The component with its steps for which unwanted(step) holds removed (a Sequence lists them under key)."""
        nonlocal found
        steps = (component or {}).get(key, [component] if component else [])
        kept = [step for step in steps if not unwanted(step)]
        found |= len(kept) < len(steps)
        return component if len(kept) == len(steps) else {"type": "Sequence", key: kept} if kept else None

    spec["normalizer"] = without(spec.get("normalizer"), "normalizers", lambda step: step.get("type") == "Prepend")
    for step in (spec.get("pre_tokenizer") or {}).get("pretokenizers", [spec.get("pre_tokenizer") or {}]):
        if step.get("type") == "Metaspace" and (step.get("prepend_scheme", "always") != "never"
                                                or step.get("add_prefix_space")):
            step.update(prepend_scheme="never", add_prefix_space=False)
            found = True
    if found:
        spec["decoder"] = without(spec.get("decoder"), "decoders",
                                  lambda step: step.get("type") == "Strip" and step.get("start"))
        for step in (spec["decoder"] or {}).get("decoders", [spec["decoder"] or {}]):
            if step.get("type") == "Metaspace":  # it would also drop a real leading space
                step.update(prepend_scheme="never", add_prefix_space=False)
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    return found


# -----------------------------------------------------------------------------
# tokenizing in worker processes (dataset.py, dataset_sft.py)

_worker_tokenizer = None  # each worker process loads its own tokenizer once


def init_worker(tokenizer_path: str, in_pool: bool):
    global _worker_tokenizer
    if in_pool:  # the pool is the parallelism: the tokenizers library's own threads would only compete with it
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def worker_tokenizer() -> Tokenizer:
    """The tokenizer of this worker process (of tokenize_in_order)."""
    return _worker_tokenizer


def tokenize_in_order(tasks, tokenizer_path: str, num_workers: int, work):
    """work(task) for each task in parallel, yielding results in input order; each worker process has
    the tokenizer loaded (worker_tokenizer). At most 4 tasks per worker are in flight: Pool.imap would
    read the whole corpus into its task queue as fast as the disk allows."""
    if num_workers <= 1:
        init_worker(tokenizer_path, in_pool=False)
        yield from map(work, tasks)
        return
    with Pool(num_workers, initializer=init_worker, initargs=(tokenizer_path, True)) as pool:
        pending = deque()
        for task in tasks:
            pending.append(pool.apply_async(work, (task,)))
            if len(pending) >= 4 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# -----------------------------------------------------------------------------
# a tokenizer.model as a tokenizer.json (for the Hugging Face export)

def _varint(buf: bytes, pos: int):
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _proto_fields(buf: bytes):
    """Yield (field number, value) of a serialized protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise UserError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def read_sentencepiece(path: str) -> dict:
    """Pieces, scores, piece types and the settings an exact tokenizer.json depends on, read from
    the .model protobuf directly (sentencepiece's Python API hides piece types, and its proto
    module needs the protobuf package). Field numbers: sentencepiece_model.proto."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        pieces, trainer, normalizer = [], {}, {}
        for number, value in _proto_fields(data):
            if number == 1:
                piece = dict(_proto_fields(value))
                pieces.append((piece[1].decode("utf-8"), struct.unpack("<f", piece.get(2, b"\0\0\0\0"))[0],
                               piece.get(3, 1)))  # type 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
            elif number == 2:
                trainer = dict(_proto_fields(value))
            elif number == 3:
                normalizer = dict(_proto_fields(value))
    except (OSError, ValueError, IndexError, KeyError, UnicodeDecodeError, struct.error):
        raise UserError(f"{path}: cannot read the SentencePiece model") from None
    return {"pieces": pieces, "bpe": trainer.get(3, 1) == 2,
            "normalizer": normalizer.get(1, b"nmt_nfkc").decode(), "add_dummy_prefix": bool(normalizer.get(3, 1)),
            "remove_extra_whitespaces": bool(normalizer.get(4, 1)), "byte_fallback": bool(trainer.get(35, 0)),
            "whitespace_as_suffix": bool(trainer.get(24, 0))}


def tokenizer_json(spm_info: dict) -> dict:
    """A `tokenizers` BPE tokenizer that encodes exactly like the SentencePiece model:
    spaces become ▁ and nothing else is normalized, special and user-defined pieces are
    matched first, byte fallback for unknown characters, and merges ranked by piece score
    (SentencePiece's BPE merges the highest-scoring available pair first). One difference, as
    in every HF Llama tokenizer: the literal text "</s>" (or <s>, <pad>, <unk>) becomes that
    special token, where SentencePiece spells it out character by character."""
    pieces = spm_info["pieces"]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    normal = {piece for piece, _, kind in pieces if kind == 1}
    merges = []  # (rank key, left, right)
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != 1:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append(((-score, i, cut), left, right))
    merges.sort()
    added = [{"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind != 4 or piece in CHAT_MARKERS}
             for i, (piece, _, kind) in enumerate(pieces) if kind in (2, 3, 4)]
    unk = next((piece for piece, _, kind in pieces if kind == 2), None)
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": spm_info["byte_fallback"],
                  "ignore_merges": False, "vocab": vocab, "merges": [[left, right] for _, left, right in merges]},
    }


# -----------------------------------------------------------------------------
# the chat template

IGNORE_INDEX = -100  # targets the loss skips (model.py: cross_entropy ignore_index)
# Qwen3's empty think block: how an ordinary reply (no reasoning) opens in the training data
EMPTY_THINK = "<think>\n\n</think>\n\n"
# What follows the generation prompt, by enable_thinking: None, nothing (the model decides whether to reason); False,
# the empty block (it answers at once, as Qwen3's template has it); True, an open block (it must reason).
THINKING_PREFILL = {None: "", False: EMPTY_THINK, True: "<think>\n"}
# The prefill is encoded with this word after it, which is then cut off (template_texts, assemble), so its ids are
# the ones it has at the start of a trained reply, where the answer follows it. Encoded alone its trailing newlines
# can differ: GPT-2's byte-level pre-tokenizer (SmolLM2's) makes "\n\n" one token at the end of a text, two before a
# word. The cut is exact where no token joins a newline to the letter after it: our tokenizer.model (trained line by
# line: a newline is always its byte piece) and the pre-tokenizers of GPT-2, Llama 3 and Qwen all split there.
PREFILL_FOLLOWER = "Hello"
# Qwen3's soft switch: a user message ending in one of these asks for reasoning, or for none (thinking_switch)
THINKING_SWITCHES = {"/think": True, "/no_think": False}
# Tools, in the layout of Qwen3's template (which transformers, llama.cpp and ollama parse for ChatML models): the
# system turn lists them between <tools> tags, one JSON object per line, after the system prompt and a blank line if
# there is one. Without Qwen's instructions on how to call (89 tokens, a third of the cpu model's 256): our models
# learn the calls from their data, and every token of the list is one less for the problem and its working.
TOOLS_INTRO = "# Tools\n\n<tools>"
TOOLS_OUTRO = "\n</tools>"
# The template in Jinja, for tokenizer_config.json (convert_hf.py, and so the GGUF) and transformers'
# apply_chat_template(messages, tools=...), whose enable_thinking=False / True (chat_template_kwargs in vLLM and SGLang)
# renders as render_text's. A call may also come as OpenAI's {"function": {...}}, its arguments as a JSON string.
CHAT_TEMPLATE_JINJA = (
    "{%- if tools %}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{ " + json.dumps(TOOLS_INTRO) + " }}{%- for tool in tools %}{{ '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{ " + json.dumps(TOOLS_OUTRO) + " + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first and tools %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user\\n' }}"
    "{%- else %}{{ '\\n' }}{%- endif %}"
    "{{ '<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if message['content'] %}{{ message['content'] + '\\n' }}{%- endif %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- if call['function'] is defined %}{%- set call = call['function'] %}{%- endif %}"
    "{%- if not loop.first %}{{ '\\n' }}{%- endif %}"
    "{{ '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{%- if call['arguments'] is string %}{{ call['arguments'] }}"
    "{%- else %}{{ call['arguments'] | tojson }}{%- endif %}"
    "{{ '}\\n</tool_call>' }}{%- endfor %}{{ '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- elif enable_thinking is defined and enable_thinking is true %}{{ '<think>\\n' }}{%- endif %}"
    "{%- endif %}")


def thinking_switch(message: str) -> tuple:
    """(the message without a trailing /think or /no_think, True for /think, False for /no_think, None without
    either): Qwen3's soft switch, typed at the end of a user message (alone, or after a space or a newline)."""
    stripped = message.rstrip()
    for tag, thinking in THINKING_SWITCHES.items():
        rest = stripped.removesuffix(tag)
        if rest != stripped and (not rest or rest[-1].isspace()):
            return rest.rstrip(), thinking
    return message, None


def call_text(call: dict) -> str:
    """One tool call ({"name", "arguments": {...}}) as the assistant writes it."""
    body = json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False)
    return f"{TOOL_PIECES['tool_call']}\n{body}\n{TOOL_PIECES['end_tool_call']}"


def chatml_turns(messages, tools=None) -> list:
    """The conversation as plain ChatML turns [{"role", "content"}], as CHAT_TEMPLATE_JINJA lays it out: the tools
    listed in the system turn, an assistant's calls after its content (one newline between), and each run of tool
    results one user turn of <tool_response> blocks. A conversation without tools or calls is its own turns."""
    turns, messages = [], list(messages)
    if tools:
        prompt = messages.pop(0)["content"] + "\n\n" if messages and messages[0]["role"] == "system" else ""
        listed = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
        turns.append({"role": "system", "content": prompt + TOOLS_INTRO + listed + TOOLS_OUTRO})
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            result = f"{TOOL_PIECES['tool_response']}\n{m['content']}\n{TOOL_PIECES['end_tool_response']}"
            if i and messages[i - 1]["role"] == "tool":
                turns[-1]["content"] += "\n" + result
            else:
                turns.append({"role": "user", "content": result})
        elif m.get("tool_calls"):
            calls = "\n".join(map(call_text, m["tool_calls"]))
            turns.append({"role": m["role"], "content": m["content"] + "\n" + calls if m["content"] else calls})
        else:
            turns.append({"role": m["role"], "content": m["content"]})
    return turns


def render_text(messages, add_generation_prompt: bool = False, enable_thinking: Optional[bool] = None,
                tools=None) -> str:
    """The template as text: what CHAT_TEMPLATE_JINJA renders and what render_prompt's ids decode to."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chatml_turns(messages, tools))
    return text + ("<|im_start|>assistant\n" + THINKING_PREFILL[enable_thinking] if add_generation_prompt else "")


def encode_conversation(tok: Tokenizer, messages, add_generation_prompt: bool = False,
                        enable_thinking: Optional[bool] = None, tools=None) -> tuple:
    """(ids, labels), two lists of ints of the same length: the rendered conversation, and the id
    where it is trained (assistant content and its <|im_end|>, tool calls included), IGNORE_INDEX elsewhere."""
    turns = chatml_turns(messages, tools)
    pieces = tok.encode_batch(template_texts(turns, add_generation_prompt, enable_thinking))  # one call, all turns
    return assemble(special_ids(tok), turns, pieces, add_generation_prompt, enable_thinking)


def template_texts(turns, add_generation_prompt: bool = False, enable_thinking: Optional[bool] = None) -> list:
    """The texts the template encodes, piece by piece, between its marker ids, for chatml_turns' turns (a
    conversation without tools is its own turns); a thinking prefill as two texts,
    itself followed by PREFILL_FOLLOWER, then PREFILL_FOLLOWER alone (assemble keeps the difference)."""
    texts = [t for m in turns for t in (m["role"] + "\n", m["content"], "\n")]
    if not add_generation_prompt:
        return texts
    prefill = THINKING_PREFILL[enable_thinking]
    return texts + ["assistant\n"] + ([prefill + PREFILL_FOLLOWER, PREFILL_FOLLOWER] if prefill else [])


def assemble(s: dict, turns, pieces: list, add_generation_prompt: bool = False,
             enable_thinking: Optional[bool] = None) -> tuple:
    """encode_conversation's (ids, labels) from the encoded template_texts(turns) and the special ids."""
    ids, labels = [], []
    for i, m in enumerate(turns):
        header, content, newline = pieces[3 * i:3 * i + 3]
        body = content + [s["im_end"]]
        ids += [s["im_start"], *header, *body, *newline]
        labels += [IGNORE_INDEX] * (1 + len(header))
        labels += body if m["role"] == "assistant" else [IGNORE_INDEX] * len(body)
        labels += [IGNORE_INDEX] * len(newline)
    if add_generation_prompt:
        n = 3 * len(turns)
        header, prefill = pieces[n], []
        if THINKING_PREFILL[enable_thinking]:  # encoded followed by PREFILL_FOLLOWER, then that alone
            followed, follower = pieces[n + 1:n + 3]
            prefill = followed[:len(followed) - len(follower)]
        ids += [s["im_start"], *header, *prefill]
        labels += [IGNORE_INDEX] * (1 + len(header) + len(prefill))
    return ids, labels


def render_prompt(tok: Tokenizer, messages, add_generation_prompt: bool = True,
                  enable_thinking: Optional[bool] = None, tools=None) -> list:
    """The ids to feed the model for a chat: the conversation so far (with the tools it may call), then the assistant
    header (and the thinking prefill enable_thinking asks for)."""
    if tools:
        tok.check_tool_pieces()
    return encode_conversation(tok, messages, add_generation_prompt, enable_thinking, tools)[0]


def reply_rows(s: dict, messages, pieces: list) -> list:
    """(ids, labels) of the prompt followed by each reply, from the encoded template_texts(messages, True) + replies:
    the ids of encode_conversation(messages + [the reply as an assistant turn]) up to its <|im_end|>, the reply and
    that <|im_end|> trained (as SFT trains them), the prompt not at all. The "\n" after would train nothing."""
    n = 3 * len(messages) + 1
    prompt, _ = assemble(s, messages, pieces[:n], add_generation_prompt=True)
    return [(prompt + reply + [s["im_end"]], [IGNORE_INDEX] * len(prompt) + reply + [s["im_end"]])
            for reply in pieces[n:]]



# -----------------------------------------------------------------------------
# token files and streams

def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype token files store ids in: uint16 while every id fits (at most 65,536 ids), else uint32,
    twice the size. Little-endian whatever the machine; files record its name, uint16 or uint32."""
    return np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")


def recorded_dtype(info: dict, where: str) -> np.dtype:
    """The dtype a token file's info records; files from before uint32 say uint16, or nothing."""
    name = info.get("dtype", "uint16")
    if name not in ("uint16", "uint32"):
        raise UserError(f"{where}: dtype {name!r}, expected \"uint16\" or \"uint32\"")
    return np.dtype(name).newbyteorder("<")


class StreamDecoder:
    """Text of a growing list of ids, handed out piece by piece as it becomes whole. Each call
    decodes all ids so far and returns what was not returned yet; while the text ends in half of
    a multi-byte character (Chinese, emoji: several byte tokens) it waits for the rest."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.done = tok, [], 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.done = text[self.done:], len(text)
        return new

    def text(self) -> str:
        return self.tok.decode(self.ids)

    def rest(self) -> str:
        """What was not handed out yet, a trailing half character included (at the end of a stream)."""
        text = self.text()
        new, self.done = text[self.done:], len(text)
        return new


def reply_pieces(tok: Tokenizer, tokens, in_think: bool = False) -> Iterator[tuple]:
    """An assistant turn's text as it is generated, from its token ids (up to <|im_end|>): (part, text) pieces,
    part "reasoning" between <think> and </think>, "call" between <tool_call> and </tool_call> (tools.parse_call
    reads one) and "answer" elsewhere, each part's characters whole (StreamDecoder). The markers are not in the text:
    each yields the part it starts with the text "", so a caller sees where a part begins and ends even when it is
    empty. in_think: the prompt opened the think block (enable_thinking=True), so the turn starts in the reasoning,
    yielded first as its <think> would be."""
    s = special_ids(tok)
    starts = {s["think"]: "reasoning", s["end_think"]: "answer", s["tool_call"]: "call", s["end_tool_call"]: "answer"}
    starts.pop(None, None)  # a tokenizer without the tool tags
    decoders = {part: StreamDecoder(tok) for part in ("reasoning", "call", "answer")}
    part = "reasoning" if in_think else "answer"
    if in_think:
        yield part, ""
    for token in tokens:
        if token == s["im_end"]:
            break
        if token in starts:
            if rest := decoders[part].rest():  # a half character the marker cut off
                yield part, rest
            part = starts[token]
            yield part, ""
        elif text := decoders[part].add(token):
            yield part, text
    if rest := decoders[part].rest():
        yield part, rest


def split_reply(text: str) -> tuple:
    """(content, [the text of each call]) of a whole assistant turn as generated: the content is what comes before the
    first <tool_call> (less the newline chatml_turns puts before it), each call the text inside its tags."""
    head, *calls = text.split(TOOL_PIECES["tool_call"])
    if not calls:
        return text, []
    return head.removesuffix("\n"), [call.split(TOOL_PIECES["end_tool_call"])[0] for call in calls]
