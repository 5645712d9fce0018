"""lora.py and LoRA fine-tuning: step 0 is the base, only adapters train, merge / HF / PEFT give the same
logits, exact resume, adapter-only checkpoints, and a wrong base refused in one line."""
import importlib.util
import json
import os
import random
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import lora
import runtime
from conftest import ROOT
from model import ModelConfig, ModelError, Transformer, read_checkpoint, save_checkpoint
from train_sft import SFTConfig, sft

SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=96)


def write_chats(path, n=60, seed=0):
    rng = random.Random(seed)
    words = ["Tom", "found", "a", "red", "ball", "in", "the", "park", "Lily", "painted", "boat", "three", "apples"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            q = " ".join(rng.choices(words, k=rng.randint(2, 6)))
            a = " ".join(rng.choices(words, k=rng.randint(2, 10)))
            f.write(json.dumps({"conversations": [{"role": "user", "content": f"{q}?"},
                                                  {"role": "assistant", "content": a}]}) + "\n")
    return str(path)


def make_base(path, vocab_size, tokenizer, tie=True, seed=0, **extra):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**SHAPE, vocab_size=vocab_size, tie_embeddings=tie))
    save_checkpoint({"model": model.state_dict(), "config": asdict(model.cfg), "step": 0, "tokenizer": tokenizer,
                     **extra}, str(path))
    return str(path)


def lora_config(tmp_path, base, tokenizer, out="lora", **overrides):
    data = write_chats(tmp_path / "chats.jsonl")
    values = dict(init_from=base, train_data=data, val_data="", tokenizer=tokenizer, out_dir=str(tmp_path / out),
                  batch_size=4, max_steps=4, warmup_steps=1, lr=1e-2, eval_every=2, log_every=1, device="cpu",
                  lora_rank=4, lora_alpha=8.0)
    return SFTConfig(**{**values, **overrides})


def test_adapter_count_of_rank_16_on_tinyllama():
    """The README's checkpoint size: 12.6M adapter weights (x 4 bytes, x 3 with AdamW's moments: 144 MiB), and
    lora_params (the memory estimate's count) equal to the adapters add_lora makes."""
    tinyllama = ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, vocab_size=32000,
                            tie_embeddings=False)
    with torch.device("meta"):
        model = lora.add_lora(Transformer(tinyllama), rank=16, alpha=32.0)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapters == lora.lora_params(tinyllama, 16)
    assert round(adapters / 1e5) == 126 and round(adapters * 12 / 2**20) == 144
    assert round(adapters / (model.num_params() - adapters), 4) == 0.0115


def test_step_zero_is_the_base_model_exactly():
    torch.manual_seed(0)
    base = Transformer(ModelConfig(**SHAPE, vocab_size=100, tie_embeddings=False)).eval()
    tokens = torch.randint(0, 100, (2, 20))
    expected = base(tokens)[0]
    lora.add_lora(base, rank=4, alpha=8.0)
    assert torch.equal(base(tokens)[0], expected)  # B starts at zero: the update adds exactly 0
    assert all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n, p in base.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("tie", [True, False])
def test_new_token_rows_start_as_the_base_rows(tie):
    torch.manual_seed(0)
    base = Transformer(ModelConfig(**SHAPE, vocab_size=100, tie_embeddings=tie)).eval()
    tokens = torch.tensor([[1, 97, 5, 98, 99, 3]])
    expected = base(tokens)[0]
    lora.add_lora(base, rank=4, alpha=8.0, new_token_ids=[97, 98, 99])
    trained = {n for n, p in base.named_parameters() if p.requires_grad}
    assert ("tok_embeddings.rows" in trained) and (("output.rows" in trained) != tie)
    torch.testing.assert_close(base(tokens)[0], expected, atol=1e-6, rtol=0)


