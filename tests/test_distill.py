"""distill.py's and evaluate.py's parts: the answer match of the accuracy report, the per-type report, the answer-only ablation's
training targets, and the teacher loss by hand."""
import json
import math
import random
from collections import Counter
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import distill
from dataset_sft import SFTData
from distill import DistillConfig, teacher_loss
from evaluate import describe_types, reasoning_report, states_answer
from model import ModelConfig, Transformer, save_checkpoint
from records import read_conversations
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
    import offline_data as od
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
    problems, _ = read_conversations(str(tmp_path / "val.jsonl"), verbose=False)
    report = reasoning_report(ScriptedModel(tok, replies), tok, problems, 40, 160)
    by_type = report["by_type"]
    assert len(by_type) >= 5 and {k: v["correct"] for k, v in by_type.items() if v["correct"]} == +expected
    assert sum(t["problems"] for t in by_type.values()) == report["checkable"] == report["problems"] == 40
    assert sum(t["correct"] for t in by_type.values()) == report["correct"] == sum(expected.values())
    assert report["accuracy"] == report["correct"] / 40
    assert report["well_formed"] == pytest.approx(27 / 40)  # two of every three replies have a think block
    line = describe_types(report)
    assert sum(int(part.split()[-1].split("/")[0]) for part in line.split(", ")) == report["correct"]


def trained_ids(path, tokenizer_path):
    """Every trained target id of a chat file, as train_sft.py and distill.py would train it."""
    data = SFTData(str(path), tokenizer_path, seq_len=256, batch_size=1)
    ids = []
    for i in range(len(data)):
        targets = data.batch(i)["targets"]
        ids += targets[targets != -100].tolist()
    return data, ids


def test_the_answer_only_ablation_trains_no_think_block(tmp_path, tokenizer_path, monkeypatch):
    records = reasoning_file(tmp_path / "r1.jsonl", 30)
    reasoning_file(tmp_path / "r1_val.jsonl", 5, seed=1)
    seen = {}

    def fake_train(cfg, *args, **kwargs):  # what distill() hands the training loop
        seen.update(train=cfg.train_data, val=cfg.val_data)
        return {}

    monkeypatch.setattr(distill, "train", fake_train)
    init = tmp_path / "init.pt"
    start = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=256))
    save_checkpoint({"model": start.state_dict(), "config": asdict(start.cfg)}, str(init))
    distill.distill(DistillConfig(init_from=str(init), train_data=str(tmp_path / "r1.jsonl"),
                                  val_data=str(tmp_path / "r1_val.jsonl"), out_dir=str(tmp_path / "out"),
                                  tokenizer=tokenizer_path, answer_only=True, eval_problems=0, device="cpu"))
    assert seen["train"] == str(tmp_path / "out" / "answer_only" / "r1.jsonl")
    tok = load_tokenizer(tokenizer_path)
    think = {tok.piece_id("<think>"), tok.piece_id("</think>")}
    for path in (seen["train"], seen["val"]):
        data, ids = trained_ids(path, tokenizer_path)
        assert data.conversations == (30 if path == seen["train"] else 5) and ids
        assert not think & set(ids), path
    answer_only = [json.loads(line) for line in open(seen["train"], encoding="utf-8")]
    for full, short in zip(records, answer_only):  # the same problems and final replies, answers and types kept
        assert short["conversations"][:-1] == full["conversations"][:-1]
        assert full["conversations"][-1]["content"].endswith("</think>\n" + short["conversations"][-1]["content"])
        assert "<think>" not in short["conversations"][-1]["content"]
        assert (short["answer"], short["type"]) == (full["answer"], full["type"])
    assert think <= set(trained_ids(tmp_path / "r1.jsonl", tokenizer_path)[1])  # the full traces do train them
