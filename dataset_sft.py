"""
Chat data for fine-tuning: conversations -> token ids, labels and loss weights. Chat shards, a chat file
tokenized once; SFTData, the reader train_sft.py and distill.py train on; PreferenceData, the reader of
preference pairs for train_dpo.py; and chat_data(), the pair of readers a fine-tuning run trains and validates on.

  python dataset_sft.py --data data/sft.jsonl --show 2     # build (or reuse) its shards; two rows, trained part marked

Input: a .jsonl file (one JSON object per line) or a .json file holding one JSON array, each record one
conversation in any of the four formats of records.py (ours, OpenAI messages, ShareGPT, alpaca), detected
record by record and reported. Other top-level keys (like the "answer" of data/r1.jsonl) are kept. A line that
is not valid JSON or lacks its fields is warned about and skipped; an unknown role, or a first record in no known
format, stops with an error: that is a different schema, not a damaged line. Conversations become ids and labels
through the chat template of tokenizer.py (ChatML; the assistant turns and their <|im_end|> are trained).

Chat shards: the first run on a chat file tokenizes it into {file}.shards/ beside it (or under --shard_dir),
streaming and in parallel (--num_workers processes, which also parse the JSON): ids.bin (the ids of every
conversation, back to back: uint16, uint32 for a vocabulary over 65,536), trained.bin (uint8: 1 where the id
is a trained label), rows.bin (int64 per conversation: start, length, first and last trained position) and
info.json (the file's size, modification time and sha256, the tokenizer's sha256, SHARD_VERSION, its kind: chat
or preference, the dtype of ids.bin, the counts). The folder is built under a temporary name and renamed, so it
is complete or absent. Later runs, resumes and every DDP rank memory-map it; a changed file or tokenizer (or the
file read as the other kind) rebuilds it, and says so.

Preference files (records.py's three formats: TRL prompt/chosen/rejected, a chat history + chosen/rejected, HH
transcripts) are tokenized the same way, into the same kind of shards, each pair two rows: the prompt (the history,
then <|im_start|>assistant\n, nothing trained) followed by the chosen reply, then the same prompt followed by the
rejected one. A reply is an assistant turn's content and its <|im_end|>, trained as in SFT, and nothing after.
A preference file given to the chat readers, or a chat file to PreferenceData, stops with one line saying which
script trains on it.

Rows (SFTData): trailing positions that train nothing are dropped (they would only be unused targets),
then a row longer than seq_len + 1 ids is cut to its first seq_len + 1 ids (counted as truncated); a
row left with no trained token is skipped (counted). tokens = ids[:-1], targets = labels[1:]. With pack,
several rows share one row of seq_len tokens (pack_rows); each keeps its own positions, from 0, and attends
only to itself (model.py: positions, document_ids), so a packed row trains exactly what its conversations
would alone, with almost no padding.
"""
import bisect
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from cli import UserError, parse_config, run_guarded
from records import (BadRecord, Skipped, atomic_write, conversation_of, describe_file, file_sha256,
                     iter_json_records, json_value, pair_of, read_conversations)
from tokenizer import (IGNORE_INDEX, Tokenizer, assemble, chatml_turns, load_tokenizer, recorded_dtype, reply_rows,
                       special_ids, template_texts, token_dtype, tokenize_in_order, worker_tokenizer)


@dataclass
class InspectConfig:
    data: str = field(default="data/sft.jsonl", metadata={"help": "chat file (.jsonl or .json array)"})
    tokenizer: str = field(default="data/tokenizer.model", metadata={
        "help": "tokenizer.model (train_tokenizer.py) or an imported model's tokenizer.json"})
    seq_len: int = field(default=512, metadata={"help": "longest row in tokens"})
    show: int = field(default=1, metadata={"help": "rows to print, trained part marked"})
    shard_dir: str = field(default="", metadata={"help": "folder for the chat shards; empty: beside the data"})
    num_workers: int = field(default=0, metadata={"help": "tokenizer processes for the shards; 0: one per core"})


# -----------------------------------------------------------------------------
# loss weights

