import importlib.util
import os
import subprocess
import sys

import pytest
from torch import nn

from bench import bytes_per_token
from conftest import ROOT
from model import ModelConfig, Transformer
from quantize import quantize_model


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
                 "decode bound", "decode, ours, int8 weights", "decode bound, int8 weights"):
        assert float(row(lines, name).split()[0]) > 0
    assert "of the bound" in row(lines, "decode, ours") and "x" in row(lines, "decode, transformers")
    assert "GB/s" in row(lines, "decode bound") and "MB a token" in row(lines, "decode bound")
    for name in ("train, ours", "train, transformers"):
        line = row(lines, name)
        assert "tokens/s" in line and "MFU" in line and "peak memory" in line and "GiB" in line
        assert float(line.split("peak memory ")[1].split()[0]) > 0
    assert "estimate" in row(lines, "memory, bf16 step")


def test_the_decode_bound_reads_every_weight_and_the_cache_once_a_token():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=32)
    model = Transformer(cfg)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))  # the tied head included
    cache = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 20  # keys and values of 20 positions
    assert bytes_per_token(model, 20) == 4 * (weights + cache)
    scales = sum(m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    assert bytes_per_token(quantize_model(model), 20) == weights + 4 * scales + 4 * cache  # int8 and float scales


def test_the_decode_bound_of_a_mixture_reads_a_tokens_experts_only():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=32, n_experts=4,
                      n_experts_per_tok=2, moe_hidden_dim=48)
    dense = Transformer(ModelConfig(**{**cfg.__dict__, "n_experts": 0, "hidden_dim": 96}))
    routers = 2 * 4 * 64 * 4  # bytes of the two routers
    assert bytes_per_token(Transformer(cfg), 20) == bytes_per_token(dense, 20) + routers


def test_bench_of_a_mixture_counts_active_weights_and_estimates_its_memory():
    lines = bench("--preset", "tiny", "--n_experts", "4", "--moe_hidden_dim", "32", "--llama_cpp", "false",
                  "--new_tokens", "8")
    assert "active a token" in lines[0] and "decode, transformers" not in "\n".join(lines)
    assert float(row(lines, "train, ours").split()[0]) > 0 and "MFU" in row(lines, "train, ours")
    assert "estimate" in row(lines, "memory, bf16 step") and float(row(lines, "decode, ours").split()[0]) > 0


def test_bench_serving_rows_batch_streams_together(tokenizer_path):
    lines = bench("--preset", "tiny", "--decode_only", "true", "--llama_cpp", "false", "--hf", "false",
                  "--serve_streams", "1,4", "--tokenizer", tokenizer_path)
    assert "train, ours" not in "\n".join(lines)
    for name in ("serve, 1 stream at once", "serve, 4 streams at once"):
        assert float(row(lines, name).split()[0]) > 0 and "first token after" in row(lines, name)
    assert "1.00x one stream" in row(lines, "serve, 1 stream at once")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or
                    not os.path.isfile(os.path.join(os.environ.get("LLAMA_CPP_DIR", ""), "convert_hf_to_gguf.py")),
                    reason="needs llama-cpp-python and LLAMA_CPP_DIR (a llama.cpp source tree), as .ci/run installs")
def test_bench_times_llama_cpp_on_the_same_weights(tokenizer_path):
    lines = bench("--preset", "tiny", "--decode_only", "true", "--hf", "false", "--tokenizer", tokenizer_path)
    for name in ("decode, llama.cpp f32", "decode, llama.cpp q8_0"):
        assert float(row(lines, name).split()[0]) > 0 and "of the bound" in row(lines, name)
    assert "x llama.cpp f32" in row(lines, "decode, ours")
    assert "x llama.cpp q8_0" in row(lines, "decode, ours, int8 weights")


def test_bench_without_llama_cpp_says_why(tmp_path):
    lines = bench("--preset", "tiny", "--decode_only", "true", "--hf", "false", "--tokenizer", str(tmp_path / "no"))
    assert not any(line.startswith("decode, llama.cpp") for line in lines)
    assert any(line.startswith("note: no llama.cpp rows: ") for line in lines)


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
