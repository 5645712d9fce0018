"""End to end on the offline data: tokenizer -> shards -> pretraining -> SFT -> distillation -> chat,
plus resume, DDP, memory estimate and gradient checkpointing."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

TINY = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--seq_len", "128",
        "--batch_size", "8", "--eval_batches", "4", "--log_every", "5"]


def run(script, *args, cwd, ok=True, env=None):
    r = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd,
                       env={**os.environ, **(env or {})}, timeout=600)
    if ok:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def metrics(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Offline data, tokenizer and shards in a scratch folder laid out like the quickstart's."""
    d = tmp_path_factory.mktemp("pipeline")
    run("download_mini_data.py", "--offline", "true", "--pretrain_mb", "1", "--n_sft", "1500", "--n_r1", "1500",
        "--n_val", "100", cwd=d)
    run("train_tokenizer.py", "--vocab_size", "1024", cwd=d)
    run("dataset.py", cwd=d)
    return d


@pytest.fixture(scope="module")
def pretrained(work):
    run("train.py", *TINY[:1], "128", *TINY[2:], "--max_steps", "150", "--eval_every", "75", "--lr", "3e-3", cwd=work)
    return work


def test_pretraining_loss_falls_well_below_start(pretrained):
    vals = [m["val_loss"] for m in metrics(pretrained / "out/pretrain") if "val_loss" in m]
    assert vals[0] > 6.0 and vals[-1] < vals[0] - 1.5, vals
    ckpt = torch.load(pretrained / "out/pretrain/last.pt", weights_only=True)
    assert ckpt["step"] == 150 and set(ckpt) >= {"model", "config", "optimizer", "rng", "data_state", "train_config"}


def test_resume_matches_an_uninterrupted_run(work):
    common = [*TINY, "--max_steps", "20", "--eval_every", "10", "--dropout", "0.1"]  # dropout: the RNG resumes too
    run("train.py", *common, "--out_dir", "out/straight", cwd=work)
    run("train.py", *common, "--out_dir", "out/split", "--stop_at_step", "10", cwd=work)
    run("train.py", *common, "--out_dir", "out/split", "--resume", "true", cwd=work)
    a = torch.load(work / "out/straight/last.pt", weights_only=True)
    b = torch.load(work / "out/split/last.pt", weights_only=True)
    assert a["step"] == b["step"] == 20
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=1e-6)


def test_resume_refuses_a_different_config(work):
    run("train.py", *TINY, "--max_steps", "4", "--out_dir", "out/cfg", cwd=work)
    r = run("train.py", *TINY[:1], "96", *TINY[2:], "--max_steps", "8", "--out_dir", "out/cfg", "--resume", "true",
            cwd=work, ok=False)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: out/cfg/last.pt was trained with dim=64 but this run has dim=96")
    r = run("train.py", *TINY, "--max_steps", "4", "--out_dir", "out/cfg", cwd=work, ok=False)
    assert "pass --resume true" in r.stderr and r.returncode != 0


def test_missing_shards_and_corrupt_checkpoint(work, tmp_path):
    r = run("train.py", *TINY, "--train_data", "nothing/*.bin", "--out_dir", str(tmp_path / "o"), cwd=work, ok=False)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error:")
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    r = run("train.py", *TINY, "--out_dir", str(tmp_path / "o2"), "--resume", "true", cwd=work, ok=False)
    assert r.returncode != 0 and "not a readable checkpoint" in r.stderr.strip().splitlines()[-1]


def test_nan_loss_stops_with_last_good_checkpoint(work):
    run("train.py", *TINY, "--max_steps", "30", "--stop_at_step", "5", "--out_dir", "out/nan", cwd=work)
    good = torch.load(work / "out/nan/last.pt", weights_only=True)
    r = run("train.py", *TINY, "--max_steps", "30", "--eval_every", "5", "--lr", "1e12", "--grad_clip", "0",
            "--out_dir", "out/nan", "--resume", "true", cwd=work, ok=False)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: loss is nan at step")
    ckpt = torch.load(work / "out/nan/last.pt", weights_only=True)
    assert ckpt["step"] == good["step"] == 5
    for name in good["model"]:
        assert torch.equal(good["model"][name], ckpt["model"][name])


def test_ddp_two_gloo_processes_match_one_process(work):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not installed")
    common = [*TINY[:-4], "--eval_batches", "2", "--log_every", "1", "--max_steps", "6", "--eval_every", "6"]
    run("train.py", *common, "--batch_size", "8", "--out_dir", "out/one", cwd=work)
    r = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29533", str(ROOT / "train.py"), *common,
                        "--batch_size", "4", "--out_dir", "out/two", "--device", "cpu"],
                       capture_output=True, text=True, cwd=work, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    one = [m["loss"] for m in metrics(work / "out/one") if "loss" in m]
    two = [m["loss"] for m in metrics(work / "out/two") if "loss" in m]
    assert len(one) == len(two) == 6
    assert one == pytest.approx(two, abs=2e-4)