def loss_weights(targets: np.ndarray, think_ids, think_weight: float = 10.0, number_ids=(),
                 number_weight: float = 1.0, call_ids=()) -> np.ndarray:
    """float32 weights aligned with targets (batch, T): 1 where a target is trained, think_weight where the trained
    target is <think> or </think>, number_weight where it is a number (number_ids) inside a think block or a tool
    call (call_ids: <tool_call>, </tool_call>), 0 where it is IGNORE_INDEX (the loss skips those anyway). The
    numbers weighted are the reasoning's, which a small model copies from the question, not a story's: weighting
    those made the Chinese quickstart model tell stories that turned into sums."""
    weights = (targets != IGNORE_INDEX).astype(np.float32)
    weights[np.isin(targets, list(think_ids))] = think_weight
    if len(number_ids):
        tags = [think_ids] + ([call_ids] if call_ids else [])
        opens = np.isin(targets, [opening for opening, _ in tags if opening is not None])
        closes = np.isin(targets, [closing for _, closing in tags if closing is not None])
        inside = np.cumsum(opens, axis=-1) > np.cumsum(closes, axis=-1)  # after an opening tag, before its closing
        weights[np.isin(targets, list(number_ids)) & inside & (weights > 0)] = number_weight
    return weights


def number_ids(tok) -> list:
    """The ids of the pieces that are a number (digits only, after a leading space), for number_weight."""
    return [i for i in range(tok.vocab_size) if tok.decode([i]).strip().isdigit()]


# -----------------------------------------------------------------------------
# chat shards: a chat (or preference) file tokenized once, in parallel, and memory-mapped by every run after

SHARD_VERSION = 1      # the template and the layout below; a change rebuilds every chat shard
CHUNK_BYTES = 1 << 20  # lines handed to a worker at a time
ROW_FIELDS = 4         # rows.bin, per row: start, length, first and last trained position (-1: none)
# What a file's records are, by its kind: their name (info.json's count, the summary line) and rows each (rows.bin).
KINDS = {"chat": ("conversations", 1), "preference": ("pairs", 2)}


def shard_dir_for(path: str, shard_dir: str = "") -> str:
    """Where a chat file's shards live: {file}.shards beside it, or in shard_dir."""
    return os.path.join(shard_dir or os.path.dirname(path) or ".", os.path.basename(path) + ".shards")


def chat_tasks(path: str, kind: str):
    """(kind, number of the first record, [(where, raw line or record)], bytes) chunks of a chat or preference
    file, unparsed: the workers parse the JSON too, which is most of the work."""
    first, records, size = 0, [], 0
    for where, raw, nbytes in iter_json_records(path, parse=False):
        records.append((where, raw))
        size += nbytes
        if size >= CHUNK_BYTES or len(records) >= 4096:
            yield kind, first, records, size
            first, records, size = first + len(records), [], 0
    if records or size:
        yield kind, first, records, size


def trained_span(starts: np.ndarray, trained: np.ndarray) -> tuple:
    """For each conversation (starting at starts, back to back in trained): the first and last position,
    counted from its start, of a trained label after its first token (labels[0] is never a target); -1 if none."""
    first, last = np.full(len(starts), -1, np.int64), np.full(len(starts), -1, np.int64)
    where = np.flatnonzero(trained)
    conv = np.searchsorted(starts, where, side="right") - 1
    pos = where - starts[conv]
    conv, pos = conv[pos > 0], pos[pos > 0]
    if len(conv):
        convs, first_at = np.unique(conv, return_index=True)  # conv is sorted: runs per conversation
        last_at = np.append(first_at[1:], len(conv)) - 1
        first[convs], last[convs] = pos[first_at], pos[last_at]
    return first, last


