"""What the machines hobbyists have need: a run without torch.compile's backend, the spawn start method
(Windows, macOS), the fp16 + gradient scaler path of cards without bf16, and consoles that cannot
show Chinese."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import runtime
import train
from conftest import ROOT
from model import ModelConfig, Transformer

TINY = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64, max_seq_len=16)


class CountingTokens:
    """Rows that count up from a random start (mod 64): learnable in a few dozen steps."""
    vocab_size, batch_size, seq_len, num_tokens, tokens_per_row = 64, 4, 16, 10**6, 16

    def batch(self, i):
        start = torch.randint(0, 64, (self.batch_size, 1), generator=torch.Generator().manual_seed(i))
        x = (start + torch.arange(self.seq_len + 1)) % 64
        return {"tokens": x[:, :-1], "targets": x[:, 1:]}


def config(tmp_path, **overrides):
    return train.TrainConfig(out_dir=str(tmp_path), batch_size=4, max_steps=40, warmup_steps=1, lr=3e-3,
                             device="cpu", eval_every=1000, log_every=5, **overrides)


def losses(out_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(out_dir, "metrics.jsonl")) if "loss" in line]


def test_without_a_compile_backend_training_goes_on_eagerly_with_one_warning(tmp_path, monkeypatch, capsys):
    class NoBackend(torch.nn.Module):  # what torch.compile gives where Triton or a C++ compiler is missing
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args, **kwargs):
            raise RuntimeError("Cannot find a working triton installation. More information on installing Triton")

    torch.manual_seed(0)
    eager = Transformer(TINY)
    train.train(config(tmp_path / "eager"), eager, CountingTokens())
    capsys.readouterr()
    monkeypatch.setattr(torch, "compile", NoBackend)
    torch.manual_seed(0)
    fallback = Transformer(TINY)
    train.train(config(tmp_path / "fallback", compile=True), fallback, CountingTokens())
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: torch.compile does not work here (RuntimeError: Cannot find a working triton "
                        "installation. More information on installing Triton); continuing without it"]
    for a, b in zip(eager.state_dict().values(), fallback.state_dict().values()):
        assert torch.equal(a, b)  # the trial step left no trace: same run as without --compile


def test_fp16_with_a_gradient_scaler_trains_skips_inf_steps_and_resumes_exactly(tmp_path):
    """Cards without bf16 (RTX 20xx) train in fp16 with a GradScaler; the same path runs on CPU here."""
    inf_at = 7  # the step whose gradients overflow
    snapshots = []

    def loss_fn(model, batch):  # records the weights each step starts from
        if model.training:
            snapshots.append([p.detach().clone() for p in model.parameters()])
        return train.default_loss(model, batch)

    def run(out_dir, **overrides):
        torch.manual_seed(0)
        model = Transformer(TINY)
        calls = []

        def overflow(grad):
            calls.append(1)
            return torch.full_like(grad, float("inf")) if len(calls) == inf_at else grad
        model.norm.weight.register_hook(overflow)
        cfg = config(out_dir, dtype="float16", **overrides)
        rt = runtime.Runtime(cfg.device, cfg.dtype)
        train.train(cfg, model, CountingTokens(), rt=rt, loss_fn=loss_fn)
        return model, rt

    model, rt = run(tmp_path / "straight")
    assert rt.dtype == torch.float16 and rt.scaler.is_enabled()
    assert losses(tmp_path / "straight")[-1] < losses(tmp_path / "straight")[0] - 1.0  # it learns
    before, after = snapshots[inf_at - 1], snapshots[inf_at]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # the overflowing step was skipped
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[inf_at - 2], before))  # the others update
    assert rt.scaler.get_scale() == 2.0 ** 16 * rt.scaler.get_backoff_factor()  # and the scale came down

    run(tmp_path / "split", stop_at_step=10)
    saved = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    resumed_cfg = config(tmp_path / "split", dtype="float16", resume=True)
    model_b, start = train.resume_or_init(resumed_cfg, TINY)
    rt_b = runtime.Runtime(resumed_cfg.device, resumed_cfg.dtype)
    train.train(resumed_cfg, model_b, CountingTokens(), rt=rt_b, start=start)
    assert saved["scaler"]["scale"] == rt.scaler.get_scale()
    assert rt_b.scaler.state_dict() == rt.scaler.state_dict()
    for a, b in zip(model.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_shards_built_under_spawn_equal_those_built_under_fork(tmp_path, tokenizer_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}: the red ball rolled {i} steps. 他有三个苹果。"})
                              + "\n" for i in range(3000)), encoding="utf-8")
    shards = {}
    for method in ("fork", "spawn"):
        out = tmp_path / method
        code = (f"import multiprocessing as mp; mp.set_start_method({method!r}, force=True); import dataset; "
                f"dataset.main(['--inputs', {str(corpus)!r}, '--val_inputs', '', '--val_fraction', '0.1', "
                f"'--tokenizer', {tokenizer_path!r}, '--out_dir', {str(out)!r}, '--num_workers', '2', "
                f"'--chunk_docs', '100'])")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        shards[method] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".bin"}
    assert shards["fork"] and shards["fork"] == shards["spawn"]


CHINESE_CHATS = [{"conversations": [{"role": "user", "content": "你好，请介绍一下长城。"},
                                    {"role": "assistant", "content": "长城是中国古代的军事防御工程。"}]}] * 3


@pytest.mark.slow
def test_a_console_that_cannot_show_chinese_does_not_stop_a_script(tmp_path, tokenizer_path):
    """stdout in cp1252 (a Windows code page) and Chinese text: replacement characters, exit 0."""
    data = tmp_path / "zh.jsonl"
    data.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in CHINESE_CHATS), encoding="utf-8")
    cfg = dataclasses.replace(TINY, vocab_size=512, max_seq_len=64)
    ckpt = tmp_path / "tiny.pt"
    from model import save_checkpoint
    save_checkpoint({"model": Transformer(cfg).state_dict(), "config": dataclasses.asdict(cfg),
                     "tokenizer": tokenizer_path}, str(ckpt))
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    for script, args in (("dataset_sft.py", ["--data", str(data), "--tokenizer", tokenizer_path, "--show", "2"]),
                         ("inference_sft.py", ["--ckpt", str(ckpt), "--prompt", "长城有多长？", "--max_new_tokens", "8"])):
        r = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, cwd=tmp_path,
                           env=env, timeout=120)
        assert r.returncode == 0, r.stderr.decode("cp1252", "replace")[-2000:]
    assert b"?" in subprocess.run([sys.executable, str(ROOT / "dataset_sft.py"), "--data", str(data), "--tokenizer",
                                   tokenizer_path, "--show", "1"], capture_output=True, env=env, timeout=120).stdout
