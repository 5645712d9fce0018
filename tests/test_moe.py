"""model.py's mixture of experts: routing, dropless grouping, the auxiliary losses, decoding, training, LoRA."""
import json

import pytest
import torch
import torch.nn.functional as F

import lora
import train
from conftest import RandomTokens, spread_weights
from model import ModelConfig, ModelError, MoE, Transformer

MOE = dict(dim=48, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=80, max_seq_len=64, n_experts=4,
           n_experts_per_tok=2, moe_hidden_dim=32)


def moe_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**MOE, **overrides}))


def swiglu(ffn, x):
    return F.linear(F.silu(F.linear(x, ffn.w1.weight)) * F.linear(x, ffn.w3.weight), ffn.w2.weight)


def by_hand(moe: MoE, x, norm_topk_prob: bool):
    """Each token alone: its router's softmax, its top k, and those experts one by one."""
    out = []
    for token in x:
        probs = F.softmax(token @ moe.router.weight.T, -1)
        top = sorted(range(len(probs)), key=lambda e: -probs[e])[:moe.cfg.n_experts_per_tok]
        weights = probs[top] / (probs[top].sum() if norm_topk_prob else 1)
        y = sum(w * swiglu(moe.experts[e], token) for w, e in zip(weights, top))
        if moe.shared is not None:
            gate = torch.sigmoid(token @ moe.shared_gate.weight.T) if moe.shared_gate is not None else 1
            y = y + gate * swiglu(moe.shared, token)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("overrides", [{}, {"norm_topk_prob": False},
                                       {"n_shared_experts": 2, "shared_expert_gate": True, "norm_topk_prob": False},
                                       {"n_shared_experts": 1, "n_experts_per_tok": 1, "norm_topk_prob": False}])
def test_a_token_gets_the_weighted_sum_of_its_top_k_experts(overrides):
    """Top-k of the router's softmax, renormalised over the k (Mixtral) or not (Qwen2-MoE), plus the shared expert
    (gated or not): the grouped computation equals each token's experts run one by one."""
    model = moe_model(**overrides)
    moe = model.layers[0].feed_forward
    x = torch.randn(2, 9, 48)
    with torch.no_grad():
        got = moe(x)
        want = by_hand(moe, x.reshape(-1, 48), moe.cfg.norm_topk_prob).view(2, 9, 48)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dropless_every_token_reaches_its_experts_however_unbalanced():
    """A router that sends every token to experts 0 and 1: both run all 40 tokens (no capacity limit), the
    others none, and the outputs are still each token's own; the load counted for the log says so."""
    model = moe_model().train()
    moe = model.layers[1].feed_forward
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0], moe.router.weight[1, 0] = 5.0, 4.0
    x = torch.randn(1, 40, 48)
    x[..., 0] = x[..., 0].abs() + 1  # the feature the router reads: positive for every token
    out = moe(x)
    torch.testing.assert_close(out.detach(), by_hand(moe, x[0], True)[None].detach(), atol=1e-5, rtol=1e-5)
    assert moe.load.tolist() == [40.0, 40.0, 0.0, 0.0]
    tokens = torch.randint(0, 97, (2, 20))
    model(tokens, targets=tokens)
    assert model.expert_load.sum(-1).tolist() == [40 * 2] * 3 and model.routed_tokens.item() == 40  # k=2 each
    report = train.expert_report(model)
    assert report["dropped"] == 0 and len(report["expert_load"]) == 3
    assert model.expert_load.sum() == 0 and model.routed_tokens == 0  # cleared for the next log window


def test_aux_losses_match_a_hand_computation():
    """Switch / Mixtral balancing: n_experts * sum_e (share of the choices e got) * (mean router probability of e);
    z-loss: mean over tokens of logsumexp(router logits) squared; each weighted by its coefficient."""
    model = moe_model(router_aux_loss_coef=0.3, router_z_loss_coef=0.05).train()
    moe = model.layers[0].feed_forward
    x = torch.randn(30, 48)
    moe(x[None])
    logits = x @ moe.router.weight.T
    probs = logits.softmax(-1)
    chosen = probs.topk(2, -1).indices
    share = torch.stack([(chosen == e).sum() for e in range(4)]) / 30
    balance = 4 * (share * probs.mean(0)).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(moe.aux_loss, 0.3 * balance + 0.05 * z)
    even = torch.full((4,), 2 / 4) * torch.full((4,), 1 / 4)
    assert 4 * even.sum() == 2  # at perfect balance the loss is k

    tokens = torch.randint(0, 97, (2, 16))
    loss = model(tokens, targets=tokens)[1]
    aux = sum(m.aux_loss for m in model.moe) / len(model.moe)
    torch.testing.assert_close(loss, model.eval()(tokens, targets=tokens)[1] + aux)  # eval: no aux loss


