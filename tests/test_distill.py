"""distill.py's parts: the answer match of the accuracy report, and the teacher loss by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from distill import DistillConfig, states_answer, teacher_loss
from model import ModelConfig, Transformer


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
