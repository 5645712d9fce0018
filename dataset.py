"""
Text -> packed token shards for pretraining, and the reader train.py samples them with.

  python dataset.py                                         # data/pretrain.jsonl -> data/pretrain_train_*.bin
  python dataset.py --inputs book.txt --val_inputs "" --val_fraction 0.01 --name books

Inputs (comma-separated, any mix):
  .jsonl   one {"text": ...} object per line (--text_field picks another key); malformed lines are skipped
           with a warning naming the line
  .txt     one document per block of lines separated by one or more blank lines
  .parquet .csv .json .arrow   read through `datasets` from the local file (never the network), column --text_field
Every document is tokenized, followed by the end-of-document id (eos, looked up in the tokenizer), and
appended to {out_dir}/{name}_train_000.bin, _001.bin, ... (shard_tokens each) or, for held-out documents, to
{out_dir}/{name}_val.bin. A .bin is raw little-endian ids: uint16, or uint32 when the vocabulary has more
than 65,536 ids (tokenizer.token_dtype). Its sidecar <file>.bin.json records the tokenizer (path, sha256,
vocab size, eos id), the dtype and the token and document counts. Sidecars are written last, once every
shard is complete, so a .bin without one is an unfinished run and the reader refuses it.
"""
import contextlib
import glob
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from cli import UserError, parse_config, run_guarded
from records import Skipped, atomic_write, file_sha256, iter_json_records
from tokenizer import load_tokenizer, recorded_dtype, token_dtype, tokenize_in_order, worker_tokenizer

DATASETS_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".arrow": "arrow"}


@dataclass
class DatasetConfig:
    inputs: str = field(default="data/pretrain.jsonl",
                        metadata={"help": "comma-separated .jsonl/.txt/.parquet/.csv/.json/.arrow files"})
    val_inputs: str = field(default="data/pretrain_val.jsonl",
                            metadata={"help": "held-out documents for {name}_val.bin; empty: hold out val_fraction of inputs"})
    val_fraction: float = field(default=0.01, metadata={
        "help": "with empty val_inputs: this fraction of the documents, evenly spread, goes to validation (0: none)"})
    tokenizer: str = field(default="data/tokenizer.model", metadata={
        "help": "tokenizer.model (train_tokenizer.py) or an imported model's tokenizer.json"})
    out_dir: str = "data"
    name: str = field(default="pretrain", metadata={"help": "files are {out_dir}/{name}_train_000.bin ... and {name}_val.bin"})
    text_field: str = field(default="text", metadata={"help": "the key / column holding the document text"})
    shard_tokens: int = field(default=100_000_000, metadata={
        "help": "tokens per training shard (2 bytes each; 4 with a vocabulary over 65,536)"})
    num_workers: int = field(default_factory=lambda: os.cpu_count() or 1, metadata={"help": "tokenizer processes"})
    chunk_docs: int = field(default=256, metadata={"help": "documents per task handed to a worker"})


# -----------------------------------------------------------------------------
# reading documents

def warn(message: str):
    tqdm.write(f"warning: {message}", file=sys.stderr)  # above the progress bar, not through it


def read_jsonl(path: str, text_field: str, skipped: Skipped):
    """Yield (text or None, bytes read) per record; a damaged one is warned about and yields None."""
    for where, record, nbytes in iter_json_records(path):
        if not isinstance(record, dict):
            reason = "not valid JSON" if record is None else f"expected a JSON object, got {type(record).__name__}"
        elif text_field not in record:
            reason = f"no \"{text_field}\" field"
        elif not isinstance(record[text_field], str):
            reason = f"\"{text_field}\" is {type(record[text_field]).__name__}, not a string"
        else:
            yield record[text_field], nbytes
            continue
        skipped.warn(where, reason)
        yield None, nbytes


def read_txt(path: str, skipped: Skipped):
    """Yield (document, bytes read): a document is a block of lines ended by a blank line (or
    the end of the file), without its final newline. Windows line ends become \\n."""
    block, size = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            size += len(raw)
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff" if lineno == 1 else "")
            except UnicodeDecodeError:
                skipped.warn(f"{path} line {lineno}", "not valid UTF-8")
                continue
            if line.strip():
                block.append(line.removesuffix("\n").removesuffix("\r"))
            elif block:
                yield "\n".join(block), size
                block, size = [], 0
    yield ("\n".join(block) if block else None), size


