"""The training loop in process: no save ever writes diverged weights, whatever the eval, log and
stop intervals; atomic checkpoint writes; the weighted loss by hand."""
import json
import math
import os
import signal

import pytest
import torch

import runtime
import train
from cli import UserError
from conftest import RandomTokens
from model import ModelConfig, Transformer, save_checkpoint

TINY = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64, max_seq_len=16)
DIVERGE_AT = 7  # the optimizer step whose loss turns NaN


def diverging_loss(interrupt_at=0):
    """The default loss until step DIVERGE_AT, NaN from then on (evaluation calls are not counted);
    optionally a Ctrl-C (SIGINT to this process) during step `interrupt_at`."""
    calls = []

    def loss_fn(model, batch):
        loss = train.default_loss(model, batch)
        if not model.training:
            return loss
        calls.append(1)
        if len(calls) == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return loss * float("nan") if len(calls) >= DIVERGE_AT else loss
    return loss_fn


@pytest.mark.parametrize("eval_every,log_every,stop_at_step,interrupt_at", [
    (4, 10, 0, 0),    # a save at step 8 before the log at step 10 sees the NaN
    (3, 7, 0, 0),
    (10, 4, 0, 0),    # the log at step 8 comes first
    (5, 5, 0, 0),
    (100, 100, 8, 0),  # --stop_at_step saves after the divergence
    (100, 100, 0, 9),  # so does Ctrl-C
])
def test_a_diverged_run_never_overwrites_a_checkpoint(tmp_path, eval_every, log_every, stop_at_step, interrupt_at):
    cfg = train.TrainConfig(out_dir=str(tmp_path), batch_size=2, max_steps=30, warmup_steps=1, device="cpu",
                            eval_every=eval_every, log_every=log_every, eval_batches=1, stop_at_step=stop_at_step)
    torch.manual_seed(0)
    data = RandomTokens(TINY.vocab_size, 2, TINY.max_seq_len)
    with pytest.raises(FloatingPointError, match="stopping with the last good checkpoint intact"):
        train.train(cfg, Transformer(TINY), data, data, loss_fn=diverging_loss(interrupt_at))
    saved = [name for name in ("last.pt", "best.pt") if (tmp_path / name).exists()]
    for name in saved:
        ckpt = torch.load(tmp_path / name, weights_only=True)
        assert ckpt["step"] < DIVERGE_AT, name
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values()), name
    assert ("last.pt" in saved) == (eval_every < DIVERGE_AT)


def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    state = Transformer(TINY).state_dict()
    state["norm.weight"][3] = float("inf")
    with pytest.raises(FloatingPointError, match="norm.weight"):
        save_checkpoint({"model": state}, str(tmp_path / "x.pt"))
    assert not os.listdir(tmp_path)


def test_a_save_that_fails_halfway_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "step": 1}, str(path))
    before = path.read_bytes()

    def half_written(obj, f):  # a full disk or a crash in the middle of torch.save
        with open(f, "wb") as out:
            out.write(before[:len(before) // 2])
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 2}, str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]  # no half-written temporary file left behind


def test_weighted_loss_is_divided_by_trained_tokens_not_by_weights():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [1.0, 3.0, 0.0], [0.0, 0.0, 4.0]]])
    targets = torch.tensor([[0, -100, 1, 0]])
    weights = torch.tensor([[1.0, 7.0, 10.0, 2.0]])

    def nll(row, target):  # -log softmax(row)[target], by hand
        return math.log(sum(math.exp(v) for v in row)) - row[target]
    rows = logits[0].tolist()
    expected = (1 * nll(rows[0], 0) + 10 * nll(rows[2], 1) + 2 * nll(rows[3], 0)) / 3  # 3 trained tokens
    assert Transformer.loss(logits, targets, weights).item() == pytest.approx(expected, rel=1e-6)
    assert Transformer.loss(logits, targets).item() == pytest.approx(
        (nll(rows[0], 0) + nll(rows[2], 1) + nll(rows[3], 0)) / 3, rel=1e-6)


