"""
The tokenizer, in one place: loading tokenizer.model (SentencePiece), the special pieces every
script agrees on, and decoding a stream of ids into text as it is generated.

Special pieces are single tokens that are never split: <|im_start|> <|im_end|> (the chat
template), <think> </think> (reasoning), plus <unk>=0 <s>=1 </s>=2 <pad>=3. Their ids are always
looked up by piece, never hard-coded, so any tokenizer that has them works.
"""
import os

import sentencepiece as spm

from cli import UserError

# name -> piece; train_tokenizer.py adds them to every vocabulary
SPECIAL_PIECES = {"im_start": "<|im_start|>", "im_end": "<|im_end|>", "think": "<think>", "end_think": "</think>"}
MAX_UINT16_VOCAB = 65535  # token shards store ids as uint16


def check_vocab(sp) -> None:
    """Shards store ids as uint16, so the vocabulary must fit."""
    if sp.get_piece_size() > MAX_UINT16_VOCAB:
        raise UserError(f"the tokenizer has {sp.get_piece_size()} pieces, more than the {MAX_UINT16_VOCAB} that "
                        f"uint16 shards can hold: train one with --vocab_size {MAX_UINT16_VOCAB} or less")


def load_tokenizer(path: str) -> spm.SentencePieceProcessor:
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such tokenizer; make one with python train_tokenizer.py")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError):
        raise UserError(f"{path}: not a SentencePiece model") from None
    check_vocab(sp)
    if sp.eos_id() < 0:
        raise UserError(f"{path}: the tokenizer has no end-of-document piece (eos)")
    return sp


def special_ids(sp: spm.SentencePieceProcessor) -> dict:
    """The ids of the chat markers and <pad>, looked up by piece. sp.piece_to_id answers <unk>'s id for a
    piece it lacks, so each is checked: a tokenizer without them cannot render the template."""
    ids = {name: sp.piece_to_id(piece) for name, piece in SPECIAL_PIECES.items()}
    for name, i in ids.items():
        if i == sp.unk_id():
            raise UserError(f"the tokenizer has no {SPECIAL_PIECES[name]} piece; train one with python "
                            f"train_tokenizer.py")
    ids["pad"] = sp.pad_id()
    if ids["pad"] < 0:
        raise UserError("the tokenizer has no <pad> piece; train one with python train_tokenizer.py")
    return ids


class StreamDecoder:
    """Text of a growing list of ids, handed out piece by piece as it becomes whole. Each call
    decodes all ids so far and returns what was not returned yet; while the text ends in half of
    a multi-byte character (Chinese, emoji: several byte tokens) it waits for the rest."""

    def __init__(self, sp: spm.SentencePieceProcessor):
        self.sp, self.ids, self.done = sp, [], 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.sp.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.done = text[self.done:], len(text)
        return new

    def text(self) -> str:
        return self.sp.decode(self.ids)

    def rest(self) -> str:
        """What was not handed out yet, a trailing half character included (at the end of a stream)."""
        text = self.text()
        new, self.done = text[self.done:], len(text)
        return new