def tokenize_chats(task) -> tuple:
    """In a worker: one chunk of chat_tasks -> (ids, uint8 trained, int64 rows (n, ROW_FIELDS) with
    starts in the chunk, formats, [(where, why)] of skipped records, bytes). A conversation is one row, a
    preference pair two (reply_rows: chosen, then rejected). UserError for a different schema."""
    kind, first, records, nbytes = task
    tok = worker_tokenizer()
    formats, skipped, conversations, texts = Counter(), [], [], []
    for n, (where, raw) in enumerate(records, first):
        record = json_value(raw) if isinstance(raw, bytes) else raw
        try:
            if kind == "chat":
                fmt, messages, extra = conversation_of(where, record, n == 0)
                messages = chatml_turns(messages, extra.get("tools"))  # tools and calls laid out as the template does
            else:
                fmt, messages, chosen, rejected, _ = pair_of(where, record, n == 0)
        except BadRecord as e:
            skipped.append((where, str(e)))
            continue
        formats[fmt] += 1
        conversations.append(messages)  # of a pair: the conversation before the replies
        texts.append(template_texts(messages) if kind == "chat" else
                     template_texts(messages, True) + [chosen, rejected])
    pieces = tok.encode_batch([t for ts in texts for t in ts])  # one call for the chunk: much faster
    s, ids, labels, lengths, at = special_ids(tok), [], [], [], 0
    for messages, ts in zip(conversations, texts):
        encoded = pieces[at:at + len(ts)]
        at += len(ts)
        record_rows = [assemble(s, messages, encoded)] if kind == "chat" else reply_rows(s, messages, encoded)
        for row_ids, row_labels in record_rows:
            ids += row_ids
            labels += row_labels
            lengths.append(len(row_ids))
    ids = np.array(ids, dtype=token_dtype(tok.vocab_size))
    trained = np.array(labels, dtype=np.int64) != IGNORE_INDEX
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    rows = np.stack([starts, np.array(lengths, np.int64), *trained_span(starts, trained)], axis=1) if lengths \
        else np.zeros((0, ROW_FIELDS), np.int64)
    return ids, trained.astype(np.uint8), rows, formats, skipped, nbytes


