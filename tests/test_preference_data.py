import json
import os

import numpy as np
import pytest
import torch

import dataset_sft
from dataset_sft import PreferenceData, SFTData, shard_dir_for, stale_because
from records import BadRecord, preference_pair, read_conversations
from tokenizer import IGNORE_INDEX, encode_conversation, load_tokenizer, render_prompt

M = IGNORE_INDEX
HH_HISTORY = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Where is Tom?\n\nAssistant:"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def msg(role, content):
    return {"role": role, "content": content}


def expected_row(tok, messages, reply):
    """(ids, labels) of a preference row built by hand: every turn of the prompt, the assistant header, then the
    reply and <|im_end|>, the only trained part."""
    start, end = tok.piece_id("<|im_start|>"), tok.piece_id("<|im_end|>")
    prompt = []
    for m in messages:
        prompt += [start] + tok.encode(m["role"] + "\n") + tok.encode(m["content"]) + [end] + tok.encode("\n")
    prompt += [start] + tok.encode("assistant\n")
    body = tok.encode(reply) + [end]
    return prompt + body, [M] * len(prompt) + body


# -----------------------------------------------------------------------------
# the formats and the exact rows

FORMATS = {  # record -> (format, prompt messages, chosen, rejected, other keys)
    "trl strings": ({"prompt": "Where is Tom?", "chosen": "Tom is in the park.", "rejected": "No idea.",
                     "answer": "park"},
                    ("prompt", [msg("user", "Where is Tom?")], "Tom is in the park.", "No idea.", {"answer": "park"})),
    "trl messages": ({"prompt": [msg("system", "Be brief."), msg("user", "Where is Tom?")],
                      "chosen": [msg("assistant", "In the park.")], "rejected": [msg("assistant", "At sea.")]},
                     ("prompt", [msg("system", "Be brief."), msg("user", "Where is Tom?")], "In the park.", "At sea.",
                      {})),
    "trl repeated history": (  # TRL's hh-rlhf-trl-style: the first user turn as prompt, whole conversations as replies
        {"prompt": "Hi", "chosen": [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Where is Tom?"),
                                    msg("assistant", "In the park.")],
         "rejected": [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Where is Tom?"),
                      msg("assistant", "Go away.")]},
        ("prompt", [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Where is Tom?")], "In the park.",
         "Go away.", {})),
    "trl implicit prompt": ({"chosen": [msg("user", "Where is Tom?"), msg("assistant", "In the park.")],
                             "rejected": [msg("user", "Where is Tom?"), msg("assistant", "Gone.")]},
                            ("prompt", [msg("user", "Where is Tom?")], "In the park.", "Gone.", {})),
    "sharegpt objects": ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                            {"from": "human", "value": "Where is Tom?"}],
                          "chosen": {"from": "gpt", "value": "In the park."},
                          "rejected": {"from": "gpt", "value": "Somewhere."}, "id": 7},
                         ("sharegpt", [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Where is Tom?")],
                          "In the park.", "Somewhere.", {"id": 7})),
    "conversations strings system": ({"system": "Be brief.", "conversations": [msg("user", "Where is Tom?")],
                                      "chosen": "Park.", "rejected": "Tom is a name that many people have."},
                                     ("conversations", [msg("system", "Be brief."), msg("user", "Where is Tom?")],
                                      "Park.", "Tom is a name that many people have.", {})),
    "hh": ({"chosen": HH_HISTORY + " He is in the park.", "rejected": HH_HISTORY + " Hmm, he left."},
           ("hh", [msg("user", "Hi there"), msg("assistant", "Hello! How can I help?"), msg("user", "Where is Tom?")],
            "He is in the park.", "Hmm, he left.", {})),
}


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_gives_its_prompt_replies_and_exact_rows(tmp_path, tokenizer_path, name, capsys):
    record, want = FORMATS[name]
    assert preference_pair(record) == want
    fmt, messages, chosen, rejected, _ = want
    path = write_jsonl(tmp_path / "p.jsonl", [record] * 3)
    data = PreferenceData(path, tokenizer_path, seq_len=512, batch_size=1)
    assert f"{path}: {fmt} format, 3 pairs" in capsys.readouterr().out.splitlines()
    assert data.pairs == 3 and data.stats["formats"] == {fmt: 3}
    for side, reply in enumerate((chosen, rejected)):
        ids, labels = (x.tolist() for x in data.row(2 + side))  # pair 1: rows 2 (chosen) and 3 (rejected)
        assert (ids, labels) == expected_row(data.tok, messages, reply)
        trained = [i for i, label in zip(ids, labels) if label != M]
        assert data.tok.decode(trained) == reply + "<|im_end|>"


