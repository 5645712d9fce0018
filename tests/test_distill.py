"""distill.py's and evaluate.py's parts: the answer match of the accuracy report, the per-type report, the chat report's
scoring, the replay of chats, the answer-only ablation's training targets, and the teacher loss by hand."""
import json
import math
import random
from collections import Counter
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import distill
import offline_data as od
from dataset_sft import SFTData, replay_mix
from distill import DistillConfig, teacher_loss
from evaluate import chat_report, describe_chat, describe_types, reasoning_report, reply_is_right, states_answer
from model import ModelConfig, Transformer, save_checkpoint
from tokenizer import load_tokenizer


@pytest.mark.parametrize("text,answer", [
    ("The sum is 50.", "50"),                       # a full stop after the number
    ("Tom has 7 stickers now.", "7"),
    ("The letter \"a\" appears 3 times in \"banana\".", "3"),
    ("一共有12只苹果。答案是：12。", "12"),              # after Chinese characters
    ("答案是7", "7"),
    ("It costs 1,000 coins.", "1000"),
    ("The sum is 50.0.", "50"),                     # the same number, written as a decimal
    ("It is -3 degrees.", "-3"),
    ("The capital is Paris.", "paris"),            # a word answer, any case
    ("\\boxed{42}", "42"),
])
def test_a_stated_answer_is_counted(text, answer):
    assert states_answer(text, answer)


@pytest.mark.parametrize("text,answer", [
    ("The sum is 500.", "50"),                      # a longer number
    ("The sum is 5.0.", "50"),                      # a decimal that reads like it
    ("Tom has 15 stickers now.", "5"),              # a number that ends like it
    ("The sum is 50, not 49.", "50"),               # only the last number is the answer
    ("10-3", "-3"),                                 # a minus between numbers is not a sign
    ("It is 3.14.", "14"),
    ("I do not know.", "5"),
    ("The capital is Parisian.", "paris"),
])
def test_a_near_miss_is_not_counted(text, answer):
    assert not states_answer(text, answer)


TINY_MODEL = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64, max_seq_len=16)


def test_teacher_loss_mixes_cross_entropy_and_kl_on_trained_positions():
    torch.manual_seed(0)
    student, teacher = Transformer(TINY_MODEL), Transformer(TINY_MODEL)
    tokens = torch.randint(0, TINY_MODEL.vocab_size, (2, 6))
    targets = torch.randint(0, TINY_MODEL.vocab_size, (2, 6))
    targets[0, :3] = -100  # prompt positions
    weight = torch.ones(2, 6)
    weight[1, 2] = 10.0
    cfg = DistillConfig(kd_weight=0.3, kd_temperature=2.0)
    got = teacher_loss(teacher, cfg)(student, {"tokens": tokens, "targets": targets, "loss_weight": weight}).item()

    t = cfg.kd_temperature
    s_logits, t_logits = student(tokens)[0].detach(), teacher(tokens)[0].detach()
    ce = Transformer.loss(s_logits, targets, weight).item()
    kl, n = 0.0, 0
    for b in range(2):
        for i in range(6):
            if targets[b, i] == -100:
                continue
            p_t = F.softmax(t_logits[b, i] / t, -1).tolist()
            log_p_s = F.log_softmax(s_logits[b, i] / t, -1).tolist()
            kl += sum(p * (math.log(p) - q) for p, q in zip(p_t, log_p_s))
            n += 1
    expected = (1 - cfg.kd_weight) * ce + cfg.kd_weight * kl / n * t * t
    assert got == pytest.approx(expected, rel=1e-5)