def read_with_datasets(path: str, builder: str, text_field: str):
    """Yield (text, 0) from a file `datasets` can parse, streamed from the local file: no network,
    and no converted copy in the datasets cache."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(dict.fromkeys(saved, "1"))  # before the import: datasets reads them once, there
    try:
        import datasets
        batches = datasets.load_dataset(builder, data_files=path, split="train", streaming=True).iter(1024)
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # pyarrow / datasets errors on a damaged file: one line for the user
            detail = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise UserError(f"{path}: could not be read as {builder}: {detail}") from None
        if batch is None:
            return
        if text_field not in batch:
            raise UserError(f"{path}: no column \"{text_field}\" (columns: {', '.join(batch)}); "
                            f"choose one with --text_field")
        yield from ((t if isinstance(t, str) else None, 0) for t in batch[text_field])


def check_input(path: str):
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".txt", *DATASETS_BUILDERS):
        raise UserError(f"{path}: unknown format {ext or '(no extension)'}; "
                        f"use .jsonl, .txt, {', '.join(DATASETS_BUILDERS)}")


def read_documents(path: str, text_field: str, skipped: Skipped):
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        return read_jsonl(path, text_field, skipped)
    if ext == ".txt":
        return read_txt(path, skipped)
    return read_with_datasets(path, DATASETS_BUILDERS[ext], text_field)


def make_tasks(sources, cfg: DatasetConfig, skipped: Skipped):
    """Group documents into (split, texts, bytes) chunks for the workers. With no val_inputs,
    document k (1-based) of the inputs is held out when k * val_fraction crosses an integer:
    deterministic, evenly spread, and exactly floor(n * val_fraction) documents."""
    texts, sizes = {"train": [], "val": []}, {"train": 0, "val": 0}
    held_out_from_inputs = not any(split == "val" for split, _ in sources)
    k = 0
    for source_split, path in sources:
        for text, nbytes in read_documents(path, cfg.text_field, skipped):
            split = source_split
            if text and split == "train" and held_out_from_inputs:
                k += 1
                if int(k * cfg.val_fraction) > int((k - 1) * cfg.val_fraction):
                    split = "val"
            sizes[split] += nbytes
            if text:  # an empty document would add nothing but a lone end-of-document id
                texts[split].append(text)
            if len(texts[split]) >= cfg.chunk_docs:
                yield split, texts[split], sizes[split]
                texts[split], sizes[split] = [], 0
    for split in texts:
        if texts[split] or sizes[split]:
            yield split, texts[split], sizes[split]


# -----------------------------------------------------------------------------
# tokenizing, in worker processes (tokenizer.tokenize_in_order)

def tokenize_chunk(task):
    """(split, texts, bytes) -> (split, ids with eos after every document, documents, bytes)."""
    split, texts, nbytes = task
    tok = worker_tokenizer()
    docs = tok.encode_batch(texts)
    flat = np.empty(sum(map(len, docs)) + len(docs), dtype=token_dtype(tok.vocab_size))
    pos = 0
    for ids in docs:
        flat[pos:pos + len(ids)] = ids
        flat[pos + len(ids)] = tok.eos_id
        pos += len(ids) + 1
    return split, flat, len(docs), nbytes


# -----------------------------------------------------------------------------
# writing shards

class ShardWriter:
    """Appends tokens to the files path_for(0), path_for(1), ... of at most `capacity` tokens each
    (capacity 0: one file). A file is written under a temporary name and renamed once full."""

    def __init__(self, path_for, capacity: int, eos_id: int):
        self.path_for, self.capacity, self.eos_id = path_for, capacity, eos_id
        self.done = []  # (path, tokens, documents) of the finished files
        self.file, self.tokens, self.documents = None, 0, 0

    def write(self, ids: np.ndarray):
        while len(ids):
            if self.file is None:
                self.file = open(self.path_for(len(self.done)) + ".tmp", "wb")
            room = self.capacity - self.tokens if self.capacity else len(ids)
            part, ids = ids[:room], ids[room:]
            self.file.write(part.tobytes())
            self.tokens += len(part)
            self.documents += int(np.count_nonzero(part == self.eos_id))  # documents that end in this file
            if self.tokens == self.capacity:
                self._finish()

    def _finish(self):
        path = self.path_for(len(self.done))
        self.file.close()
        os.replace(path + ".tmp", path)
        self.done.append((path, self.tokens, self.documents))
        self.file, self.tokens, self.documents = None, 0, 0

    def close(self) -> list:
        if self.file is not None:
            self._finish()
        return self.done

    def discard(self):
        """Remove everything this writer made: an interrupted run leaves no shards behind."""
        if self.file is not None:
            self.file.close()
            os.remove(self.file.name)
            self.file = None
        for path, _, _ in self.done:
            os.remove(path)
        self.done = []


def write_sidecar(bin_path: str, info: dict):
    """<bin_path>.json, atomically. Written after the .bin: its presence marks the shard complete."""
    with atomic_write(bin_path + ".json") as f:
        json.dump(info, f, indent=2)


def remove_stale_shards(out_dir: str, name: str):
    """Delete {name}_train_NNN.bin / {name}_val.bin (sidecars first) and temporaries from an earlier
    run, so a smaller rerun cannot leave old shards for the reader's glob to pick up."""
    shard = re.compile(re.escape(name) + r"_(train_\d+|val)\.bin(\.json)?(\.tmp)?")
    stale = [f for f in os.listdir(out_dir) if shard.fullmatch(f)]
    for f in sorted(stale, key=lambda f: not f.endswith(".json")):
        os.remove(os.path.join(out_dir, f))