def test_lora_run_trains_only_adapters_and_merging_keeps_its_logits(tmp_path, tokenizer_path):
    base_path = make_base(tmp_path / "base.pt", 512, tokenizer_path)
    base_state = read_checkpoint(base_path)["model"]
    sft(lora_config(tmp_path, base_path, tokenizer_path))
    ckpt = read_checkpoint(str(tmp_path / "lora" / "last.pt"))
    assert ckpt["lora"]["base"] == base_path and ckpt["lora"]["rank"] == 4
    assert set(ckpt["model"]) == {f"layers.{i}.{m}.lora_{ab}" for i in range(2) for m in
                                  ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                   "feed_forward.w1", "feed_forward.w2", "feed_forward.w3") for ab in "AB"}
    assert os.path.getsize(tmp_path / "lora" / "last.pt") < os.path.getsize(base_path) / 2

    model = lora.with_adapters(ckpt, "last.pt").eval()
    for name, tensor in base_state.items():  # every base weight bit-identical after training
        module_path = name.rsplit(".", 1)
        wrapped = f"{module_path[0]}.base.{module_path[1]}"
        state = model.state_dict()
        assert torch.equal(state[wrapped] if wrapped in state else state[name], tensor), name
    assert all(ckpt["model"][n].abs().sum() > 0 for n in ckpt["model"] if n.endswith("lora_B"))  # B trained

    tokens = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        unmerged = model(tokens)[0]
        merged_model, _ = lora.load_merged(str(tmp_path / "lora" / "last.pt"))
        merged = merged_model.eval()(tokens)[0]
    assert not any(isinstance(m, (lora.LoRALinear, lora.TrainedRows)) for m in merged_model.modules())
    assert set(merged_model.state_dict()) == set(base_state)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_lora_resume_is_bit_for_bit(tmp_path, tokenizer_path):
    base_path = make_base(tmp_path / "base.pt", 512, tokenizer_path)
    sft(lora_config(tmp_path, base_path, tokenizer_path, out="straight"))
    sft(lora_config(tmp_path, base_path, tokenizer_path, out="split", stop_at_step=2))
    sft(lora_config(tmp_path, base_path, tokenizer_path, out="split", resume=True))
    straight = read_checkpoint(str(tmp_path / "straight" / "last.pt"))
    split = read_checkpoint(str(tmp_path / "split" / "last.pt"))
    assert straight["model"].keys() == split["model"].keys()
    assert all(torch.equal(straight["model"][k], split["model"][k]) for k in straight["model"])
    assert split["lora"] == straight["lora"]  # the resumed run records its base as the first did
    lora.load_merged(str(tmp_path / "split" / "last.pt"))


def test_resume_refuses_other_lora_settings(tmp_path, tokenizer_path):
    base_path = make_base(tmp_path / "base.pt", 512, tokenizer_path)
    sft(lora_config(tmp_path, base_path, tokenizer_path, max_steps=2))
    with pytest.raises(Exception, match="trained LoRA rank=4.*asks for LoRA rank=8"):
        sft(lora_config(tmp_path, base_path, tokenizer_path, max_steps=4, resume=True, lora_rank=8))
    with pytest.raises(Exception, match="asks for every weight"):
        sft(lora_config(tmp_path, base_path, tokenizer_path, max_steps=4, resume=True, lora_rank=0))