def reasoning_file(path, n, seed=0):
    """n built-in English reasoning problems (with their "type") as a chat file."""
    rng = random.Random(seed)
    records = [od.english_reasoning(rng) for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records


class ScriptedModel:
    """Stands in for a model in reasoning_report: its greedy reply to the i-th prompt is replies[i]."""

    def __init__(self, tok, replies):
        self.cfg = ModelConfig(max_seq_len=4096)
        self.tok, self.replies = tok, iter(replies)

    def generate(self, ids, **kwargs):
        return self.tok.encode(next(self.replies))


def test_per_type_report_adds_up_to_the_overall_figure(tmp_path, tokenizer_path):
    records = reasoning_file(tmp_path / "val.jsonl", 40)
    replies, expected = [], Counter()
    for i, r in enumerate(records):  # right, wrong, or right without a think block, in turn
        answer = int(r["answer"])
        replies.append([f"<think>\nso {answer}\n</think>\nIt is {answer}.", f"<think>\n{answer}\n</think>\nIt is "
                        f"{answer + 1}.", f"The answer is {answer}."][i % 3])
        expected[r["type"]] += i % 3 != 1
    tok = load_tokenizer(tokenizer_path)
    report = reasoning_report(ScriptedModel(tok, replies), tok, str(tmp_path / "val.jsonl"), 40, 160)
    by_type = report["by_type"]
    assert len(by_type) >= 5 and {k: v["correct"] for k, v in by_type.items() if v["correct"]} == +expected
    assert sum(t["problems"] for t in by_type.values()) == report["checkable"] == report["problems"] == 40
    assert sum(t["correct"] for t in by_type.values()) == report["correct"] == sum(expected.values())
    assert report["accuracy"] == report["correct"] / 40
    assert report["well_formed"] == pytest.approx(27 / 40)  # two of every three replies have a think block
    line = describe_types(report)
    assert sum(int(part.split()[-1].split("/")[0]) for part in line.split(", ")) == report["correct"]


def trained_ids(path_or_data, tokenizer_path):
    """Every trained target id of a chat file (or of the data read from one), as train_sft.py and distill.py
    would train it."""
    data = path_or_data if isinstance(path_or_data, SFTData) else \
        SFTData(str(path_or_data), tokenizer_path, seq_len=256, batch_size=1)
    ids = []
    for i in range(len(data)):
        targets = data.batch(i)["targets"]
        ids += targets[targets != -100].tolist()
    return data, ids


def test_the_answer_only_ablation_trains_no_think_block(tmp_path, tokenizer_path, monkeypatch):
    records = reasoning_file(tmp_path / "r1.jsonl", 30)
    reasoning_file(tmp_path / "r1_val.jsonl", 5, seed=1)
    seen = {}

    def fake_train(cfg, model, train_data, val_data, *args):  # what distill() hands the training loop
        seen.update(cfg=cfg, train=train_data, val=val_data)
        return {}

    monkeypatch.setattr(distill, "train", fake_train)
    init = tmp_path / "init.pt"
    start = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=256))
    save_checkpoint({"model": start.state_dict(), "config": asdict(start.cfg)}, str(init))
    distill.distill(DistillConfig(init_from=str(init), train_data=str(tmp_path / "r1.jsonl"),
                                  val_data=str(tmp_path / "r1_val.jsonl"), out_dir=str(tmp_path / "out"),
                                  tokenizer=tokenizer_path, answer_only=True, eval_problems=0, replay=0.0,
                                  chat_val="", text_val="", device="cpu"))
    assert seen["cfg"].train_data == str(tmp_path / "r1.jsonl")  # the settings as given, saved as given
    tok = load_tokenizer(tokenizer_path)
    think = {tok.piece_id("<think>"), tok.piece_id("</think>")}
    for name, n in (("train", 30), ("val", 5)):
        data, ids = trained_ids(seen[name], tokenizer_path)
        assert data.conversations == n and ids
        assert not think & set(ids), name
    answer_only = [json.loads(line) for line in open(tmp_path / "out" / "answer_only" / "r1.jsonl", encoding="utf-8")]
    for full, short in zip(records, answer_only):  # the same problems and final replies, answers and types kept
        assert short["conversations"][:-1] == full["conversations"][:-1]
        assert full["conversations"][-1]["content"].endswith("</think>\n" + short["conversations"][-1]["content"])
        assert "<think>" not in short["conversations"][-1]["content"]
        assert (short["answer"], short["type"]) == (full["answer"], full["type"])
    assert think <= set(trained_ids(tmp_path / "r1.jsonl", tokenizer_path)[1])  # the full traces do train them