def build_chat_shards(path: str, tok: Tokenizer, out: str, num_workers: int, verbose: bool, kind: str = "chat") -> dict:
    """Tokenize a chat (or preference) file into out/: ids.bin, trained.bin, rows.bin, then info.json. Built in
    out.tmp and renamed into place, so a directory named out is always complete. Returns the info."""
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise UserError(f"cannot write the chat shards of {path} to {tmp}: {e.strerror}; "
                        f"choose a writable folder with --shard_dir") from None
    skipped, formats, tokens, trained_tokens, rows_written = Skipped(verbose), Counter(), 0, 0, 0
    bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, unit_divisor=1024, leave=False,
               desc="tokenizing", disable=not verbose)
    try:
        with contextlib.ExitStack() as stack:
            files = {name: stack.enter_context(open(os.path.join(tmp, name + ".bin"), "wb"))
                     for name in ("ids", "trained", "rows")}
            results = stack.enter_context(contextlib.closing(
                tokenize_in_order(chat_tasks(path, kind), tok.path, num_workers, work=tokenize_chats)))
            for ids, trained, rows, chunk_formats, chunk_skipped, nbytes in results:
                for where, why in chunk_skipped:
                    skipped.warn(where, why)
                formats.update(chunk_formats)
                rows[:, 0] += tokens  # chunk starts -> file starts
                files["ids"].write(ids.tobytes())
                files["trained"].write(trained.tobytes())
                files["rows"].write(rows.astype("<i8").tobytes())
                tokens, trained_tokens, rows_written = tokens + len(ids), trained_tokens + int(trained.sum()), \
                    rows_written + len(rows)
                bar.update(nbytes)
        unit, rows_each = KINDS[kind]
        line = describe_file(path, formats, skipped.count, unit)
        stat = os.stat(path)
        info = {"version": SHARD_VERSION, "kind": kind, "source": os.path.abspath(path), "source_size": stat.st_size,
                "source_mtime_ns": stat.st_mtime_ns, "source_sha256": file_sha256(path),
                "tokenizer": tok.path, "tokenizer_sha256": file_sha256(tok.path),
                "dtype": token_dtype(tok.vocab_size).name, unit: rows_written // rows_each, "tokens": tokens,
                "trained_tokens": trained_tokens, "formats": dict(formats), "malformed": skipped.count, "summary": line}
        with atomic_write(os.path.join(tmp, "info.json")) as f:
            json.dump(info, f, indent=2)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def stale_because(path: str, out: str, tokenizer_path: str, kind: str = "chat"):
    """Why the shards in out cannot be used for this file, read as `kind`, and tokenizer, or None when they can.
    An unchanged size and modification time is trusted; a changed time alone costs one hash of the file."""
    try:
        with open(os.path.join(out, "info.json"), encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        return "no shards yet"
    except ValueError:
        return "its shards' info.json is damaged"
    stat = os.stat(path)
    ids_bytes = recorded_dtype(info, os.path.join(out, "info.json")).itemsize
    unit, rows_each = KINDS[kind]
    sizes = {"ids": info.get("tokens", -1) * ids_bytes, "trained": info.get("tokens", -1),
             "rows": info.get(unit, -1) * rows_each * ROW_FIELDS * 8}
    if info.get("version") != SHARD_VERSION:
        return "they were made by another version of dataset_sft.py"
    if info.get("kind", "chat") != kind:  # shards made before preference files are chat shards
        return f"its shards were made for {info.get('kind', 'chat')} data"
    if any(not os.path.isfile(f := os.path.join(out, name + ".bin")) or os.path.getsize(f) != size
           for name, size in sizes.items()):
        return "its shards are incomplete"
    if info["tokenizer_sha256"] != file_sha256(tokenizer_path):
        return f"the tokenizer changed ({tokenizer_path})"
    if stat.st_size != info["source_size"] or (stat.st_mtime_ns != info["source_mtime_ns"] and
                                               file_sha256(path) != info["source_sha256"]):
        return "the file changed"
    return None


class ChatShards:
    """The tokenized form of one chat (kind "chat") or preference ("preference") file, memory-mapped: ids, trained
    (uint8: 1 where the id is a trained label), rows (n, ROW_FIELDS) int64 and info. Built first when missing or
    stale, and said so."""

    def __init__(self, path: str, tokenizer_path: str, shard_dir: str = "", num_workers: int = 0,
                 verbose: bool = True, kind: str = "chat"):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file")
        tok = load_tokenizer(tokenizer_path)  # a clear error before any worker starts
        self.dir = out = shard_dir_for(path, shard_dir)
        why = stale_because(path, out, tokenizer_path, kind)
        if why is None:
            with open(os.path.join(out, "info.json"), encoding="utf-8") as f:
                self.info = json.load(f)
        else:
            # a worker per core, but no more than the file has chunks for (starting one costs a moment)
            workers = min(num_workers or os.cpu_count() or 1, 1 + os.path.getsize(path) // (2 * CHUNK_BYTES))
            if verbose:
                print(f"{path}: tokenizing into {out} with {workers} worker{'s' * (workers > 1)} ({why}); "
                      f"later runs reuse it")
            t0 = time.perf_counter()
            self.info = build_chat_shards(path, tok, out, workers, verbose, kind)
            if verbose:
                print(f"{path}: {self.info['tokens']:,} tokens in {time.perf_counter() - t0:.1f}s")
        if verbose:
            print(self.info["summary"])
        dtype = recorded_dtype(self.info, os.path.join(out, "info.json"))
        self.ids = np.memmap(os.path.join(out, "ids.bin"), dtype=dtype, mode="r")
        self.trained = np.memmap(os.path.join(out, "trained.bin"), dtype=np.uint8, mode="r")
        self.rows = np.fromfile(os.path.join(out, "rows.bin"), dtype="<i8").reshape(-1, ROW_FIELDS)


# -----------------------------------------------------------------------------
# the training-time reader

def pack_rows(widths: np.ndarray, seq_len: int, seed: int, window: int = 1000) -> tuple:
    """Rows of at most seq_len tokens, each a few whole conversations: (order, bounds), packed row p holding
    conversations order[bounds[p]:bounds[p + 1]]. The conversations are shuffled (by the seed) and taken
    `window` at a time; within a window each row starts with the longest conversation left and is filled
    with the longest that still fit, which wastes far less than filling rows in order."""
    order = np.random.default_rng(seed).permutation(len(widths))
    rows = []
    for at in range(0, len(order), window):
        items = sorted(zip(widths[order[at:at + window]].tolist(), order[at:at + window].tolist()))
        keys = [w for w, _ in items]  # ascending, for bisect
        while items:
            keys.pop()
            width, i = items.pop()
            row, room = [i], seq_len - width
            while (k := bisect.bisect_right(keys, room) - 1) >= 0:  # the longest that still fits
                row.append(items[k][1])
                room -= keys[k]
                del items[k], keys[k]
            rows.append(row)
    return np.array([i for row in rows for i in row]), np.cumsum([0] + [len(row) for row in rows])


class ShardBatches:
    """What SFTData and PreferenceData share: the file's shards (built first when missing or stale), its rows
    (starts, lengths: set by each), and the order batches take its items in (len(self) of them: rows, or pairs).

    batch(index) is a pure function of (seed, index), so resuming needs only the index. Batch `index`
    holds the global positions index*G .. index*G+G-1 (G = batch_size * world_size) of an endless
    stream in which epoch e is the items in the order of a permutation seeded by (seed, e); rank r takes
    items r*batch_size:(r+1)*batch_size. Rows are padded on the right with <pad> (targets IGNORE_INDEX)
    to the longest row of the global batch: every rank gets the same shape, and its rows are exactly
    those of the one-process batch."""

    def __init__(self, path, tokenizer_path, seq_len: int, batch_size: int, seed: int, rank: int, world_size: int,
                 shard_dir: str, num_workers: int, kind: str):
        if seq_len < 1 or batch_size < 1:
            raise UserError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be at least 1")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in 0..{world_size - 1}")
        self.seq_len, self.batch_size, self.seed, self.rank, self.world_size = seq_len, batch_size, seed, rank, world_size
        self.tok = load_tokenizer(tokenizer_path)
        self.special = special_ids(self.tok)
        self.vocab_size, self.pad_id = self.tok.vocab_size, self.special["pad"]
        self.verbose = rank == 0
        self.shards = ChatShards(path, tokenizer_path, shard_dir, num_workers, self.verbose, kind)
        self.ids, self.trained = self.shards.ids, self.shards.trained
        self._permutation = (None, None)  # (epoch, order) of the last epoch used

    @property
    def tokens_per_row(self) -> float:
        """Mean tokens per item, what batch_size counts (a row; for PreferenceData a pair, both its rows): train.py's
        epochs report multiplies it by the items a run reads."""
        return self.num_tokens / len(self)

    def row(self, i: int) -> tuple:
        """(ids, labels) of row i as int64 arrays."""
        span = slice(self.starts[i], self.starts[i] + self.lengths[i])
        ids = self.ids[span].astype(np.int64)
        return ids, np.where(self.trained[span].astype(bool), ids, IGNORE_INDEX)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._permutation[0] != epoch:
            self._permutation = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self)))
        return self._permutation[1]

    def rows_of(self, index: int) -> np.ndarray:
        """The items (rows; pairs for PreferenceData) of global batch `index`, all ranks."""
        size = self.batch_size * self.world_size
        positions = index * size + np.arange(size)
        epochs, offsets = np.divmod(positions, len(self))
        return np.concatenate([self.epoch_order(e)[offsets[epochs == e]] for e in np.unique(epochs)])

    def mine(self, items: np.ndarray) -> np.ndarray:
        """This rank's part of a global batch's items."""
        return items[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]


