import json
import os
import re
import subprocess
import sys
import time
import types

import pytest

import download_mini_data as dm
from conftest import ROOT

SMALL = dict(pretrain_mb=0.3, n_sft=400, n_r1=400, n_val=50)
ROLES = {"system", "user", "assistant"}
EQUATION = re.compile(r"(\d+(?: [-+*/] \d+)+) = (\d+)")  # "3 + 4 = 7", "2 + 2 + 2 = 6", "6 * 4 = 24"
THINK = re.compile(r"<think>\n(.+?)\n</think>\n(.+)", re.S)


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module", params=["en", "zh"])
def data(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return request.param, dm.write_offline_data(str(out), request.param, seed=0, **SMALL)


def check_equations(text, where):
    """Every written sum in the text is right; returns the result of the last one."""
    last = None
    for lhs, rhs in EQUATION.findall(text):
        assert eval(lhs) == int(rhs), f"{where}: {lhs} = {rhs}"  # the regex admits only digits and + - * /
        last = int(rhs)
    return last


def check_chat(record, where):
    turns = record["conversations"]
    assert turns and all(set(t) == {"role", "content"} for t in turns), where
    assert all(t["role"] in ROLES and isinstance(t["content"], str) and t["content"].strip() for t in turns), where
    roles = [t["role"] for t in turns]
    body = roles[1:] if roles[0] == "system" else roles
    assert body == ["user", "assistant"] * (len(body) // 2) and body, f"{where}: roles {roles}"
    for t in turns:
        check_equations(t["content"], where)


def test_files_and_sizes(data):
    lang, paths = data
    assert list(paths) == dm.FILE_NAMES
    counts = {name: len(read(path)) for name, path in paths.items()}
    assert counts["sft"] == 400 and counts["r1"] == 400
    assert counts["pretrain_val"] == counts["sft_val"] == counts["r1_val"] == 50
    assert 0.3e6 <= sum(len(r["text"].encode()) for r in read(paths["pretrain"])) < 0.35e6


def test_deterministic_for_a_seed(data, tmp_path):
    lang, paths = data
    same = dm.write_offline_data(str(tmp_path / "same"), lang, seed=0, **SMALL)
    other = dm.write_offline_data(str(tmp_path / "other"), lang, seed=1, **SMALL)
    for name in dm.FILE_NAMES:
        with open(paths[name], "rb") as a, open(same[name], "rb") as b, open(other[name], "rb") as c:
            first = a.read()
            assert first == b.read(), name
            assert first != c.read(), name


def test_pretrain_and_chat_schema(data):
    lang, paths = data
    for name in ("pretrain", "pretrain_val"):
        for i, r in enumerate(read(paths[name])):
            assert list(r) == ["text"] and r["text"].strip(), f"{name} {i}"
            check_equations(r["text"], f"{name} {i}")
    for name in ("sft", "sft_val"):
        for i, r in enumerate(read(paths[name])):
            assert list(r) == ["conversations"]
            check_chat(r, f"{name} {i}")


def recomputed_answer(lang, question):
    """The answer of a counting question worked out from its text, or None for an arithmetic one."""
    if lang == "zh":
        m = re.search(r"有几个是(\S+?)：(.+)？", question)
        return sum(w in dm.ZH_CATEGORIES[m[1]] for w in m[2].split("、")) if m else None
    m = re.search(r"letter \"(\w)\" (?:appear )?in (?:the word )?\"(\w+)\"", question)
    if m:
        return m[2].count(m[1])
    m = re.search(r"(?:letters are in|How long is) the word \"(\w+)\"", question)
    if m:
        return len(m[1])
    m = re.search(r"How many (\w+)s are in this list: (.+)\?", question)
    return sum(w in dm.CATEGORIES[m[1]] for w in m[2].split(", ")) if m else None


def test_reasoning_records_are_well_formed_and_correct(data):
    lang, paths = data
    kinds = {"counted": 0, "summed": 0}
    for name in ("r1", "r1_val"):
        for i, r in enumerate(read(paths[name])):
            where = f"{name} {i}"
            assert set(r) == {"conversations", "answer"} and isinstance(r["answer"], str), where
            check_chat(r, where)
            assert len(r["conversations"]) in (2, 3), where
            question, reply = r["conversations"][-2]["content"], r["conversations"][-1]["content"]
            assert reply.count("<think>") == 1 and reply.count("</think>") == 1, where
            m = THINK.fullmatch(reply)
            assert m and m[1].strip() and m[2].strip(), where
            assert re.search(rf"(?<![\w.]){re.escape(r['answer'])}(?!\w|\.\d)" if lang == "en" else
                             rf"(?<!\d){re.escape(r['answer'])}(?!\d)", m[2]), f"{where}: answer not in {m[2]!r}"
            expected = recomputed_answer(lang, question)
            if expected is None:
                expected = check_equations(m[1], where)
                assert expected is not None, f"{where}: no worked sum in {m[1]!r}"
                kinds["summed"] += 1
            else:
                kinds["counted"] += 1
            assert r["answer"] == str(expected), f"{where}: {question!r} -> {r['answer']} (expected {expected})"
    assert kinds["counted"] > 20 and kinds["summed"] > 200


def test_reasoning_validation_questions_are_not_in_training(data):
    lang, paths = data
    train = {r["conversations"][-2]["content"] for r in read(paths["r1"])}
    val = [r["conversations"][-2]["content"] for r in read(paths["r1_val"])]
    assert len(set(val)) == len(val) and not train & set(val)


def test_english_chat_answers_are_right(tmp_path):
    paths = dm.write_offline_data(str(tmp_path), "en", seed=3, pretrain_mb=0.01, n_sft=1500, n_r1=1, n_val=1)
    checked = 0
    for r in read(paths["sft"]):
        for t in r["conversations"]:
            for word, spelled in re.findall(r"\"(\w+)\" is spelled ([a-z-]+)\.", t["content"]):
                assert spelled == "-".join(word)
                checked += 1
            for word, n in re.findall(r"The word \"(\w+)\" has (\d+) letters\.", t["content"]):
                assert len(word) == int(n)
                checked += 1
            for big, small in re.findall(r"^(\d+) is bigger than (\d+)\.$", t["content"]):
                assert int(big) > int(small)
                checked += 1
    assert checked > 50


def test_english_text_is_varied(tmp_path):
    paths = dm.write_offline_data(str(tmp_path), "en", seed=0, pretrain_mb=1.0, n_sft=1, n_r1=1, n_val=1)
    texts = [r["text"] for r in read(paths["pretrain"])]
    sentences = [s for t in texts for s in re.split(r"(?<=[.!?])\s+|\n+", t) if s.strip()]
    vocabulary = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}
    assert len(sentences) > 15_000
    assert len(set(sentences)) / len(sentences) > 0.5
    assert len(set(texts)) / len(texts) > 0.95
    assert len(vocabulary) > 1200


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "download_mini_data.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, **kwargs)


def test_cli_offline_and_help(tmp_path):
    out = tmp_path / "tmp"
    r = run_cli("--offline", "true", "--out_dir", str(out), "--pretrain_mb", "0.1", "--n_sft", "50", "--n_r1", "50",
                "--n_val", "10", env={**os.environ, "PYTHONHASHSEED": "123"})
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.jsonl" for n in dm.FILE_NAMES)
    assert str(out / "sft.jsonl") in r.stdout and "MB" in r.stdout and "note:" not in r.stderr
    # the same bytes in another process (another string hash seed): no set or hash order leaks into the data
    here = dm.write_offline_data(str(tmp_path / "here"), "en", seed=0, pretrain_mb=0.1, n_sft=50, n_r1=50, n_val=10)
    assert all((out / f"{n}.jsonl").read_bytes() == open(here[n], "rb").read() for n in dm.FILE_NAMES)
    r = run_cli("--help")
    assert r.returncode == 0
    for flag in ("--out_dir", "--lang", "--offline", "--seed", "--pretrain_mb", "--n_sft", "--n_r1", "--n_val"):
        assert flag in r.stdout
    assert "TinyStories" in r.stdout and "alpaca-zh" in r.stdout
    r = run_cli("--offline", "true", "--lang", "fr", "--out_dir", str(tmp_path / "fr"))
    assert r.returncode == 1 and r.stderr.strip() == "error: --lang must be one of en, zh, got 'fr'"


def test_unreachable_hub_falls_back_with_one_note(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once, no network
    assert dm.hub_address() == ("127.0.0.1", 9)
    start = time.time()
    dm.main(["--out_dir", str(tmp_path), "--pretrain_mb", "0.05", "--n_sft", "20", "--n_r1", "20", "--n_val", "5"])
    assert time.time() - start < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: 127.0.0.1 unreachable, writing the built-in offline data instead"]
    assert len(read(tmp_path / "r1.jsonl")) == 20


def test_failing_datasets_falls_back(tmp_path, monkeypatch, capsys):
    def broken_stream(*args):
        raise ConnectionError("Couldn't reach the dataset\nmore detail")

    monkeypatch.setattr(dm, "hub_reachable", lambda timeout: True)
    monkeypatch.setattr(dm, "stream_stage", broken_stream)
    dm.main(["--out_dir", str(tmp_path), "--pretrain_mb", "0.05", "--n_sft", "20", "--n_r1", "20", "--n_val", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: streaming from huggingface.co failed (ConnectionError: "
                                               "Couldn't reach the dataset)")
    assert len(read(tmp_path / "sft.jsonl")) == 20


FAKE_HUB = {
    ("roneneldan/TinyStories", "train"): [{"text": f"Story {i}."} for i in range(10)] + [{"text": "  "}],
    ("roneneldan/TinyStories", "validation"): [{"text": f"Held out {i}."} for i in range(10)],
    ("yahma/alpaca-cleaned", "train"): [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
                                        {"instruction": "Name a color.", "input": "Be brief.", "output": "Red."},
                                        {"instruction": "Empty reply.", "input": "", "output": ""}] * 3,
    ("bespokelabs/Bespoke-Stratos-17k", "train"): [
        {"system": "Your role as an assistant involves ...",
         "conversations": [{"from": "user", "value": "What is 6 * 7?"},
                           {"from": "assistant", "value": "<|begin_of_thought|>\n\n6 * 7 = 42\n\n<|end_of_thought|>\n\n"
                                                          "<|begin_of_solution|>\n\nIt is \\boxed{42}.\n\n"
                                                          "<|end_of_solution|>"}]},
        {"conversations": [{"from": "user", "value": "Prove it."},
                           {"from": "assistant", "value": "no markers here"}]},
        {"conversations": [{"from": "user", "value": "Half of 1?"},
                           {"from": "assistant", "value": "<|begin_of_thought|>x<|end_of_thought|>"
                                                          "<|begin_of_solution|>\\boxed{\\frac{1}{2}}"
                                                          "<|end_of_solution|>"}]}] * 2,
}


def test_online_records_are_normalised(tmp_path, monkeypatch):
    def load_dataset(path, name=None, split=None, streaming=False):
        assert streaming and name is None
        return iter(FAKE_HUB[path, split])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    cfg = dm.DownloadConfig(out_dir=str(tmp_path), online_pretrain=5, online_sft=3, online_r1=2, n_val=1)
    paths = dm.download_online(cfg)
    assert [r["text"] for r in read(paths["pretrain"])] == [f"Story {i}." for i in range(5)]
    assert read(paths["pretrain_val"]) == [{"text": "Held out 0."}]
    sft = read(paths["sft_val"]) + read(paths["sft"])
    assert sft[0] == {"conversations": [{"role": "user", "content": "Add 2 and 3."},
                                        {"role": "assistant", "content": "5"}]}
    assert sft[1]["conversations"][0]["content"] == "Name a color.\n\nBe brief."
    assert all(r["conversations"][-1]["content"] for r in sft)
    r1 = read(paths["r1_val"]) + read(paths["r1"])
    reply = "<think>\n6 * 7 = 42\n</think>\nIt is \\boxed{42}."
    assert r1[0] == {"conversations": [{"role": "user", "content": "What is 6 * 7?"},
                                       {"role": "assistant", "content": reply}], "answer": "42"}
    assert "answer" not in r1[1] and r1[1]["conversations"][-1]["content"].startswith("<think>\nx\n</think>\n")
    assert len(r1) == 3


def test_chinese_reasoning_fields_are_wrapped():
    record = dm.from_reasoning_fields({"input": "3加4等于几？", "reasoning_content": "3 + 4 = 7",
                                       "content": "答案是 \\boxed{7}。"})
    reply = "<think>\n3 + 4 = 7\n</think>\n答案是 \\boxed{7}。"
    assert record == {"conversations": [{"role": "user", "content": "3加4等于几？"},
                                        {"role": "assistant", "content": reply}], "answer": "7"}
    assert dm.from_reasoning_fields({"input": "q", "reasoning_content": "", "content": "a"}) is None


def test_interrupted_write_leaves_no_file(tmp_path):
    def records():
        yield {"text": "one"}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dm.write_jsonl(str(tmp_path / "x.jsonl"), records())
    assert list(tmp_path.iterdir()) == []