# -----------------------------------------------------------------------------
# the whole job

def build_shards(cfg: DatasetConfig) -> dict:
    """Tokenize cfg.inputs (and the held-out documents) into shards; return what was written."""
    if cfg.shard_tokens < 1 or cfg.num_workers < 1 or cfg.chunk_docs < 1:
        raise UserError("shard_tokens, num_workers and chunk_docs must be at least 1")
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"val_fraction {cfg.val_fraction} must be in [0, 1)")
    tok = load_tokenizer(cfg.tokenizer)
    train_paths = [p for p in cfg.inputs.split(",") if p]
    val_paths = [p for p in cfg.val_inputs.split(",") if p]
    if not train_paths:
        raise UserError("no --inputs given")
    for path in train_paths:
        check_input(path)
    for path in val_paths:
        try:
            check_input(path)
        except UserError as e:
            raise UserError(f"{e} (held-out documents; --val_inputs \"\" holds out --val_fraction "
                            f"of the inputs instead)") from None
    has_val = bool(val_paths) or cfg.val_fraction > 0

    os.makedirs(cfg.out_dir, exist_ok=True)
    remove_stale_shards(cfg.out_dir, cfg.name)
    prefix = os.path.join(cfg.out_dir, cfg.name)
    writers = {"train": ShardWriter(lambda i: f"{prefix}_train_{i:03d}.bin", cfg.shard_tokens, tok.eos_id),
               "val": ShardWriter(lambda i: f"{prefix}_val.bin", 0, tok.eos_id)}
    skipped = Skipped()
    sources = [("train", p) for p in train_paths] + [("val", p) for p in val_paths]
    total_bytes = sum(os.path.getsize(p) for _, p in sources if p.endswith((".jsonl", ".txt")))
    bar = tqdm(total=total_bytes or None, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing")
    t0 = time.perf_counter()
    try:
        tasks = make_tasks(sources, cfg, skipped)
        with contextlib.closing(tokenize_in_order(tasks, cfg.tokenizer, cfg.num_workers, tokenize_chunk)) as results:
            for split, ids, _, nbytes in results:  # closing: an error here still stops the worker pool
                writers[split].write(ids)
                bar.update(nbytes)
        written = {split: w.close() for split, w in writers.items()}
        bar.close()
        seconds = time.perf_counter() - t0
        if skipped.count:
            warn(f"skipped {skipped.count} malformed lines in total")
        if not written["train"]:
            raise UserError(f"no documents to train on in {cfg.inputs}")
        if has_val and not written["val"]:
            raise UserError(f"no documents in {cfg.val_inputs}" if val_paths else
                            f"val_fraction {cfg.val_fraction} of the documents holds out none: "
                            f"raise --val_fraction, give --val_inputs, or pass --val_fraction 0")
        info = {"tokenizer": cfg.tokenizer, "tokenizer_sha256": file_sha256(cfg.tokenizer),
                "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "dtype": token_dtype(tok.vocab_size).name}
        for path, tokens, documents in written["train"] + written["val"]:
            write_sidecar(path, {**info, "num_tokens": tokens, "num_documents": documents})
    except BaseException:  # errors and Ctrl-C alike: leave no shard behind that could pass for complete
        bar.close()
        for w in writers.values():
            w.discard()
        raise

    summary = {split: {"paths": [p for p, _, _ in files], "tokens": sum(t for _, t, _ in files),
                       "documents": sum(d for _, _, d in files)} for split, files in written.items()}
    summary.update(seconds=seconds, malformed_lines=skipped.count,
                   tokens_per_second=(summary["train"]["tokens"] + summary["val"]["tokens"]) / max(seconds, 1e-9))
    for split, s in summary.items():
        if isinstance(s, dict) and s["paths"]:
            where = s["paths"][0] if len(s["paths"]) == 1 else f"{len(s['paths'])} shards {prefix}_{split}_*.bin"
            print(f"{split}: {s['documents']:,} documents, {s['tokens']:,} tokens -> {where}")
    print(f"tokenized in {seconds:.2f}s: {summary['tokens_per_second']:,.0f} tokens/s with {cfg.num_workers} worker(s)")
    return summary


# -----------------------------------------------------------------------------
# the training-time reader

class TokenShards:
    """Random contiguous windows from memory-mapped shards, for train.py.

    batch(index) is a pure function of (seed, index): resuming needs only the index, and evaluating
    indices 0..n-1 gives the same windows every time. The global batch of batch_size * world_size
    windows is drawn, and rank r takes rows r*batch_size:(r+1)*batch_size, so two DDP ranks with batch B
    see exactly what one process with batch 2B sees. Windows are drawn uniformly over all positions of
    all shards (a shard's share follows its length) and never cross a shard boundary."""

    def __init__(self, pattern_or_paths, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if isinstance(pattern_or_paths, (str, os.PathLike)):
            self.paths = sorted(glob.glob(os.fspath(pattern_or_paths)))
        else:
            self.paths = [os.fspath(p) for p in pattern_or_paths]
        if not self.paths:
            raise UserError(f"no token shards match {pattern_or_paths}: make them with python dataset.py")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in 0..{world_size - 1}")
        self.seq_len, self.batch_size, self.seed, self.rank, self.world_size = seq_len, batch_size, seed, rank, world_size
        infos, dtypes = zip(*map(self._read_sidecar, self.paths))
        for key in ("vocab_size", "eos_id", "tokenizer_sha256"):
            for path, info in zip(self.paths, infos):
                if info[key] != infos[0][key]:
                    raise UserError(f"{path} and {self.paths[0]} were made with different tokenizers "
                                    f"({key} {info[key]} vs {infos[0][key]}): rebuild them with one")
        self.vocab_size, self.eos_id, self.tokenizer = infos[0]["vocab_size"], infos[0]["eos_id"], infos[0]["tokenizer"]
        self.tokenizer_sha256 = infos[0]["tokenizer_sha256"]
        lengths = np.array([info["num_tokens"] for info in infos], dtype=np.int64)
        self.num_tokens = int(lengths.sum())
        self.tokens_per_row = seq_len  # every row is a full window
        # opened once; the OS pages in only the windows read (a 0-token file cannot be mapped)
        self.shards = [np.memmap(p, dtype=dtype, mode="r") if n else None
                       for p, dtype, n in zip(self.paths, dtypes, lengths)]
        windows = np.maximum(lengths - seq_len, 0)  # start positions with seq_len + 1 tokens after them
        if windows.sum() == 0:
            raise UserError(f"{pattern_or_paths}: no shard has the seq_len + 1 = {seq_len + 1} tokens one window "
                            f"needs (largest: {lengths.max()} tokens, {self.num_tokens} in total); "
                            f"use a smaller --seq_len or more data")
        self.window_ends = np.cumsum(windows)  # shard i owns the global start positions [starts[i], ends[i])
        self.window_starts = self.window_ends - windows

    def made_with(self, tokenizer_path: str) -> bool:
        """Whether the shards hold the ids of this tokenizer file (the sha256 their sidecars record)."""
        return os.path.isfile(tokenizer_path) and file_sha256(tokenizer_path) == self.tokenizer_sha256

    @staticmethod
    def _read_sidecar(path: str) -> tuple:
        """(the sidecar's info, the dtype of the shard's ids)"""
        try:
            with open(path + ".json", encoding="utf-8") as f:
                info = json.load(f)
        except FileNotFoundError:
            raise UserError(f"{path} has no sidecar {path}.json, so it is incomplete (an interrupted "
                            f"dataset.py run?): rerun python dataset.py") from None
        except json.JSONDecodeError:
            raise UserError(f"{path}.json is not valid JSON: rerun python dataset.py") from None
        dtype = recorded_dtype(info, f"{path}.json")
        if os.path.getsize(path) != info["num_tokens"] * dtype.itemsize:
            raise UserError(f"{path} is {os.path.getsize(path)} bytes but its sidecar says {info['num_tokens']} "
                            f"tokens: the file changed after it was written; rerun python dataset.py")
        return info, dtype

    def batch(self, index: int) -> dict:
        """{"tokens", "targets"}: int64 CPU tensors (batch_size, seq_len); targets are tokens shifted by one."""
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(0, self.window_ends[-1], size=self.batch_size * self.world_size)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        shard = np.searchsorted(self.window_ends, starts, side="right")
        offsets = starts - self.window_starts[shard]
        rows = np.stack([self.shards[s][o:o + self.seq_len + 1] for s, o in zip(shard, offsets)]).astype(np.int64)
        return {"tokens": torch.from_numpy(rows[:, :-1].copy()), "targets": torch.from_numpy(rows[:, 1:].copy())}


def main(argv=None):
    run_guarded(build_shards, parse_config(DatasetConfig, argv, description=__doc__.strip().splitlines()[0]))


if __name__ == "__main__":
    main()