class SFTData(ShardBatches):
    """Conversations as training rows for train.py, read from the file's chat shards (built first
    when missing or stale). A row is a conversation cut to its part that trains (see the top); batches
    as ShardBatches says.

    With pack, a row is instead seq_len tokens holding several conversations (pack_rows); the batch adds
    their positions and document ids (the padding at a row's end is a document of its own). With
    think_weight, batch() also returns loss_weights() (number_weight: on the numbers of think blocks and calls)."""

    def __init__(self, path, tokenizer_path, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, think_weight=None, pack: bool = False, shard_dir: str = "",
                 num_workers: int = 0, number_weight: float = 1.0):
        super().__init__(path, tokenizer_path, seq_len, batch_size, seed, rank, world_size, shard_dir, num_workers,
                         kind="chat")
        self.think_weight, self.number_weight, self.pack = think_weight, number_weight, pack
        self.think_ids = (self.special["think"], self.special["end_think"])
        self.call_ids = (self.special["tool_call"], self.special["end_tool_call"])
        self.number_ids = number_ids(self.tok) if think_weight is not None and number_weight != 1 else []
        shards = self.shards

        start, length, first, last = shards.rows.T
        no_reply = first < 0
        too_long = ~no_reply & (first > seq_len)  # its first trained target lies past seq_len
        keep = ~no_reply & ~too_long
        end = np.minimum(last + 1, seq_len + 1)  # up to the last trained id, at most seq_len + 1 ids
        counts = {"truncated": int((keep & (last + 1 > seq_len + 1)).sum()),
                  "skipped_no_reply": int(no_reply.sum()), "skipped_too_long": int(too_long.sum())}
        self.starts, self.lengths = start[keep], end[keep]
        self.stats = {"formats": Counter(shards.info["formats"]), "malformed": shards.info["malformed"],
                      "rows": len(self.starts), **counts}
        if not len(self.starts):
            raise UserError(f"{path}: no conversation has an assistant reply within seq_len {seq_len} tokens "
                            f"({counts['skipped_no_reply']} without one, {counts['skipped_too_long']} starting later)")
        self.conversations = len(self.starts)
        self.num_tokens = int(self.lengths.sum() - len(self.starts))  # inputs, over all rows
        if pack:
            self.order, self.bounds = pack_rows(self.lengths - 1, seq_len, seed)
        if self.verbose:
            skipped = [f"{counts[k]:,} {why}" for k, why in (("skipped_no_reply", "with no assistant reply"),
                       ("skipped_too_long", "whose first reply starts past seq_len")) if counts[k]]
            packed = f"; packed into {len(self):,} rows of {seq_len} ({self.num_tokens / len(self) / seq_len:.0%} " \
                     f"filled)" if pack else ""
            print(f"{path}: {len(self.starts):,} rows, {self.num_tokens:,} tokens "
                  f"({shards.info['trained_tokens'] / max(1, shards.info['tokens']):.0%} of the file trained), "
                  f"longest {self.lengths.max() - 1}; {counts['truncated']:,} truncated to seq_len {seq_len}"
                  + (f"; skipped {', '.join(skipped)}" if skipped else "") + packed)

    def __len__(self) -> int:
        """Rows: conversations, or packed rows with pack."""
        return len(self.bounds) - 1 if self.pack else len(self.starts)

    def batch(self, index: int) -> dict:
        """{"tokens", "targets"[, "positions", "document_ids"][, "loss_weight"]}: CPU tensors (batch_size, T),
        int64 but loss_weight (float32, only with think_weight). T is seq_len with pack, else the longest
        row of the global batch (at most seq_len)."""
        rows = self.rows_of(index)
        mine = self.mine(rows)
        width = self.seq_len if self.pack else int(self.lengths[rows].max()) - 1
        tokens = np.full((self.batch_size, width), self.pad_id, dtype=np.int64)
        targets = np.full((self.batch_size, width), IGNORE_INDEX, dtype=np.int64)
        if self.pack:
            positions = np.zeros((self.batch_size, width), dtype=np.int64)
            documents = np.zeros((self.batch_size, width), dtype=np.int64)
        for r, p in enumerate(mine):
            conversations = self.order[self.bounds[p]:self.bounds[p + 1]] if self.pack else [p]
            at = 0
            for d, i in enumerate(conversations):
                ids, labels = self.row(i)
                n = len(ids) - 1
                tokens[r, at:at + n], targets[r, at:at + n] = ids[:-1], labels[1:]
                if self.pack:
                    positions[r, at:at + n], documents[r, at:at + n] = np.arange(n), d
                at += n
            if self.pack:  # the padding at the end: a document of its own
                positions[r, at:], documents[r, at:] = np.arange(width - at), len(conversations)
        batch = {"tokens": torch.from_numpy(tokens), "targets": torch.from_numpy(targets)}
        if self.pack:
            batch.update(positions=torch.from_numpy(positions), document_ids=torch.from_numpy(documents))
        if self.think_weight is not None:
            batch["loss_weight"] = torch.from_numpy(loss_weights(targets, self.think_ids, self.think_weight,
                                                                 self.number_ids, self.number_weight, self.call_ids))
        return batch