@pytest.mark.slow
def test_adapters_on_the_wrong_base_are_one_line(tmp_path, tokenizer_path):
    base_path = make_base(tmp_path / "base.pt", 512, tokenizer_path)
    sft(lora_config(tmp_path, base_path, tokenizer_path, max_steps=2))
    last = str(tmp_path / "lora" / "last.pt")
    other = make_base(tmp_path / "other.pt", 512, tokenizer_path, seed=1)
    with pytest.raises(ModelError, match="trained on .*base.pt .*other.pt is a different file"):
        lora.load_merged(last, base=other)
    result = subprocess.run([sys.executable, str(ROOT / "convert_hf.py"), "--merge_lora", last, "--base", other],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "different file" in result.stderr
    os.remove(base_path)
    with pytest.raises(ModelError, match="does not exist"):
        lora.load_merged(last)


@pytest.mark.slow
def test_merge_command_writes_a_plain_checkpoint(tmp_path, tokenizer_path):
    base_path = make_base(tmp_path / "base.pt", 512, tokenizer_path)
    sft(lora_config(tmp_path, base_path, tokenizer_path, max_steps=2))
    last = str(tmp_path / "lora" / "last.pt")
    result = subprocess.run([sys.executable, str(ROOT / "convert_hf.py"), "--merge_lora", last], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    from model import load_model
    merged, ckpt = load_model(str(tmp_path / "lora" / "last_merged.pt"))
    assert ckpt["tokenizer"] == tokenizer_path
    with pytest.raises(ModelError, match="holds LoRA adapters, not a whole model"):
        load_model(last)


def assert_exports_give_the_same_logits(tmp_path, base_path: str, last: str, tokens):
    """The LoRA checkpoint's logits, unmerged, equal those of its merged HF export (transformers) and of its PEFT
    adapters loaded with peft onto the base's HF export."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import convert_hf
    model = lora.with_adapters(read_checkpoint(last), last).eval()
    with torch.no_grad():
        expected = model(tokens)[0]
    convert_hf.main(["--to_hf", last, "--out", str(tmp_path / "merged_hf")])  # merged on export
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged_hf")).eval()
    convert_hf.main(["--to_hf", base_path, "--out", str(tmp_path / "base_hf")])
    convert_hf.main(["--to_peft", last, "--out", str(tmp_path / "adapter")])
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base_hf"))
    with_peft = peft.PeftModel.from_pretrained(base_hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        for hf in (merged, with_peft):
            torch.testing.assert_close(hf(tokens).logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_hf_export_and_peft_adapters_give_the_lora_models_logits(tmp_path, tokenizer_path, tie):
    base_path = make_base(tmp_path / "base.pt", 512, tokenizer_path, tie=tie, added_token_ids=[500, 510])
    sft(lora_config(tmp_path, base_path, tokenizer_path, max_steps=3))
    last = str(tmp_path / "lora" / "last.pt")
    ckpt = read_checkpoint(last)
    assert ckpt["lora"]["new_token_ids"] == [500, 510]
    assert not torch.equal(ckpt["model"]["tok_embeddings.rows"], read_checkpoint(base_path)["model"][
        "tok_embeddings.weight"][[500, 510]])  # the new tokens' rows trained
    assert_exports_give_the_same_logits(tmp_path, base_path, last, torch.tensor([[1, 500, 7, 9, 510, 11, 40, 3, 500]]))


def test_an_imported_tokenizer_json_model_gets_the_markers_and_fine_tunes_with_lora(tmp_path, hf_tokenizer_json):
    """A SmolLM2-like import: byte-level BPE tokenizer.json without chat markers -> the 8 special pieces (chat
    markers, think and tool tags) added and rows grown -> LoRA SFT with that tokenizer (the new rows trained) -> merged
    and PEFT exports with the same logits, and an exported tokenizer whose chat template gives our ids."""
    transformers = pytest.importorskip("transformers")
    import shutil

    import convert_hf
    from tokenizer import render_prompt
    from records import file_sha256
    from tokenizer import load_tokenizer
    vocab = load_tokenizer(hf_tokenizer_json).vocab_size
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=96, tie_word_embeddings=True))
    hf.save_pretrained(str(tmp_path / "hf"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(os.path.dirname(hf_tokenizer_json), name), tmp_path / "hf")
    base_path = str(tmp_path / "base.pt")
    convert_hf.main(["--from_hf", str(tmp_path / "hf"), "--out", base_path])
    base = read_checkpoint(base_path)
    new_ids = list(range(vocab, vocab + 8))
    tokenizer = str(tmp_path / "base_tokenizer" / "tokenizer.json")
    assert base["tokenizer"] == tokenizer and base["added_token_ids"] == new_ids
    assert base["config"]["vocab_size"] == vocab + 8
    embedding = base["model"]["tok_embeddings.weight"]
    assert torch.equal(embedding[new_ids], embedding[:vocab].mean(0).expand(8, -1))
    base_sha = file_sha256(base_path)

    sft(lora_config(tmp_path, base_path, "", max_steps=3))  # no --tokenizer: the one the import names
    last = str(tmp_path / "lora" / "last.pt")
    assert read_checkpoint(last)["tokenizer"] == tokenizer
    rows = read_checkpoint(last)["model"]["tok_embeddings.rows"]
    assert rows.shape == (8, 64) and not torch.equal(rows, embedding[new_ids])
    assert file_sha256(base_path) == base_sha

    tok = load_tokenizer(tokenizer)
    messages = [{"role": "user", "content": "Tom found three apples."}]
    ours = render_prompt(tok, messages)
    assert_exports_give_the_same_logits(tmp_path, base_path, last, torch.tensor([ours]))
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "merged_hf"))
    theirs = exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert list(getattr(theirs, "input_ids", theirs)) == ours


@pytest.mark.parametrize("base_quant", ["", pytest.param("nf4", marks=pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="an NF4 base needs torchao"))])
def test_memory_estimate_of_a_lora_run_is_close_to_the_cpu_loops_peak(tmp_path, base_quant):
    """fp32 on CPU: the frozen base (with NF4, its 4-bit projections and the dequantized weight of the projection
    being computed), adapters with gradients and AdamW state, activations."""
    import train
    from bench import PeakMemory
    from conftest import RandomTokens
    model_cfg = ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096, max_seq_len=256)
    cfg = train.TrainConfig(out_dir=str(tmp_path), batch_size=4, max_steps=2, warmup_steps=1, eval_every=100,
                            log_every=1, device="cpu")
    with PeakMemory() as meter:
        model = lora.add_lora(Transformer(model_cfg), rank=16, alpha=32.0, base_quant=base_quant)
        meter.peak = meter.live  # the base's construction, before training, is not the step's
        train.train(cfg, model, RandomTokens(model_cfg.vocab_size, 4, 256))
    estimate = sum(runtime.estimate_memory(model_cfg, 4, 256, torch.float32, adapters=lora.lora_params(model_cfg, 16),
                                           base_quant=base_quant).values())
    assert 0.9 < estimate / meter.peak < 1.15, (estimate, meter.peak)


@pytest.mark.parametrize("shape, gib", [("smollm2-360m", 1.41), ("tinyllama-1.1b", 2.97), ("llama3.2-1b", 3.21),
                                        ("smollm2-1.7b", 4.32), ("llama3.2-3b", 7.52)])
@pytest.mark.slow
def test_lora_preset_fits_every_shape_simulated_and_the_estimate_agrees(shape, gib):
    """The README's table: train_sft.py --preset 12gb_lora on these shapes, a bf16 step on fake tensors (the loss
    chunked: Transformer.logprobs_of), and the estimate within 10%."""
    from bench import PRESETS, BenchConfig, simulated_peak
    from train_sft import PRESETS as SFT_PRESETS
    p = {k: v for k, v in PRESETS[shape].items() if k in BenchConfig.__dataclass_fields__}
    lora_preset = SFT_PRESETS["12gb_lora"]
    assert (p["lora_rank"], p["batch_size"], p["seq_len"], p["grad_checkpointing"]) == (
        lora_preset["lora_rank"], lora_preset["batch_size"], lora_preset["seq_len"], lora_preset["grad_checkpointing"])
    bench_cfg = BenchConfig(**p)
    model_cfg = ModelConfig(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"],
                            vocab_size=p["vocab_size"], hidden_dim=p["hidden_dim"],
                            tie_embeddings=p.get("tie_embeddings", True), max_seq_len=p["max_seq_len"])
    peak = simulated_peak(model_cfg, bench_cfg)
    estimate = sum(runtime.estimate_memory(model_cfg, p["batch_size"], p["seq_len"], torch.bfloat16, True,
                                           adapters=lora.lora_params(model_cfg, p["lora_rank"])).values())
    assert round(peak / 2**30, 2) == gib
    assert 0.9 < estimate / peak < 1.1, (estimate, peak)


def test_inference_loads_a_lora_checkpoint_merged(tmp_path, tokenizer_path):
    from inference import LoadSettings, load_for_inference
    base_path = make_base(tmp_path / "base.pt", 512, tokenizer_path)
    sft(lora_config(tmp_path, base_path, tokenizer_path, max_steps=2))
    last = str(tmp_path / "lora" / "last.pt")
    model, tok, _ = load_for_inference(LoadSettings(ckpt=last, device="cpu"))  # the tokenizer the run recorded
    assert tok.path == tokenizer_path
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    tokens = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens)[0], lora.with_adapters(read_checkpoint(last), last).eval()(
            tokens)[0], atol=1e-5, rtol=0)


def test_a_lora_run_can_extend_the_context_resume_and_merge(tmp_path, tokenizer_path):
    base_path = make_base(tmp_path / "base.pt", 512, tokenizer_path)  # trained at 96 tokens
    sft(lora_config(tmp_path, base_path, tokenizer_path, max_steps=2, seq_len=128, rope_scaling="yarn"))
    sft(lora_config(tmp_path, base_path, tokenizer_path, max_steps=4, seq_len=128, rope_scaling="yarn",
                         resume=True))
    model, ckpt = lora.load_merged(str(tmp_path / "lora" / "last.pt"))
    assert ckpt["step"] == 4 and model.cfg.max_seq_len == 128
    assert model.cfg.rope_scaling == {"rope_type": "yarn", "factor": 128 / 96, "original_max_position_embeddings": 96}
