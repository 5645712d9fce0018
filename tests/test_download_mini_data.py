"""download_mini_data.py: the command line, the fallback to the built-in data, and the hub path against
a local stand-in for `datasets` streaming."""
import json
import os
import subprocess
import sys
import time
import tracemalloc
import types
from pathlib import Path

import pytest

import download_mini_data as dm
import offline_data as od
from conftest import ROOT, read_jsonl as read


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "download_mini_data.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, **kwargs)


def test_cli_offline_and_help(tmp_path):
    out = tmp_path / "tmp"
    r = run_cli("--offline", "true", "--out_dir", str(out), "--pretrain_mb", "0.1", "--n_sft", "50", "--n_r1", "50",
                "--n_dpo", "40", "--n_val", "10", env={**os.environ, "PYTHONHASHSEED": "123"})
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.jsonl" for n in od.FILE_NAMES)
    assert str(out / "dpo.jsonl") in r.stdout and "MB" in r.stdout and "note:" not in r.stderr
    pairs = {name: read(out / f"{name}.jsonl") for name in ("dpo", "dpo_val")}
    assert len(pairs["dpo"]) == 40 and len(pairs["dpo_val"]) == 10
    for pair in pairs["dpo"] + pairs["dpo_val"]:  # our "conversations" preference layout, as records.py reads it
        assert list(pair) == ["conversations", "chosen", "rejected", "answer"]
        assert pair["conversations"][-1]["role"] == "user" and pair["chosen"] != pair["rejected"]
        assert pair["chosen"].startswith("<think>\n") and pair["rejected"].startswith("<think>\n")
    # the same bytes in another process (another string hash seed): no set or hash order leaks into the data
    here = od.write_offline_data(str(tmp_path / "here"), "en", seed=0, pretrain_mb=0.1, n_sft=50, n_r1=50, n_dpo=40,
                                 n_val=10)
    assert all((out / f"{n}.jsonl").read_bytes() == open(here[n], "rb").read() for n in od.FILE_NAMES)
    r = run_cli("--help")
    assert r.returncode == 0
    for flag in ("--out_dir", "--lang", "--offline", "--seed", "--pretrain_mb", "--n_sft", "--n_r1", "--n_dpo",
                 "--n_val", "--online_dpo"):
        assert flag in r.stdout
    assert "TinyStories" in r.stdout and "alpaca-zh" in r.stdout and "hh-rlhf (helpful-base)" in r.stdout
    r = run_cli("--offline", "true", "--lang", "fr", "--out_dir", str(tmp_path / "fr"))
    assert r.returncode == 1 and r.stderr.strip() == "error: --lang must be one of en, zh, got 'fr'"


def test_unreachable_hub_falls_back_with_one_note(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once, no network
    assert dm.hub_address() == ("127.0.0.1", 9)
    start = time.time()
    dm.main(["--out_dir", str(tmp_path), "--pretrain_mb", "0.05", "--n_sft", "20", "--n_r1", "20", "--n_dpo", "20",
             "--n_val", "5"])
    assert time.time() - start < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: 127.0.0.1 is unreachable, writing the built-in offline data instead"]
    assert len(read(tmp_path / "r1.jsonl")) == 20


def test_failing_datasets_falls_back(tmp_path, monkeypatch, capsys):
    def broken_stream(*args):
        raise ConnectionError("Couldn't reach the dataset\nmore detail")

    monkeypatch.setattr(dm, "hub_reachable", lambda timeout: True)
    monkeypatch.setattr(dm, "open_stream", broken_stream)
    (tmp_path / "math.jsonl").write_text("{}\n")  # an earlier online download's: the offline set has no math files
    dm.main(["--out_dir", str(tmp_path), "--pretrain_mb", "0.05", "--n_sft", "20", "--n_r1", "20", "--n_dpo", "20",
             "--n_val", "5"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("note", "error"))]
    assert len(err) == 1 and err[0].startswith("note: streaming from huggingface.co failed (ConnectionError: "
                                               "Couldn't reach the dataset)")
    assert not (tmp_path / "download_state.json").exists() and not list(tmp_path.glob("*.partial"))
    assert not (tmp_path / "math.jsonl").exists()
    assert len(read(tmp_path / "sft.jsonl")) == 20


class FakeStream:
    """Stands in for a streaming `datasets.IterableDataset`: iteration, state_dict and load_state_dict
    (the state is that after the last record yielded, as in `datasets`). Records are made on demand."""

    def __init__(self, make, n, hub):
        self.make, self.n, self.hub, self.pos = make, n, hub, 0

    def __iter__(self):
        while self.pos < self.n:
            self.pos += 1
            self.hub.yielded += 1
            if self.hub.yielded == self.hub.interrupt_at:
                raise KeyboardInterrupt
            yield self.make(self.pos - 1)

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


class FakeHub:
    """A local stand-in for datasets.load_dataset(..., streaming=True): {(path, split): (make, n)}."""

    def __init__(self, sets, interrupt_at=0):
        self.sets, self.interrupt_at, self.yielded, self.calls = sets, interrupt_at, 0, []

    def load_dataset(self, path, name=None, split=None, streaming=False, **kwargs):
        assert streaming
        self.calls.append((path, name, split, kwargs))
        make, n = self.sets[path, split]
        return FakeStream(make, n, self)

    def install(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=self.load_dataset))
        return self


