"""
The tokenizer, in one place: one interface over the two kinds of tokenizer file, the special
pieces every script agrees on, decoding a stream of ids into text as it is generated, and the
dtype token files store ids in.

  tokenizer.model   SentencePiece: ours, made by train_tokenizer.py
  tokenizer.json    Hugging Face's tokenizers library: an imported model's own (SmolLM2, Llama 3.2, ...)

Special pieces are single tokens that are never split: <|im_start|> <|im_end|> (the chat
template), <think> </think> (reasoning), plus the end of a document (eos), bos and pad. Their ids
are always looked up by piece, never hard-coded, so any tokenizer that has them works.
train_tokenizer.py puts them all in its tokenizer.model (<unk>=0 <s>=1 </s>=2 <pad>=3). A
tokenizer.json takes eos, bos and pad from the tokenizer_config.json beside it (else from common
piece names), and add_chat_pieces() appends the markers an imported tokenizer lacks.
"""
import functools
import json
import os
from typing import Optional

import numpy as np
import sentencepiece as spm
import tokenizers

from cli import UserError
from records import atomic_path

# name -> piece; train_tokenizer.py adds them to every vocabulary, add_chat_pieces to an imported one
SPECIAL_PIECES = {"im_start": "<|im_start|>", "im_end": "<|im_end|>", "think": "<think>", "end_think": "</think>"}
# The chat markers are special tokens in every tokenizer we write or extend (hidden by decoders that skip
# special pieces, control tokens in llama.cpp); <think> and </think> are not, so they stay in decoded text.
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
        """The ids of the chat markers, looked up by piece, and pad; checked, as a tokenizer without the
        markers cannot render the template, nor one that puts a space before every text it encodes
        (SentencePiece's dummy prefix, kept by the tokenizer.json of Llama 2 and TinyLlama): the template
        is encoded piece by piece (dataset_sft.py), and would not decode to itself. Computed on first use
        (a failed check is not kept, and raises again), then kept: the template asks for it per conversation."""
        ids = {name: self.piece_id(piece) for name, piece in SPECIAL_PIECES.items()}
        for name, i in ids.items():
            if i is None:
                fix = ("import the model with python convert_hf.py, which adds it" if self.hf else
                       "train one with python train_tokenizer.py")
                raise UserError(f"{self.path}: the tokenizer has no {SPECIAL_PIECES[name]} piece; {fix}")
        user, newline = self.encode_batch(["user", "\n"])
        if self.decode(user + newline) != "user\n":
            raise UserError(f"{self.path}: the tokenizer puts a space before every text it encodes, so it cannot "
                            f"encode the chat template piece by piece (not supported yet)")
        return {**ids, "pad": self.pad_id}

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
    """Write a copy of the tokenizer.json src to dst with the special pieces it lacks appended; return
    their new ids (the end of the vocabulary, in SPECIAL_PIECES order: a model needs as many more
    embedding rows). The chat markers are special, as in the tokenizers of Qwen and SmolLM2 (hidden by
    decoders that skip special pieces); <think> and </think> are not, so they stay in decoded text."""
    hf = tokenizers.Tokenizer.from_file(src)
    added = []
    for piece in SPECIAL_PIECES.values():
        if hf.token_to_id(piece) is None:
            special = piece in CHAT_MARKERS
            token = tokenizers.AddedToken(piece, special=special, normalized=False, lstrip=False, rstrip=False,
                                          single_word=False)
            (hf.add_special_tokens if special else hf.add_tokens)([token])
            added.append(hf.token_to_id(piece))
    with atomic_path(dst) as tmp:
        hf.save(tmp)
    return added


def without_space_prefix(src: str, dst: str) -> bool:
    """Copy the tokenizer.json src to dst without the space a Llama 2 style tokenizer puts before every text it
    encodes (SentencePiece's dummy prefix: a Prepend("▁") normalizer or a Metaspace pre-tokenizer that
    prepends, and the decoder's Strip that takes it off again); return whether it had one. The template is
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
    with atomic_path(dst) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    return found


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
