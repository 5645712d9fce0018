import json
import os

import numpy as np
import pytest
import torch

import dataset_sft
from conftest import SHARED_DATA
from dataset_sft import SFTData, loss_weights
from records import read_conversations
from tokenizer import CHAT_TEMPLATE_JINJA, IGNORE_INDEX, encode_conversation, load_tokenizer, render_prompt, render_text

M = IGNORE_INDEX


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return load_tokenizer(tokenizer_path)


def ids_of(tok):
    return {p: tok.piece_id(p) for p in ("<|im_start|>", "<|im_end|>", "<think>", "</think>")}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def masked(ids):
    return [M] * len(ids)


def turn(tok, role, content, trained):
    """Expected (ids, labels) of one turn, built by hand from the template's pieces."""
    t = ids_of(tok)
    header = [t["<|im_start|>"]] + tok.encode(role + "\n")
    body = tok.encode(content) + [t["<|im_end|>"]]
    newline = tok.encode("\n")
    return header + body + newline, masked(header) + (body if trained else masked(body)) + masked(newline)


def expected(tok, *turns):
    ids, labels = [], []
    for role, content in turns:
        i, l = turn(tok, role, content, role == "assistant")
        ids += i
        labels += l
    return ids, labels


def encoded(path, tok):
    conversations, _ = read_conversations(path, verbose=False)
    return [encode_conversation(tok, c.messages) for c in conversations], conversations


# -----------------------------------------------------------------------------
# formats and the exact ids and labels

FORMATS = {
    "conversations": {"conversations": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Where is Tom?"},
                                        {"role": "assistant", "content": "Tom is in the park."}]},
    "messages": {"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Where is Tom?"},
                              {"role": "assistant", "content": "Tom is in the park."}]},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."},
                                   {"from": "human", "value": "Where is Tom?"},
                                   {"from": "gpt", "value": "Tom is in the park."}]},
    "alpaca": {"system": "Be brief.", "instruction": "Where is Tom?", "input": "", "output": "Tom is in the park."},
}


# One tool conversation in each layout that carries tools: the calculator offered, two calls, their results, the answer.
CALCULATOR = {"name": "calculator", "description": "Work out an arithmetic expression.",
              "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}
CALLS = [{"name": "calculator", "arguments": {"expression": "5 - 2"}}, {"name": "calculator", "arguments": {
    "expression": "2 * 4"}}]
TOOL_MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "5 - 2 and 2 * 4?"},
                 {"role": "assistant", "content": "", "tool_calls": CALLS}, {"role": "tool", "content": "3"},
                 {"role": "tool", "content": "8"}, {"role": "assistant", "content": "3 and 8."}]
TOOL_FORMATS = {
    "conversations": {"conversations": TOOL_MESSAGES, "tools": [{"type": "function", "function": CALCULATOR}]},
    "messages": {"messages": [
        *TOOL_MESSAGES[:2],
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": c["name"],
                                                                 "arguments": json.dumps(c["arguments"])}}
            for i, c in enumerate(CALLS)]},
        {"role": "tool", "tool_call_id": "call_0", "content": "3"},
        {"role": "tool", "tool_call_id": "call_1", "content": "8"}, TOOL_MESSAGES[-1]],
        "tools": [{"type": "function", "function": CALCULATOR}]},
    "sharegpt": {"system": "Be brief.", "tools": json.dumps([CALCULATOR]), "conversations": [  # LLaMA-Factory's
        {"from": "human", "value": "5 - 2 and 2 * 4?"}, {"from": "function_call", "value": json.dumps(CALLS)},
        {"from": "observation", "value": "3"}, {"from": "observation", "value": "8"},
        {"from": "gpt", "value": "3 and 8."}]},
}


