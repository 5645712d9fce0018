"""tokenizer.py: one interface over tokenizer.model and tokenizer.json, the chat pieces an imported tokenizer
gets, the thinking switch of the chat template (rendered as Qwen3's and transformers' are), and uint32 token files
for vocabularies past 65,536 ids."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import small_corpus
from dataset import DatasetConfig, TokenShards, build_shards
from dataset_sft import SFTData
from tokenizer import (CHAT_TEMPLATE_JINJA, EMPTY_THINK, IGNORE_INDEX, SPECIAL_PIECES, StreamDecoder, add_chat_pieces,
                       encode_conversation, load_tokenizer, render_prompt, render_text, reply_pieces, special_ids,
                       split_reply, thinking_switch, token_dtype)
from tools import parse_call

TEXTS = ["Tom found a red ball in the park.", "他有三个苹果。今天天气很好。",
         "Mia  counted 42 steps 🐋\n\nby the sea.\t你好"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好, where is Tom?"},
        {"role": "assistant", "content": "<think>\nTom is out.\n</think>\nIn the park, 公园."}]
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Work out an arithmetic expression.",
                                           "parameters": {"type": "object", "required": ["expression"], "properties": {
                                               "expression": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "weather", "description": "今天的天气", "parameters": {
             "type": "object", "properties": {}}}}]
TOOL_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Lily has 5 pens and gives 2 away?"},
             {"role": "assistant", "content": "<think>\nI will use the calculator.\n</think>\n", "tool_calls": [
                 {"name": "calculator", "arguments": {"expression": "5 - 2"}},
                 {"name": "weather", "arguments": {}}]},
             {"role": "tool", "content": "3"}, {"role": "tool", "content": "{\"sky\": \"晴\"}"},
             {"role": "assistant", "content": EMPTY_THINK + "Lily has 3 pens now."}]


@pytest.fixture(scope="module", params=["model", "json"])
def tok(request, tokenizer_path, hf_chat_tokenizer_json):
    return load_tokenizer(tokenizer_path if request.param == "model" else hf_chat_tokenizer_json)


def test_both_backends_round_trip_and_keep_special_pieces_whole(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.eos_id not in ids and (tok.bos_id is None or tok.bos_id not in ids)  # never added
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    for piece in SPECIAL_PIECES.values():
        i = tok.piece_id(piece)
        assert tok.encode(f"x{piece}y")[1:-1] == [i] and tok.decode([i]) == piece  # typed: one id; shown
    assert tok.piece_id("<no such piece>") is None
    assert max(max(ids) for ids in tok.encode_batch(TEXTS)) < tok.vocab_size


def test_roles_of_a_tokenizer_json(hf_tokenizer_json, hf_chat_tokenizer_json, tmp_path):
    tok = load_tokenizer(hf_tokenizer_json)  # its tokenizer_config.json names eos as {"content": ...}
    eos = tok.piece_id("<|endoftext|>")
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (eos, None, eos)  # no <pad>: eos fills
    assert tok.vocab_size == len(json.load(open(hf_tokenizer_json))["model"]["vocab"])

    shutil.copy(hf_chat_tokenizer_json, tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path / "tokenizer.json").eos_id == eos  # no config: the common names
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": {"content": "<|im_start|>", "special": True}, "pad_token": None}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (tok.piece_id("<|im_end|>"), tok.piece_id("<|im_start|>"),
                                                   tok.piece_id("<|im_end|>"))


def one_line_error(path, *words):
    with pytest.raises(ValueError) as e:
        load_tokenizer(path)
    assert "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_load_errors_are_one_line(tmp_path):
    from tokenizers import Tokenizer, models
    one_line_error(tmp_path / "none.json", f"{tmp_path / 'none.json'}: no such tokenizer", "convert_hf.py")
    one_line_error(tmp_path / "none.model", f"{tmp_path / 'none.model'}: no such tokenizer", "train_tokenizer.py")
    (tmp_path / "bad.json").write_text("{")
    one_line_error(tmp_path / "bad.json", f"{tmp_path / 'bad.json'}: not a tokenizer.json")
    (tmp_path / "bad.model").write_bytes(b"junk")
    one_line_error(tmp_path / "bad.model", f"{tmp_path / 'bad.model'}: not a SentencePiece model")
    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    one_line_error(path, f"{path}: the tokenizer has no end-of-document piece (eos)")
    (tmp_path / "tokenizer_config.json").write_text("[1]")
    one_line_error(path, f"{tmp_path / 'tokenizer_config.json'}: not a JSON object")


def test_add_chat_pieces_appends_only_the_missing_ones(hf_tokenizer_json, tmp_path):
    n = load_tokenizer(hf_tokenizer_json).vocab_size
    first, second = str(tmp_path / "first.json"), str(tmp_path / "second.json")
    assert add_chat_pieces(hf_tokenizer_json, first) == list(range(n, n + 8))
    tok = load_tokenizer(first)
    assert tok.vocab_size == n + 8 and [tok.piece_id(p) for p in SPECIAL_PIECES.values()] == list(range(n, n + 8))
    added = {t["content"]: t for t in json.load(open(first))["added_tokens"]}
    assert {p: added[p]["special"] for p in SPECIAL_PIECES.values()} == {
        "<|im_start|>": True, "<|im_end|>": True, "<think>": False, "</think>": False, "<tool_call>": False,
        "</tool_call>": False, "<tool_response>": False, "</tool_response>": False}
    assert not any(added[p][k] for p in SPECIAL_PIECES.values() for k in ("normalized", "lstrip", "rstrip", "single_word"))
    assert add_chat_pieces(first, second) == [] and load_tokenizer(second).vocab_size == n + 8
    assert not (tmp_path / "second.json.tmp").exists()

    # a tokenizer that has the chat markers already (SmolLM2's, Qwen's) gets only the think and tool tags
    from tokenizers import AddedToken, Tokenizer
    hf = Tokenizer.from_file(hf_tokenizer_json)
    hf.add_special_tokens([AddedToken("<|im_start|>", normalized=False), AddedToken("<|im_end|>", normalized=False)])
    hf.save(str(tmp_path / "markers.json"))
    assert add_chat_pieces(str(tmp_path / "markers.json"), str(tmp_path / "markers.json")) == list(range(n + 2, n + 8))
    tok = load_tokenizer(tmp_path / "markers.json")
    text = "<|im_start|>user\nhi<think>x</think> y<tool_call>{}</tool_call><|im_end|>\n"
    ids = tok.encode(text)
    assert [i for i in ids if i >= n] == [tok.piece_id(p) for p in (
        "<|im_start|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<|im_end|>")]
    assert tok.decode(ids) == text


def test_special_ids_name_the_missing_piece_and_how_to_get_it(hf_tokenizer_json, hf_chat_tokenizer_json):
    with pytest.raises(ValueError) as e:
        special_ids(load_tokenizer(hf_tokenizer_json))
    assert str(e.value) == (f"{hf_tokenizer_json}: the tokenizer has no <|im_start|> piece; import the model with "
                            f"python convert_hf.py, which adds it")
    tok = load_tokenizer(hf_chat_tokenizer_json)
    assert special_ids(tok) == {**{k: tok.piece_id(p) for k, p in SPECIAL_PIECES.items()}, "pad": tok.eos_id}


def test_a_tokenizer_without_the_tool_tags_still_chats_but_cannot_be_offered_tools(hf_tokenizer_json, tmp_path):
    """One from before the tool tags: every chat renders; a prompt with tools says what is missing."""
    from tokenizers import AddedToken, Tokenizer
    hf = Tokenizer.from_file(hf_tokenizer_json)
    hf.add_special_tokens([AddedToken(p, normalized=False) for p in ("<|im_start|>", "<|im_end|>")])
    hf.add_tokens([AddedToken(p, normalized=False) for p in ("<think>", "</think>")])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert special_ids(tok)["tool_call"] is None and render_prompt(tok, CHAT[:2])
    with pytest.raises(ValueError) as e:
        render_prompt(tok, CHAT[:2], tools=TOOLS)
    assert str(e.value) == (f"{tmp_path / 'tokenizer.json'}: the tokenizer has no <tool_call> piece, so the model "
                            f"cannot call tools; import the model with python convert_hf.py, which adds it")


def test_a_tokenizer_that_puts_a_space_before_every_text_is_refused_for_the_template(tmp_path):
    """Llama 2's and TinyLlama's tokenizer.json: "user" and "\n" encoded apart decode to "user \n"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    hf = Tokenizer(models.BPE(byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.train_from_iterator(small_corpus(300), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)],
        show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    add_chat_pieces(str(tmp_path / "tokenizer.json"), str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="puts a space before every text it encodes"):
        special_ids(load_tokenizer(tmp_path / "tokenizer.json"))


def test_a_conversation_through_a_tokenizer_json_decodes_to_the_template(hf_chat_tokenizer_json):
    tok = load_tokenizer(hf_chat_tokenizer_json)
    ids, labels = encode_conversation(tok, CHAT)
    assert tok.decode(ids) == render_text(CHAT)
    trained = [k for k, x in enumerate(labels) if x != IGNORE_INDEX]
    assert trained == list(range(trained[0], trained[-1] + 1))  # one span: the reply and its <|im_end|>
    assert [labels[k] for k in trained] == [ids[k] for k in trained] == tok.encode(CHAT[-1]["content"]) + [
        tok.piece_id("<|im_end|>")]


# ---------------------------------------------------------------------------------------------
# the thinking switch: enable_thinking and /think, /no_think

def test_enable_thinking_follows_the_generation_prompt_as_qwen3s_template_does():
    messages = [{"role": "user", "content": "Hi"}]
    asked = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_text(messages, True, enable_thinking=False) == asked + "<think>\n\n</think>\n\n"  # Qwen3's
    assert render_text(messages, True, enable_thinking=True) == asked + "<think>\n"
    assert render_text(messages, True, enable_thinking=None) == render_text(messages, True) == asked
    assert EMPTY_THINK == "<think>\n\n</think>\n\n"
    for enable_thinking in (None, False, True):  # only a reply asked for is prefilled
        assert render_text(messages, enable_thinking=enable_thinking) == "<|im_start|>user\nHi<|im_end|>\n"


def test_transformers_renders_the_jinja_template_as_render_text(hf_chat_tokenizer_json):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=hf_chat_tokenizer_json,
                                              chat_template=CHAT_TEMPLATE_JINJA)
    messages = CHAT + [{"role": "user", "content": "And Sam?"}]
    for gen in (True, False):
        assert hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == render_text(messages, gen)
        for thinking in (False, True, None):
            assert hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False,
                                          enable_thinking=thinking) == render_text(messages, gen, thinking)


