import json
import subprocess
import sys

import sentencepiece as spm

from conftest import ROOT, small_corpus


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "train_tokenizer.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_specials_are_single_pieces_and_bytes_fall_back(tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    for piece in ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]:
        ids = sp.encode(f"x{piece}y")
        assert sp.piece_to_id(piece) in ids and len(sp.encode(piece)) == 1
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    text = "Unseen: 鑫龘 😀 ü\n<think>2+2</think>"
    ids = sp.encode(text)
    assert sp.unk_id() not in ids
    assert sp.decode(ids) == text


def test_vocab_too_large_for_uint16_is_refused(tmp_path):
    r = run_cli("--vocab_size", "70000", "--out", str(tmp_path / "t.model"))
    assert r.returncode != 0
    assert r.stderr.strip() == "error: vocab_size 70000 does not fit the uint16 shards: use 1..65535"
    assert not (tmp_path / "t.model").exists()


def test_missing_and_empty_inputs(tmp_path):
    r = run_cli("--inputs", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "t.model"))
    assert r.returncode != 0 and r.stderr.strip() == f"error: {tmp_path / 'nope.jsonl'}: no such file"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = run_cli("--inputs", str(empty), "--out", str(tmp_path / "t.model"))
    assert r.returncode != 0 and r.stderr.strip() == f"error: no text found in {empty}"
    assert not list(tmp_path.glob("t.*"))


def test_malformed_lines_are_reported_and_skipped(tmp_path):
    good = [json.dumps({"text": t}) for t in small_corpus(800)]
    lines = good[:3] + ["{not json"] + good[3:5] + [json.dumps({"foo": 1})] + good[5:]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    r = run_cli("--inputs", str(corpus), "--out", str(tmp_path / "t.model"), "--vocab_size", "512",
                "--character_coverage", "1.0")
    assert r.returncode == 0, r.stderr
    assert f"{corpus} line 4: not valid JSON; skipped" in r.stderr
    assert f"{corpus} line 7: no \"text\"" in r.stderr
    assert "skipped 2 malformed lines" in r.stderr
    assert (tmp_path / "t.model").exists() and "characters per token" in r.stdout