@pytest.mark.parametrize("fmt", TOOL_FORMATS)
def test_each_tool_layout_reads_exactly_and_its_shards_train_the_calls(tmp_path, tok, tokenizer_path, fmt, capsys):
    path = write_jsonl(tmp_path / "tools.jsonl", [TOOL_FORMATS[fmt]] * 2)
    conversations, stats = read_conversations(path, verbose=False)
    assert conversations[0].messages == TOOL_MESSAGES and stats["formats"] == {fmt: 2}
    assert conversations[0].extra == {"tools": [{"type": "function", "function": CALCULATOR}]}
    ids, labels = encode_conversation(tok, TOOL_MESSAGES, tools=conversations[0].extra["tools"])
    data = SFTData(path, tokenizer_path, seq_len=2048, batch_size=1, num_workers=1)
    assert [x.tolist() for x in data.row(0)] == list(trained_part(ids, labels))
    trained = tok.decode([i for i, label in zip(ids, labels) if label != M])
    assert trained == "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in CALLS) + "<|im_end|>" \
        "3 and 8.<|im_end|>"  # the calls and the answer; never the tool list, the results or the system prompt


@pytest.mark.parametrize("bad, reason", [
    ({"from": "function_call", "value": '{"name": "calculator", "arguments": {'}, '"conversations"[1] is not valid JSON'),
    ({"from": "function_call", "value": '{"arguments": {}}'},
     '"conversations"[1][0] is not a call {"name": ..., "arguments": {...}}'),
    ({"from": "function_call", "value": '{"name": "calculator", "arguments": "{5"}'},
     '"conversations"[1][0] arguments is not valid JSON'),
])
@pytest.mark.parametrize("reader", ["objects", "shards"])
def test_malformed_tool_json_is_counted_and_skipped(tmp_path, tokenizer_path, capsys, bad, reason, reader):
    good = TOOL_FORMATS["sharegpt"]
    broken = {**good, "conversations": [good["conversations"][0], bad, *good["conversations"][2:]]}
    bad_tools = {**good, "tools": "[{"}
    path = write_jsonl(tmp_path / "t.jsonl", [good, broken, bad_tools, good])
    if reader == "objects":
        assert read_conversations(path)[1]["malformed"] == 2
    else:
        assert SFTData(path, tokenizer_path, seq_len=2048, batch_size=1, num_workers=2).stats["malformed"] == 2
    err = capsys.readouterr().err
    assert f"{path} line 2: {reason}; skipped" in err and f'{path} line 3: "tools" is not valid JSON; skipped' in err


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_renders_exact_ids_and_labels(tmp_path, tok, fmt, capsys):
    path = write_jsonl(tmp_path / "chat.jsonl", [FORMATS[fmt]] * 3)
    [(ids, labels), *_], _ = encoded(path, tok)
    read_conversations(path)
    assert capsys.readouterr().out.strip() == f"{path}: {fmt} format, 3 conversations"

    t = ids_of(tok)
    answer = tok.encode("Tom is in the park.")
    want_ids = ([t["<|im_start|>"]] + tok.encode("system\n") + tok.encode("Be brief.") + [t["<|im_end|>"]] + tok.encode("\n")
                + [t["<|im_start|>"]] + tok.encode("user\n") + tok.encode("Where is Tom?") + [t["<|im_end|>"]] + tok.encode("\n")
                + [t["<|im_start|>"]] + tok.encode("assistant\n") + answer + [t["<|im_end|>"]] + tok.encode("\n"))
    n_prompt = len(want_ids) - len(answer) - 1 - len(tok.encode("\n"))
    want_labels = [M] * n_prompt + answer + [t["<|im_end|>"]] + [M] * len(tok.encode("\n"))
    assert ids == want_ids
    assert labels == want_labels
    assert tok.decode(ids) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhere is Tom?<|im_end|>\n" \
                             "<|im_start|>assistant\nTom is in the park.<|im_end|>\n"


def test_alpaca_input_history_and_extra_keys(tmp_path, tok):
    record = {"instruction": "Add the numbers.", "input": "3 and 4", "output": "7",
              "history": [["Hi", "Hello!"]], "answer": "7", "id": 12}
    path = write_jsonl(tmp_path / "a.jsonl", [record, {"instruction": "Only a prompt."}])
    [(ids, labels), (prompt_ids, prompt_labels)], conversations = encoded(path, tok)
    assert conversations[0].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                         {"role": "user", "content": "Add the numbers.\n\n3 and 4"},
                                         {"role": "assistant", "content": "7"}]
    assert conversations[0].extra == {"answer": "7", "id": 12}
    assert (ids, labels) == expected(tok, ("user", "Hi"), ("assistant", "Hello!"),
                                     ("user", "Add the numbers.\n\n3 and 4"), ("assistant", "7"))
    assert conversations[1].messages == [{"role": "user", "content": "Only a prompt."}]  # for distill.py
    assert set(prompt_labels) == {M}