@pytest.mark.parametrize("system", [True, False])
def test_transformers_renders_tools_calls_and_results_as_render_text(hf_chat_tokenizer_json, system):
    """tools=, the calls in our form and in OpenAI's (arguments a JSON string), runs of results in one user turn."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=hf_chat_tokenizer_json,
                                              chat_template=CHAT_TEMPLATE_JINJA)
    messages = TOOL_CHAT if system else TOOL_CHAT[1:]
    openai_form = [{**m, "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {
        "name": c["name"], "arguments": json.dumps(c["arguments"])}} for i, c in enumerate(m["tool_calls"])]}
        if "tool_calls" in m else m for m in messages]
    for gen in (True, False):
        for theirs in (messages, openai_form):
            assert hf.apply_chat_template(theirs, tools=TOOLS, add_generation_prompt=gen, tokenize=False) == \
                render_text(messages, gen, tools=TOOLS)
    text = render_text(messages, tools=TOOLS)
    assert text.startswith("<|im_start|>system\n" + ("Be brief.\n\n" if system else "") + "# Tools\n\n")
    assert '\n<tools>\n{"type": "function", "function": {"name": "calculator", ' in text
    assert "I will use the calculator.\n</think>\n\n<tool_call>\n" \
           '{"name": "calculator", "arguments": {"expression": "5 - 2"}}\n</tool_call>\n<tool_call>\n' in text
    assert "<|im_start|>user\n<tool_response>\n3\n</tool_response>\n<tool_response>\n{\"sky\": \"晴\"}\n" \
           "</tool_response><|im_end|>\n<|im_start|>assistant\n<think>" in text
    assert render_text(CHAT, tools=None) == render_text(CHAT, tools=[]) == hf.apply_chat_template(CHAT, tokenize=False)


def test_the_calls_are_trained_and_the_tool_list_and_results_are_not(tok):
    ids, labels = encode_conversation(tok, TOOL_CHAT, tools=TOOLS)
    assert tok.decode(ids) == render_text(TOOL_CHAT, tools=TOOLS)
    assert ids == render_prompt(tok, TOOL_CHAT, add_generation_prompt=False, tools=TOOLS)
    trained = tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    calls = TOOL_CHAT[2]["content"] + "\n" + "\n".join(
        f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in TOOL_CHAT[2]["tool_calls"])
    assert trained == calls + "<|im_end|>" + TOOL_CHAT[-1]["content"] + "<|im_end|>"
    assert [label for i, label in zip(ids, labels) if label != IGNORE_INDEX] == \
        [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]


def test_a_reply_streams_its_calls_apart_and_each_parses(tok):
    reply = "<think>\nI will use the calculator.\n</think>\n\n" \
            '<tool_call>\n{"name": "calculator", "arguments": {"expression": "5 - 2"}}\n</tool_call>\n' \
            '<tool_call>\n{"name": "weather", "arguments": {}}\n</tool_call>'
    pieces = list(reply_pieces(tok, tok.encode(reply) + [special_ids(tok)["im_end"]] + tok.encode("ignored")))
    parts = []
    for part, text in pieces:
        if text == "" or not parts or parts[-1][0] != part:
            parts.append([part, text])
        else:
            parts[-1][1] += text
    assert parts == [["reasoning", "\nI will use the calculator.\n"], ["answer", "\n\n"],
                     ["call", '\n{"name": "calculator", "arguments": {"expression": "5 - 2"}}\n'], ["answer", "\n"],
                     ["call", '\n{"name": "weather", "arguments": {}}\n'], ["answer", ""]]
    content, calls = split_reply(reply)
    assert content == "<think>\nI will use the calculator.\n</think>\n"
    assert [parse_call(c) for c in calls] == [{"name": "calculator", "arguments": {"expression": "5 - 2"}},
                                              {"name": "weather", "arguments": {}}]
    assert render_text([{"role": "assistant", "content": content, "tool_calls": list(map(parse_call, calls))}]) == \
        f"<|im_start|>assistant\n{reply}<|im_end|>\n"  # kept in the history, it renders as generated
    assert split_reply("Just an answer.") == ("Just an answer.", [])
    assert parse_call('{"name": "weather"}') == {"name": "weather", "arguments": {}}  # arguments may be left out


@pytest.mark.parametrize("text", ['{"name": "calculator", "arguments": {"expression": "1 +', '["calculator"]',
                                  '{"arguments": {}}', '{"name": "f", "arguments": "5 - 2"}', ''])
def test_a_malformed_call_says_what_is_wrong(text):
    with pytest.raises(ValueError, match="the call is not"):
        parse_call(text)


@pytest.fixture(scope="module")
def newline_merging_tokenizer_json(tmp_path_factory):
    """A byte-level BPE tokenizer.json like SmolLM2's (GPT-2's pre-tokenizer) that learned "\n\n" as one token, with
    the chat pieces: it encodes "\n\n" at the end of a text as that token, and before a word as two."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("newline_merging")
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([line + "\n\n" for line in small_corpus(300)], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf.save(str(d / "tokenizer.json"))
    add_chat_pieces(str(d / "tokenizer.json"), str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return str(d / "tokenizer.json")


@pytest.mark.parametrize("which", ["model", "json", "json merging newlines"])
def test_a_thinking_prefill_has_the_ids_of_the_same_text_in_a_trained_reply(
        which, tokenizer_path, hf_chat_tokenizer_json, newline_merging_tokenizer_json):
    """The prompt the model continues must be the ids it was trained on: a reply's content (EMPTY_THINK + the answer,
    or <think>\n + the reasoning) is encoded as one text, and the generation prompt's prefill as its start."""
    tok = load_tokenizer({"model": tokenizer_path, "json": hf_chat_tokenizer_json,
                          "json merging newlines": newline_merging_tokenizer_json}[which])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    replies = {False: [EMPTY_THINK + "Hello!", EMPTY_THINK + "Tom is 7.", EMPTY_THINK + "你好"],
               True: ["<think>\nTom has 3 apples.\n</think>\n3", "<think>\n3 + 4 = 7\n</think>\n7"]}
    for enable_thinking, contents in replies.items():
        prompt, asked = render_prompt(tok, messages, enable_thinking=enable_thinking), render_prompt(tok, messages)
        assert tok.decode(prompt) == render_text(messages, True, enable_thinking) and prompt[:len(asked)] == asked
        for content in contents:
            ids, _ = encode_conversation(tok, messages + [{"role": "assistant", "content": content}])
            assert ids[:len(prompt)] == prompt, content
    alone, in_reply = tok.encode(EMPTY_THINK), tok.encode(EMPTY_THINK + "Hello!")[:len(tok.encode(EMPTY_THINK))]
    assert (alone != in_reply) == (which == "json merging newlines")  # where a plain encode would not do


@pytest.mark.parametrize("message, expected", [
    ("What is 3 + 4? /think", ("What is 3 + 4?", True)),
    ("Just say hi /no_think", ("Just say hi", False)),
    ("Two lines\n/no_think \n", ("Two lines", False)),
    ("/think", ("", True)),
    ("  /no_think", ("", False)),
    ("Hi", ("Hi", None)),
    ("What does /think do?", ("What does /think do?", None)),  # only at the end
    ("cd /usr/think", ("cd /usr/think", None)),  # a word of its own
    ("Say /no_think/think", ("Say /no_think/think", None)),
])
def test_thinking_switch_is_qwen3s_soft_switch_at_the_end_of_a_message(message, expected):
    assert thinking_switch(message) == expected


def chat_records(n):
    rng = np.random.default_rng(0)
    lines = small_corpus(2 * n)
    return [{"conversations": [{"role": "user", "content": lines[2 * i]},
                               {"role": "assistant", "content": ("<think>\n好\n</think>\n" if rng.random() < 0.5 else "")
                                + lines[2 * i + 1]}]} for i in range(n)]


def trained_part(tok, messages):
    """The ids of a conversation as SFTData keeps them: up to its last trained label."""
    ids, labels = encode_conversation(tok, messages)
    return ids[:max(k for k, x in enumerate(labels) if x != IGNORE_INDEX) + 1]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_sft_batches_from_a_tokenizer_json_decode_to_the_template(hf_chat_tokenizer_json, tmp_path, monkeypatch):
    import dataset_sft
    monkeypatch.setattr(dataset_sft, "CHUNK_BYTES", 2000)  # several chunks: two worker processes
    records = chat_records(40)
    data = SFTData(write_jsonl(tmp_path / "c.jsonl", records), hf_chat_tokenizer_json, seq_len=256, batch_size=8,
                   num_workers=2)
    tok = data.tok
    for index in range(5):
        batch = data.batch(index)
        for r, conv in enumerate(data.rows_of(index)):
            n = int(np.flatnonzero(batch["targets"][r].numpy() != IGNORE_INDEX)[-1]) + 1  # up to the last trained
            ids = batch["tokens"][r, :n].tolist() + [int(batch["targets"][r, n - 1])]
            want = render_text(records[conv]["conversations"])
            assert tok.decode(ids) == want.removesuffix("\n")  # the untrained "\n" after the last <|im_end|> is cut
            assert (batch["tokens"][r, n:] == tok.pad_id).all()


# ---------------------------------------------------------------------------------------------
# token files: uint32 past 65,536 ids

@pytest.fixture(scope="module")
def big_tokenizer_json(hf_tokenizer_json, tmp_path_factory):
    """hf_tokenizer_json with 65,600 more pieces and the chat markers: ids up to about 66,150."""
    from tokenizers import AddedToken, Tokenizer
    d = tmp_path_factory.mktemp("big_tokenizer")
    hf = Tokenizer.from_file(hf_tokenizer_json)
    hf.add_tokens([AddedToken(f"<x{i}>", normalized=False) for i in range(65600)])
    hf.save(str(d / "tokenizer.json"))
    shutil.copy(Path(hf_tokenizer_json).with_name("tokenizer_config.json"), d)
    add_chat_pieces(str(d / "tokenizer.json"), str(d / "tokenizer.json"))
    return str(d / "tokenizer.json")


def test_token_dtype_is_uint16_while_every_id_fits():
    assert [token_dtype(v).name for v in (512, 65535, 65536, 65537, 200_000)] == ["uint16"] * 3 + ["uint32"] * 2
    assert token_dtype(70000).str == "<u4"  # little-endian whatever the machine


def test_pretraining_shards_past_65536_ids_are_uint32(big_tokenizer_json, tmp_path):
    tok = load_tokenizer(big_tokenizer_json)
    assert tok.vocab_size > 65536
    docs = [f"{line} <x65599> 你好 <x7>" for line in small_corpus(60)]
    write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    summary = build_shards(DatasetConfig(inputs=str(tmp_path / "c.jsonl"), val_inputs="", val_fraction=0.0,
                                         tokenizer=big_tokenizer_json, out_dir=str(tmp_path / "out"),
                                         shard_tokens=500, num_workers=2, chunk_docs=16))
    paths = summary["train"]["paths"]
    infos = [json.load(open(p + ".json")) for p in paths]
    assert len(paths) > 1 and {i["dtype"] for i in infos} == {"uint32"} and infos[0]["vocab_size"] == tok.vocab_size
    want = [i for d in docs for i in tok.encode(d) + [tok.eos_id]]
    assert tok.piece_id("<x65599>") > 65535 and tok.piece_id("<x65599>") in want
    assert np.concatenate([np.fromfile(p, "<u4") for p in paths]).tolist() == want
    data = TokenShards(paths, seq_len=16, batch_size=4)
    assert np.concatenate([np.asarray(s) for s in data.shards]).tolist() == want


def test_old_uint16_shards_still_read(tmp_path):
    for name, dtype in (("old", None), ("new", "uint16")):
        path = str(tmp_path / f"{name}.bin")
        np.arange(100, dtype="<u2").tofile(path)
        info = {"tokenizer": "t.model", "tokenizer_sha256": "abc", "vocab_size": 512, "eos_id": 2,
                "num_tokens": 100, "num_documents": 1}
        json.dump({**info, "dtype": dtype} if dtype else info, open(path + ".json", "w"))
        assert np.asarray(TokenShards([path], seq_len=8, batch_size=2).shards[0]).tolist() == list(range(100))


def test_chat_shards_past_65536_ids_are_uint32_and_old_ones_read_as_uint16(
        big_tokenizer_json, tokenizer_path, tmp_path, capsys):
    records = chat_records(12)
    records[0]["conversations"][1]["content"] += " <x65599>"
    path = write_jsonl(tmp_path / "c.jsonl", records)
    info_path = tmp_path / "c.jsonl.shards" / "info.json"
    for tokenizer, dtype in ((big_tokenizer_json, "uint32"), (tokenizer_path, "uint16")):
        data = SFTData(path, tokenizer, seq_len=512, batch_size=2)
        assert json.load(open(info_path))["dtype"] == dtype and data.ids.dtype == np.dtype(dtype)
        assert [data.row(i)[0].tolist() for i in range(len(records))] == [
            trained_part(data.tok, r["conversations"]) for r in records]
        assert (data.row(0)[0] > 65535).any() == (dtype == "uint32")  # <|im_start|>, <x65599>

    info = json.load(open(info_path))
    del info["dtype"]  # as chat shards made before uint32 existed
    json.dump(info, open(info_path, "w"))
    capsys.readouterr()
    data = SFTData(path, tokenizer_path, seq_len=512, batch_size=2)
    assert "tokenizing" not in capsys.readouterr().out  # reused, read as uint16
    assert data.row(0)[0].tolist() == trained_part(data.tok, records[0]["conversations"])


def test_stream_decoder_waits_for_whole_characters_of_byte_level_tokens(hf_chat_tokenizer_json):
    tok = load_tokenizer(hf_chat_tokenizer_json)
    text = "他有三个苹果 ok 🐋<think>"
    decoder = StreamDecoder(tok)
    pieces = [decoder.add(i) for i in tok.encode(text)]
    assert "".join(pieces) + decoder.rest() == text and decoder.text() == text
    assert "" in pieces and not any("\ufffd" in p for p in pieces)  # bytes of one character came apart
