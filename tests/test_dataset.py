import hashlib
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch

import dataset
from conftest import ROOT, small_corpus
from dataset import DatasetConfig, TokenShards, build_shards


def documents(n: int, seed: int = 0):
    """n documents of 1-5 sentences each, one line per sentence."""
    lines, rng = small_corpus(5 * n, seed), random.Random(seed)
    docs, i = [], 0
    while len(docs) < n:
        k = rng.randint(1, 5)
        docs.append("\n".join(lines[i:i + k]))
        i += k
    return docs


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def build(tmp_path, tokenizer_path, inputs, **overrides):
    cfg = dict(inputs=str(inputs), val_inputs="", val_fraction=0.0, tokenizer=tokenizer_path,
               out_dir=str(tmp_path / "out"), num_workers=1)
    return build_shards(DatasetConfig(**{**cfg, **overrides}))


def decode_documents(paths, tokenizer_path):
    """The documents in shards, in order: every one must end with the end-of-document id."""
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    ids = np.concatenate([np.fromfile(p, dtype="<u2") for p in paths])
    assert ids[-1] == sp.eos_id()
    return [sp.decode(doc[:-1].tolist()) for doc in np.split(ids, np.flatnonzero(ids == sp.eos_id()) + 1)[:-1]]


def shard_files(directory):
    return sorted(p.name for p in directory.iterdir() if ".bin" in p.name)


def test_round_trip_sidecars_and_held_out_documents(tmp_path, tokenizer_path):
    docs = documents(200)
    summary = build(tmp_path, tokenizer_path, write_jsonl(tmp_path / "c.jsonl", docs),
                    val_fraction=0.1, shard_tokens=1000, num_workers=2, chunk_docs=7)
    train_paths, val_paths = summary["train"]["paths"], summary["val"]["paths"]
    assert len(train_paths) >= 3
    assert train_paths == sorted(str(p) for p in (tmp_path / "out").glob("pretrain_train_*.bin"))
    assert val_paths == [str(tmp_path / "out" / "pretrain_val.bin")]
    # every 10th document is held out, all others are trained on, each exactly once and in order
    assert decode_documents(train_paths, tokenizer_path) == [d for i, d in enumerate(docs) if i % 10 != 9]
    assert decode_documents(val_paths, tokenizer_path) == docs[9::10]

    sha = hashlib.sha256(open(tokenizer_path, "rb").read()).hexdigest()
    infos = []
    for path in train_paths + val_paths:
        info = json.load(open(path + ".json"))
        infos.append(info)
        size = (tmp_path / "out" / path).stat().st_size
        assert info["num_tokens"] * 2 == size
        assert info | {"num_tokens": 0, "num_documents": 0} == {
            "tokenizer": tokenizer_path, "tokenizer_sha256": sha, "vocab_size": 512, "eos_id": 2,
            "dtype": "uint16", "num_tokens": 0, "num_documents": 0}
    assert [i["num_tokens"] for i in infos[:-2]] == [1000] * (len(train_paths) - 1)  # only the last is short
    assert sum(i["num_documents"] for i in infos[:-1]) == summary["train"]["documents"] == 180
    assert infos[-1]["num_documents"] == summary["val"]["documents"] == 20
    assert summary["train"]["tokens"] == sum(i["num_tokens"] for i in infos[:-1])


def test_worker_count_does_not_change_the_bytes_and_reruns_remove_stale_shards(tmp_path, tokenizer_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(120))
    out = tmp_path / "out"
    build(tmp_path, tokenizer_path, corpus, shard_tokens=300, num_workers=1, chunk_docs=50)
    one_worker = {name: (out / name).read_bytes() for name in shard_files(out) if name.endswith(".bin")}
    build(tmp_path, tokenizer_path, corpus, shard_tokens=300, num_workers=2, chunk_docs=3)
    assert {name: (out / name).read_bytes() for name in one_worker} == one_worker
    assert len(one_worker) > 3
    build(tmp_path, tokenizer_path, corpus, shard_tokens=10**6)  # a smaller rerun: old _001.. must go
    assert shard_files(out) == ["pretrain_train_000.bin", "pretrain_train_000.bin.json"]


def test_txt_documents_are_blank_line_separated_blocks(tmp_path, tokenizer_path):
    txt = tmp_path / "book.txt"
    txt.write_bytes("\ufeffTom found a red ball.\nIt was 3 steps away.\n\n\n  \nLily lost the old boat.\r\n"
                    "\r\n小猫在树下睡觉。\n".encode("utf-8"))
    summary = build(tmp_path, tokenizer_path, txt)
    assert decode_documents(summary["train"]["paths"], tokenizer_path) == [
        "Tom found a red ball.\nIt was 3 steps away.", "Lily lost the old boat.", "小猫在树下睡觉。"]