@pytest.mark.parametrize("tokenizer", ["sentencepiece", "tokenizer.json"])
def test_a_row_is_the_conversation_with_its_reply_cut_after_the_im_end(tmp_path, tokenizer, tokenizer_path,
                                                                        hf_chat_tokenizer_json):
    tokenizer = tokenizer_path if tokenizer == "sentencepiece" else hf_chat_tokenizer_json
    records = [record for record, _ in FORMATS.values()]
    data = PreferenceData(write_jsonl(tmp_path / "p.jsonl", records), tokenizer, seq_len=512, batch_size=2)
    tok = load_tokenizer(tokenizer)
    for p, record in enumerate(records):
        _, messages, *replies, _ = preference_pair(record)
        prompt = render_prompt(tok, messages)
        for side, reply in enumerate(replies):
            ids, _ = encode_conversation(tok, messages + [msg("assistant", reply)])
            cut = len(ids) - len(tok.encode("\n"))  # the "\n" after the last <|im_end|>
            assert ids[cut - 1] == tok.piece_id("<|im_end|>") and ids[:len(prompt)] == prompt
            got_ids, got_labels = (x.tolist() for x in data.row(2 * p + side))
            assert got_ids == ids[:cut]
            assert got_labels == [M] * len(prompt) + ids[len(prompt):cut]  # the reply and its <|im_end|>, no more


# -----------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("record, reason", [
    ({"prompt": "Hi", "chosen": "Hello"}, '"rejected" is missing'),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": 3}, '"rejected" is int, not a string'),
    ({"prompt": "Hi", "chosen": " \n", "rejected": "Go."}, '"chosen" is empty'),
    ({"prompt": [msg("user", "Hi")], "chosen": [msg("user", "Hi")], "rejected": "Go."},
     '"chosen" does not end with an assistant message'),
    ({"prompt": "Hi", "chosen": [msg("user", "Hi"), msg("assistant", "A")],
      "rejected": [msg("user", "Hey"), msg("assistant", "B")]}, "repeat different conversations"),
    ({"conversations": [msg("user", "Hi"), msg("assistant", "Hello")], "chosen": "A", "rejected": "B"},
     "the prompt does not end with a user turn"),
    ({"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nHuman: b\n\nAssistant: y"},
     "not two HH transcripts"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: y",
      "rejected": "\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: y"}, "not two HH transcripts"),
])
def test_damaged_records_say_why(record, reason):
    with pytest.raises(BadRecord, match=reason):
        preference_pair(record)


def test_malformed_lines_are_warned_skipped_and_counted(tmp_path, tokenizer_path, capsys):
    path = tmp_path / "m.jsonl"
    good = json.dumps(FORMATS["trl strings"][0])
    path.write_text("\n".join([good, "{not json", json.dumps({"prompt": "Hi", "chosen": "Hello"}), good,
                               json.dumps({"prompt": "Hi", "chosen": "", "rejected": "Go."}),
                               json.dumps({"chosen": "no transcript", "rejected": "at all"}), "", good]) + "\n",
                    encoding="utf-8")
    data = PreferenceData(path, tokenizer_path, seq_len=64, batch_size=1, num_workers=2)
    assert data.pairs == 3 and data.stats["malformed"] == 4
    captured = capsys.readouterr()
    assert f"{path} line 2: not valid JSON; skipped" in captured.err
    assert f'{path} line 3: "rejected" is missing; skipped' in captured.err
    assert f'{path} line 5: "chosen" is empty; skipped' in captured.err
    assert f'{path} line 6: "chosen" and "rejected" are not two HH transcripts' in captured.err
    assert f"{path}: prompt format, 3 pairs, 4 malformed records skipped" in captured.out.splitlines()


