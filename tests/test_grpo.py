"""train_grpo.py: the reward, the advantages, the loss against a hand computation, and whole runs (resume bit for bit
with the sampling, LoRA leaving its base untouched) on a tiny model whose answers a stand-in reward scores."""
import json
import math
from dataclasses import asdict

import pytest
import torch

import train_grpo
from conftest import FixedLogits
from model import ModelConfig, Transformer, save_checkpoint
from test_distill import reasoning_file
from train_grpo import GRPOConfig, advantages, grpo, grpo_loss, reward


@pytest.mark.parametrize("completion, finished, expected", [
    ("<think>\n3 + 4 = 7\n</think>\nThe sum is 7.", True, 1.1),      # right and well formed
    ("<think>\n3 + 4 = 8\n</think>\nThe sum is 8.", True, 0.1),      # wrong: the format term alone
    ("The sum is 7.", True, 1.0),                                    # right without a think block
    ("<think>\n\n</think>\nThe sum is 7.", True, 1.0),               # an empty block is not reasoning
    ("<think>\n3 + 4 = 7\n</think>\n", True, 0.0),                   # malformed: nothing after the block, no answer
    ("<think>\n3 + 4 = 7\n</think>\nThe sum is 7.", False, 0.0),     # cut off at max_new_tokens: nothing
    ("<think>\n25 + 25 = 50\n</think>\nThe answer is 50.0.", True, 1.1),  # 50.0 states 50
    ("<think>\n25 + 25 = 50\n</think>\nThe answer is 500.", True, 0.1),
    ("<think>\n3 + 4 = 7\n</think>\nThe sum is 7 now now now.", True, 1.0),  # right, but stuck in a loop
])
def test_the_reward_of_each_kind_of_answer(completion, finished, expected):
    answer = "50" if "50" in completion else "7"
    assert reward({"answer": answer}, completion, finished) == pytest.approx(expected)


def test_advantages_are_centred_per_group_and_flat_groups_get_zero():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    none = advantages(rewards, "none")
    assert torch.equal(none, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.75, -0.75, -0.75, 2.25]]))
    group = advantages(rewards, "group")
    assert torch.equal(group[1], torch.zeros(4))
    assert torch.allclose(group[0], none[0] / (rewards[0].std() + 1e-4))


def test_the_loss_equals_a_hand_computation():
    """Two answers of two and one tokens (the rest masked), advantages +1 and -2, old log-probs that put one
    token's ratio above 1 + epsilon_high, one below 1 - epsilon and one inside; beta 0.1 to the reference."""
    cfg = GRPOConfig(epsilon=0.2, epsilon_high=0.28, beta=0.1, temperature=1.0, grad_accum=2)
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]],
                           [[0.0, 1.0, 0.0], [1.0, 0.0, 3.0], [0.0, 0.0, 0.0]]])
    targets = torch.tensor([[0, 2, -100], [-100, 2, -100]])
    logp = torch.log_softmax(logits, -1)
    lp = {(0, 0): logp[0, 0, 0], (0, 1): logp[0, 1, 2], (1, 1): logp[1, 1, 2]}
    ratio = {(0, 0): 1.5, (0, 1): 1.1, (1, 1): 0.5}  # above 1.28, inside, below 0.8
    old = torch.zeros(2, 3)
    ref = torch.zeros(2, 3)
    for (b, t), r in ratio.items():
        old[b, t] = lp[(b, t)] - math.log(r)
        ref[b, t] = lp[(b, t)] + 0.3 * (b + t + 1)
    adv = {0: 1.0, 1: -2.0}
    expected = 0.0
    for (b, t), r in ratio.items():  # -min(r A, clip(r) A) + beta (e^d - d - 1), d = ref - logp
        surrogate = min(r * adv[b], min(max(r, 0.8), 1.28) * adv[b])
        d = 0.3 * (b + t + 1)
        expected += -surrogate + 0.1 * (math.exp(d) - d - 1)
    step_tokens = 6.0  # the whole step's answer tokens (this micro-batch holds 3 of them)
    expected = expected / step_tokens * cfg.grad_accum
    stats = dict(clipped=0, tokens=0, kl=0.0)
    batch = {"tokens": torch.zeros(2, 3, dtype=torch.long), "targets": targets, "advantages": torch.tensor([1.0, -2.0]),
             "step_tokens": torch.tensor(step_tokens), "old_logp": old, "ref_logp": ref}
    loss = grpo_loss(cfg, stats)(FixedLogits(torch.nn.Parameter(logits.clone())), batch)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the clipped tokens: A > 0 with the ratio above 1 + eps_high, A < 0 with it below 1 - eps
    assert stats["clipped"] == 2 and stats["tokens"] == 3


def test_flat_groups_give_zero_gradient():
    cfg = GRPOConfig(beta=0.0)
    model = FixedLogits(torch.nn.Parameter(torch.randn(4, 5, 7)))
    targets = torch.randint(0, 7, (4, 5))
    rewards = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # two groups of two, each all equal
    batch = {"tokens": torch.zeros(4, 5, dtype=torch.long), "targets": targets,
             "advantages": advantages(rewards, "group").flatten(), "step_tokens": torch.tensor(20.0)}
    grpo_loss(cfg, dict(clipped=0, tokens=0, kl=0.0))(model, batch).backward()
    assert torch.equal(model.logits.grad, torch.zeros_like(model.logits))