class PreferenceData(ShardBatches):
    """Preference pairs as training rows for train_dpo.py, read from the file's shards (built first when missing
    or stale). Pair p is rows 2p (its prompt, then the chosen reply) and 2p + 1 (the same prompt, then the rejected
    one); only a reply and its <|im_end|> are trained (see the top). Batches take pairs, as ShardBatches says.

    A row keeps at most seq_len + 1 ids (tokens = ids[:-1], targets = labels[1:]). A pair whose prompt leaves no
    room for a reply token within seq_len is skipped; otherwise a reply too long is cut at its end (the pair counted
    once as truncated). Prompts are never cut, and a pair is kept or skipped whole."""

    def __init__(self, path, tokenizer_path, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shard_dir: str = "", num_workers: int = 0):
        super().__init__(path, tokenizer_path, seq_len, batch_size, seed, rank, world_size, shard_dir, num_workers,
                         kind="preference")
        info = self.shards.info
        rows = self.shards.rows.reshape(-1, 2, ROW_FIELDS)  # pair, chosen | rejected, field
        start, length = rows[..., 0], rows[..., 1]
        prompt = rows[:, 0, 2]  # the first trained position: where the reply starts, the same in both rows
        keep = prompt <= seq_len  # the reply's first token is still a target
        counts = {"truncated": int((keep & (length > seq_len + 1).any(axis=1)).sum()),
                  "skipped_too_long": int((~keep).sum())}
        self.starts, self.lengths = start[keep].ravel(), np.minimum(length[keep], seq_len + 1).ravel()
        self.pairs = int(keep.sum())
        self.rows_per_batch = 2 * batch_size  # a micro-batch's rows, for train.py's memory estimate
        self.stats = {"formats": Counter(info["formats"]), "malformed": info["malformed"], **counts}
        if not self.pairs:
            raise UserError(f"{path}: no pair's prompt leaves room for a reply within seq_len {seq_len} tokens "
                            f"({counts['skipped_too_long']:,} pairs)")
        self.num_tokens = int(self.lengths.sum() - len(self.lengths))  # inputs, over both rows of every pair
        if self.verbose:
            skipped = counts["skipped_too_long"]
            print(f"{path}: {self.pairs:,} pairs, {self.num_tokens:,} tokens, longest row {self.lengths.max() - 1}; "
                  f"{counts['truncated']:,} truncated to seq_len {seq_len}"
                  + (f"; skipped {skipped:,} whose prompt leaves no room for a reply" if skipped else ""))

    def __len__(self) -> int:
        """Pairs."""
        return self.pairs

    def pair_rows(self, pair_indices, width: int = 0) -> dict:
        """{"tokens", "targets"}: CPU int64 tensors (2n, T) for n pairs, in the order given: rows 0..n-1 their
        chosen replies, rows n..2n-1 their rejected ones. T is width, or their longest row."""
        pairs = np.asarray(pair_indices, dtype=np.int64)
        rows = np.concatenate([2 * pairs, 2 * pairs + 1])
        width = width or int(self.lengths.reshape(-1, 2)[pairs].max()) - 1
        tokens = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        for r, i in enumerate(rows):
            ids, labels = self.row(i)
            tokens[r, :len(ids) - 1], targets[r, :len(ids) - 1] = ids[:-1], labels[1:]
        return {"tokens": torch.from_numpy(tokens), "targets": torch.from_numpy(targets)}

    def batch(self, index: int) -> dict:
        """pair_rows of this rank's batch_size pairs of global batch `index`, T the longest row of the global
        batch, and "pair_index" (batch_size,) int64: those pairs' numbers (0..pairs-1), for reference log-probs."""
        pairs = self.rows_of(index)
        mine = self.mine(pairs)
        width = int(self.lengths.reshape(-1, 2)[pairs].max()) - 1
        return {**self.pair_rows(mine, width), "pair_index": torch.from_numpy(mine.astype(np.int64))}


