"""The built-in data generator: sizes, determinism, schemas, and sums, counts and answers that are right
(and, in the preference pairs' rejected replies, wrong in the ways intended)."""
import json
import random
import re
from collections import Counter

import pytest

import offline_data as od
from conftest import read_jsonl as read
from evaluate import answer_is_right, reply_is_right
from tokenizer import EMPTY_THINK

SMALL = dict(pretrain_mb=0.3, n_sft=400, n_r1=400, n_dpo=300, n_val=50)
ROLES = {"system", "user", "assistant"}
EQUATION = re.compile(r"(\d+(?: [-+*/] \d+)+) = (\d+)")  # "3 + 4 = 7", "2 + 2 + 2 = 6", "6 * 4 = 24"
TYPES = {"en": {f.__name__.removeprefix("r1_") for f, _ in od.R1_PROBLEMS}, "zh": set(od.ZH_TYPES)}
THINK = re.compile(r"<think>\n(.+?)\n</think>\n(.+)", re.S)


@pytest.fixture(scope="module", params=["en", "zh"])
def data(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return request.param, od.write_offline_data(str(out), request.param, seed=0, **SMALL)


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
    assert list(paths) == od.FILE_NAMES
    counts = {name: len(read(path)) for name, path in paths.items()}
    assert counts["sft"] == 400 and counts["r1"] == 400 and counts["dpo"] == 300
    assert counts["pretrain_val"] == counts["sft_val"] == counts["r1_val"] == counts["dpo_val"] == 50
    assert 0.3e6 <= sum(len(r["text"].encode()) for r in read(paths["pretrain"])) < 0.35e6


def test_deterministic_for_a_seed(data, tmp_path):
    lang, paths = data
    same = od.write_offline_data(str(tmp_path / "same"), lang, seed=0, **SMALL)
    other = od.write_offline_data(str(tmp_path / "other"), lang, seed=1, **SMALL)
    for name in od.FILE_NAMES:
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
    offered = 0
    for name in ("sft", "sft_val"):
        for i, r in enumerate(read(paths[name])):
            keys = [k for k in r if k != "tools"]
            assert keys in (["conversations", "type", "replies"], ["conversations", "type", "mentions"])
            check_chat(r, f"{name} {i}")
            if "tools" in r:  # offered to a chat with no number in it, and not called
                offered += 1
                assert name == "sft" and r["tools"] == [od.CALCULATOR], f"{name} {i}"
                assert not re.search(r"\d", json.dumps(r["conversations"], ensure_ascii=False)), f"{name} {i}"
    assert 20 <= offered <= 80


def test_every_chat_reply_opens_with_qwen3s_empty_think_block(data):
    """The model learns to answer a chat at once (and reason where a problem asks): the empty block it writes is
    the one the template prefills when thinking is switched off."""
    lang, paths = data
    for i, r in enumerate(read(paths["sft"])):
        for t in r["conversations"]:
            if t["role"] == "assistant":
                assert t["content"].startswith(EMPTY_THINK) and t["content"][len(EMPTY_THINK):].strip(), f"sft {i}"
    assert od.think_reply("", "Hi!") == EMPTY_THINK + "Hi!"


def test_each_chat_says_how_its_last_reply_is_scored_and_that_reply_scores_right(data):
    """The chat report (evaluate.chat_report) scores a model's reply by the record's check; the generator's own
    reply must pass it, and the report's headline types must all occur."""
    lang, paths = data
    kinds = Counter()
    for i, r in enumerate(read(paths["sft"])):
        reply = r["conversations"][-1]["content"].split("</think>")[-1]
        assert r["conversations"][-1]["role"] == "assistant" and reply_is_right(reply, r), f"sft {i}: {r}"
        kinds[r["type"]] += 1
    assert {"greeting", "fact", "story", "story question", "reading", "math"} <= set(kinds), kinds


def recomputed_answer(lang, question):
    """The answer of a counting question worked out from its text, or None for an arithmetic one."""
    if lang == "zh":
        m = re.search(r"有几个是(\S+?)：(.+)？", question)
        return sum(w in od.ZH_CATEGORIES[m[1]] for w in m[2].split("、")) if m else None
    m = re.search(r"letter \"(\w)\" (?:appear )?in (?:the word )?\"(\w+)\"", question)
    if m:
        return m[2].count(m[1])
    m = re.search(r"(?:letters are in|How long is) the word \"(\w+)\"", question)
    if m:
        return len(m[1])
    m = re.search(r"How many (\w+)s are in this list: (.+)\?", question)
    return sum(w in od.CATEGORIES[m[1]] for w in m[2].split(", ")) if m else None


def think_and_reply(reply, where):
    assert reply.count("<think>") == 1 and reply.count("</think>") == 1, where
    m = THINK.fullmatch(reply)
    assert m and m[1].strip() and m[2].strip(), where
    return m[1], m[2]


def mentions(lang, text, answer) -> bool:
    return bool(re.search(rf"(?<![\w.]){re.escape(answer)}(?!\w|\.\d)" if lang == "en" else
                          rf"(?<!\d){re.escape(answer)}(?!\d)", text))


def check_worked_reply(lang, question, reply, answer, where) -> str:
    """A right worked reply: one <think> block, right sums, and `answer` (worked out anew) in its final reply.
    Returns how the answer was checked: "counted" or "summed"."""
    think, final = think_and_reply(reply, where)
    assert mentions(lang, final, answer), f"{where}: answer not in {final!r}"
    expected = recomputed_answer(lang, question)
    checked = "counted"
    if expected is None:
        expected, checked = check_equations(think, where), "summed"
        assert expected is not None, f"{where}: no worked sum in {think!r}"
    assert answer == str(expected), f"{where}: {question!r} -> {answer} (expected {expected})"
    return checked


def test_reasoning_records_are_well_formed_and_correct(data):
    lang, paths = data
    kinds = {"counted": 0, "summed": 0}
    for name in ("r1", "r1_val"):
        for i, r in enumerate(read(paths[name])):
            where = f"{name} {i}"
            if any("tool_calls" in t for t in r["conversations"]):
                continue  # test_tool_use_calls_the_calculator_with_the_problems_arithmetic
            assert [k for k in r if k != "tools"] == ["conversations", "answer", "type"], where
            assert isinstance(r["answer"], str), where
            assert r["type"] in TYPES[lang], where
            check_chat(r, where)
            assert len(r["conversations"]) in (2, 3), where
            question, reply = r["conversations"][-2]["content"], r["conversations"][-1]["content"]
            kinds[check_worked_reply(lang, question, reply, r["answer"], where)] += 1
    assert kinds["counted"] > 20 and kinds["summed"] > 100


def test_a_problems_answer_names_no_one_after_its_number(data):
    """No final reply to an arithmetic problem names anyone after its answer's number ("Sam has 11 more coins
    than Mia."): a small model that cannot copy the name writes a number in its place, and the answer check reads
    the last number."""
    lang, paths = data
    names = set(od.GIRLS + od.BOYS + od.PET_NAMES) if lang == "en" else {name for name, _ in od.ZH_KIDS}
    for i, r in enumerate(read(paths["r1"])):
        final = r["conversations"][-1]["content"].split("</think>")[-1]
        if r["type"] in od.ARITHMETIC_TYPES:
            after = final[final.rindex(r["answer"]) + len(r["answer"]):]
            assert not any(name in after for name in names), (i, final)


def test_tool_use_calls_the_calculator_with_the_problems_arithmetic(data):
    """TOOL_SHARE of r1's problems offer the calculator: an arithmetic one sets its arithmetic up in the think
    block, its last line ending with the expression the call copies and no result worked before the call, calls
    the calculator with it, reads the answer and says it; a count is worked in its think block. The held-out
    problems offer no tools."""
    lang, paths = data
    assert not any("tools" in r for r in read(paths["r1_val"]))
    offered, called = 0, Counter()
    for i, r in enumerate(read(paths["r1"])):
        if "tools" not in r:
            continue
        offered += 1
        assert r["tools"] == [od.CALCULATOR], i
        turns = r["conversations"][1:] if r["conversations"][0]["role"] == "system" else r["conversations"]
        if r["type"] not in od.ARITHMETIC_TYPES:
            assert [t["role"] for t in turns] == ["user", "assistant"] and THINK.match(turns[1]["content"]), i
            continue
        user, call, result, answer = turns
        assert [t["role"] for t in turns] == ["user", "assistant", "tool", "assistant"], i
        assert THINK.match(call["content"] + "x") and call["content"].endswith("\n</think>\n"), i
        (tool_call,) = call["tool_calls"]
        assert tool_call["name"] == "calculator" and list(tool_call["arguments"]) == ["expression"], i
        expression = tool_call["arguments"]["expression"]
        assert od.calculator(expression) == result["content"] == r["answer"], i
        set_up = call["content"].removesuffix("\n</think>\n").split("\n")
        assert set_up[-1].removesuffix(".").removesuffix("。").endswith(expression) and "=" not in call["content"], i
        assert answer["content"].startswith(EMPTY_THINK) and answer_is_right(answer["content"], r["answer"]), i
        assert set(re.findall(r"\d+", expression)) <= set(re.findall(r"\d+", user["content"])) | {
            "2", "3", "4", "6", "8"}, i  # the question's numbers (and the legs of an animal)
        called[r["type"]] += 1
    assert abs(offered / len(read(paths["r1"])) - od.TOOL_SHARE) < 0.1
    assert set(called) == od.ARITHMETIC_TYPES & TYPES[lang]


def mistake(pair) -> str:
    """The mistake of a pair's rejected reply, told from its sums against the chosen reply's."""
    right, wrong = EQUATION.findall(pair["chosen"]), EQUATION.findall(pair["rejected"])

    def operators(equations):
        return [re.findall(r" ([-+*/]) ", lhs) for lhs, _ in equations]

    if operators(wrong) != operators(right):
        return "operation"
    if any(eval(lhs) != int(rhs) for lhs, rhs in wrong):  # the regex admits only digits and + - * /
        return "slip"
    return "copied" if wrong else "miscount"  # the same right sums and a wrong answer, or no sums: a count


def test_preference_pairs_are_a_right_and_a_wrong_answer(data):
    lang, paths = data
    made = {"slip": 0, "operation": 0, "miscount": 0, "copied": 0}
    for name in ("dpo", "dpo_val"):
        for i, pair in enumerate(read(paths[name])):
            where = f"{name} {i}"
            assert list(pair) == ["conversations", "chosen", "rejected", "answer"], where
            check_chat({"conversations": pair["conversations"] + [{"role": "assistant", "content": "ok"}]}, where)
            question = pair["conversations"][-1]["content"]
            check_worked_reply(lang, question, pair["chosen"], pair["answer"], where)
            _, final = think_and_reply(pair["rejected"], where)
            assert not mentions(lang, final, pair["answer"]) and re.search(r"\d", final), f"{where}: {final!r}"
            kind = mistake(pair)
            if kind == "copied":
                assert re.findall(r"\d+", final)[-1] in re.findall(r"\d+", question), where
            made[kind] += 1
    assert min(made.values()) > 0.05 * sum(made.values()), made  # every kind of mistake, none rare


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_a_pair_chosen_reply_is_the_one_r1_writes(lang):
    make_problem = od.GENERATORS[lang][2]
    for seed in range(300):
        pair, record = od.reasoning_pair(random.Random(seed), make_problem), make_problem(random.Random(seed))
        if pair is not None:  # None: a count no mistake can change
            assert pair["conversations"] + [{"role": "assistant", "content": pair["chosen"]}] == \
                record["conversations"] and pair["answer"] == record["answer"]


def test_held_out_questions_are_not_trained_on(data):
    """r1_val and dpo_val are disjoint from each other and from the training files (train_dpo.py reports its
    answer accuracy on r1_val); DPO may train on problems distillation saw."""
    lang, paths = data

    def questions(name):
        return [[t["content"] for t in r["conversations"] if t["role"] == "user"][-1] for r in read(paths[name])]

    r1_val, dpo_val, dpo = questions("r1_val"), questions("dpo_val"), questions("dpo")
    assert all(len(set(q)) == len(q) for q in (r1_val, dpo_val, dpo))
    assert not set(r1_val) & (set(questions("r1")) | set(dpo_val) | set(dpo)) and not set(dpo_val) & set(dpo)
    pretraining = "\n".join(r["text"] for name in ("pretrain", "pretrain_val") for r in read(paths[name]))
    assert not [q for q in r1_val if q in pretraining]
    assert all(od.EXAMPLE_QUESTION not in open(path, encoding="utf-8").read() for path in paths.values())


def test_the_readme_example_is_like_the_problems_but_never_one_of_them(tmp_path):
    """The quickstart asks "Tom has 3 apples and buys 4 more. How many apples does he have now?": problems
    phrased like it (one move, "and", "he" in the question) are common in training, the question itself is in no
    file (also checked above), so a right answer is learned, not remembered."""
    paths = od.write_offline_data(str(tmp_path), "en", seed=0, pretrain_mb=0.01, n_sft=1, n_r1=2000, n_dpo=1,
                                  n_val=1)
    like = re.compile(r"^[A-Z]\w+ has \d+ [a-z ]+ and (buys|finds|picks) \d+ more\. How many [a-z ]+ does s?he have now\?$")
    questions = [next(t["content"] for t in r["conversations"] if t["role"] == "user") for r in read(paths["r1"])]
    assert sum(map(bool, map(like.match, questions))) >= 5 and od.EXAMPLE_QUESTION not in questions
    assert any(q.startswith("Tom has ") for q in questions) and sum(" apples" in q for q in questions) >= 50


def test_pretraining_has_worked_problems_and_sums(data):
    """Some pretraining documents are reasoning problems worked as in r1 (question, one step a line, the answer)
    or lines of sums, so copying names and numbers from the question and adding up are learned from the start."""
    lang, paths = data
    texts = [r["text"] for r in read(paths["pretrain"])]
    if lang == "zh":
        return
    worked = [t for t in texts if re.search(r"\?\n.+\n", t)]
    assert 0.15 < len(worked) / len(texts) < 0.4
    assert sum(bool(re.fullmatch(r"(\d+ [-+*] \d+ = \d+\. ?)+", t)) for t in texts) > 0.03 * len(texts)


def test_english_chat_answers_are_right(tmp_path):
    paths = od.write_offline_data(str(tmp_path), "en", seed=3, pretrain_mb=0.01, n_sft=3000, n_r1=1, n_val=1)
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
    paths = od.write_offline_data(str(tmp_path), "en", seed=0, pretrain_mb=1.0, n_sft=1, n_r1=1, n_val=1)
    texts = [r["text"] for r in read(paths["pretrain"])]
    sentences = [s for t in texts for s in re.split(r"(?<=[.!?])\s+|\n+", t) if s.strip()]
    vocabulary = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}
    assert len(sentences) > 15_000
    assert len(set(sentences)) / len(sentences) > 0.5
    assert len(set(texts)) / len(texts) > 0.95
    assert len(vocabulary) > 1200


def test_interrupted_write_leaves_no_file(tmp_path):
    def records():
        yield {"text": "one"}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        od.write_jsonl(str(tmp_path / "x.jsonl"), records())
    assert list(tmp_path.iterdir()) == []