@pytest.mark.parametrize("content, message", [
    ('{"foo": 1}\n', "line 1: unknown preference format (keys: foo); expected prompt/chosen/rejected"),
    (json.dumps({"conversations": [msg("user", "Hi"), msg("assistant", "Hello")]}) + "\n",
     "line 1: a chat conversation, not a preference pair (no chosen/rejected): train on it with train_sft.py"),
    (json.dumps({"prompt": [msg("function", "x")], "chosen": "a", "rejected": "b"}) + "\n",
     "line 1: \"prompt\"[0]: unknown role 'function'"),
    ("{broken\n", "no pairs, 1 malformed records skipped"),
])
def test_a_file_that_is_not_preference_data_is_one_clear_error(tmp_path, tokenizer_path, content, message):
    path = tmp_path / "x.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as e:
        PreferenceData(path, tokenizer_path, seq_len=64, batch_size=1)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl"]


def test_the_chat_readers_send_a_preference_file_to_train_dpo(tmp_path, tokenizer_path, capsys):
    path = write_jsonl(tmp_path / "dpo.jsonl", [record for record, _ in FORMATS.values()])
    error = f"{path} line 1: a preference pair (chosen/rejected): train on it with train_dpo.py"
    for read in (lambda: read_conversations(path), lambda: SFTData(path, tokenizer_path, seq_len=64, batch_size=1)):
        with pytest.raises(ValueError) as e:
            read()
        assert str(e.value) == error
    with pytest.raises(SystemExit):
        dataset_sft.main(["--data", path, "--tokenizer", tokenizer_path])
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {error}"  # after the progress bar


# -----------------------------------------------------------------------------
# PreferenceData: truncation, batches, shards

def pair(question, chosen, rejected):
    return {"prompt": question, "chosen": chosen, "rejected": rejected}


def test_long_replies_are_cut_and_a_prompt_without_room_skips_its_pair(tmp_path, tokenizer_path, capsys):
    tok = load_tokenizer(tokenizer_path)
    fits = pair("Hi", "Yes.", "No.")
    edge = pair("Tom found a red ball in the park.", "Lily painted the boat. " * 10, "No.")
    over = pair("Tom found a red ball in the park!!", "Yes.", "No.")
    seq_len = len(render_prompt(tok, [msg("user", edge["prompt"])]))  # edge: room for one reply token
    assert len(render_prompt(tok, [msg("user", over["prompt"])])) > seq_len
    path = write_jsonl(tmp_path / "t.jsonl", [fits, edge, over])
    data = PreferenceData(path, tokenizer_path, seq_len=seq_len, batch_size=2)
    assert data.pairs == 2 and data.stats["truncated"] == 1 and data.stats["skipped_too_long"] == 1
    assert f"1 truncated to seq_len {seq_len}; skipped 1 whose prompt leaves no room for a reply" in \
        capsys.readouterr().out
    for side, reply in enumerate(("Yes.", "No.")):  # untouched
        assert [x.tolist() for x in data.row(side)] == list(expected_row(tok, [msg("user", "Hi")], reply))
    for side, reply in enumerate((edge["chosen"], "No.")):  # both cut to seq_len + 1 ids: prompt + 1 reply token
        ids, labels = expected_row(tok, [msg("user", edge["prompt"])], reply)
        assert [x.tolist() for x in data.row(2 + side)] == [ids[:seq_len + 1], labels[:seq_len + 1]]
    b = data.batch(0)
    assert b["tokens"].shape == (4, seq_len) and sorted(b["pair_index"].tolist()) == [0, 1]
    edge_rows = [r for r in range(4) if b["pair_index"][r % 2] == 1]
    for r in edge_rows:  # exactly one trained target: the reply's first token, at the last position
        assert (b["targets"][r] != M).nonzero().flatten().tolist() == [seq_len - 1]
    with pytest.raises(ValueError, match="no pair's prompt leaves room for a reply within seq_len 4"):
        PreferenceData(path, tokenizer_path, seq_len=4, batch_size=1)


def pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["Tom", "found", "a", "red", "ball", "in", "the", "park", "Lily", "painted", "boat"]

    def say(most):
        return " ".join(rng.choice(words, size=rng.integers(1, most)))
    return [pair(f"{i}: {say(8)}?", say(16), say(16)) for i in range(n)]