LIONS = {"type": "fact", "replies": [s for p in od.animal_fact_phrasings("lion") for s in p]}


@pytest.mark.parametrize("reply,check,right", [
    ("A cook makes food for people to eat.", {"replies": ["A cook makes food for people to eat."]}, True),
    ("a cook  makes food for people to eat.", {"replies": ["A cook makes food for people to eat."]}, True),
    ("A cook makes food.", {"replies": ["A cook makes food for people to eat."]}, False),
    ("", {"replies": ["Goodbye! Have a great day!"]}, False),
    ("Goodbye!", {"replies": ["Goodbye! Have a great day!", "Bye! Come back any time."]}, True),
    ("Lions live on the grassland. A lion eats meat.", LIONS, True),        # any true lion facts, in any order
    ("A lion eats meat. Lions live on the grassland.", LIONS, True),
    ("A lion eats meat. The sum is 17.", LIONS, False),                     # one sentence that is not a lion fact
    ("A lion eats grass.", LIONS, False),
    ("Once upon a time, Jade went to the beach.", {"mentions": ["Jade", "beach"]}, True),
    ("Once upon a time, Jade went home.", {"mentions": ["Jade", "beach"]}, False),
    ("再见！祝你今天开心！", {"replies": ["再见！祝你今天开心！"]}, True),
    ("再见！", {"replies": ["再见！祝你今天开心！"]}, True),
    ("它们一共有22条腿。答案是：22。", {"replies": ["我是一个小小的聊天助手，可以回答简单的问题、算数和讲故事。"]}, False),
])
def test_a_chat_reply_is_scored_against_what_the_generator_knows(reply, check, right):
    assert reply_is_right(reply, check) == right