# -----------------------------------------------------------------------------
# whole runs on a tiny model

def long_answers_win(problem, completion, finished):
    """A stand-in reward a random model's answers differ on, so every group has something to learn."""
    return float(len(completion) % 3)


@pytest.fixture
def start(tmp_path, tokenizer_path, monkeypatch):
    """A random tiny model recorded with the test tokenizer, and problem files, in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_grpo, "reward", long_answers_win)
    reasoning_file(tmp_path / "r1.jsonl", 40)
    reasoning_file(tmp_path / "r1_val.jsonl", 4, seed=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=160))
    save_checkpoint({"model": model.state_dict(), "config": asdict(model.cfg), "step": 0,
                     "tokenizer": tokenizer_path}, "start.pt")
    return tmp_path


def run(out_dir, **overrides):
    settings = dict(init_from="start.pt", train_data="r1.jsonl", val_data="r1_val.jsonl", out_dir=out_dir, device="cpu",
                    batch_size=8, group_size=4, max_steps=4,
                    eval_every=2, log_every=2, max_new_tokens=12, eval_problems=2, eval_max_new_tokens=8, pass_k=2,
                    eval_chats=0, text_val="", lr=1e-2, warmup_steps=1)
    return grpo(GRPOConfig(**{**settings, **overrides}))


@pytest.mark.slow
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(start, inner_steps):
    run("out/full", inner_steps=inner_steps)
    run("out/split", inner_steps=inner_steps, stop_at_step=2)
    run("out/split", inner_steps=inner_steps, resume=True)
    full, split = (torch.load(f"out/{d}/last.pt", weights_only=True) for d in ("full", "split"))
    assert all(torch.equal(full["model"][k], split["model"][k]) for k in full["model"])
    begin = torch.load("start.pt", weights_only=True)["model"]
    assert any(not torch.equal(begin[k], full["model"][k]) for k in begin)  # it trained
    draws = [json.loads(line) for line in open("out/full/metrics.jsonl") if "reward" in line]
    assert len(draws) == 4 // inner_steps and all(d["flat_groups"] < 1 for d in draws)
    if inner_steps == 2:  # the second step on a sample moves away from the sampling model: some ratios clip
        assert any(json.loads(line).get("clipped", 0) > 0 for line in open("out/full/metrics.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("base_quant", ["", "nf4"])
def test_a_lora_run_leaves_its_base_untouched(start, base_quant):
    if base_quant:
        pytest.importorskip("torchao")
    base = torch.load("start.pt", weights_only=True)["model"]
    run("out/lora", lora_rank=4, beta=0.05, base_quant=base_quant)
    ckpt = torch.load("out/lora/last.pt", weights_only=True)
    assert ckpt["lora"]["base"] == "start.pt"
    assert all(torch.equal(base[k], v) for k, v in torch.load("start.pt", weights_only=True)["model"].items())
    assert set(ckpt["model"]) and all("lora" in k for k in ckpt["model"])  # adapters only
    assert any(json.loads(line).get("kl", 0) > 0 for line in open("out/lora/metrics.jsonl"))


def test_settings_that_cannot_work_are_one_line_errors():
    from cli import UserError
    with pytest.raises(UserError, match="--group_size 3 must .* divide the 8 answers"):
        train_grpo.check_settings(GRPOConfig(batch_size=8, group_size=3))
    with pytest.raises(UserError, match="--eval_every 5 must be a multiple of --inner_steps 2"):
        train_grpo.check_settings(GRPOConfig(batch_size=8, group_size=4, inner_steps=2, eval_every=5))
    with pytest.raises(UserError, match="--scale_rewards is group or none"):
        train_grpo.check_settings(GRPOConfig(scale_rewards="std"))


@pytest.mark.slow
def test_each_ddp_process_samples_its_own_problems(start):
    import shutil
    import subprocess

    from conftest import ROOT
    from test_pipeline import free_port
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not installed")
    r = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
                        str(ROOT / "train_grpo.py"),
                        "--init_from", "start.pt", "--train_data", "r1.jsonl", "--val_data", "r1_val.jsonl",
                        "--out_dir", "out/ddp", "--device", "cpu", "--batch_size", "8", "--group_size", "4",
                        "--max_steps", "2", "--eval_every", "2", "--log_every", "1", "--max_new_tokens", "8",
                        "--eval_problems", "0", "--eval_chats", "0", "--text_val", ""],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 draws of 4 problems x 4 answers" in r.stdout  # two processes of 2 problems each
    assert torch.load("out/ddp/last.pt", weights_only=True)["step"] == 2
    data = train_grpo.Rollouts.__new__(train_grpo.Rollouts)  # which problems each rank draws
    data.problems, data.per_step, data.cfg = list(range(40)), 2, GRPOConfig(seed=0)
    drawn = []
    for rank in (0, 1):
        data.rt = type("Rank", (), {"rank": rank, "world_size": 2})()
        drawn.append(data.problems_of(0) + data.problems_of(1))
    assert not set(drawn[0]) & set(drawn[1])  # no problem answered twice in an epoch's first draws
