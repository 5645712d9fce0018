"""
Train a SentencePiece BPE tokenizer on jsonl / json / txt files.

  python train_tokenizer.py                                   # data/*.jsonl -> data/tokenizer.model, cpu sizes
  python train_tokenizer.py --preset 12gb                     # sizes for the 12gb model
  python train_tokenizer.py --inputs my.txt,chat.jsonl --vocab_size 8000

The vocabulary is sized by the text's language and the model: Chinese needs thousands of pieces
for its characters alone (about 5,500 for four classic novels), so text that is mostly CJK
characters gets --vocab_zh pieces, anything else --vocab_en. --vocab_size N overrides both.

Byte fallback is on (no unknown tokens; any language, Chinese included, round-trips), and the
chat/reasoning markers are single pieces that are never split: <|im_start|> <|im_end|>
<think> </think>, plus <unk>=0 <s>=1 </s>=2 <pad>=3. Other scripts look ids up by piece.
Large corpora are sampled line by line (reservoir sampling), never loaded whole.
"""
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field

import sentencepiece as spm

from cli import UserError, parse_config, run_guarded
from records import BadRecord, Skipped, chat_messages, iter_json_records
from tokenizer import SPECIAL_PIECES, chatml_turns

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
# Chinese prose is 75-85% CJK characters (punctuation and digits are the rest); English with a
# few Chinese phrases stays under 5%. Above 20% the characters alone need thousands of pieces.
ZH_SHARE = 0.2
# pieces at most: the ids then fit uint16 token shards (tokenizer.token_dtype), half the size of uint32 ones
MAX_UINT16_VOCAB = 65535


@dataclass
class TokenizerConfig:
    inputs: str = field(default="data/pretrain.jsonl,data/sft.jsonl,data/r1.jsonl",
                        metadata={"help": "comma-separated .jsonl/.json/.txt files"})
    out: str = field(default="data/tokenizer.model", metadata={"help": "where to write the model"})
    vocab_size: int = field(default=0, metadata={
        "help": "pieces, at most 65535 (shards are uint16); 0: --vocab_en or --vocab_zh by the text's language"})
    vocab_en: int = field(default=4096, metadata={"help": "pieces for text that is not mostly Chinese"})
    vocab_zh: int = field(default=10000, metadata={
        "help": f"pieces for mostly Chinese text (more than {ZH_SHARE} of its characters CJK)"})
    max_lines: int = field(default=2_000_000, metadata={"help": "lines sampled for training"})
    heldout_every: int = field(default=50, metadata={"help": "every Nth line is held out for the report"})
    character_coverage: float = field(default=0.9995, metadata={"help": "lower keeps rare CJK chars as bytes"})
    split_digits: bool = field(default=False, metadata={
        "help": "every digit its own piece (true, as LLaMA: sums of any size are digit by digit); false: common "
                "numbers become whole pieces (a small model learns 8 + 8 = 16 as one fact), never joined to the "
                "space or punctuation beside them"})
    seed: int = 0


# Sizes from characters per token on held-out text (English: Sherlock Holmes + alpaca; Chinese: four classic
# novels; and the built-in data). cpu: English 4096, where the built-in data levels off; Chinese 10000, which holds
# the characters of the novels and of Chinese Wikipedia with room for merges. 12gb: 12000 for both, past the
# steep part of both curves, while each 1,000 pieces cost 12 bytes of log-probabilities per token in training.
# Digits: the cpu model learns the built-in sums as whole-number facts far sooner than digit by digit with
# carries; the 12gb model, on real text with numbers of every size, gets LLaMA's one piece per digit. Either way a
# number is the same piece wherever it stands: BPE left alone learns " 3", " 4." and ' "3' as three pieces, and a
# small model then miscopies the 3 of a question into a tool call's JSON ("expression": "3 + 4"), where its piece
# is another. So the trainer sees every run of digits cut off from its neighbours (NUMBER_CUT, a training-only
# pre-tokenization): the vocabulary holds "3" and "12", the space before a number is its own piece, and the
# encoder, which only joins pieces the vocabulary has, splits numbers off the same way.
NUMBER_CUT = "\ue000"  # a private-use character, never in the text
PIECES_PER_CHARACTER = 4  # Chinese text: at most 256 byte pieces + this many for each different character

PRESETS = {
    "cpu": {},  # the defaults above
    "12gb": dict(vocab_en=12000, vocab_zh=12000, split_digits=True),
}


def record_texts(record) -> list:
    """The strings to learn from in one record: a plain string, `text`, or the turns of a chat
    record in any of the formats records.py reads (ours, OpenAI messages, ShareGPT, alpaca)."""
    if isinstance(record, str):
        return [record]
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return [record["text"]]
    fmt, messages, extra = chat_messages(record)
    if fmt is None:
        raise BadRecord(f"no \"text\", \"conversations\", \"messages\" or alpaca fields (keys: {', '.join(record)})")
    return [m["content"] for m in chatml_turns(messages, extra.get("tools"))]  # with the tool list and calls


