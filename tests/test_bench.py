import subprocess
import sys

import pytest
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench import ROOFLINE_TOKENS, BenchConfig, roofline_chain
from conftest import ROOT
from model import ModelConfig, Transformer


def bench(*args):
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.splitlines()


def row(lines, name):
    """The line of that row, without its name: "value unit note"."""
    return next(line for line in lines if line.startswith(name + " "))[len(name):]


@pytest.mark.slow
def test_bench_cpu_preset_prints_every_row_and_column():
    lines = bench("--preset", "cpu", "--new_tokens", "8", "--batch_size", "2", "--seq_len", "64", "--compile", "false")
    for name in ("train, ours", "train, transformers", "memory, bf16 step", "decode, ours", "decode, transformers",
                 "decode roofline", "decode, ours, int8 weights", "decode roofline, int8 weights"):
        assert float(row(lines, name).split()[0]) > 0
    assert "of the roofline" in row(lines, "decode, ours") and "x" in row(lines, "decode, transformers")
    for name in ("train, ours", "train, transformers"):
        line = row(lines, name)
        assert "tokens/s" in line and "MFU" in line and "peak memory" in line and "GiB" in line
        assert float(line.split("peak memory ")[1].split()[0]) > 0
    assert "estimate" in row(lines, "memory, bf16 step")


def test_the_roofline_chain_multiplies_every_weight_matrix_once_per_token():
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=32))
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    with FlopCounterMode(display=False) as flops:
        roofline_chain(model, BenchConfig(device="cpu"))()
    assert flops.get_total_flops() == 2 * weights * ROOFLINE_TOKENS  # a multiply and an add per weight
    assert model.layers[0].attention.wqkv is None  # stacked on a copy: the model itself is left as it was


@pytest.mark.slow
def test_bench_memory_only_sizes_the_12gb_preset_in_seconds():
    lines = bench("--preset", "12gb", "--memory_only", "true")
    assert len(lines) == 1
    assert 1 < float(row(lines, "memory, bf16 step").split()[0]) < 7


@pytest.mark.slow
def test_bench_chat_data_rows_build_reuse_and_compare_padded_with_packed(tokenizer_path):
    lines = bench("--preset", "tiny", "--sft_mb", "0.3", "--sft_spread_mb", "0.3", "--sft_steps", "2",
                  "--tokenizer", tokenizer_path, "--seq_len", "128", "--max_seq_len", "128", "--sft_workers", "2")
    assert len(lines) == 4
    assert "2 workers" in row(lines, "chat shards, build") and "MiB" in row(lines, "chat shards, build")
    assert "reused, nothing tokenized" in row(lines, "chat shards, second launch")
    padded, packed = row(lines, "SFT step, padded"), row(lines, "SFT step, packed")
    assert float(padded.split()[0]) > 0 and float(packed.split()[0]) > 0 and "x padded" in packed
    assert int(packed.split("% of computed")[0].split()[-1]) >= 90  # packed rows are (almost) all conversation