def test_sft_chat_and_distillation(pretrained):
    w = pretrained
    run("train_sft.py", "--batch_size", "8", "--max_steps", "120", "--eval_every", "60", "--eval_batches", "4",
        "--lr", "2e-3", cwd=w)
    r = run("inference_sft.py", "--ckpt", "out/sft/best.pt", "--prompt", "Hello! How are you?", "--temperature", "0",
            "--max_new_tokens", "60", cwd=w)
    assert r.stdout.strip() and "<|im_start|>" not in r.stdout
    # it stopped at <|im_end|> rather than running on to the token limit
    from dataset_sft import load_tokenizer
    assert len(load_tokenizer(str(w / "data/tokenizer.model")).encode(r.stdout.strip())) < 58
    r = run("distill.py", "--batch_size", "8", "--max_steps", "120", "--eval_every", "120", "--eval_batches", "4",
            "--lr", "3e-3", "--eval_problems", "10", "--eval_max_new_tokens", "64", cwd=w)
    before = float(r.stdout.split("before distillation: well-formed <think> ")[1].split("%")[0])
    after = float(r.stdout.split("after distillation:  well-formed <think> ")[1].split("%")[0])
    assert after > before, r.stdout


class RandomTokens:
    """Stands in for TokenShards: batch i is a fixed random (tokens, targets) pair."""

    def __init__(self, vocab_size, batch_size, seq_len):
        self.vocab_size, self.batch_size, self.seq_len = vocab_size, batch_size, seq_len

    def batch(self, i):
        x = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len + 1),
                          generator=torch.Generator().manual_seed(i))
        return x[:, :-1], x[:, 1:]


# The factor within which the training scripts' memory estimate must match the measured peak.
ESTIMATE_FACTOR = (0.9, 1.15)


def preset_model(p):
    """The model of a train.py preset, with the default tokenizer's vocabulary."""
    from model import ModelConfig
    return ModelConfig(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"],
                       vocab_size=4096, max_seq_len=p["seq_len"])


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_memory_estimate_is_close_to_the_peak_of_the_cpu_training_loop(tmp_path, grad_checkpointing):
    """The estimate against the bytes of tensors alive at the peak of train.train(), cpu preset, fp32."""
    import train
    from bench import PeakMemory
    from model import Transformer
    p = train.PRESETS["cpu"]
    cfg = train.TrainConfig(out_dir=str(tmp_path), batch_size=p["batch_size"], grad_accum=2, max_steps=2,
                            warmup_steps=1, eval_every=100, log_every=1, device="cpu",
                            grad_checkpointing=grad_checkpointing)
    model_cfg = preset_model(p)
    with PeakMemory() as meter:
        train.train(cfg, Transformer(model_cfg), RandomTokens(4096, p["batch_size"], p["seq_len"]))
    estimate = sum(train.estimate_memory(model_cfg, p["batch_size"], p["seq_len"], torch.float32,
                                         grad_checkpointing).values())
    assert ESTIMATE_FACTOR[0] < estimate / meter.peak < ESTIMATE_FACTOR[1], (estimate, meter.peak)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_memory_estimate_is_close_to_a_simulated_12gb_step(dtype, grad_checkpointing):
    """The 12gb preset in low precision, on fake tensors (no memory, no arithmetic): the estimate
    matches, and the step stays under the 11 GiB the preset promises."""
    import train
    from bench import BenchConfig, simulated_peak
    p = train.PRESETS["12gb"]
    model_cfg = preset_model(p)
    bench_cfg = BenchConfig(batch_size=p["batch_size"], seq_len=p["seq_len"], grad_accum=2,
                            grad_checkpointing=grad_checkpointing)
    peak = simulated_peak(model_cfg, bench_cfg, dtype)
    estimate = sum(train.estimate_memory(model_cfg, p["batch_size"], p["seq_len"], dtype,
                                         grad_checkpointing).values())
    assert ESTIMATE_FACTOR[0] < estimate / peak < ESTIMATE_FACTOR[1], (estimate, peak)
    assert peak < 11 * 2**30


def test_grad_checkpointing_gives_same_loss_and_gradients():
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=32))
    x = torch.randint(0, 100, (2, 33))
    results = []
    for flag in (False, True):
        model.zero_grad()
        model.grad_checkpointing = flag
        loss = model(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