# -----------------------------------------------------------------------------
# the data of a fine-tuning run

def resolve_tokenizer(cfg):
    """An empty --tokenizer becomes the one the starting checkpoint was trained with (an imported model's own
    tokenizer.json), read without loading its tensors: fine-tuning with another would train nonsense quietly."""
    if cfg.tokenizer:
        return
    path = os.path.join(cfg.out_dir, "last.pt") if cfg.resume else cfg.init_from
    try:
        recorded = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("tokenizer")
    except Exception:  # missing or damaged: loading the checkpoint itself reports it
        recorded = None
    cfg.tokenizer = recorded or "data/tokenizer.model"


def read_chats(cfg, model, rt, paths: list, reader=SFTData, **options) -> list:
    """Each chat file of `paths` read by `reader` (SFTData, or PreferenceData) with `options` for the run's rank
    (rt: runtime.Runtime), at cfg's (train.py's FinetuneConfig) sequence length and batch size; None for an
    empty path. Rank 0 tokenizes files without shards first; the other ranks then map its shards."""
    seq_len = cfg.seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise UserError(f"--seq_len {seq_len} is longer than the model's max_seq_len {model.cfg.max_seq_len}")
    common = dict(tokenizer_path=cfg.tokenizer, seq_len=seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                  rank=rt.rank, world_size=rt.world_size, shard_dir=cfg.shard_dir, num_workers=cfg.num_workers,
                  **options)
    if not rt.master:
        rt.barrier()
    data = [reader(path, **common) if path else None for path in paths]
    if rt.master:
        rt.barrier()
    return data


