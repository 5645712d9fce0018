"""train_dpo.py: each loss against a hand computation, gradients only through the replies, a reference that
never changes (a frozen copy, or a LoRA model with its adapters off), precomputed log-probs equal to live ones."""
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import lora
from conftest import FixedLogits
from model import ModelConfig, Transformer
from train_dpo import DPOConfig, dpo_loss, make_reference, pair_logps, preference_losses

IGNORE = -100


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("loss, label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_each_loss_equals_a_hand_computation(loss, label_smoothing):
    cfg = DPOConfig(beta=0.1, loss=loss, label_smoothing=label_smoothing)
    pc, pr, rc, rr = torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -3.0]), torch.tensor([-1.5, -4.5]), \
        torch.tensor([-1.8, -2.0])
    losses, chosen_reward, rejected_reward = preference_losses(pc, pr, rc, rr, cfg)
    for i in range(2):
        chosen_ratio, rejected_ratio = pc[i].item() - rc[i].item(), pr[i].item() - rr[i].item()
        h = 0.1 * (chosen_ratio - rejected_ratio)
        if loss == "ipo":
            expected = (chosen_ratio - rejected_ratio - 1 / (2 * 0.1)) ** 2
        else:
            expected = -(1 - label_smoothing) * logsigmoid(h) - label_smoothing * logsigmoid(-h)
        assert losses[i].item() == pytest.approx(expected, rel=1e-6)
        assert chosen_reward[i].item() == pytest.approx(0.1 * chosen_ratio, rel=1e-6)
        assert rejected_reward[i].item() == pytest.approx(0.1 * rejected_ratio, rel=1e-6)


def tiny_pair_batch():
    """Two pairs, vocab 7: rows 0-1 chosen, rows 2-3 rejected; prompt positions masked, replies trained."""
    torch.manual_seed(0)
    targets = torch.tensor([[IGNORE, IGNORE, 3, 4, 1],
                            [IGNORE, 2, 5, 1, IGNORE],
                            [IGNORE, IGNORE, 6, 1, IGNORE],
                            [IGNORE, 2, 2, 3, 1]])
    return {"tokens": torch.zeros_like(targets), "targets": targets}, torch.randn(4, 5, 7, requires_grad=True)


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_the_loss_of_a_batch_by_hand_and_no_gradient_at_prompt_positions(sft_weight):
    batch, logits = tiny_pair_batch()
    ref = torch.tensor([[-3.0, -4.0], [-2.5, -6.0]])  # (pairs, (chosen, rejected))
    cfg = DPOConfig(beta=0.5, sft_weight=sft_weight)
    loss = dpo_loss(cfg, reference=None)(FixedLogits(logits), {**batch, "reference_logps": ref})
    loss.backward()

    log_p = F.log_softmax(logits.detach(), -1)
    seq = [sum(log_p[r, t, batch["targets"][r, t]].item() for t in range(5) if batch["targets"][r, t] != IGNORE)
           for r in range(4)]
    expected = 0.0
    for i in range(2):
        h = 0.5 * ((seq[i] - ref[i, 0].item()) - (seq[i + 2] - ref[i, 1].item()))
        expected += -logsigmoid(h) / 2
    chosen_tokens = int((batch["targets"][:2] != IGNORE).sum())
    expected += sft_weight * -(seq[0] + seq[1]) / chosen_tokens
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    trained = batch["targets"] != IGNORE
    assert torch.all(logits.grad[~trained] == 0)  # prompt, template and padding positions: no gradient
    assert torch.all(logits.grad[trained].abs().sum(-1) > 0)


def small_model(seed=0, vocab_size=50):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                                   max_seq_len=16))


def random_pairs(vocab_size=50, pairs=4, T=10):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab_size, (2 * pairs, T), generator=g)
    targets = tokens.roll(-1, 1).clone()
    targets[:, :4] = IGNORE  # the prompt
    return {"tokens": tokens, "targets": targets, "pair_index": torch.arange(pairs)}


def train_steps(model, loss_fn, batch, steps=5):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss_fn(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_a_frozen_reference_copy_never_changes(tmp_path):
    from model import save_checkpoint
    start = small_model()
    path = str(tmp_path / "start.pt")
    save_checkpoint({"model": start.state_dict(), "config": asdict(start.cfg), "step": 0}, path)
    from runtime import Runtime
    cfg = DPOConfig(init_from=path, device="cpu")
    rt = Runtime(cfg.device, cfg.dtype)
    policy = lora.load_merged(path)[0]
    reference, reference_path, _ = make_reference(cfg, policy, rt)
    batch = random_pairs()
    with torch.no_grad():
        before = reference(policy, batch)
    train_steps(policy, dpo_loss(cfg, reference), batch)
    with torch.no_grad():
        after = reference(policy, batch)
        moved = pair_logps(policy, batch)
    assert reference_path == path
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # bit for bit
    assert not torch.equal(moved[0], before[0])  # while the policy did move


@pytest.mark.parametrize("base_quant", ["", "nf4"])
def test_a_lora_reference_is_the_base_with_adapters_off(base_quant):
    """With a float base the reference equals the base model; with an NF4 one (QLoRA) the 4-bit base it trains on."""
    if base_quant:
        pytest.importorskip("torchao")
    base = small_model()
    batch = random_pairs()
    policy = lora.add_lora(small_model(), rank=4, alpha=8.0, new_token_ids=[48, 49], base_quant=base_quant)
    with torch.no_grad(), lora.adapters_off(policy):
        expected = pair_logps(policy if base_quant else base, batch)
    policy.lora["base"] = "base.pt"
    from runtime import Runtime
    cfg = DPOConfig(device="cpu", lora_rank=4)
    reference, reference_path, _ = make_reference(cfg, policy, Runtime(cfg.device, cfg.dtype))
    train_steps(policy, dpo_loss(cfg, reference), batch)
    with torch.no_grad():
        after = reference(policy, batch)
        moved = pair_logps(policy, batch)
    assert reference_path == "base.pt"
    assert all(torch.equal(a, b) for a, b in zip(expected, after))
    assert not torch.equal(moved[0], expected[0])


def test_precomputed_reference_log_probs_equal_the_live_ones(tmp_path, tokenizer_path):
    import json

    from dataset_sft import PreferenceData
    from runtime import Runtime
    from train_dpo import WithReference, reference_table
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"conversations": [{"role": "user", "content": f"What is {i} + {i}?"}],
                                "chosen": f"It is {2 * i}.", "rejected": f"It is {2 * i + 1}, I think."}) + "\n")
    data = PreferenceData(str(tmp_path / "pairs.jsonl"), tokenizer_path, seq_len=48, batch_size=3, seed=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=48))
    cfg = DPOConfig(device="cpu")
    rt = Runtime(cfg.device, cfg.dtype)
    table = reference_table(lambda policy, batch: pair_logps(model, batch), model, data, rt, "test")
    assert table.shape == (10, 2)
    for index in range(4):  # shuffled batches, padded to their own longest row
        batch = WithReference(data, table).batch(index)
        with torch.no_grad():
            live = torch.stack(pair_logps(model, batch), 1)
        torch.testing.assert_close(batch["reference_logps"], live, atol=1e-5, rtol=0)