def test_parquet_read_through_datasets_with_text_field(tmp_path, tokenizer_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = documents(30)
    pq.write_table(pa.table({"id": list(range(31)), "content": docs[:10] + [None] + docs[10:]}),
                   tmp_path / "c.parquet")
    summary = build(tmp_path, tokenizer_path, tmp_path / "c.parquet", text_field="content")
    assert decode_documents(summary["train"]["paths"], tokenizer_path) == docs
    with pytest.raises(ValueError, match='no column "text" \\(columns: id, content\\)'):
        build(tmp_path, tokenizer_path, tmp_path / "c.parquet")


def test_failure_midway_leaves_no_shards(tmp_path, tokenizer_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(100))
    with pytest.raises(ValueError, match="no column"):  # after the jsonl filled several shards
        build(tmp_path, tokenizer_path, f"{corpus},{tmp_path / 'bad.parquet'}", shard_tokens=200, num_workers=2)
    assert shard_files(tmp_path / "out") == []


def test_malformed_jsonl_lines_are_reported_and_skipped(tmp_path, tokenizer_path, capsys):
    good = documents(4)
    lines = [json.dumps({"text": good[0]}), "{not json", json.dumps({"txt": "x"}), json.dumps([1, 2]),
             json.dumps({"text": good[1]}), json.dumps({"text": 5}), "", "{", json.dumps({"text": good[2]}),
             "]", json.dumps({"text": good[3]}), json.dumps({"text": ""})]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    summary = build(tmp_path, tokenizer_path, corpus)
    err = capsys.readouterr().err
    assert f"warning: {corpus} line 2: not valid JSON; skipped" in err
    assert f"warning: {corpus} line 3: no \"text\" field; skipped" in err
    assert f"warning: {corpus} line 4: expected a JSON object, got list; skipped" in err
    assert f"warning: {corpus} line 6: \"text\" is int, not a string; skipped" in err
    assert f"warning: {corpus} line 8: not valid JSON; skipped" in err
    assert "line 10" not in err  # only the first five are listed ...
    assert "warning: skipped 6 malformed lines in total" in err  # ... and all are counted
    assert decode_documents(summary["train"]["paths"], tokenizer_path) == good
    assert summary["malformed_lines"] == 6


def test_missing_files(tmp_path, tokenizer_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(5))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'nope.jsonl'}: no such file$"):
        build(tmp_path, tokenizer_path, tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="nope_val.jsonl: no such file .*--val_inputs"):
        build(tmp_path, tokenizer_path, corpus, val_inputs=str(tmp_path / "nope_val.jsonl"))
    with pytest.raises(ValueError, match="no such tokenizer"):
        build(tmp_path, str(tmp_path / "none.model"), corpus)
    with pytest.raises(ValueError, match="holds out none"):  # 5 documents * 0.1 < 1
        build(tmp_path, tokenizer_path, corpus, val_fraction=0.1)
    assert shard_files(tmp_path / "out") == []


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "dataset.py"), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
def test_cli_help_success_and_empty_corpus(tmp_path, tokenizer_path):
    r = run_cli("--help")
    assert r.returncode == 0
    for flag in ("--inputs", "--val_inputs", "--val_fraction", "--tokenizer", "--shard_tokens", "--num_workers",
                 "--text_field", "--out_dir", "--name"):
        assert flag in r.stdout

    docs = documents(40)
    out = tmp_path / "out"
    write_jsonl(tmp_path / "val.jsonl", docs[:5])
    r = run_cli("--inputs", str(write_jsonl(tmp_path / "c.jsonl", docs[5:])), "--val_inputs", str(tmp_path / "val.jsonl"),
                "--tokenizer", tokenizer_path, "--out_dir", str(out), "--name", "tiny", "--num_workers", "2")
    assert r.returncode == 0, r.stderr
    assert "train: 35 documents" in r.stdout and "val: 5 documents" in r.stdout and "tokens/s" in r.stdout
    assert decode_documents([out / "tiny_train_000.bin"], tokenizer_path) == docs[5:]
    assert decode_documents([out / "tiny_val.bin"], tokenizer_path) == docs[:5]

    empty = tmp_path / "empty.jsonl"
    empty.write_text('\n{"text": ""}\n\n')
    r = run_cli("--inputs", str(empty), "--val_inputs", "", "--tokenizer", tokenizer_path, "--out_dir", str(out),
                "--name", "tiny")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"error: no documents to train on in {empty}"
    assert shard_files(out) == []  # the previous run's tiny_* shards are gone too, not left to mix in