def chat_data(cfg, model, rt, reader=SFTData, paths: tuple = (), **options) -> tuple:
    """(training data, validation data or None) of a fine-tuning run: cfg's chat files (or `paths`, files made from
    them) read by read_chats, checked against the model, and one line saying what will train. Its tokenizer is
    resolved first."""
    resolve_tokenizer(cfg)
    train_data, val_data = read_chats(cfg, model, rt, list(paths or (cfg.train_data, cfg.val_data)), reader, **options)
    if train_data.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{cfg.tokenizer} has {train_data.vocab_size} pieces but the model's vocab_size is "
                        f"{model.cfg.vocab_size}: use the tokenizer the model was trained with")
    if rt.master:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lora = f" (LoRA: {trained / 1e6:.2f}M of them trained)" if cfg.lora_rank else ""
        packed = f" in {len(train_data):,} packed rows" if cfg.pack else ""
        what = f"{train_data.pairs:,} training pairs" if hasattr(train_data, "pairs") else \
            f"{train_data.conversations:,} training conversations{packed}"
        print(f"model: {model.num_params() / 1e6:.2f}M parameters{lora} from {cfg.init_from}, tokenizer "
              f"{cfg.tokenizer}; {what}")
    return train_data, val_data


def replay_mix(path: str, replay_path: str, share: float, seed: int, out: str) -> tuple:
    """Write `out`: the records of chat file `path` and, mixed among them, records drawn from `replay_path` so
    they are `share` of the whole (0 <= share < 1): the chats a later stage replays so the model keeps what an
    earlier stage taught it. Records are copied as they are (their lines), drawn without repeats while the
    replayed file has enough, and shuffled together, all by `seed`. Returns (records of path, replayed)."""
    if not 0 <= share < 1:
        raise UserError(f"--replay must be at least 0 and less than 1, got {share}")
    if not os.path.isfile(replay_path):
        raise UserError(f"{replay_path}: no such file (the chats to replay; --replay 0 trains without them)")
    rng = random.Random(seed)
    lines = [line for line in open(path, encoding="utf-8") if line.strip()]
    pool = [line for line in open(replay_path, encoding="utf-8") if line.strip()]
    wanted = round(len(lines) * share / (1 - share))
    if wanted and not pool:
        raise UserError(f"{replay_path}: no chats to replay")
    replayed = [line for _ in range(wanted // len(pool)) for line in pool] + rng.sample(pool, wanted % len(pool))
    mixed = lines + replayed
    rng.shuffle(mixed)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with atomic_write(out) as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in mixed)
    return len(lines), len(replayed)


THINK_BLOCK = re.compile(r"^\s*<think>.*?</think>\s*", re.S)


def answer_only_file(path: str, out_dir: str, resume: bool = False) -> str:
    """A copy of a chat file (in our conversations format, other keys kept) in out_dir/answer_only/, every
    assistant reply without its leading <think>...</think> block: the same problems, answers only. A resumed
    run reads the copy its first run wrote."""
    out = os.path.join(out_dir, "answer_only", os.path.basename(path))
    if resume:
        return out
    conversations, _ = read_conversations(path, verbose=False)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with atomic_write(out) as f:
        for conv in conversations:
            messages = [dict(m, content=THINK_BLOCK.sub("", m["content"], count=1)) if m["role"] == "assistant"
                        else m for m in conv.messages]
            f.write(json.dumps({"conversations": messages, **conv.extra}, ensure_ascii=False) + "\n")
    return out


# -----------------------------------------------------------------------------
# the script

def show_row(tok: Tokenizer, ids: np.ndarray, trained: np.ndarray, color: bool) -> str:
    """The row as text, its trained spans in green (or between [[ and ]] when not on a terminal)."""
    start, end = ("\033[32m", "\033[0m") if color else ("[[", "]]")
    spans = itertools.groupby(zip(ids.tolist(), trained.tolist()), key=lambda x: x[1])
    return "".join(start + tok.decode([i for i, _ in g]) + end if t else tok.decode([i for i, _ in g]) for t, g in spans)


def inspect(cfg: InspectConfig):
    data = SFTData(cfg.data, cfg.tokenizer, cfg.seq_len, batch_size=1, shard_dir=cfg.shard_dir,
                   num_workers=cfg.num_workers)
    for i in range(min(cfg.show, len(data))):
        ids, labels = data.row(i)
        print(f"--- row {i}: {len(ids) - 1} tokens, {int((labels[1:] != IGNORE_INDEX).sum())} trained")
        print(show_row(data.tok, ids, labels != IGNORE_INDEX, sys.stdout.isatty()))


def main(argv=None):
    run_guarded(inspect, parse_config(InspectConfig, argv, description=__doc__.strip().splitlines()[0]))


if __name__ == "__main__":
    main()
