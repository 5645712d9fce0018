"""
Chat data for fine-tuning: conversations -> token ids, labels and loss weights.
The one chat template every script shares is here, and SFTData, the reader train_sft.py and distill.py train on.

  python dataset_sft.py --data data/sft.jsonl --show 2     # what was detected, and two rows with the trained part marked

Input: a .jsonl file (one JSON object per line) or a .json file holding one JSON array, each record one
conversation in any of the four formats of records.py (ours, OpenAI messages, ShareGPT, alpaca), detected
record by record and reported. Other top-level keys (like the "answer" of data/r1.jsonl) are kept in
Conversation.extra. A line that is not valid JSON or lacks its fields is warned about and skipped; an
unknown role, or a first record in no known format, stops with an error: that is a different schema,
not a damaged line.

Template (ChatML), the same as CHAT_TEMPLATE_JINJA:
  <|im_start|>{role}\\n{content}<|im_end|>\\n  per turn, then <|im_start|>assistant\\n to ask for a reply,
  which ends at <|im_end|>.
Ids, turn by turn: the <|im_start|> id, sp.encode(role + "\\n"), sp.encode(content), the <|im_end|> id,
sp.encode("\\n"). Text is encoded piece by piece, so it never merges with a marker or with the next piece.
Markers typed inside content (<think>, even <|im_end|>) become their single ids, as in Hugging Face's tokenizers.

Labels: the id itself for each assistant turn's content and its <|im_end|>; -100 (no loss) for everything
else: system and user turns, every role header, and the "\\n" after <|im_end|> (so the model learns to
stop at <|im_end|>). Every assistant turn of a conversation is trained.

Rows (SFTData): trailing positions that train nothing are dropped (they would only be unused targets),
then a row longer than seq_len + 1 ids is cut to its first seq_len + 1 ids (counted as truncated); a
row left with no trained token is skipped (counted). tokens = ids[:-1], targets = labels[1:].
"""
import itertools
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from cli import UserError, parse_config, run_guarded
from records import BadRecord, Skipped, chat_messages, iter_json_records
from tokenizer import load_tokenizer, special_ids