def iter_documents(path: str, skipped: Skipped):
    """Yield document strings from one file; damaged records are warned about and skipped."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            yield from f
        return
    for where, record, _ in iter_json_records(path):
        try:
            yield from record_texts(record)
        except (BadRecord, UserError) as e:
            skipped.warn(where, e)


def sample_lines(paths, cfg: TokenizerConfig):
    """Reservoir-sample up to max_lines non-empty lines for training; keep every
    heldout_every-th line aside to measure compression on text the trainer never saw."""
    rng = random.Random(cfg.seed)
    train, heldout, seen = [], [], 0
    skipped = Skipped()
    for path in paths:
        for doc in iter_documents(path, skipped):
            for line in doc.splitlines():
                if not line.strip():
                    continue
                seen += 1
                if seen % cfg.heldout_every == 0:
                    if len(heldout) < 2000:
                        heldout.append(line)
                    continue
                if len(train) < cfg.max_lines:
                    train.append(line)
                else:
                    j = rng.randrange(seen)
                    if j < cfg.max_lines:
                        train[j] = line
    if skipped.count:
        print(f"warning: skipped {skipped.count} malformed lines in total", file=sys.stderr)
    return train, heldout


def choose_vocab_size(cfg: TokenizerConfig, lines) -> int:
    """--vocab_size if given, else --vocab_zh or --vocab_en by the share of CJK characters
    among the non-space characters of (a random sample of) the training lines. Chinese text with few different
    characters gets at most the 256 byte pieces and PIECES_PER_CHARACTER for each (never fewer than --vocab_en):
    the built-in data's ~600 characters read at 3.05 characters per token with 4,096 pieces and 3.15 with 10,000,
    and a small model's 6,000 more rows of output layer cost more time per token than the merges save."""
    if cfg.vocab_size:
        return cfg.vocab_size
    sample = random.Random(cfg.seed).sample(lines, min(len(lines), 100_000))
    cjk = sum(len(CJK.findall(line)) for line in sample)
    share = cjk / max(1, sum(len("".join(line.split())) for line in sample))
    zh = share > ZH_SHARE
    size, few = cfg.vocab_en, ""
    if zh:  # no more pieces than the characters can use
        characters = len(set("".join(sample)))
        size = min(cfg.vocab_zh, max(cfg.vocab_en, 256 + PIECES_PER_CHARACTER * characters))
        few = f", {characters:,} different characters" if size < cfg.vocab_zh else ""
    print(f"text is {'mostly' if zh else 'not mostly'} Chinese ({share:.0%} CJK characters{few}): {size:,} pieces "
          f"(--vocab_{'zh' if zh else 'en'}; --vocab_size N to choose)")
    return size


def train(cfg: TokenizerConfig) -> str:
    for name in ("vocab_size",) if cfg.vocab_size else ("vocab_en", "vocab_zh"):  # before reading any text
        n = getattr(cfg, name)
        if not 0 < n <= MAX_UINT16_VOCAB:
            raise UserError(f"{name} {n} does not fit the uint16 shards: use 1..{MAX_UINT16_VOCAB}")
    paths = [p for p in cfg.inputs.split(",") if p]
    lines, heldout = sample_lines(paths, cfg)
    if not lines:
        raise UserError(f"no text found in {cfg.inputs}")
    vocab_size = choose_vocab_size(cfg, lines)
    print(f"training a {vocab_size}-piece BPE tokenizer on {len(lines):,} lines "
          f"({sum(map(len, lines)) / 1e6:.1f}M chars) from {len(paths)} file(s)")
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    prefix = cfg.out.removesuffix(".model") + ".tmp"
    t0 = time.time()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(re.sub(r"(\d+)", NUMBER_CUT + r"\1" + NUMBER_CUT, line) for line in lines),
            model_prefix=prefix, model_type="bpe",
            vocab_size=vocab_size, character_coverage=cfg.character_coverage,
            byte_fallback=True, split_digits=cfg.split_digits, pretokenization_delimiter=NUMBER_CUT,
            add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
            allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
            required_chars="\u2581",  # the space piece: without it, text with no spaces decodes " " as "▁"
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<unk>", bos_piece="<s>",
            eos_piece="</s>", pad_piece="<pad>", user_defined_symbols=list(SPECIAL_PIECES.values()),
            num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        raise UserError(f"sentencepiece could not train a {vocab_size}-piece vocabulary on "
                        f"{cfg.inputs}: {what_to_do(str(e), cfg)}") from None
    os.replace(prefix + ".model", cfg.out)
    os.replace(prefix + ".vocab", cfg.out.removesuffix(".model") + ".vocab")
    report(cfg.out, heldout, time.time() - t0)
    return cfg.out


def what_to_do(error: str, cfg: TokenizerConfig) -> str:
    """sentencepiece's message, with the fix spelled out for the two size errors users meet."""
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", error):
        need = int(m[1])  # one piece per character kept, plus <unk> <s> </s> <pad>, the markers and 256 bytes
        room = min(MAX_UINT16_VOCAB, math.ceil(need * 1.25 / 1000) * 1000)  # a quarter more for merges
        return (f"the characters alone need {need:,} pieces at --character_coverage {cfg.character_coverage}: "
                f"use --vocab_size {room} or lower --character_coverage")
    if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", error):
        return f"the text is too small for that many pieces: use --vocab_size {m[1]} or less, or more text"
    return error.strip().splitlines()[-1]


def report(path: str, heldout, seconds: float):
    sp = spm.SentencePieceProcessor(model_file=path)
    example = "Hello <|im_start|>user\n<think>3 + 4 = 7</think> 你好！<|im_end|>"
    ids = sp.encode(example)
    assert sp.decode(ids) == example, "tokenizer does not round-trip"
    print(f"wrote {path} in {seconds:.1f}s: vocab {sp.get_piece_size()}")
    print(f"round trip: {example!r} -> {len(ids)} tokens -> identical")
    if heldout:
        chars = sum(map(len, heldout))
        tokens = sum(len(x) for x in sp.encode(heldout))
        print(f"held-out text: {chars / tokens:.2f} characters per token ({len(heldout)} lines)")


def main(argv=None):
    run_guarded(train, parse_config(TokenizerConfig, argv, presets=PRESETS,
                                    description=__doc__.strip().splitlines()[0]))


if __name__ == "__main__":
    main()