def test_multi_turn_trains_every_assistant_turn_and_first_answer_token(tmp_path, tok):
    turns = [("system", "You help."), ("user", "Hi"), ("assistant", "Hello, Sam."),
             ("user", "Count to 3."), ("assistant", "1 2 3")]
    path = write_jsonl(tmp_path / "m.jsonl", [{"conversations": [{"role": r, "content": c} for r, c in turns]}])
    [(ids, labels)], _ = encoded(path, tok)
    assert (ids, labels) == expected(tok, *turns)
    trained_text = tok.decode([i for i in labels if i != M])
    assert trained_text == "Hello, Sam.<|im_end|>1 2 3<|im_end|>"
    # the first answer token of each reply, right after the assistant header, is trained
    header = [ids_of(tok)["<|im_start|>"]] + tok.encode("assistant\n")
    starts = [k + len(header) for k in range(len(ids)) if ids[k:k + len(header)] == header]
    assert [tok.decode(ids[k:k + 3]) for k in starts] == [tok.decode(tok.encode("Hello, Sam.")[:3]),
                                                           tok.decode(tok.encode("1 2 3")[:3])]
    for k in starts:
        assert labels[k - 1] == M and labels[k] == ids[k]


def test_render_prompt_and_generation_prompt(tok):
    messages = [{"role": "user", "content": "Hi"}]
    t = ids_of(tok)
    assert render_prompt(tok, messages) == turn(tok, "user", "Hi", False)[0] + [t["<|im_start|>"]] + tok.encode("assistant\n")
    assert render_prompt(tok, messages, add_generation_prompt=False) == turn(tok, "user", "Hi", False)[0]
    assert render_text(messages, True) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(render_prompt(tok, messages)) == render_text(messages, True)


def test_jinja_template_matches_renderer(tok):
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(CHAT_TEMPLATE_JINJA)
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "2+2?\n你好"},
                {"role": "assistant", "content": "<think>\nadd\n</think>\n4"}, {"role": "user", "content": "Thanks"}]
    for gen in (True, False):
        text = template.render(messages=messages, add_generation_prompt=gen)
        assert text == render_text(messages, gen)
        assert tok.decode(render_prompt(tok, messages, gen)) == text


def test_think_tags_are_single_tokens_and_pad_is_not_im_end(tok):
    t = ids_of(tok)
    for piece in ("<think>", "</think>", "<|im_start|>", "<|im_end|>"):
        assert tok.encode(piece) == [t[piece]]
        assert t[piece] is not None
    assert tok.pad_id is not None and tok.pad_id != t["<|im_end|>"]


# -----------------------------------------------------------------------------
# SFTData