@pytest.mark.parametrize("max_steps,warned", [(10, False), (50, True)])
def test_epochs_are_reported_and_many_are_warned_about(tmp_path, capsys, max_steps, warned):
    """2 rows x 16 tokens a step: 10 steps over 1,000 tokens are 0.32 epochs; 50 steps over 200 tokens
    are 8 epochs, past the 4 worth having: warned, with the number of steps that would make 4."""
    cfg = train.TrainConfig(out_dir=str(tmp_path), batch_size=2, max_steps=max_steps, warmup_steps=1, device="cpu",
                            eval_every=1000, log_every=1000)
    data = RandomTokens(TINY.vocab_size, 2, TINY.max_seq_len, num_tokens=200 if warned else 1000)
    train.train(cfg, Transformer(TINY), data)
    out, err = capsys.readouterr()
    reads = max_steps * 2 * 16
    epochs = reads / data.num_tokens
    assert f"this run reads {reads / 1e6:,.1f}M tokens ({max_steps} steps x 2 rows); the data holds 0.0M: " \
           f"{epochs:.2f} epochs" in out
    assert ("warning: 8 passes over the same data" in err) == warned
    if warned:
        assert "lower --max_steps to about 25" in err


def test_memory_cap_sets_the_allocator_fraction(monkeypatch):
    """A 80 GiB card capped to 12 GiB: the caching allocator gets 12/80 of it; more than the card is refused."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 80 * 2**30}))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Big GPU")
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device: calls.append((f, device)))
    runtime.cap_memory(torch.device("cuda:0"), 12)
    assert calls == [(12 / 80, torch.device("cuda:0"))]
    runtime.cap_memory(torch.device("cuda:0"), 0)
    assert len(calls) == 1
    with pytest.raises(UserError, match="--memory_cap_gib 96 is more than the 80.0 GiB of Big GPU"):
        runtime.cap_memory(torch.device("cuda:0"), 96)


@pytest.mark.parametrize("tie", [True, False])
def test_muon_gets_exactly_the_2d_block_weights_and_adamw_the_rest(tmp_path, tie):
    model = Transformer(ModelConfig(**{**TINY.__dict__, "tie_embeddings": tie}))
    cfg = train.TrainConfig(out_dir=str(tmp_path), device="cpu", optimizer="muon")
    adamw, muon = train.make_optimizers(model, cfg, runtime.Runtime(cfg.device, cfg.dtype))
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    name = {id(p): n for n, p in model.named_parameters()}
    to_muon = {name[id(p)] for g in muon.param_groups for p in g["params"]}
    to_adamw = {name[id(p)] for g in adamw.param_groups for p in g["params"]}
    projections = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                   "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    assert to_muon == {f"layers.{i}.{p}.weight" for i in range(TINY.n_layers) for p in projections}
    assert to_adamw == set(name.values()) - to_muon
    assert ("output.weight" in to_adamw) == (not tie) and "tok_embeddings.weight" in to_adamw
    adamw_bytes = sum(8 * p.numel() for g in adamw.param_groups for p in g["params"])
    muon_bytes = sum(4 * p.numel() for g in muon.param_groups for p in g["params"])
    assert runtime.estimate_memory(model.cfg, 1, 8, torch.float32, optimizer="muon")["optimizer"] == \
        adamw_bytes + muon_bytes
    only_adamw = train.make_optimizers(model, train.TrainConfig(device="cpu"), runtime.Runtime(cfg.device, cfg.dtype))
    assert len(only_adamw) == 1 and sum(len(g["params"]) for g in only_adamw[0].param_groups) == len(name)
    with pytest.raises(UserError, match="fp16"):
        fp16 = train.TrainConfig(device="cpu", dtype="float16", optimizer="muon")
        train.make_optimizers(model, fp16, runtime.Runtime(fp16.device, fp16.dtype))


def test_muon_learns_and_resumes_bit_for_bit(tmp_path):
    def run(out_dir, **overrides):
        cfg = train.TrainConfig(out_dir=str(out_dir), batch_size=4, max_steps=30, warmup_steps=3, lr=3e-3,
                                device="cpu", eval_every=10, log_every=5, optimizer="muon", **overrides)
        model, start = train.resume_or_init(cfg, TINY)
        data = RandomTokens(TINY.vocab_size, 4, TINY.max_seq_len)
        return train.train(cfg, model, data, data, start=start)

    straight = run(tmp_path / "straight")
    run(tmp_path / "split", stop_at_step=13)
    with pytest.raises(UserError, match="optimizer='muon'"):
        cfg = train.TrainConfig(out_dir=str(tmp_path / "split"), resume=True, batch_size=4, device="cpu")
        train.resume_or_init(cfg, TINY)
    resumed = run(tmp_path / "split", resume=True)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert len(a["optimizer"]) == 2 and a["optimizer"][1]["state"]  # AdamW's and Muon's states
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["val_loss"] == straight["val_loss"]
    first = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl") if "val_loss" in line]
    assert first[-1]["val_loss"] < first[0]["val_loss"] - 0.1  # it learns (random tokens: the batches repeat)