def test_batches_are_deterministic_aligned_and_split_across_ranks(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "d.jsonl", pairs(12))
    one = PreferenceData(path, tokenizer_path, seq_len=64, batch_size=4, seed=3)
    again = PreferenceData(path, tokenizer_path, seq_len=64, batch_size=4, seed=3)
    ranks = [PreferenceData(path, tokenizer_path, seq_len=64, batch_size=2, seed=3, rank=r, world_size=2)
             for r in range(2)]
    for index in (0, 2, 3, 5, 1):  # 3 batches per epoch: two epochs, in any order (a resume)
        b = one.batch(index)
        assert set(b) == {"tokens", "targets", "pair_index"}
        assert all(torch.equal(v, again.batch(index)[k]) for k, v in b.items())
        assert b["tokens"].dtype == b["targets"].dtype == b["pair_index"].dtype == torch.int64
        assert b["tokens"].shape[0] == 8 and b["pair_index"].tolist() == one.rows_of(index).tolist()
        for r, p in enumerate(b["pair_index"].tolist()):  # row r chosen, row 4 + r rejected, of the same pair
            for row, side in ((r, 0), (4 + r, 1)):
                ids, labels = one.row(2 * p + side)
                n = len(ids) - 1
                assert b["tokens"][row, :n].tolist() == ids[:-1].tolist()
                assert b["targets"][row, :n].tolist() == labels[1:].tolist()
                assert (b["tokens"][row, n:] == one.pad_id).all() and (b["targets"][row, n:] == M).all()
        assert all(torch.equal(v, b[k]) for k, v in one.pair_rows(b["pair_index"]).items())
        for r, data in enumerate(ranks):  # each rank: its half of the pairs, chosen then rejected, global width
            mine = data.batch(index)
            assert mine["pair_index"].tolist() == b["pair_index"][2 * r:2 * r + 2].tolist()
            assert torch.equal(mine["tokens"], b["tokens"][[2 * r, 2 * r + 1, 4 + 2 * r, 5 + 2 * r]])
            assert torch.equal(mine["targets"], b["targets"][[2 * r, 2 * r + 1, 4 + 2 * r, 5 + 2 * r]])
    epoch = np.concatenate([one.rows_of(i) for i in range(3)])
    assert sorted(epoch.tolist()) == list(range(12))  # every pair once an epoch
    assert one.num_tokens == int(one.lengths.sum()) - 24 and one.tokens_per_row == one.num_tokens / 12
    rows = one.pair_rows([5, 2])  # in the order given: chosen of 5, chosen of 2, rejected of 5, rejected of 2
    for r, i in enumerate((10, 4, 11, 5)):
        ids, labels = one.row(i)
        assert rows["tokens"][r, :len(ids) - 1].tolist() == ids[:-1].tolist()
        assert rows["targets"][r, :len(ids) - 1].tolist() == labels[1:].tolist()
    assert rows["tokens"].shape[1] == max(len(one.row(i)[0]) for i in (10, 4, 11, 5)) - 1


def test_shards_are_reused_rebuilt_when_the_file_changes_and_kept_apart_by_kind(tmp_path, tokenizer_path, capsys,
                                                                                  monkeypatch):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, pairs(6))
    PreferenceData(path, tokenizer_path, seq_len=64, batch_size=1)
    out = shard_dir_for(str(path))
    assert "tokenizing into" in capsys.readouterr().out
    info = json.loads((tmp_path / "c.jsonl.shards" / "info.json").read_text())
    assert info["kind"] == "preference" and info["pairs"] == 6 and "conversations" not in info
    builds = []
    real_build = dataset_sft.build_chat_shards
    monkeypatch.setattr(dataset_sft, "build_chat_shards", lambda *a: builds.append(a) or real_build(*a))

    PreferenceData(path, tokenizer_path, seq_len=32, batch_size=3, seed=5)
    assert builds == [] and "tokenizing" not in capsys.readouterr().out
    assert stale_because(str(path), out, tokenizer_path, "chat") == "its shards were made for preference data"

    write_jsonl(path, pairs(7))
    assert len(PreferenceData(path, tokenizer_path, seq_len=64, batch_size=1)) == 7 and len(builds) == 1
    assert "(the file changed)" in capsys.readouterr().out

    write_jsonl(path, [{"conversations": [msg("user", "Hi"), msg("assistant", "Hello")]}] * 3)
    assert len(SFTData(path, tokenizer_path, seq_len=64, batch_size=1)) == 3 and len(builds) == 2
    assert stale_because(str(path), out, tokenizer_path, "preference") == "its shards were made for chat data"
    info = json.loads((tmp_path / "c.jsonl.shards" / "info.json").read_text())
    del info["kind"]  # chat shards made before preference files had one
    (tmp_path / "c.jsonl.shards" / "info.json").write_text(json.dumps(info))
    assert stale_because(str(path), out, tokenizer_path, "chat") is None
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "c.jsonl.shards"]
