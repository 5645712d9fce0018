import json
import random
import re
import subprocess
import sys

import pytest
import sentencepiece as spm

from conftest import ROOT, SHARED_DATA, small_corpus
from train_tokenizer import PRESETS, TokenizerConfig, choose_vocab_size


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


def test_numbers_are_whole_pieces_in_the_cpu_preset_and_digits_in_the_12gb_one(tmp_path):
    """...and either way a number is the same pieces wherever it stands: after a space, in a tool call's JSON
    string, before a full stop (a small model copies a question's number into a call only if its piece is one)."""
    corpus = tmp_path / "sums.jsonl"
    rng = random.Random(0)
    sums = [f"{x} + {y} = {x + y}." for x, y in ((rng.randint(1, 20), rng.randint(1, 9)) for _ in range(3000))]
    sums += [f'{{"expression": "{x} + {y}"}}, ({x}), {x}, {y}?' for x, y in ((rng.randint(1, 20), rng.randint(1, 9))
                                                                        for _ in range(500))]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in small_corpus(2000) + sums))
    pieces = {}
    for preset, vocab in (("cpu", "780"), ("12gb", "600")):  # about the most pieces this text gives either way
        out = tmp_path / f"{preset}.model"
        r = run_cli("--preset", preset, "--inputs", str(corpus), "--out", str(out), "--vocab_size", vocab,
                    "--character_coverage", "1.0")
        assert r.returncode == 0, r.stderr
        sp = spm.SentencePieceProcessor(model_file=str(out))
        pieces[preset] = [p.strip("\u2581") for p in sp.encode("8 + 8 = 16 apples", out_type=str)]
        places = ['16 apples', '"16 + 2"}}', 'is 16.', '(16)', 'x16', '16?']
        numbers = [[p for p in sp.encode(text, out_type=str) if any(c.isdigit() for c in p)] for text in places]
        assert all(n[0] == numbers[0][0] and n[0].isdigit() for n in numbers), numbers
    assert "16" in pieces["cpu"]
    assert "16" not in pieces["12gb"] and ["1", "6"] == [p for p in pieces["12gb"] if p.isdigit()][-2:]


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


def chinese_corpus(n_lines: int = 800, seed: int = 0):
    """Short Chinese sentences without spaces: 56 distinct characters."""
    rng = random.Random(seed)
    who = ["小明", "小红", "老师", "妈妈", "小猫", "爷爷", "哥哥", "小兔子"]
    where = ["在公园里", "在河边", "在学校", "在树下", "在海边", "在家里"]
    did = ["看见了", "喜欢", "买了", "画了", "找到了", "带来了", "数了数"]
    what = ["三个苹果", "一只小鸟", "红色的气球", "一本新书", "蓝色的风筝", "一些面包"]
    return [f"{rng.choice(who)}{rng.choice(where)}{rng.choice(did)}{rng.choice(what)}。" for _ in range(n_lines)]


def write_corpus(path, lines):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines), encoding="utf-8")
    return str(path)


def pieces(path):
    return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()


def test_language_picks_the_vocabulary_size(tmp_path):
    zh = write_corpus(tmp_path / "zh.jsonl", chinese_corpus())
    en = write_corpus(tmp_path / "en.jsonl", small_corpus(800))  # 10% of its lines have a Chinese phrase
    for corpus, chosen, lang in [(zh, 450, "zh"), (en, 350, "en")]:
        out = tmp_path / f"{chosen}.model"
        r = run_cli("--inputs", corpus, "--out", str(out), "--vocab_en", "350", "--vocab_zh", "450",
                    "--character_coverage", "1.0")
        assert r.returncode == 0, r.stderr
        assert f"text is {'mostly' if lang == 'zh' else 'not mostly'} Chinese (" in r.stdout
        assert f"): {chosen} pieces (--vocab_{lang}" in r.stdout
        assert pieces(out) == chosen
        sp = spm.SentencePieceProcessor(model_file=str(out))
        assert sp.decode(sp.encode("a b  c 你好")) == "a b  c 你好"  # spaces survive a corpus without any