def chats(n, seed=0, max_words=20):
    rng = np.random.default_rng(seed)
    words = ["Tom", "found", "a", "red", "ball", "in", "the", "park", "Lily", "painted", "boat"]
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words, size=rng.integers(1, max_words // 2 + 1)))
        a = " ".join(rng.choice(words, size=rng.integers(1, max_words)))
        out.append({"conversations": [{"role": "user", "content": f"{i}: {q}?"}, {"role": "assistant", "content": a}]})
    return out


def test_batch_is_shifted_padded_and_weighted(tmp_path, tok, tokenizer_path):
    t = ids_of(tok)
    turns = [("user", "Say <think> please"), ("assistant", "<think>\nTom has 3.\n</think>\nThree.")]
    short = [("user", "Hi"), ("assistant", "Hello.")]
    path = write_jsonl(tmp_path / "w.jsonl", [{"conversations": [{"role": r, "content": c} for r, c in x]}
                                              for x in (turns, short)])
    data = SFTData(path, tokenizer_path, seq_len=256, batch_size=2, think_weight=5.0)
    tokens, targets, weights = (data.batch(0)[k] for k in ("tokens", "targets", "loss_weight"))
    assert tokens.dtype == targets.dtype == torch.int64 and weights.dtype == torch.float32
    ids, labels = expected(tok, *turns)
    ids, labels = ids[:-len(tok.encode("\n"))], labels[:-len(tok.encode("\n"))]  # trailing untrained "\n" dropped
    short_ids, short_labels = expected(tok, *short)
    short_ids, short_labels = short_ids[:-len(tok.encode("\n"))], short_labels[:-len(tok.encode("\n"))]
    assert tokens.shape == (2, len(ids) - 1)
    rows = {tuple(tokens[r, :len(ids) - 1].tolist()): r for r in range(2)}
    r = rows[tuple(ids[:-1])]
    assert targets[r].tolist() == labels[1:]
    s = 1 - r
    n = len(short_ids) - 1
    assert tokens[s, :n].tolist() == short_ids[:-1] and targets[s, :n].tolist() == short_labels[1:]
    assert set(tokens[s, n:].tolist()) == {tok.pad_id} and set(targets[s, n:].tolist()) == {M}
    assert (weights[s, n:] == 0).all()

    # weights: exactly 5 on the trained <think> and </think> targets, 1 on other trained targets, 0 elsewhere
    tgt, w = targets[r], weights[r]
    think_at = [k for k, x in enumerate(tgt.tolist()) if x in (t["<think>"], t["</think>"])]
    assert len(think_at) == 2
    assert w[think_at].tolist() == [5.0, 5.0]
    others = [k for k in range(len(tgt)) if k not in think_at]
    assert w[others].tolist() == [1.0 if tgt[k] != M else 0.0 for k in others]
    # the <think> the user typed (the first one) is masked as a target: no weight there
    k = ids.index(t["<think>"]) - 1  # the position whose target it is
    assert tokens[r, k + 1] == t["<think>"] and tgt[k] == M and w[k] == 0
    # number_weight: exactly that on the trained number piece of the think block (the 3 of "Tom has 3."), every other
    # weight as before
    numbered = SFTData(path, tokenizer_path, seq_len=256, batch_size=2, think_weight=5.0, number_weight=3.0).batch(0)
    (three,) = tok.encode("3")
    at = [k for k, x in enumerate(tgt.tolist()) if x == three]
    assert len(at) == 1 and numbered["loss_weight"][r, at].tolist() == [3.0]
    assert torch.equal(numbered["loss_weight"][r, :at[0]], w[:at[0]])
    assert torch.equal(numbered["loss_weight"][r, at[0] + 1:], w[at[0] + 1:])
    assert SFTData(path, tokenizer_path, seq_len=256, batch_size=2).batch(0)["targets"].shape == targets.shape
    assert set(SFTData(path, tokenizer_path, seq_len=256, batch_size=2).batch(0)) == {"tokens", "targets"}


def test_loss_weights_ignore_masked_think():
    targets = np.array([[M, 6, 5, M, 7, 9], [6, M, M, M, M, M]])
    w = loss_weights(targets, (6, 7), 10.0)
    assert w.dtype == np.float32
    assert w.tolist() == [[0, 10, 1, 0, 10, 1], [10, 0, 0, 0, 0, 0]]
    # number_weight: on the numbers (9, 8) inside a think block (6 7) or a call (3 4), not after them
    targets = np.array([[M, 6, 9, M, 9, 7, 9, 5, 3, 8, 4, 8], [9, 3, 9, M, M, M, M, M, M, M, M, M]])
    w = loss_weights(targets, (6, 7), 10.0, number_ids=[9, 8], number_weight=4.0, call_ids=(3, 4))
    assert w.tolist() == [[0, 10, 4, 0, 4, 10, 1, 1, 1, 4, 1, 1], [1, 1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0]]


def test_truncation_and_skip_counts(tmp_path, tok, tokenizer_path, capsys):
    long_reply = {"conversations": [{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Tom found a red ball. " * 20}]}
    long_prompt = {"conversations": [{"role": "user", "content": "Lily painted the boat. " * 20},
                                     {"role": "assistant", "content": "Yes."}]}
    no_reply = {"messages": [{"role": "user", "content": "Anyone?"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [long_reply, long_prompt, no_reply] + chats(3, max_words=2))
    data = SFTData(path, tokenizer_path, seq_len=32, batch_size=1)
    assert len(data) == 4
    assert data.stats["truncated"] == 1
    assert data.stats["skipped_too_long"] == 1 and data.stats["skipped_no_reply"] == 1
    out = capsys.readouterr().out
    assert "4 rows" in out and "1 truncated" in out
    assert "skipped 1 with no assistant reply, 1 whose first reply starts past seq_len" in out
    # the truncated row keeps the first seq_len + 1 ids: its prompt and the start of the reply
    ids, labels = expected(tok, ("user", "Hi"), ("assistant", "Tom found a red ball. " * 20))
    assert data.row(0)[0].tolist() == ids[:33] and data.row(0)[1].tolist() == labels[:33]
    assert max(data.batch(i)["tokens"].shape[1] for i in range(8)) == 32


def test_batches_are_deterministic_cover_epochs_and_split_across_ranks(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "d.jsonl", chats(24))
    one = SFTData(path, tokenizer_path, seq_len=64, batch_size=4, seed=3)
    again = SFTData(path, tokenizer_path, seq_len=64, batch_size=4, seed=3)
    ranks = [SFTData(path, tokenizer_path, seq_len=64, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    for index in (0, 5, 6, 11, 7):  # 6 batches per epoch: both epochs, in any order (a resume)
        tokens, targets = one.batch(index).values()
        assert torch.equal(tokens, again.batch(index)["tokens"])
        for r, data in enumerate(ranks):
            rt, rg = data.batch(index).values()
            assert torch.equal(rt, tokens[2 * r:2 * r + 2]) and torch.equal(rg, targets[2 * r:2 * r + 2])
    seen = [one.rows_of(i) for i in range(6)]
    assert sorted(np.concatenate(seen).tolist()) == list(range(24))  # an epoch sees every row once
    second = np.concatenate([one.rows_of(i) for i in range(6, 12)])
    assert sorted(second.tolist()) == list(range(24)) and second.tolist() != np.concatenate(seen).tolist()
    other_seed = SFTData(path, tokenizer_path, seq_len=64, batch_size=4, seed=4)
    assert not all(np.array_equal(one.rows_of(i), other_seed.rows_of(i)) for i in range(6))


def test_batch_larger_than_the_data_wraps_into_the_next_epoch(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "d.jsonl", chats(3))
    data = SFTData(path, tokenizer_path, seq_len=64, batch_size=5)
    rows = data.rows_of(0)
    assert sorted(rows[:3].tolist()) == [0, 1, 2] and data.batch(1)["tokens"].shape[0] == 5


# -----------------------------------------------------------------------------
# reading files and bad input

def test_json_array_file_and_bom(tmp_path, tok):
    path = tmp_path / "a.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([FORMATS["alpaca"], FORMATS["sharegpt"]]).encode())
    conversations, stats = read_conversations(str(path), verbose=False)
    assert [c.messages for c in conversations] == [conversations[1].messages] * 2
    assert stats["formats"] == {"alpaca": 1, "sharegpt": 1} and conversations[1].where == f"{path} record 1"


@pytest.mark.parametrize("reader", ["objects", "shards"])
def test_malformed_lines_are_warned_skipped_and_counted(tmp_path, capsys, reader, tokenizer_path):
    path = tmp_path / "m.jsonl"
    good = json.dumps(FORMATS["messages"])
    path.write_text("\n".join([good, "{not json", good, '{"messages": [{"role": "user"}]}', "[1, 2]",
                               '{"foo": 1}', "", good]) + "\n", encoding="utf-8")
    if reader == "objects":
        conversations, stats = read_conversations(str(path))
        assert len(conversations) == 3 and stats["malformed"] == 4
    else:
        data = SFTData(path, tokenizer_path, seq_len=64, batch_size=1, num_workers=2)
        assert len(data) == 3 and data.stats["malformed"] == 4
    captured = capsys.readouterr()
    assert f"{path} line 2: not valid JSON; skipped" in captured.err
    assert f'{path} line 4: "messages"[0]["content"] is missing; skipped' in captured.err
    assert f"{path} line 5:" in captured.err and f"{path} line 6: unknown chat format" in captured.err
    assert f"{path}: messages format, 3 conversations, 4 malformed records skipped" in captured.out.splitlines()


@pytest.mark.parametrize("content, message", [
    ('{"foo": 1, "bar": 2}\n', "line 1: unknown chat format (keys: foo, bar); expected conversations, messages "
                                "or instruction/output"),
    ('{"text": "a story"}\n', "line 1: unknown chat format (keys: text)"),
    (json.dumps({"messages": [{"role": "function", "content": "x"}]}) + "\n",
     "line 1: \"messages\"[0]: unknown role 'function'; expected \"role\": system, user, assistant, tool"),
    (json.dumps(FORMATS["sharegpt"]) + "\n" + json.dumps({"conversations": [{"from": "bot", "value": "x"}]}) + "\n",
     "line 2: \"conversations\"[0]: unknown role 'bot'"),
    ("{broken\n\n[3]\n", "no conversations, 2 malformed records skipped"),
    ("[{]", "not valid JSON"),
])
@pytest.mark.parametrize("reader", ["objects", "shards"])
def test_bad_input_is_one_clear_error(tmp_path, content, message, reader, tokenizer_path):
    path = tmp_path / "x.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as e:
        if reader == "objects":
            read_conversations(str(path), verbose=False)
        else:  # the same error from a tokenizer worker process, and no shards left behind
            SFTData(path, tokenizer_path, seq_len=64, batch_size=1, num_workers=2)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl"]


def test_missing_files_and_nothing_to_train(tmp_path, tokenizer_path):
    with pytest.raises(ValueError, match="no such file"):
        SFTData(tmp_path / "nope.jsonl", tokenizer_path, seq_len=64, batch_size=1)
    path = write_jsonl(tmp_path / "c.jsonl", chats(2))
    with pytest.raises(ValueError, match="no such tokenizer"):
        SFTData(path, tmp_path / "nope.model", seq_len=64, batch_size=1)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(ValueError, match="no conversation has an assistant reply"):
        SFTData(prompts, tokenizer_path, seq_len=64, batch_size=1)


def test_cli_shows_trained_part(tmp_path, tokenizer_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [FORMATS["sharegpt"]])
    dataset_sft.main(["--data", path, "--tokenizer", tokenizer_path, "--show", "1"])
    out = capsys.readouterr().out
    assert "<|im_start|>user\nWhere is Tom?<|im_end|>\n<|im_start|>assistant\n[[Tom is in the park.<|im_end|>]]" in out
    with pytest.raises(SystemExit):
        dataset_sft.main(["--data", str(tmp_path / "none.jsonl"), "--tokenizer", tokenizer_path])
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'none.jsonl'}: no such file"


@pytest.mark.skipif(not (SHARED_DATA / "sft_alpaca_zh_1k.json").exists(), reason="../shared/data absent")
def test_real_alpaca_file(tokenizer_path, tmp_path):
    data = SFTData(SHARED_DATA / "sft_alpaca_zh_1k.json", tokenizer_path, seq_len=128, batch_size=4, shard_dir=tmp_path)
    assert len(data) > 900 and data.stats["formats"] == {"alpaca": 1000}
    tokens, targets = data.batch(0).values()
    assert tokens.shape[1] <= 128 and (targets != M).any()


# -----------------------------------------------------------------------------
# chat shards

def trained_part(ids, labels):
    """A row as the reader keeps it: up to its last trained label."""
    last = max(k for k, x in enumerate(labels) if x != M)
    return ids[:last + 1], labels[:last + 1]


def test_shards_give_exactly_the_ids_and_labels_of_every_format(tmp_path, tok, tokenizer_path, monkeypatch):
    """Many small chunks over two worker processes, in file order, for every format and a JSON array."""
    monkeypatch.setattr(dataset_sft, "CHUNK_BYTES", 300)
    multi = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, <think>Sam."},
                               {"role": "user", "content": "你好 Count to 3."}, {"role": "assistant", "content": "1 2 3"}]}
    records = [dict(FORMATS[f]) for f in FORMATS] * 5 + [multi] + chats(40, seed=1)
    (tmp_path / "arr").mkdir()
    for path in (write_jsonl(tmp_path / "all.jsonl", records), tmp_path / "arr" / "all.json"):
        if str(path).endswith(".json"):
            path.write_text(json.dumps(records), encoding="utf-8")
        data = SFTData(path, tokenizer_path, seq_len=512, batch_size=1, num_workers=2)
        conversations, _ = read_conversations(str(path), verbose=False)
        assert len(data) == len(conversations) == len(records)
        for i, conv in enumerate(conversations):
            want = trained_part(*encode_conversation(tok, conv.messages))
            assert [x.tolist() for x in data.row(i)] == list(want)


def test_a_second_launch_reuses_the_shards_and_a_changed_file_or_tokenizer_rebuilds_them(
        tmp_path, tokenizer_path, capsys, monkeypatch):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, chats(6))
    SFTData(path, tokenizer_path, seq_len=64, batch_size=1)
    assert "tokenizing into" in capsys.readouterr().out and (tmp_path / "c.jsonl.shards" / "info.json").exists()
    builds = []
    real_build = dataset_sft.build_chat_shards
    monkeypatch.setattr(dataset_sft, "build_chat_shards", lambda *a: builds.append(a) or real_build(*a))

    SFTData(path, tokenizer_path, seq_len=32, batch_size=3, seed=5)  # other settings: the same shards
    os.utime(path)  # touched, not changed: one hash says so
    SFTData(path, tokenizer_path, seq_len=64, batch_size=1)
    assert builds == [] and "tokenizing" not in capsys.readouterr().out

    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("0: ", "9: ", 1), encoding="utf-8")  # same size, new content
    data = SFTData(path, tokenizer_path, seq_len=64, batch_size=1)
    assert len(builds) == 1 and "(the file changed)" in capsys.readouterr().out
    assert data.tok.decode(data.row(0)[0].tolist()).startswith("<|im_start|>user\n9: ")

    write_jsonl(path, chats(7))
    assert len(SFTData(path, tokenizer_path, seq_len=64, batch_size=1)) == 7 and len(builds) == 2

    import train_tokenizer
    other = train_tokenizer.train(train_tokenizer.TokenizerConfig(
        inputs=str(path), out=str(tmp_path / "other.model"), vocab_size=300, character_coverage=1.0))
    SFTData(path, other, seq_len=64, batch_size=1)
    assert len(builds) == 3 and "(the tokenizer changed" in capsys.readouterr().out

    (tmp_path / "c.jsonl.shards" / "rows.bin").write_bytes(b"")  # damaged: rebuilt, not trusted
    SFTData(path, other, seq_len=64, batch_size=1)
    assert len(builds) == 4 and "(its shards are incomplete)" in capsys.readouterr().out


def test_shard_dir_keeps_the_data_folder_untouched(tmp_path, tokenizer_path):
    (tmp_path / "data").mkdir()
    path = write_jsonl(tmp_path / "data" / "c.jsonl", chats(3))
    SFTData(path, tokenizer_path, seq_len=64, batch_size=1, shard_dir=tmp_path / "cache")
    assert os.listdir(tmp_path / "data") == ["c.jsonl"] and os.listdir(tmp_path / "cache") == ["c.jsonl.shards"]


# -----------------------------------------------------------------------------
# packing

def varied_chats(n, seed=0):
    """Conversations from a few to about 60 tokens."""
    rng = np.random.default_rng(seed)
    words = ["Tom", "found", "a", "red", "ball", "in", "the", "park", "and", "Lily", "painted", "boat", "三个", "苹果"]
    return [{"conversations": [{"role": "user", "content": " ".join(rng.choice(words, rng.integers(1, 20)))},
                               {"role": "assistant", "content": " ".join(rng.choice(words, rng.integers(1, 30)))}]}
            for _ in range(n)]


def test_packing_fills_rows_with_whole_conversations_each_once_per_epoch(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "v.jsonl", varied_chats(60))
    plain = SFTData(path, tokenizer_path, seq_len=256, batch_size=3, seed=2)
    packed = SFTData(path, tokenizer_path, seq_len=256, batch_size=3, seed=2, pack=True)
    assert packed.num_tokens == plain.num_tokens and packed.num_tokens / (len(packed) * 256) > 0.85
    epoch = [packed.rows_of(i) for i in range(-(-len(packed) // 3))]
    rows = np.concatenate(epoch)[:len(packed)]
    assert sorted(rows.tolist()) == list(range(len(packed)))
    convs = np.concatenate([packed.order[packed.bounds[p]:packed.bounds[p + 1]] for p in rows])
    assert sorted(convs.tolist()) == list(range(len(plain)))  # every conversation once
    for index in range(len(epoch)):
        b = packed.batch(index)
        assert {k: tuple(v.shape) for k, v in b.items()} == dict.fromkeys(
            ("tokens", "targets", "positions", "document_ids"), (3, 256))
        for r, p in enumerate(packed.rows_of(index)):
            at = 0
            for d, i in enumerate(packed.order[packed.bounds[p]:packed.bounds[p + 1]]):
                ids, labels = plain.row(i)
                n = len(ids) - 1
                assert b["tokens"][r, at:at + n].tolist() == ids[:-1].tolist()
                assert b["targets"][r, at:at + n].tolist() == labels[1:].tolist()
                assert b["positions"][r, at:at + n].tolist() == list(range(n))
                assert set(b["document_ids"][r, at:at + n].tolist()) == {d}
                at += n
            assert (b["targets"][r, at:] == M).all() and (b["tokens"][r, at:] == packed.pad_id).all()
            assert len(set(b["document_ids"][r, at:].tolist())) <= 1
    assert np.array_equal(SFTData(path, tokenizer_path, 256, 3, seed=2, pack=True).order, packed.order)


def per_token_loss(model, **batch):
    logits = model(**{k: v for k, v in batch.items() if k != "targets"})[0]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none",
                                             ignore_index=M).view(batch["targets"].shape)


def test_a_packed_row_trains_exactly_what_its_conversations_train_alone(tmp_path, tokenizer_path):
    from model import ModelConfig, Transformer
    path = write_jsonl(tmp_path / "v.jsonl", varied_chats(30, seed=3))
    packed = SFTData(path, tokenizer_path, seq_len=128, batch_size=4, pack=True, think_weight=3.0)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=packed.vocab_size,
                                    max_seq_len=128)).eval()
    b = packed.batch(0)
    with torch.no_grad():
        together = per_token_loss(model, **{k: v for k, v in b.items() if k != "loss_weight"})
        for r, p in enumerate(packed.rows_of(0)):
            at = 0
            for i in packed.order[packed.bounds[p]:packed.bounds[p + 1]]:
                ids, labels = (torch.from_numpy(x)[None] for x in packed.row(i))
                n = ids.shape[1] - 1
                alone = per_token_loss(model, tokens=ids[:, :-1], targets=labels[:, 1:])[0]
                torch.testing.assert_close(together[r, at:at + n], alone, atol=1e-5, rtol=0)
                at += n
        # no attention across conversations: change one, the others' logits do not move
        logits = model(b["tokens"], positions=b["positions"], document_ids=b["document_ids"])[0]
        changed = b["tokens"].clone()
        first = b["document_ids"][0] == 0
        changed[0, first] = (changed[0, first] + 7) % packed.vocab_size
        moved = model(changed, positions=b["positions"], document_ids=b["document_ids"])[0]
        assert not torch.allclose(moved[0, first], logits[0, first])
        torch.testing.assert_close(moved[0, ~first], logits[0, ~first], atol=1e-6, rtol=0)
        torch.testing.assert_close(moved[1:], logits[1:], atol=0, rtol=0)
    # the training loss (think-weighted) of the packed batch is the same weighted mean over the same tokens
    loss = model(**b)[1]
    weights = b["loss_weight"]
    torch.testing.assert_close(loss, (together * weights).sum() / (b["targets"] != M).sum(), atol=1e-5, rtol=0)