# ---------------------------------------------------------------------------------------------
# the reader, on hand-made shards whose token values tell where they came from

def synthetic_shards(directory, lengths, **sidecar):
    """Shard i holds i*10000, i*10000+1, ...: a token's value names its shard and offset."""
    paths = []
    for i, n in enumerate(lengths):
        path = str(directory / f"s_train_{i:03d}.bin")
        (i * 10000 + np.arange(n)).astype("<u2").tofile(path)
        dataset.write_sidecar(path, {"tokenizer": "t.model", "tokenizer_sha256": "abc", "vocab_size": 65000,
                                     "eos_id": 2, "dtype": "uint16", "num_tokens": n, "num_documents": 1, **sidecar})
        paths.append(path)
    return paths


def test_windows_are_contiguous_shifted_and_drawn_from_every_shard(tmp_path):
    lengths = [1000, 3000, 200, 40]  # the last is shorter than one window: never drawn
    synthetic_shards(tmp_path, lengths)
    data = TokenShards(str(tmp_path / "s_train_*.bin"), seq_len=64, batch_size=8)
    assert (data.num_tokens, data.vocab_size, data.eos_id) == (sum(lengths), 65000, 2)
    counts = np.zeros(len(lengths), dtype=int)
    for index in range(300):
        tokens, targets = data.batch(index).values()
        assert tokens.dtype == targets.dtype == torch.int64 and tokens.device.type == "cpu"
        assert tokens.shape == targets.shape == (8, 64)
        assert torch.equal(tokens[:, 1:], targets[:, :-1])
        window = torch.cat([tokens, targets[:, -1:]], dim=1).numpy()
        shard, offset = window[:, 0] // 10000, window[:, 0] % 10000
        assert (window == window[:, :1] + np.arange(65)).all()  # a contiguous slice of one shard
        assert (offset + 65 <= np.array(lengths)[shard]).all()
        np.add.at(counts, shard, 1)
    assert counts[3] == 0 and (counts[:3] > 0).all()
    assert 2.5 < counts[1] / counts[0] < 3.8  # drawn in proportion to the 936 vs 2936 start positions


def test_batches_are_a_function_of_seed_and_index_and_ranks_split_the_global_batch(tmp_path):
    paths = synthetic_shards(tmp_path, [500, 700])
    a = TokenShards(str(tmp_path / "s_train_*.bin"), seq_len=32, batch_size=6, seed=1)
    b = TokenShards(paths, seq_len=32, batch_size=6, seed=1)  # a fresh reader, as after a resume
    assert all(torch.equal(a.batch(5)[k], b.batch(5)[k]) for k in ("tokens", "targets"))
    assert not torch.equal(a.batch(5)["tokens"], a.batch(6)["tokens"])
    assert not torch.equal(a.batch(5)["tokens"], TokenShards(paths, 32, 6, seed=2).batch(5)["tokens"])
    ranks = [TokenShards(paths, 32, 2, seed=1, rank=r, world_size=3) for r in range(3)]
    for index in (0, 7):
        for k in ("tokens", "targets"):
            assert torch.equal(torch.cat([r.batch(index)[k] for r in ranks]), a.batch(index)[k])


def test_reader_errors(tmp_path):
    with pytest.raises(ValueError, match="no token shards match"):
        TokenShards(str(tmp_path / "none_*.bin"), 8, 2)
    paths = synthetic_shards(tmp_path, [30, 20])
    with pytest.raises(ValueError, match=r"seq_len \+ 1 = 31 tokens .*largest: 30 tokens, 50 in total"):
        TokenShards(paths, 30, 2)
    TokenShards(paths, 29, 2)
    np.arange(100, dtype="<u2").tofile(tmp_path / "s_train_002.bin")  # as if dataset.py were interrupted
    with pytest.raises(ValueError, match="s_train_002.bin has no sidecar .* incomplete"):
        TokenShards(str(tmp_path / "s_train_*.bin"), 8, 2)
    (tmp_path / "other").mkdir()
    other = synthetic_shards(tmp_path / "other", [50], vocab_size=512)
    with pytest.raises(ValueError, match="different tokenizers"):
        TokenShards(paths + other, 8, 2)
    with open(paths[0], "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="62 bytes but its sidecar says 30 tokens"):
        TokenShards(paths, 8, 2)