@pytest.mark.parametrize("vocab_en,vocab_zh,chosen", [(100, 1000, 256 + 4 * 56), (500, 1000, 500), (100, 400, 400)])
def test_chinese_text_with_few_characters_gets_at_most_four_pieces_each(vocab_en, vocab_zh, chosen, capsys):
    """No more pieces than the text can use (256 byte pieces + 4 per character: the built-in data's ~600 characters
    get 4,096, not 10,000), never fewer than --vocab_en, never more than --vocab_zh."""
    lines = chinese_corpus()
    assert len(set("".join(lines))) == 56
    assert choose_vocab_size(TokenizerConfig(vocab_en=vocab_en, vocab_zh=vocab_zh), lines) == chosen
    assert f"56 different characters): {chosen} pieces" in capsys.readouterr().out or chosen == vocab_zh


def test_vocab_size_overrides_the_language(tmp_path):
    zh = write_corpus(tmp_path / "zh.jsonl", chinese_corpus())
    r = run_cli("--inputs", zh, "--out", str(tmp_path / "t.model"), "--vocab_size", "400", "--vocab_zh", "450")
    assert r.returncode == 0, r.stderr
    assert "mostly Chinese" not in r.stdout and pieces(tmp_path / "t.model") == 400


def test_presets_choose_the_sizes(tmp_path):
    # No preset is the cpu preset; --preset 12gb is read from the command line (tiny corpora are
    # too small for its sizes, so its choice is checked in the line printed before training).
    assert {k: getattr(TokenizerConfig(), k) for k in PRESETS["cpu"]} == PRESETS["cpu"]
    cpu = TokenizerConfig()  # the cpu preset is the defaults
    assert PRESETS["12gb"]["vocab_en"] > cpu.vocab_en
    assert PRESETS["12gb"]["vocab_zh"] >= cpu.vocab_zh > 5500  # the novels' characters need ~5,500
    r = run_cli("--help")
    assert r.returncode == 0 and "--preset {12gb,cpu}" in r.stdout and "--vocab_zh" in r.stdout, r.stderr
    zh = write_corpus(tmp_path / "zh.jsonl", chinese_corpus(100))
    en = write_corpus(tmp_path / "en.jsonl", small_corpus(100))
    for corpus, lang in [(zh, "zh"), (en, "en")]:
        r = run_cli("--preset", "12gb", "--inputs", corpus, "--out", str(tmp_path / "t.model"))
        assert f"{PRESETS['12gb']['vocab_' + lang]:,} pieces (--vocab_{lang};" in r.stdout, r.stdout + r.stderr
    r = run_cli("--preset", "12gb", "--inputs", en, "--out", str(tmp_path / "t.model"), "--vocab_en", "400")
    assert r.returncode == 0 and pieces(tmp_path / "t.model") == 400, r.stderr  # flags beat the preset


def test_too_small_and_too_large_vocabularies_say_what_to_do(tmp_path):
    zh = write_corpus(tmp_path / "zh.jsonl", chinese_corpus())
    r = run_cli("--inputs", zh, "--out", str(tmp_path / "t.model"), "--vocab_size", "300")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    m = re.fullmatch(rf"error: sentencepiece could not train a 300-piece vocabulary on {re.escape(zh)}: the "
                     r"characters alone need ([\d,]+) pieces at --character_coverage 0\.9995: use --vocab_size (\d+) "
                     r"or lower --character_coverage", r.stderr.strip())
    assert m and 300 < int(m[1].replace(",", "")) <= int(m[2]), r.stderr
    r = run_cli("--inputs", zh, "--out", str(tmp_path / "t.model"), "--vocab_size", "5000")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(r"the text is too small for that many pieces: use --vocab_size \d+ or less, or more text$",
                     r.stderr.strip()), r.stderr
    assert not list(tmp_path.glob("t.*"))


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")
@pytest.mark.slow
def test_default_size_holds_the_characters_of_real_chinese(tmp_path):
    novels = sorted(str(p) for p in SHARED_DATA.glob("zh_*.txt"))
    r = run_cli("--inputs", ",".join(novels), "--out", str(tmp_path / "t.model"))
    assert r.returncode == 0, r.stderr
    assert "text is mostly Chinese" in r.stdout and pieces(tmp_path / "t.model") == TokenizerConfig().vocab_zh
