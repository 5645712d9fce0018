"""inference.py through its command line: streaming output, and one-line errors for bad input."""
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import inference
import quantize
from model import ModelConfig, Transformer, load_model, save_checkpoint
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=64, max_seq_len=48)


@pytest.fixture(scope="module")
def ckpt(tokenizer_path, tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY)
    path = tmp_path_factory.mktemp("inference") / "tiny.pt"
    save_checkpoint({"model": Transformer(cfg).state_dict(), "config": asdict(cfg), "step": 0,
                     "tokenizer": tokenizer_path}, str(path))
    return str(path)


def cli(*args, stdin=""):
    return subprocess.run([sys.executable, str(ROOT / "inference.py"), *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_greedy_completion_from_stdin_matches_generate(ckpt, tokenizer_path):
    result = cli("--ckpt", ckpt, "--temperature", "0", "--max_new_tokens", "12", stdin="Tom found a\n")
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr
    tok = load_tokenizer(tokenizer_path)
    model, _ = load_model(ckpt)
    prompt = inference.prompt_ids(tok, "Tom found a")
    assert prompt[0] == tok.eos_id  # the document-start convention
    new = model.generate(prompt, max_new_tokens=12, temperature=0, stop_ids=[tok.eos_id])
    assert result.stdout == "Tom found a" + tok.decode([t for t in new if t != tok.eos_id]) + "\n"


def test_streaming_prints_whole_characters(ckpt, tokenizer_path):
    """Byte tokens of one character arrive one by one; the output must still be whole characters."""
    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, s):
            self.writes.append(s)

        def flush(self):
            pass

    tok = load_tokenizer(tokenizer_path)
    whale = tok.encode("🐋")  # not in the tiny vocabulary: four byte tokens
    assert len(whale) == 4

    class Scripted:  # a "model" that generates the bytes of 🐋, a word, then the end of the document
        def generate_stream(self, ids, **kwargs):
            yield from whale + tok.encode(" ok") + [tok.eos_id]

    out = Recorder()
    cfg = inference.InferenceConfig()
    n = inference.stream_completion(Scripted(), tok, [tok.eos_id], cfg, None, out)
    assert n == len(whale) + len(tok.encode(" ok")) + 1
    assert "".join(out.writes) == "🐋 ok\n"
    assert all("\ufffd" not in w for w in out.writes)


@pytest.mark.slow
def test_sampling_is_seeded(ckpt):
    args = ("--ckpt", ckpt, "--prompt", "Lily", "--max_new_tokens", "10", "--num_samples", "2")
    a, b, c = cli(*args, "--seed", "1"), cli(*args, "--seed", "1"), cli(*args, "--seed", "2")
    assert a.returncode == 0 and a.stdout == b.stdout != c.stdout
    assert a.stdout.count("---\n") == 1


def test_shape_mismatch_is_one_line(ckpt, tmp_path):
    ckpt_dict = torch.load(ckpt, weights_only=True)
    ckpt_dict["config"]["dim"] = 64  # the tensors were made for dim 32
    bad = tmp_path / "bad.pt"
    save_checkpoint(ckpt_dict, str(bad))
    assert_one_line_error(cli("--ckpt", str(bad), "--prompt", "x"), "tok_embeddings.weight", "(512, 32)", "(512, 64)")


@pytest.mark.slow
def test_corrupt_and_missing_files_are_one_line(ckpt, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(Path(ckpt).read_bytes()[:1000])
    assert_one_line_error(cli("--ckpt", str(truncated), "--prompt", "x"), "corrupt or truncated")
    assert_one_line_error(cli("--ckpt", str(tmp_path / "none.pt"), "--prompt", "x"), "no such checkpoint")
    not_a_tokenizer = tmp_path / "tok.model"
    not_a_tokenizer.write_text("hello")
    assert_one_line_error(cli("--ckpt", ckpt, "--tokenizer", str(not_a_tokenizer), "--prompt", "x"), "tok.model")


def test_prompt_longer_than_context_is_one_line(ckpt):
    assert_one_line_error(cli("--ckpt", ckpt, "--prompt", "Tom found a red ball. " * 20), "max_seq_len")


@pytest.mark.slow
def test_compiled_int8_decoding_gives_the_eager_int8_greedy_tokens(ckpt):
    eager, tok, _ = inference.load_for_inference(inference.LoadSettings(ckpt=ckpt, device="cpu", quantize="int8"))
    compiled, _, _ = inference.load_for_inference(
        inference.LoadSettings(ckpt=ckpt, device="cpu", quantize="int8", compile=True))
    assert compiled.compiled_decoding and not eager.compiled_decoding
    prompt = inference.prompt_ids(tok, "Tom found a")
    assert compiled.generate(prompt, max_new_tokens=24, temperature=0) == \
        eager.generate(prompt, max_new_tokens=24, temperature=0)


@pytest.mark.slow
def test_quantize_and_compile_settings_are_checked(ckpt, tmp_path):
    assert_one_line_error(cli("--ckpt", ckpt, "--prompt", "a", "--quantize", "int4"), "--quantize int4")
    model, source = load_model(ckpt)
    save_checkpoint(quantize.quantized_checkpoint(quantize.quantize_model(model), source, ckpt), str(tmp_path / "q.pt"))
    assert_one_line_error(cli("--ckpt", str(tmp_path / "q.pt"), "--prompt", "a", "--max_seq_len", "96"),
                          "quantized", "--quantize int8")
    assert_one_line_error(cli("--ckpt", ckpt, "--prompt", "a", "--max_seq_len", "96", "--compile", "true"),
                          "dynamic")