def cycle(records):
    return lambda i: records[i % len(records)], len(records)


# The functions LLaMA-Factory's glaive sets offer: a list of {"name", "description", "parameters"} (a JSON schema),
# given as a JSON string in "tools"; a function_call turn's value is a JSON string of {"name", "arguments": an object}.
AREA = {"name": "calculate_area", "description": "Calculate the area of a given shape",
        "parameters": {"type": "object", "properties": {
            "shape": {"type": "string", "description": "The shape for which to calculate the area"},
            "dimensions": {"type": "array", "items": {"type": "number"}, "description": "The dimensions"}},
            "required": ["shape", "dimensions"]}}
NEWS = {"name": "get_news", "description": "获取最新新闻文章", "parameters": {"type": "object", "properties": {
    "category": {"type": "string", "description": "要检索的新闻文章类别"},
    "country": {"type": "string", "description": "获取新闻文章的国家"}}, "required": ["category"]}}

# One record of each hub set, written by hand from its dataset card: the real field names and nesting.
CARD_RECORDS = {
    "roneneldan/TinyStories": {"text": "Once upon a time, there was a little dog named Max. Max loved the park."},
    "HuggingFaceFW/fineweb-edu": {
        "text": "Photosynthesis is the process plants use to turn light into chemical energy.",
        "id": "<urn:uuid:0b7e2a4c-5d1f-4a8e-9c3b-2f6d7e8a9b10>", "dump": "CC-MAIN-2013-20",
        "url": "http://example.org/biology/photosynthesis.html", "date": "2013-05-18T07:24:47Z",
        "file_path": "s3://commoncrawl/crawl-data/CC-MAIN-2013-20/x.warc.gz", "language": "en",
        "language_score": 0.9712, "token_count": 15, "score": 3.21875, "int_score": 3},
    "wikimedia/wikipedia": {"id": "13", "url": "https://zh.wikipedia.org/wiki/%E6%95%B0%E5%AD%A6", "title": "数学",
                            "text": "数学是研究数量、结构以及空间等概念及其变化的一门学科。"},
    "HuggingFaceFW/fineweb-2": {
        "text": "人工智能是计算机科学的一个分支，它试图理解智能的实质。", "id": "<urn:uuid:3f1c9a7e>",
        "dump": "CC-MAIN-2023-50", "url": "https://example.cn/ai.html", "date": "2023-12-02T10:15:33Z",
        "file_path": "s3://commoncrawl/x.warc.gz", "language": "cmn", "language_score": 0.9987,
        "language_script": "Hani", "minhash_cluster_size": 2, "top_langs": "{\"cmn_Hani_score\": 0.9987}"},
    "yahma/alpaca-cleaned": {"instruction": "Name a color.", "input": "Be brief.", "output": "Red."},
    "shibing624/alpaca-zh": {"instruction": "给出三个保持健康的小贴士。", "input": "", "output": "均衡饮食。"},
    "llamafactory/alpaca_gpt4_zh": {"instruction": "给出三个保持健康的小贴士。", "input": "", "output": "经常锻炼。"},
    "HuggingFaceTB/smol-smoltalk": {
        "messages": [{"content": "What is the capital of France?", "role": "user"},
                     {"content": "The capital of France is Paris.", "role": "assistant"}],
        "source": "everyday-conversations"},
    "shibing624/sharegpt_gpt4": {"conversations": [
        {"from": "human", "value": "你好，请介绍一下长城。"}, {"from": "gpt", "value": "长城是中国古代的军事防御工程。"},
        {"from": "human", "value": "它是什么时候修建的？"}, {"from": "gpt", "value": "最早修建于春秋战国时期。"}]},
    "bespokelabs/Bespoke-Stratos-17k": {
        "system": "Your role as an assistant involves thoroughly exploring questions ...",
        "conversations": [{"from": "user", "value": "Return your final response within \\boxed{}. What is 7 + 5?"},
                          {"from": "assistant", "value": "<|begin_of_thought|>\n\n7 + 5 = 12.\n\n<|end_of_thought|>"
                                                         "\n\n<|begin_of_solution|>\n\nThe sum is \\boxed{12}.\n\n"
                                                         "<|end_of_solution|>"}]},
    "Congliu/Chinese-DeepSeek-R1-Distill-data-110k": {
        "input": "小明有5个苹果，又买了3个，现在一共有几个？", "content": "5 + 3 = 8。\n\n最终答案：\\boxed{8}",
        "reasoning_content": "原来5个，加上3个，就是8个。", "repo_name": "meta-math/GSM8K_zh", "prompt_tokens_len": 32,
        "content_tokens_len": 25, "reasoning_content_tokens_len": 20, "score": 10},
    "Anthropic/hh-rlhf": {  # helpful-base: two transcripts that differ only in the last reply
        "chosen": "\n\nHuman: How do I keep my puppy warm at night?\n\nAssistant: Is it sleeping inside?\n\n"
                  "Human: Yes, in a crate.\n\nAssistant: Put a soft blanket in the crate, away from drafts.",
        "rejected": "\n\nHuman: How do I keep my puppy warm at night?\n\nAssistant: Is it sleeping inside?\n\n"
                    "Human: Yes, in a crate.\n\nAssistant: Puppies don't get cold."},
    "llamafactory/DPO-En-Zh-20k": {  # config zh: a ShareGPT history, then one ShareGPT message per reply
        "conversations": [{"from": "human", "value": "用一句话解释什么是光合作用。"}],
        "chosen": {"from": "gpt", "value": "光合作用是植物利用光能，把二氧化碳和水变成养分并放出氧气的过程。"},
        "rejected": {"from": "gpt", "value": "光合作用就是植物晒太阳。"}},
    "openai/gsm8k": {  # config main: the working with calculator notes, then "#### " and the answer
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her "
                    "friends in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                  "altogether in April and May.\n#### 72"},
    "swulling/gsm8k_chinese": {  # GSM8K's English fields, the question in Chinese and the answer as an int64
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her "
                    "friends in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                  "altogether in April and May.\n#### 72",
        "question_zh-cn": "娜塔莉亚四月份把发夹卖给了她的48个朋友，五月份卖出的是四月份的一半。娜塔莉亚四月和五月一共卖出了多少个发夹？",
        "answer_only": 72},
    "llamafactory/glaive_toolcall_en": {  # ShareGPT turns, the call and its result JSON strings; "tools" one too
        "conversations": [
            {"from": "human", "value": "What is the area of a circle with a radius of 4 units?"},
            {"from": "function_call",
             "value": "{\"name\": \"calculate_area\", \"arguments\": {\"shape\": \"circle\", \"dimensions\": [4]}}"},
            {"from": "observation", "value": "{\"area\": 50.24}"},
            {"from": "gpt", "value": "The area of the circle is approximately 50.24 square units."}],
        "tools": json.dumps([AREA])},
    "llamafactory/glaive_toolcall_zh": {  # the same layout, translated: the values in Chinese, the JSON keys not
        "conversations": [
            {"from": "human", "value": "你能帮我找到最新的美国体育新闻吗？"},
            {"from": "function_call", "value": "{\"name\": \"get_news\", \"arguments\": {\"category\": \"运动\", "
                                               "\"country\": \"美国\"}}"},
            {"from": "observation", "value": "{\"status\": \"成功\", \"data\": [{\"title\": \"NBA总决赛：湖人队对阵热火队\"}]}"},
            {"from": "gpt", "value": "最新的美国体育新闻：NBA总决赛，湖人队对阵热火队。"}],
        "tools": json.dumps([NEWS], ensure_ascii=False)},
}
EXPECTED = {  # what each card record becomes
    "HuggingFaceTB/smol-smoltalk": {"conversations": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."}]},
    "shibing624/sharegpt_gpt4": {"conversations": [
        {"role": "user", "content": "你好，请介绍一下长城。"}, {"role": "assistant", "content": "长城是中国古代的军事防御工程。"},
        {"role": "user", "content": "它是什么时候修建的？"}, {"role": "assistant", "content": "最早修建于春秋战国时期。"}]},
    "bespokelabs/Bespoke-Stratos-17k": {"conversations": [
        {"role": "user", "content": "Return your final response within \\boxed{}. What is 7 + 5?"},
        {"role": "assistant", "content": "<think>\n7 + 5 = 12.\n</think>\nThe sum is \\boxed{12}."}], "answer": "12"},
    "Congliu/Chinese-DeepSeek-R1-Distill-data-110k": {"conversations": [
        {"role": "user", "content": "小明有5个苹果，又买了3个，现在一共有几个？"},
        {"role": "assistant", "content": "<think>\n原来5个，加上3个，就是8个。\n</think>\n5 + 3 = 8。\n\n最终答案：\\boxed{8}"}],
        "answer": "8"},
    "openai/gsm8k": {"conversations": [
        {"role": "user", "content": CARD_RECORDS["openai/gsm8k"]["question"]},
        {"role": "assistant", "content": "<think>\nNatalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips "
                                         "altogether in April and May.\n</think>\nThe answer is 72."}], "answer": "72"},
    "swulling/gsm8k_chinese": {"conversations": [
        {"role": "user", "content": CARD_RECORDS["swulling/gsm8k_chinese"]["question_zh-cn"]},
        {"role": "assistant", "content": "<think>\n\n</think>\n\n答案是 72。"}], "answer": "72"},
    "llamafactory/glaive_toolcall_en": {  # the call's arguments an object, the functions in OpenAI's form
        "conversations": [
            {"role": "user", "content": "What is the area of a circle with a radius of 4 units?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"name": "calculate_area", "arguments": {"shape": "circle", "dimensions": [4]}}]},
            {"role": "tool", "content": "{\"area\": 50.24}"},
            {"role": "assistant", "content": "The area of the circle is approximately 50.24 square units."}],
        "tools": [{"type": "function", "function": AREA}]},
    "llamafactory/glaive_toolcall_zh": {"conversations": [
        {"role": "user", "content": "你能帮我找到最新的美国体育新闻吗？"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_news",
                                                            "arguments": {"category": "运动", "country": "美国"}}]},
        {"role": "tool", "content": "{\"status\": \"成功\", \"data\": [{\"title\": \"NBA总决赛：湖人队对阵热火队\"}]}"},
        {"role": "assistant", "content": "最新的美国体育新闻：NBA总决赛，湖人队对阵热火队。"}],
        "tools": [{"type": "function", "function": NEWS}]},
}


def test_every_hub_set_has_a_card_record_that_normalises():
    used = {s.path for langs in dm.HUB_SETS.values() for stages in langs.values() for sets in stages.values()
            for s in sets}
    assert used == set(CARD_RECORDS) == set(dm.NORMALISERS)
    for path, rec in CARD_RECORDS.items():
        record = dm.NORMALISERS[path](rec)
        if "text" in rec:
            assert record == {"text": rec["text"]}, path
        elif "chosen" in rec:  # a preference pair stays in its set's format: records.py reads it as it is
            assert record == rec, path
        elif "instruction" in rec:
            prompt = "\n\n".join(x for x in (rec["instruction"], rec["input"]) if x)
            assert record == {"conversations": [{"role": "user", "content": prompt},
                                                {"role": "assistant", "content": rec["output"]}]}, path
        else:
            assert record == EXPECTED[path], path


def card_hub(n, text_chars=60, sizes=None):
    """Every (set, split) of both presets with n records (or sizes[path]) shaped like its card record, made on
    demand; pretraining texts are numbered so that order and duplicates show."""
    sets = {}
    for langs in dm.HUB_SETS.values():
        for stages in langs.values():
            for hub_sets in stages.values():
                for s in hub_sets:
                    rec = CARD_RECORDS[s.path]
                    if "text" in rec:
                        def make(i, rec=rec, path=s.path):
                            return {**rec, "text": f"{path} {i} " + "x" * text_chars}
                    else:
                        def make(i, rec=rec):
                            return rec
                    for split in (s.split, s.val_split):
                        if split:
                            sets[s.path, split] = (make, (sizes or {}).get(s.path, n))
    return sets


SMALL_CHATS = {path: 40 for path in ("HuggingFaceTB/smol-smoltalk", "llamafactory/alpaca_gpt4_zh",
                                     "shibing624/sharegpt_gpt4", "bespokelabs/Bespoke-Stratos-17k",
                                     "Congliu/Chinese-DeepSeek-R1-Distill-data-110k", "Anthropic/hh-rlhf",
                                     "llamafactory/DPO-En-Zh-20k", "llamafactory/glaive_toolcall_en",
                                     "llamafactory/glaive_toolcall_zh")}


def small_12gb(tmp_path, lang, **overrides):
    return dm.DownloadConfig(preset="12gb", lang=lang, out_dir=str(tmp_path),
                             **{**dm.PRESETS["12gb"], "n_val": 3, "pretrain_tokens": 1000, **overrides})


def file_bytes(out_dir):
    return {p.name: p.read_bytes() for p in sorted(Path(out_dir).iterdir())}


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_12gb_fetch_takes_every_set_in_order_up_to_the_token_budget(tmp_path, monkeypatch, lang):
    hub = FakeHub(card_hub(300, sizes={"wikimedia/wikipedia": 40, **SMALL_CHATS})).install(monkeypatch)
    cfg = small_12gb(tmp_path, lang, pretrain_tokens=4000)
    paths = dm.download_online(cfg)
    texts = [r["text"] for r in read(paths["pretrain"])]
    budget = cfg.pretrain_tokens * dm.CHARS_PER_TOKEN[lang]
    assert sum(map(len, texts)) >= budget > sum(map(len, texts[:-1]))  # stops at the budget, not before
    first = dm.HUB_SETS["12gb"][lang]["pretrain"][0].path
    assert texts[0].startswith(f"{first} 3 ")  # records 0-2 are the validation set
    assert [r["text"] for r in read(paths["pretrain_val"])] == [f"{first} {i} " + "x" * 60 for i in range(3)]
    if lang == "zh":  # wikipedia runs out after 40 records, then fineweb-2
        assert texts[36].startswith("wikimedia/wikipedia 39 ") and texts[37].startswith("HuggingFaceFW/fineweb-2 0 ")
    sft_sets = dm.HUB_SETS["12gb"][lang]["sft"]
    sft_val = 0 if sft_sets[0].val_split else 3
    sft = read(paths["sft"])
    assert len(sft) == 40 * len(sft_sets) - sft_val  # every record of every set
    assert sft[-40:] == [EXPECTED[sft_sets[-1].path]] * 40 and "tools" not in sft[-41]  # the tool set last
    assert len(read(paths["sft_val"])) == 3 and not any("tools" in r for r in read(paths["sft_val"]))
    assert len(read(paths["r1"])) == 40 - 3
    dpo = dm.HUB_SETS["12gb"][lang]["dpo"][0]
    assert read(paths["dpo"]) == [CARD_RECORDS[dpo.path]] * (40 if dpo.val_split else 40 - 3)
    assert read(paths["dpo_val"]) == [CARD_RECORDS[dpo.path]] * 3
    assert ("Anthropic/hh-rlhf", None, "test", {"data_dir": "helpful-base"}) in hub.calls or lang == "zh"
    assert ("llamafactory/DPO-En-Zh-20k", "zh", "train", {}) in hub.calls or lang == "en"
    assert ("HuggingFaceTB/smol-smoltalk", None, "test", {}) in hub.calls or lang == "zh"
    assert ("shibing624/sharegpt_gpt4", None, "train", {"data_files": "sharegpt_zh_38K_format.jsonl"}) in hub.calls \
        or lang == "en"
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("interrupt_at", [2, 9, 30, 44, 61, 95, 101, 130, 143, 166, 183, 206])
# yields 20-140: the sft stage (100-140 its tool set); 180-220: the dpo stage
def test_an_interrupted_fetch_resumed_gives_exactly_the_uninterrupted_records(tmp_path, monkeypatch, interrupt_at):
    monkeypatch.setattr(dm, "COMMIT_EVERY", 4)
    FakeHub(card_hub(40)).install(monkeypatch)
    dm.download_online(small_12gb(tmp_path / "straight", "zh"))
    hub = FakeHub(card_hub(40), interrupt_at=interrupt_at).install(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        dm.download_online(small_12gb(tmp_path / "split", "zh"))
    FakeHub(card_hub(40)).install(monkeypatch)
    dm.download_online(small_12gb(tmp_path / "split", "zh"))
    straight, split = file_bytes(tmp_path / "straight"), file_bytes(tmp_path / "split")
    state = json.loads(split.pop("download_state.json"))
    straight.pop("download_state.json")
    assert split == straight
    assert all(stage["done"] for stage in state["stages"].values()) and hub.yielded == interrupt_at


def test_a_finished_stage_is_not_fetched_again(tmp_path, monkeypatch):
    FakeHub(card_hub(40)).install(monkeypatch)
    dm.download_online(small_12gb(tmp_path, "en"))
    (tmp_path / "r1.jsonl").unlink()
    hub = FakeHub(card_hub(40)).install(monkeypatch)
    dm.download_online(small_12gb(tmp_path, "en"))
    assert {path for path, *_ in hub.calls} == {"bespokelabs/Bespoke-Stratos-17k"}
    assert len(read(tmp_path / "r1.jsonl")) == 37


@pytest.mark.slow
def test_the_fetch_is_streamed_in_flat_memory(tmp_path, monkeypatch):
    """Peak Python memory while fetching 2,000 or 20,000 pretraining documents of 1 KB: about the same."""
    peaks = []
    for n in (2_000, 20_000):
        FakeHub(card_hub(n, text_chars=1000)).install(monkeypatch)
        cfg = small_12gb(tmp_path / str(n), "en", pretrain_tokens=n * 1000 // 4, online_sft=5, online_r1=5)
        tracemalloc.start()
        dm.download_online(cfg)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert len(read(tmp_path / str(n) / "pretrain.jsonl")) >= 0.9 * n
    assert peaks[1] < 1.3 * peaks[0] + 200_000, peaks


def test_the_disk_space_needed_is_checked_first(tmp_path, monkeypatch, capsys):
    hub = FakeHub(card_hub(40)).install(monkeypatch)
    monkeypatch.setattr(dm.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=2_000_000_000))
    with pytest.raises(ValueError, match=r"has 2.0 GB free but this download needs about 7.\d GB"):
        dm.download_online(dm.DownloadConfig(preset="12gb", out_dir=str(tmp_path), **dm.PRESETS["12gb"]))
    assert hub.calls == [] and "fetching about 7." in capsys.readouterr().out


def test_12gb_offline_is_refused_in_one_line(tmp_path):
    for args in (["--offline", "true"], []):
        r = run_cli("--preset", "12gb", "--out_dir", str(tmp_path), *args,
                    env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"})
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("error: --preset 12gb streams about ") and "fineweb-edu" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_online_records_are_normalised(tmp_path, monkeypatch):
    """The cpu preset: document, record and character limits, held-out records, skipped records."""
    hh = CARD_RECORDS["Anthropic/hh-rlhf"]
    long_prompt = "\n\nHuman: " + "z" * 3000 + "\n\nAssistant: "
    sets = {
        ("roneneldan/TinyStories", "train"): cycle([{"text": f"Story {i}."} for i in range(10)] + [{"text": "  "}]),
        ("roneneldan/TinyStories", "validation"): cycle([{"text": f"Held out {i}."} for i in range(10)]),
        ("yahma/alpaca-cleaned", "train"): cycle([{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
                                                  {"instruction": "Name a color.", "input": "Be brief.",
                                                   "output": "Red."},
                                                  {"instruction": "Empty reply.", "input": "", "output": ""}] * 3),
        ("bespokelabs/Bespoke-Stratos-17k", "train"): cycle([
            CARD_RECORDS["bespokelabs/Bespoke-Stratos-17k"],
            {"conversations": [{"from": "user", "value": "Prove it."}, {"from": "assistant", "value": "no markers"}]},
            {"conversations": [{"from": "user", "value": "Half of 1?"},
                               {"from": "assistant", "value": "<|begin_of_thought|>x<|end_of_thought|>"
                                                              "<|begin_of_solution|>\\boxed{\\frac{1}{2}}"
                                                              "<|end_of_solution|>"}]},
            {"conversations": [{"from": "user", "value": "Long?"},
                               {"from": "assistant", "value": "<|begin_of_thought|>" + "y" * 9000 +
                                "<|end_of_thought|><|begin_of_solution|>no<|end_of_solution|>"}]}] * 2),
        ("Anthropic/hh-rlhf", "test"): cycle([{"chosen": "\n\nHuman: Hi?\n\nAssistant: ", "rejected": "x"}, hh]),
        ("Anthropic/hh-rlhf", "train"): cycle([
            {**hh, "score": 3},  # fields the reader does not read are dropped
            {"chosen": long_prompt + "y" * 9000, "rejected": long_prompt + "no"},  # its chosen row is too long
            {"chosen": long_prompt + "y" * 3000, "rejected": long_prompt + "n" * 3000},  # each row fits: kept
            {"chosen": hh["chosen"], "rejected": "\n\nHuman: Something else?\n\nAssistant: No."}] * 2),  # no pair
        ("llamafactory/glaive_toolcall_en", "train"): cycle([CARD_RECORDS["llamafactory/glaive_toolcall_en"]]),
        ("openai/gsm8k", "test"): cycle([CARD_RECORDS["openai/gsm8k"]]),
        ("openai/gsm8k", "train"): cycle([{"question": "No answer line?", "answer": "It is 3."},
                                          CARD_RECORDS["openai/gsm8k"]]),
    }
    FakeHub(sets).install(monkeypatch)
    cfg = dm.DownloadConfig(out_dir=str(tmp_path), online_pretrain=5, online_sft=3, online_r1=2, online_dpo=3,
                            online_math=0, n_val=1)
    paths = dm.download_online(cfg)
    assert [r["text"] for r in read(paths["pretrain"])] == [f"Story {i}." for i in range(5)]
    assert read(paths["pretrain_val"]) == [{"text": "Held out 0."}]
    sft = read(paths["sft_val"]) + read(paths["sft"])
    assert sft[0] == {"conversations": [{"role": "user", "content": "Add 2 and 3."},
                                        {"role": "assistant", "content": "5"}]}
    assert sft[1]["conversations"][0]["content"] == "Name a color.\n\nBe brief."
    assert all(r["conversations"][-1]["content"] for r in sft) and len(sft) == 4
    assert sft[3] == EXPECTED["llamafactory/glaive_toolcall_en"]  # half a small limit is kept for the tool set
    r1 = read(paths["r1_val"]) + read(paths["r1"])
    assert r1[0] == EXPECTED["bespokelabs/Bespoke-Stratos-17k"]
    assert "answer" not in r1[1] and r1[1]["conversations"][-1]["content"].startswith("<think>\nx\n</think>\n")
    assert r1[2] == r1[0] and len(r1) == 3  # the 9,000-character trace was skipped
    assert read(paths["dpo_val"]) == [hh]  # from the test split, past a damaged pair
    dpo = read(paths["dpo"])
    assert dpo[0] == hh and dpo[1]["chosen"].endswith("y" * 3000) and dpo[2] == hh and len(dpo) == 3
    assert read(paths["math_val"]) == read(paths["math"]) == [EXPECTED["openai/gsm8k"]]  # all, less the damaged one


GLAIVE_EN = CARD_RECORDS["llamafactory/glaive_toolcall_en"]
BROKEN_CALL = {**GLAIVE_EN, "conversations": [  # the call's JSON cut short
    GLAIVE_EN["conversations"][0], {"from": "function_call", "value": '{"name": "calculate_area", "arguments": {"sh'},
    *GLAIVE_EN["conversations"][2:]]}
PLAIN = {"conversations": [GLAIVE_EN["conversations"][0], GLAIVE_EN["conversations"][3]], "tools": "[]"}


def test_tool_records_keep_their_calls_and_damaged_ones_are_skipped():
    """A tool set's record whose call or tool list is not valid JSON, whose result answers no call (a few of the Chinese
    translations write the call into the reply) or that ends with no reply is skipped; one offering no tools is a plain
    chat. The plain chat normaliser refuses a record with calls rather than lose them."""
    turns = GLAIVE_EN["conversations"]
    prose_call = {**GLAIVE_EN, "conversations": [
        turns[0], {"from": "gpt", "value": 'Let me compute it.\nAI calculate_area: {"shape": "circle"}'}, *turns[2:]]}
    for damaged in (BROKEN_CALL, {**GLAIVE_EN, "tools": '[{"name": "calculate_area", '}, prose_call,
                    {**GLAIVE_EN, "conversations": turns[:3]}):
        assert dm.from_tool_chat(damaged) is None
    expected = EXPECTED["llamafactory/glaive_toolcall_en"]["conversations"]
    assert dm.from_tool_chat(PLAIN) == {"conversations": [expected[0], expected[3]]}
    openai = {"messages": [  # a call with text before it, its arguments a JSON string
        {"role": "user", "content": "Area of a unit circle?"},
        {"role": "assistant", "content": "Let me compute it.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "calculate_area", "arguments": '{"shape": "circle", "dimensions": [1]}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"area": 3.14}'},
        {"role": "assistant", "content": "About 3.14."}]}
    assert dm.from_tool_chat(openai)["conversations"][1] == {
        "role": "assistant", "content": "Let me compute it.",
        "tool_calls": [{"name": "calculate_area", "arguments": {"shape": "circle", "dimensions": [1]}}]}
    assert dm.from_chat(openai) is None and dm.from_chat(PLAIN) == dm.from_tool_chat(PLAIN)


def tool_stage_hub(interrupt_at=0):
    """The cpu English sets, the chat set numbered, the tool set 1,000 records of which a quarter is damaged."""
    sets = card_hub(40)
    sets["yahma/alpaca-cleaned", "train"] = (lambda i: {"instruction": f"Chat {i}.", "input": "", "output": "Sure."},
                                             6000)
    tool_records = [GLAIVE_EN, PLAIN, GLAIVE_EN, BROKEN_CALL]
    sets["llamafactory/glaive_toolcall_en", "train"] = (lambda i: tool_records[i % 4], 1000)
    return FakeHub(sets, interrupt_at)


def tool_stage_config(out_dir, **limits):
    return dm.DownloadConfig(out_dir=str(out_dir), online_pretrain=3, online_r1=2, online_dpo=2, online_math=2, n_val=3,
                             **limits)


@pytest.mark.parametrize("online_sft, chats", [(5000, 4000), (10, 5)])  # the cpu preset's limit; a small one
def test_the_sft_stage_takes_the_tool_set_whole_after_its_chats(tmp_path, monkeypatch, online_sft, chats):
    """The chats stop short of --online_sft by the tool set's 1,000 rows (a small limit keeps half for chats), then the
    tool set's usable records follow; sft_val holds chats only."""
    tool_stage_hub().install(monkeypatch)
    paths = dm.download_online(tool_stage_config(tmp_path, online_sft=online_sft))
    sft, expected = read(paths["sft"]), EXPECTED["llamafactory/glaive_toolcall_en"]
    plain = dm.from_tool_chat(PLAIN)
    assert [r["conversations"][0]["content"] for r in read(paths["sft_val"])] == ["Chat 0.", "Chat 1.", "Chat 2."]
    assert [r["conversations"][0]["content"] for r in sft[:chats]] == [f"Chat {i}." for i in range(3, 3 + chats)]
    tools = [[expected, plain, expected][i % 3] for i in range(750)]  # all 750 usable, or what a small limit leaves
    assert sft[chats:] == tools[:min(750, online_sft - chats)]


@pytest.mark.parametrize("interrupt_at", [2000, 4009, 4010, 4500])  # sft's yields: 7-9 held out, 10-4009 chats
def test_an_interrupted_sft_stage_resumed_gives_the_same_chats_and_tool_records(tmp_path, monkeypatch, interrupt_at):
    monkeypatch.setattr(dm, "COMMIT_EVERY", 300)
    tool_stage_hub().install(monkeypatch)
    dm.download_online(tool_stage_config(tmp_path / "straight"))
    hub = tool_stage_hub(interrupt_at).install(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        dm.download_online(tool_stage_config(tmp_path / "split"))
    tool_stage_hub().install(monkeypatch)
    dm.download_online(tool_stage_config(tmp_path / "split"))
    straight, split = file_bytes(tmp_path / "straight"), file_bytes(tmp_path / "split")
    split.pop("download_state.json")
    straight.pop("download_state.json")
    assert split == straight and hub.yielded == interrupt_at


def test_gsm8k_answers_with_thousands_and_damaged_records():
    """1,000 is the answer 1000; a record without its "#### " line, or without a question, is skipped."""
    record = dm.from_gsm8k({"question": "How many?", "answer": "10 * 100 = <<10*100=1000>>1000\n#### 1,000"})
    assert record["answer"] == "1000" and record["conversations"][1]["content"].startswith("<think>\n10 * 100 = 1000")
    assert dm.from_gsm8k({"question": "How many?", "answer": "It is 5."}) is None
    assert dm.from_gsm8k({"question": "", "answer": "#### 5"}) is None
    assert dm.from_gsm8k_zh({"question_zh-cn": "几个？", "answer_only": None}) is None


def test_chinese_reasoning_fields_are_wrapped():
    record = dm.from_reasoning_fields({"input": "3加4等于几？", "reasoning_content": "3 + 4 = 7",
                                       "content": "答案是 \\boxed{7}。"})
    reply = "<think>\n3 + 4 = 7\n</think>\n答案是 \\boxed{7}。"
    assert record == {"conversations": [{"role": "user", "content": "3加4等于几？"},
                                        {"role": "assistant", "content": reply}], "answer": "7"}
    assert dm.from_reasoning_fields({"input": "q", "reasoning_content": "", "content": "a"}) is None
