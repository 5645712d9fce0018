"""
Train a SentencePiece BPE tokenizer on jsonl / json / txt files.

  python train_tokenizer.py                                   # data/*.jsonl -> data/tokenizer.model
  python train_tokenizer.py --inputs my.txt,chat.jsonl --vocab_size 8000

Byte fallback is on (no unknown tokens; any language, Chinese included, round-trips), and the
chat/reasoning markers are single pieces that are never split: <|im_start|> <|im_end|>
<think> </think>, plus <unk>=0 <s>=1 </s>=2 <pad>=3. Other scripts look ids up by piece.
Large corpora are sampled line by line (reservoir sampling), never loaded whole.
"""
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import sentencepiece as spm

from cli import parse_config, run_guarded

SPECIAL_PIECES = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]


@dataclass
class TokenizerConfig:
    inputs: str = field(default="data/pretrain.jsonl,data/sft.jsonl,data/r1.jsonl",
                        metadata={"help": "comma-separated .jsonl/.json/.txt files"})
    out: str = field(default="data/tokenizer.model", metadata={"help": "where to write the model"})
    vocab_size: int = field(default=4096, metadata={"help": "at most 65535 (shards are uint16)"})
    max_lines: int = field(default=2_000_000, metadata={"help": "lines sampled for training"})
    heldout_every: int = field(default=50, metadata={"help": "every Nth line is held out for the report"})
    character_coverage: float = field(default=0.9995, metadata={"help": "lower keeps rare CJK chars as bytes"})
    seed: int = 0


def record_texts(record, where: str):
    """The strings to learn from in one record: `text`, the turns of `conversations` /
    `messages` (role/content or ShareGPT from/value), or alpaca's instruction/input/output."""
    if isinstance(record, str):
        return [record]
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" in record:
        return [record["text"]]
    turns = record.get("conversations") or record.get("messages")
    if isinstance(turns, list):
        return [t.get("content", t.get("value", "")) for t in turns if isinstance(t, dict)]
    alpaca = [record[k] for k in ("instruction", "input", "output") if isinstance(record.get(k), str)]
    if alpaca:
        return alpaca
    raise ValueError(f"{where}: no \"text\", \"conversations\", \"messages\" or alpaca fields (keys: {', '.join(record)})")


def iter_documents(path: str, stats: dict):
    """Yield document strings from one file; malformed jsonl lines are reported and skipped."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            yield from f
        return
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        for i, r in enumerate(records if isinstance(records, list) else [records]):
            yield from record_texts(r, f"{path} record {i}")
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield from record_texts(json.loads(line), f"{path} line {lineno}")
            except (json.JSONDecodeError, ValueError) as e:
                stats["bad"] += 1
                if stats["bad"] <= 5:
                    msg = e if isinstance(e, ValueError) and not isinstance(e, json.JSONDecodeError) \
                        else f"{path} line {lineno}: not valid JSON"
                    print(f"warning: {msg}; skipped", file=sys.stderr)


def sample_lines(paths, cfg: TokenizerConfig):
    """Reservoir-sample up to max_lines non-empty lines for training; keep every
    heldout_every-th line aside to measure compression on text the trainer never saw."""
    rng = random.Random(cfg.seed)
    train, heldout, seen = [], [], 0
    stats = {"bad": 0}
    for path in paths:
        for doc in iter_documents(path, stats):
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
    if stats["bad"]:
        print(f"warning: skipped {stats['bad']} malformed lines in total", file=sys.stderr)
    return train, heldout


def train(cfg: TokenizerConfig) -> str:
    if not 0 < cfg.vocab_size <= 65535:
        raise ValueError(f"vocab_size {cfg.vocab_size} does not fit the uint16 shards: use 1..65535")
    paths = [p for p in cfg.inputs.split(",") if p]
    lines, heldout = sample_lines(paths, cfg)
    if not lines:
        raise ValueError(f"no text found in {cfg.inputs}")
    print(f"training a {cfg.vocab_size}-piece BPE tokenizer on {len(lines):,} lines "
          f"({sum(map(len, lines)) / 1e6:.1f}M chars) from {len(paths)} file(s)")
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    prefix = cfg.out.removesuffix(".model") + ".tmp"
    t0 = time.time()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=prefix, model_type="bpe",
            vocab_size=cfg.vocab_size, character_coverage=cfg.character_coverage,
            byte_fallback=True, split_digits=True,  # digits one by one: arithmetic stays learnable
            add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
            allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<unk>", bos_piece="<s>",
            eos_piece="</s>", pad_piece="<pad>", user_defined_symbols=SPECIAL_PIECES,
            num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1]
        raise ValueError(f"sentencepiece could not train a {cfg.vocab_size}-piece vocabulary on "
                         f"{cfg.inputs}: {detail}") from None
    os.replace(prefix + ".model", cfg.out)
    os.replace(prefix + ".vocab", cfg.out.removesuffix(".model") + ".vocab")
    report(cfg.out, heldout, time.time() - t0)
    return cfg.out


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
    run_guarded(train, parse_config(TokenizerConfig, argv, description=__doc__.strip().splitlines()[0]))


if __name__ == "__main__":
    main()