IGNORE_INDEX = -100  # targets the loss skips (model.py: cross_entropy ignore_index)
# The template in Jinja, for tokenizer_config.json (convert_hf.py) and transformers' apply_chat_template.
CHAT_TEMPLATE_JINJA = ("{% for message in messages %}"
                       "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
                       "{% endfor %}"
                       "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@dataclass
class InspectConfig:
    data: str = field(default="data/sft.jsonl", metadata={"help": "chat file (.jsonl or .json array)"})
    tokenizer: str = "data/tokenizer.model"
    seq_len: int = field(default=512, metadata={"help": "longest row in tokens"})
    show: int = field(default=1, metadata={"help": "rows to print, trained part marked"})


# -----------------------------------------------------------------------------
# the template

def render_text(messages, add_generation_prompt: bool = False) -> str:
    """The template as text: what CHAT_TEMPLATE_JINJA renders and what render_prompt's ids decode to."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def encode_conversation(sp, messages, add_generation_prompt: bool = False) -> tuple:
    """(ids, labels), two lists of ints of the same length: the rendered conversation, and the id
    where it is trained (assistant content and its <|im_end|>), IGNORE_INDEX elsewhere."""
    s = special_ids(sp)
    texts = [t for m in messages for t in (m["role"] + "\n", m["content"], "\n")]
    pieces = sp.encode(texts + (["assistant\n"] if add_generation_prompt else []))  # one call for all turns
    ids, labels = [], []
    for i, m in enumerate(messages):
        header, content, newline = pieces[3 * i:3 * i + 3]
        body = content + [s["im_end"]]
        ids += [s["im_start"], *header, *body, *newline]
        labels += [IGNORE_INDEX] * (1 + len(header))
        labels += body if m["role"] == "assistant" else [IGNORE_INDEX] * len(body)
        labels += [IGNORE_INDEX] * len(newline)
    if add_generation_prompt:
        ids += [s["im_start"], *pieces[-1]]
        labels += [IGNORE_INDEX] * (1 + len(pieces[-1]))
    return ids, labels


def render_prompt(sp, messages, add_generation_prompt: bool = True) -> list:
    """The ids to feed the model for a chat: the conversation so far, then the assistant header."""
    return encode_conversation(sp, messages, add_generation_prompt)[0]


def loss_weights(targets: np.ndarray, think_ids, think_weight: float = 10.0) -> np.ndarray:
    """float32 weights aligned with targets: 1 where a target is trained, think_weight where the trained
    target is <think> or </think>, 0 where it is IGNORE_INDEX (the loss skips those anyway)."""
    weights = (targets != IGNORE_INDEX).astype(np.float32)
    weights[np.isin(targets, list(think_ids))] = think_weight
    return weights


# -----------------------------------------------------------------------------
# reading chat files

@dataclass
class Conversation:
    messages: list  # [{"role": "system"|"user"|"assistant", "content": str}, ...]
    extra: dict     # the record's other top-level keys, e.g. {"answer": "42"}
    where: str      # "data/sft.jsonl line 17", for messages about it


def read_conversations(path: str, verbose: bool = True) -> tuple:
    """All conversations of a chat file, and stats: {"formats": Counter, "malformed": int}. With verbose,
    malformed records are warned about on stderr and one line says what was found."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    conversations, formats, skipped = [], Counter(), Skipped(verbose)
    for n, (where, record, _) in enumerate(iter_json_records(path)):
        try:
            try:
                fmt, messages, extra = chat_messages(record)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
            if fmt is None:
                unknown = (f"unknown chat format (keys: {', '.join(record) or 'none'}); "
                           f"expected conversations, messages or instruction/output")
                if n == 0:  # the file is not a chat file at all: one error, not a warning per line
                    raise UserError(f"{where}: {unknown}")
                raise BadRecord(unknown)
        except BadRecord as e:
            skipped.warn(where, e)
            continue
        formats[fmt] += 1
        conversations.append(Conversation(messages, extra, where))
    skipped_note = f", {skipped.count:,} malformed records skipped" if skipped.count else ""
    if not conversations:
        raise UserError(f"{path}: no conversations{skipped_note}")
    if verbose:
        found = " and ".join(f"{f} ({c:,})" for f, c in formats.most_common()) if len(formats) > 1 else \
            next(iter(formats))
        print(f"{path}: {found} format{'s' if len(formats) > 1 else ''}, {len(conversations):,} conversations"
              f"{skipped_note}")
    return conversations, {"formats": formats, "malformed": skipped.count}


# -----------------------------------------------------------------------------
# the training-time reader

def fit_row(ids: np.ndarray, labels: np.ndarray, seq_len: int) -> tuple:
    """(ids, labels, truncated) of the row to train on, or None when no target would be trained."""
    trained = np.flatnonzero(labels[1:] != IGNORE_INDEX)  # targets are labels[1:]: labels[0] never counts
    if not len(trained):
        return None
    end = trained[-1] + 2  # up to the last trained id, included
    truncated = end > seq_len + 1
    end = min(end, seq_len + 1)
    if not (labels[1:end] != IGNORE_INDEX).any():
        return None
    return ids[:end], labels[:end], truncated


class SFTData:
    """Conversations as training rows for train.py, every one tokenized at load.

    batch(index) is a pure function of (seed, index), so resuming needs only the index. Batch `index`
    holds the global positions index*G .. index*G+G-1 (G = batch_size * world_size) of an endless
    stream in which epoch e is the rows in the order of a permutation seeded by (seed, e); rank r takes
    rows r*batch_size:(r+1)*batch_size. Rows are padded on the right with <pad> (targets IGNORE_INDEX)
    to the longest row of the global batch: every rank gets the same shape, and its rows are exactly
    those of the one-process batch. With think_weight, batch() also returns loss_weights()."""

    def __init__(self, path, tokenizer_path, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, think_weight=None):
        if seq_len < 1 or batch_size < 1:
            raise UserError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be at least 1")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in 0..{world_size - 1}")
        self.seq_len, self.batch_size, self.seed, self.rank, self.world_size = seq_len, batch_size, seed, rank, world_size
        self.think_weight = think_weight
        self.sp = sp = load_tokenizer(tokenizer_path)
        s = special_ids(sp)
        self.vocab_size, self.pad_id, self.think_ids = sp.get_piece_size(), s["pad"], (s["think"], s["end_think"])
        verbose = rank == 0
        conversations, read_stats = read_conversations(os.fspath(path), verbose)

        rows, counts = [], Counter()
        for conv in tqdm(conversations, desc="tokenizing", unit=" conversations", disable=not verbose, leave=False):
            ids, labels = (np.array(x, dtype=np.int32) for x in encode_conversation(sp, conv.messages))
            row = fit_row(ids, labels, seq_len)
            if row is None:
                counts["skipped_no_reply" if (labels[1:] == IGNORE_INDEX).all() else "skipped_too_long"] += 1
                continue
            counts["truncated"] += int(row[2])
            rows.append(row[:2])
        self.stats = {**read_stats, "rows": len(rows), "truncated": 0, "skipped_no_reply": 0, "skipped_too_long": 0,
                      **counts}
        if not rows:
            raise UserError(f"{path}: no conversation has an assistant reply within seq_len {seq_len} tokens "
                            f"({counts['skipped_no_reply']} without one, {counts['skipped_too_long']} starting later)")
        lengths = np.array([len(ids) for ids, _ in rows])
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.ids = np.concatenate([ids for ids, _ in rows])
        self.trained = np.concatenate([labels != IGNORE_INDEX for _, labels in rows])
        self.num_tokens = int(lengths.sum() - len(rows))  # inputs, over all rows
        self._permutation = (None, None)  # (epoch, order) of the last epoch used
        if verbose:
            skipped = [f"{counts[k]:,} {why}" for k, why in (("skipped_no_reply", "with no assistant reply"),
                       ("skipped_too_long", "whose first reply starts past seq_len")) if counts[k]]
            print(f"{path}: {len(rows):,} rows, {self.num_tokens:,} tokens ({self.trained.sum() / self.num_tokens:.0%} trained), "
                  f"longest {lengths.max() - 1}; {counts['truncated']:,} truncated to seq_len {seq_len}"
                  + (f"; skipped {', '.join(skipped)}" if skipped else ""))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def tokens_per_row(self) -> float:
        return self.num_tokens / len(self)

    def row(self, i: int) -> tuple:
        """(ids, labels) of row i as int64 arrays."""
        ids = self.ids[self.offsets[i]:self.offsets[i + 1]].astype(np.int64)
        return ids, np.where(self.trained[self.offsets[i]:self.offsets[i + 1]], ids, IGNORE_INDEX)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._permutation[0] != epoch:
            self._permutation = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self)))
        return self._permutation[1]

    def rows_of(self, index: int) -> np.ndarray:
        """The row numbers of global batch `index`, all ranks."""
        size = self.batch_size * self.world_size
        positions = index * size + np.arange(size)
        epochs, offsets = np.divmod(positions, len(self))
        return np.concatenate([self.epoch_order(e)[offsets[epochs == e]] for e in np.unique(epochs)])

    def batch(self, index: int) -> tuple:
        """(tokens, targets[, loss_weight]): int64 CPU tensors (batch_size, T), T the longest row of the
        global batch (at most seq_len); loss_weight float32, only when think_weight is set."""
        rows = self.rows_of(index)
        width = int(np.diff(self.offsets)[rows].max()) - 1
        tokens = np.full((self.batch_size, width), self.pad_id, dtype=np.int64)
        targets = np.full((self.batch_size, width), IGNORE_INDEX, dtype=np.int64)
        for r, i in enumerate(rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]):
            ids, labels = self.row(i)
            tokens[r, :len(ids) - 1] = ids[:-1]
            targets[r, :len(ids) - 1] = labels[1:]
        batch = (torch.from_numpy(tokens), torch.from_numpy(targets))
        if self.think_weight is None:
            return batch
        return batch + (torch.from_numpy(loss_weights(targets, self.think_ids, self.think_weight)),)


def show_row(sp, ids: np.ndarray, trained: np.ndarray, color: bool) -> str:
    """The row as text, its trained spans in green (or between [[ and ]] when not on a terminal)."""
    start, end = ("\033[32m", "\033[0m") if color else ("[[", "]]")
    spans = itertools.groupby(zip(ids.tolist(), trained.tolist()), key=lambda x: x[1])
    return "".join(start + sp.decode([i for i, _ in g]) + end if t else sp.decode([i for i, _ in g]) for t, g in spans)


def inspect(cfg: InspectConfig):
    data = SFTData(cfg.data, cfg.tokenizer, cfg.seq_len, batch_size=1)
    for i in range(min(cfg.show, len(data))):
        ids, labels = data.row(i)
        print(f"--- row {i}: {len(ids) - 1} tokens, {int((labels[1:] != IGNORE_INDEX).sum())} trained")
        print(show_row(data.sp, ids, labels != IGNORE_INDEX, sys.stdout.isatty()))


def main(argv=None):
    run_guarded(inspect, parse_config(InspectConfig, argv, description=__doc__.strip().splitlines()[0]))


if __name__ == "__main__":
    main()