def test_cached_decoding_matches_the_full_forward():
    model = moe_model(n_shared_experts=1, first_dense_layers=1).eval()
    assert [type(b.feed_forward).__name__ for b in model.layers] == ["FeedForward", "MoE", "MoE"]
    tokens = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = model(tokens)[0]
        cache = model.new_cache(batch_size=2)
        pieces = [model(tokens[:, :10], cache=cache)[0]] + [model(tokens[:, t:t + 1], cache=cache)[0]
                                                            for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


def test_active_parameters_and_flops_count_a_tokens_experts_only():
    model, dense = moe_model(), Transformer(ModelConfig(**{**MOE, "n_experts": 0, "hidden_dim": 64}))
    expert = 3 * 48 * 32
    assert model.num_params() - model.num_params(active=True) == 3 * 2 * expert  # 2 idle experts in 3 layers
    # the same active weights as a dense model of SwiGLU width 2 * 32, plus the routers
    assert model.num_params(active=True) == dense.num_params() + 3 * 4 * 48
    assert model.flops_per_token(64) == dense.flops_per_token(64) + 6 * 3 * 4 * 48


def test_bad_moe_settings_are_one_line_errors():
    with pytest.raises(ModelError, match="n_experts_per_tok 5"):
        ModelConfig(**{**MOE, "n_experts_per_tok": 5})
    with pytest.raises(ModelError, match="learn nothing"):  # weight p / p = 1: no gradient to the router
        ModelConfig(**{**MOE, "n_experts_per_tok": 1})
    with pytest.raises(ModelError, match="first_dense_layers 3"):
        ModelConfig(**{**MOE, "first_dense_layers": 3})


def test_training_logs_the_load_and_resumes_bit_for_bit(tmp_path):
    """The log records the routers' loss, each expert's share and its coefficient of variation, and nothing
    dropped; stopping and resuming gives the same weights as one run (torch.equal)."""
    cfg_model = ModelConfig(**MOE)

    def run(out_dir, **overrides):
        cfg = train.TrainConfig(out_dir=str(out_dir), batch_size=4, max_steps=12, warmup_steps=2, lr=3e-3,
                                device="cpu", eval_every=4, log_every=3, **overrides)
        model, start = train.resume_or_init(cfg, cfg_model)
        data = RandomTokens(cfg_model.vocab_size, 4, 32)
        return train.train(cfg, model, data, data, start=start)

    straight = run(tmp_path / "straight")
    run(tmp_path / "split", stop_at_step=5)
    resumed = run(tmp_path / "split", resume=True)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["val_loss"] == straight["val_loss"]
    logs = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl") if '"loss"' in line]
    assert len(logs) == 4 and all(r["dropped"] == 0 and r["router_loss"] > 0 for r in logs)
    assert all(len(r["expert_load"]) == 3 and abs(sum(r["expert_load"][0]) - 1) < 1e-3 for r in logs)
    assert all(0 <= r["expert_load_cv"] < 2 for r in logs)


def test_lora_adapts_attention_and_the_experts_only_when_asked():
    model = moe_model(n_shared_experts=1)
    lora.add_lora(model, rank=2, alpha=4, targets=["wq", "w1"])
    adapted = sorted(n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if n.endswith("lora_A"))
    assert adapted == [f"layers.{i}.{p}" for i in range(3) for p in ("attention.wq", "feed_forward.shared.w1")]
    assert sum(p.numel() for p in lora.adapter_state(model).values()) == \
        lora.lora_params(model.cfg, 2, ["wq", "w1"])

    model = moe_model(n_shared_experts=1)
    targets = list(lora.TARGETS) + ["experts"]
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        before = model.eval()(tokens)[0]
    lora.add_lora(model, rank=2, alpha=4, targets=targets)
    assert sum(p.numel() for p in lora.adapter_state(model).values()) == lora.lora_params(model.cfg, 2, targets)
    assert any(".experts.3.w2.lora_B" in n for n, _ in model.named_parameters())
    loss = model.train()(tokens, targets=tokens)[1]
    loss.backward()
    ran = [(i, e) for i, m in enumerate(model.moe) for e in range(4) if m.load[e] > 0]
    assert all(model.get_parameter(f"layers.{i}.feed_forward.experts.{e}.w2.lora_B").grad is not None
               for i, e in ran) and len(ran) > 6
    with torch.no_grad():
        for p in lora.adapter_state(model).values():
            p.add_(0.01)
        adapted_logits = model.eval()(tokens)[0]
        merged = lora.merge_lora(model)
        torch.testing.assert_close(merged(tokens)[0], adapted_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted_logits, before)
    assert set(merged.state_dict()) == set(moe_model(n_shared_experts=1).state_dict())


def test_int8_weights_keep_the_routing():
    from quantize import Int8Linear, quantize_model
    model = moe_model().eval()
    spread_weights(model)
    tokens = torch.randint(0, 97, (4, 32))
    with torch.no_grad():
        reference = model(tokens)[0].argmax(-1)
        int8 = quantize_model(model)
        assert isinstance(int8.layers[0].feed_forward.experts[3].w2, Int8Linear)
        assert (int8(tokens)[0].argmax(-1) == reference).float().mean() > 0.8  # the next token of 128 contexts


def test_batched_greedy_rows_equal_each_prompt_alone():
    """generate_batch (serve.py's and GRPO's sampling): padded prompts of different lengths in one batch; a token's
    experts depend on that token only, so each row is its prompt's generate()."""
    model = moe_model(n_shared_experts=1).eval()
    spread_weights(model)
    prompts = [[5, 17, 3], list(range(1, 20)), [42, 42, 7, 8]]
    alone = [model.generate(p, max_new_tokens=16, temperature=0) for p in prompts]
    assert model.generate_batch(prompts, max_new_tokens=16, temperature=0) == alone