def chat_file(path, n, lang="en", seed=0):
    """n built-in chats (each with the "type" and check of its last reply) as a chat file."""
    rng = random.Random(seed)
    records = [(od.english_chat if lang == "en" else od.zh_chat)(rng) for _ in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return records


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_the_chat_report_scores_scripted_replies_right_wrong_and_empty(tmp_path, tokenizer_path, lang):
    records = chat_file(tmp_path / "chats.jsonl", 45, lang)
    replies, right, sums = [], Counter(), 0
    # right (after an empty think block), answered as a problem (a sum, or reasoning), or nothing, in turn
    as_a_problem = ["The sum is 17.", "答案是：17。", od.think_reply("I add: 3 + 4 = 7.", "It is 7.")]
    for i, r in enumerate(records):
        if i % 3 == 0:
            replies.append(od.think_reply("", " ".join(r["mentions"]) if "mentions" in r else r["replies"][0]))
            right[r["type"]] += 1
        else:
            replies.append(as_a_problem[i % 9 // 3] if i % 3 == 1 else "")
            sums += i % 3 == 1 and r["type"] not in ("math", "numbers", "word")
    tok = load_tokenizer(tokenizer_path)
    report = chat_report(ScriptedModel(tok, replies), tok, str(tmp_path / "chats.jsonl"), 45, 64)
    assert report["chats"] == 45 and report["right"] == 15 and report["sums"] == sums > 0
    assert {k: v["correct"] for k, v in report["by_type"].items() if v["correct"]} == +right
    assert sum(v["problems"] for v in report["by_type"].values()) == 45
    goal = [k for k in report["by_type"] if k in ("fact", "greeting", "story question")]
    assert report["goal_chats"] == sum(report["by_type"][k]["problems"] for k in goal) > 0
    assert report["goal_right"] == sum(right[k] for k in goal)
    assert f"{report['sums']} chat prompts answered with a sum" in describe_chat(report)


def test_a_story_that_holds_sums_is_not_a_chat_answered_with_a_sum(tmp_path, tokenizer_path):
    records = [r for r in chat_file(tmp_path / "all.jsonl", 300) if r["type"] == "story"][:2]
    (tmp_path / "stories.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    story = od.think_reply("", "Once there was a cat named Pip. On Monday, he found 3 shells, and 3 + 4 = 7.")
    tok = load_tokenizer(tokenizer_path)
    report = chat_report(ScriptedModel(tok, [story, "The sum is 7."]), tok, str(tmp_path / "stories.jsonl"), 2, 64)
    assert report["right"] == 0 and report["sums"] == 1  # the wrong story with a sum in it is just a wrong story


def test_replayed_chats_are_mixed_in_deterministically_and_counted(tmp_path):
    reasoning_file(tmp_path / "r1.jsonl", 70)
    chat_file(tmp_path / "sft.jsonl", 50)
    counts = replay_mix(str(tmp_path / "r1.jsonl"), str(tmp_path / "sft.jsonl"), 0.3, 0, str(tmp_path / "a.jsonl"))
    replay_mix(str(tmp_path / "r1.jsonl"), str(tmp_path / "sft.jsonl"), 0.3, 0, str(tmp_path / "b.jsonl"))
    replay_mix(str(tmp_path / "r1.jsonl"), str(tmp_path / "sft.jsonl"), 0.3, 1, str(tmp_path / "c.jsonl"))
    mixed = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
    assert counts == (70, 30) and len(mixed) == 100  # 30 chats are 30% of the 100 conversations
    assert mixed == (tmp_path / "b.jsonl").read_text(encoding="utf-8").splitlines()  # the same seed, the same file
    assert mixed != (tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()
    problems = (tmp_path / "r1.jsonl").read_text(encoding="utf-8").splitlines()
    chats = set((tmp_path / "sft.jsonl").read_text(encoding="utf-8").splitlines())
    assert sorted(line for line in mixed if line not in chats) == sorted(problems)  # every problem, once
    replayed = [line for line in mixed if line in chats]
    assert len(set(replayed)) == 30  # no chat twice while there are enough
    assert mixed[:70] != problems[:70]  # shuffled together, not appended
    more = replay_mix(str(tmp_path / "r1.jsonl"), str(tmp_path / "sft.jsonl"), 0.6, 0, str(tmp_path / "d.jsonl"))
    assert more == (70, 105)  # more than the file holds: every chat once, then a sample again


def test_an_empty_think_block_is_not_reasoning(tmp_path, tokenizer_path):
    """A chat reply's empty block (offline_data.think_reply("", ...)) does not count as a well-formed think block."""
    records = reasoning_file(tmp_path / "val.jsonl", 2)
    answers = [r["answer"] for r in records]
    replies = [od.think_reply("", f"It is {answers[0]}."), od.think_reply("I add.", f"It is {answers[1]}.")]
    tok = load_tokenizer(tokenizer_path)
    report = reasoning_report(ScriptedModel(tok, replies), tok, str(tmp_path / "val.jsonl"), 2, 64)
    assert report["well_formed"] == 0.5 and report["correct"] == 2


def test_a_reply_stuck_in_a_loop_is_not_well_formed(tmp_path, tokenizer_path):
    """A reply that says a word three times running ("now now now", GRPO's drift) is right but not well-formed."""
    records = reasoning_file(tmp_path / "val.jsonl", 2)
    answers = [r["answer"] for r in records]
    replies = [od.think_reply("I add.", f"It is {answers[0]} now now now."),
               od.think_reply("I add.", f"It is {answers[1]} now.")]
    tok = load_tokenizer(tokenizer_path)
    report = reasoning_report(ScriptedModel(tok, replies), tok, str(tmp_path / "val.jsonl"), 2, 64)
    assert report["well_formed"] == 0.5 and report["correct"] == 2
