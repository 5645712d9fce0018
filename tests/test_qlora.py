"""QLoRA (lora.py base_quant "nf4"): the NF4 format against the paper's definition and torchao, a run that trains
only adapters and leaves the 4-bit base bit-identical, merged exports with the QLoRA model's logits, exact resume,
and the memory figures (README: QLoRA)."""
import os

import pytest
import torch

pytest.importorskip("torchao")

import lora  # noqa: E402
import runtime  # noqa: E402
from model import Linear, ModelConfig, ModelError, Transformer, read_checkpoint  # noqa: E402
from test_lora import SHAPE, lora_config, make_base  # noqa: E402
from train_sft import SFTConfig, sft  # noqa: E402

# the 16 values of NormalFloat4 (Dettmers et al. 2023, appendix E), rounded as the paper prints them
NF4_CODE = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461,
                         0.3379, 0.4407, 0.5626, 0.7230, 1.0])


def nf4_parts(model) -> dict:
    """Every stored tensor of every NF4 weight, cloned: codes, quantized scales, their factors and means."""
    return {f"{name}.{part}": getattr(p, part).clone() for name, p in model.named_parameters()
            if type(p).__name__ == "NF4Tensor"
            for part in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean")}


def test_nf4_round_trip_is_the_papers_code_within_its_bound_and_torchaos_reference():
    torch.manual_seed(0)
    weight = torch.randn(256, 512) * 0.02
    layer = lora.NF4Linear(lora.to_nf4(weight))
    q = layer.weight
    restored = q.get_original_weight()
    blocks = weight.reshape(-1, lora.NF4_BLOCK)  # (2048, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    # the codes: each weight's nearest of the 16 values once its block is divided by the block's absmax
    nearest = (blocks / absmax).reshape(-1, 1).sub(NF4_CODE).abs().argmin(1).to(torch.uint8)
    assert torch.equal(q.quantized_data, nearest[::2] << 4 | nearest[1::2])
    # the bound: half the widest gap between neighbouring values (-1.0 -> -0.6962) times the block's absmax, plus
    # the error of the block's 8-bit scale: one step (its group's largest distance from the scales' mean / 128; a
    # whole step, as that largest one is clamped from 128 to 127 steps)
    scales = absmax.flatten() - absmax.mean()
    step = scales.reshape(-1, 256).abs().amax(1).repeat_interleave(256) / 128
    bound = NF4_CODE.diff().max() / 2 * absmax + step[:, None] + 1e-7
    assert ((restored.reshape(-1, lora.NF4_BLOCK) - blocks).abs() <= bound).all()
    from torchao.quantization import to_nf4  # QLoRA's settings: blocks of 64, scales quantized in groups of 256
    assert torch.equal(restored, to_nf4(weight, 64, 256).get_original_weight())
    assert torch.equal(layer.dequantized().weight, restored)


def test_small_projections_group_their_scales_and_odd_sizes_are_refused():
    small = lora.NF4Linear(lora.to_nf4(Linear(64, 32).weight))  # 32 blocks: the scales quantized as one group of 32
    assert small.weight.scaler_block_size == 32
    torch.testing.assert_close(small.dequantized().weight, small.weight.get_original_weight())
    with pytest.raises(ModelError, match="multiple of 64 weights, but one has shape \\(3, 20\\)"):
        lora.to_nf4(Linear(20, 3).weight)
    with pytest.raises(ModelError, match="unknown base quantization 'int4'"):
        lora.add_lora(Transformer(ModelConfig(**SHAPE, vocab_size=100)), rank=4, alpha=8.0, base_quant="int4")


def test_only_projections_are_quantized_and_the_rest_stays_float():
    torch.manual_seed(0)
    model = lora.add_lora(Transformer(ModelConfig(**SHAPE, vocab_size=100)), rank=4, alpha=8.0, targets=("wq", "wv"),
                          base_quant="nf4")
    quantized = {name for name, p in model.named_parameters() if type(p).__name__ == "NF4Tensor"}
    assert quantized == {f"layers.{i}.{m}" for i in range(2) for m in (
        "attention.wq.base.weight", "attention.wk.weight", "attention.wv.base.weight", "attention.wo.weight",
        "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight")}
    lora.cast_frozen(model, torch.bfloat16)  # (the compute dtype on CUDA) leaves the codes alone
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.layers[0].attention.wk.weight.quantized_data.dtype == torch.uint8


def test_a_qlora_step_trains_only_adapters_and_leaves_the_4bit_base_bit_identical(tmp_path):
    import train
    from conftest import RandomTokens
    torch.manual_seed(0)
    model = lora.add_lora(Transformer(ModelConfig(**SHAPE, vocab_size=512)), rank=4, alpha=8.0, base_quant="nf4")
    before, frozen = nf4_parts(model), {n: p.clone() for n, p in model.named_parameters()
                                        if not p.requires_grad and type(p).__name__ != "NF4Tensor"}
    cfg = train.TrainConfig(out_dir=str(tmp_path), batch_size=4, max_steps=3, warmup_steps=1, eval_every=100,
                            log_every=1, lr=1e-2, device="cpu")
    train.train(cfg, model, RandomTokens(512, 4, 32))
    assert len(before) == 2 * 7 * 4 and all(torch.equal(before[k], v) for k, v in nf4_parts(model).items())
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)  # norms, embedding
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith(("lora_A", "lora_B")) for n in trained)
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))  # B moved off 0


def test_a_qlora_run_records_its_base_and_merges_to_its_logits(tmp_path, tokenizer_path):
    """The checkpoint holds adapters only and says its base is NF4; the merged model (what inference, --merge_lora
    and --to_hf load) gives the QLoRA model's logits. Both compute the same dequantized base weights (the codes are
    made from the float base on the CPU in fp32, the same on every load), so only float rounding of W x + B A x
    against (W + B A) x separates them: 1e-5. Against the float base the merge differs by the 4-bit rounding."""
    base_path = make_base(tmp_path / "base.pt", 512, tokenizer_path)
    sft(lora_config(tmp_path, base_path, tokenizer_path, base_quant="nf4"))
    last = str(tmp_path / "lora" / "last.pt")
    ckpt = read_checkpoint(last)
    assert ckpt["lora"]["base_quant"] == "nf4" and all(k.endswith(("lora_A", "lora_B")) for k in ckpt["model"])
    qlora = lora.with_adapters(ckpt, last).eval()
    assert nf4_parts(qlora)
    merged, _ = lora.load_merged(last)
    assert not nf4_parts(merged) and all(p.dtype == torch.float32 for p in merged.parameters())
    tokens = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        expected = qlora(tokens)[0]
        torch.testing.assert_close(merged.eval()(tokens)[0], expected, atol=1e-5, rtol=0)
        with lora.adapters_off(qlora):
            base_logits = qlora(tokens)[0]
        float_base = lora.load_merged(base_path)[0].eval()(tokens)[0]
    assert 1e-3 < (base_logits - float_base).abs().max() < 0.1 * float_base.abs().max()


def test_hf_export_of_a_qlora_run_gives_its_logits(tmp_path, tokenizer_path):
    transformers = pytest.importorskip("transformers")
    import convert_hf
    base_path = make_base(tmp_path / "base.pt", 512, tokenizer_path)
    sft(lora_config(tmp_path, base_path, tokenizer_path, max_steps=3, base_quant="nf4"))
    last = str(tmp_path / "lora" / "last.pt")
    tokens = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        expected = lora.with_adapters(read_checkpoint(last), last).eval()(tokens)[0]
    convert_hf.main(["--to_hf", last, "--out", str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, expected, atol=1e-4, rtol=0)


def test_qlora_resume_is_bit_for_bit(tmp_path, tokenizer_path):
    base_path = make_base(tmp_path / "base.pt", 512, tokenizer_path)
    sft(lora_config(tmp_path, base_path, tokenizer_path, out="straight", base_quant="nf4"))
    sft(lora_config(tmp_path, base_path, tokenizer_path, out="split", stop_at_step=2, base_quant="nf4"))
    sft(lora_config(tmp_path, base_path, tokenizer_path, out="split", resume=True, base_quant="nf4"))
    straight = read_checkpoint(str(tmp_path / "straight" / "last.pt"))
    split = read_checkpoint(str(tmp_path / "split" / "last.pt"))
    assert straight["model"].keys() == split["model"].keys()
    assert all(torch.equal(straight["model"][k], split["model"][k]) for k in straight["model"])
    with pytest.raises(Exception, match="trained LoRA .*base_quant=nf4 but this run asks for LoRA .*base_quant="):
        sft(lora_config(tmp_path, base_path, tokenizer_path, out="split", resume=True, max_steps=6))


def test_base_quant_settings_that_cannot_work_are_one_line_errors():
    from cli import UserError
    with pytest.raises(UserError, match="--base_quant nf4 quantizes the frozen base of a LoRA run: add --lora_rank"):
        SFTConfig(base_quant="nf4").lora()
    with pytest.raises(UserError, match="--base_quant 'int8': use nf4"):
        SFTConfig(base_quant="int8", lora_rank=4).lora()


@pytest.mark.parametrize("shape, gib", [("llama3.2-3b", 4.02), ("mistral-7b", 7.22), ("llama3.1-8b", 8.68)])
@pytest.mark.slow
def test_qlora_preset_fits_3b_to_8b_simulated_and_the_estimate_agrees(shape, gib):
    """The README's table: train_sft.py --preset 12gb_qlora (LoRA rank 16, 4 x 1,024 tokens, checkpointing, bf16,
    an NF4 base) on these shapes, a step on fake tensors, within the goals (3B <= 7 GiB, 8B <= 11 GiB), and the
    estimate within 10%."""
    from dataclasses import replace

    from bench import PRESETS, BenchConfig, simulated_peak
    from train_sft import PRESETS as SFT_PRESETS
    p = {k: v for k, v in PRESETS[shape].items() if k in BenchConfig.__dataclass_fields__}
    qlora = SFT_PRESETS["12gb_qlora"]
    assert qlora["base_quant"] == "nf4" and (p["lora_rank"], p["batch_size"], p["seq_len"]) == (
        qlora["lora_rank"], qlora["batch_size"], qlora["seq_len"])
    bench_cfg = replace(BenchConfig(**p), base_quant="nf4")
    model_cfg = ModelConfig(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"],
                            vocab_size=p["vocab_size"], hidden_dim=p["hidden_dim"],
                            tie_embeddings=p.get("tie_embeddings", True), max_seq_len=p["max_seq_len"])
    peak = simulated_peak(model_cfg, bench_cfg)
    estimate = sum(runtime.estimate_memory(model_cfg, p["batch_size"], p["seq_len"], torch.bfloat16, True,
                                           adapters=lora.lora_params(model_cfg, p["lora_rank"]),
                                           base_quant="nf4").values())
    assert round(peak / 2**30, 2) == gib
    assert 0.9 < estimate / peak < 1.1, (estimate, peak)


def write_sharded_hf(folder, cfg: ModelConfig, shards: int):
    """A Hugging Face Llama folder of random bf16 weights in `shards` safetensors files with their index."""
    import json

    from safetensors.torch import save_file

    import convert_hf
    folder.mkdir()
    with torch.device("meta"):
        state = Transformer(cfg).state_dict()
    shapes = {theirs: state[ours].shape for ours, theirs in convert_hf.hf_names(cfg).items()}
    names, weight_map = list(shapes), {}
    for i in range(shards):
        part = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: (torch.randn(shapes[n]) * 0.02).to(torch.bfloat16) for n in names[i::shards]},
                  str(folder / part))
        weight_map.update(dict.fromkeys(names[i::shards], part))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(convert_hf.hf_config(cfg)))


def test_an_nf4_import_is_the_qlora_base_and_loads_in_4_bits(tmp_path):
    """convert_hf.py --from_hf --base_quant nf4 stores the codes that quantizing the float import gives, as plain
    tensors, and a QLoRA run loads them as they are (keep_nf4) while other scripts get them dequantized."""
    import convert_hf
    cfg = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=97, max_seq_len=64,
                      tie_embeddings=False)
    write_sharded_hf(tmp_path / "hf", cfg, shards=3)
    convert_hf.main(["--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "nf4.pt"), "--base_quant", "nf4"])
    convert_hf.main(["--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "float.pt")])
    ckpt = read_checkpoint(str(tmp_path / "nf4.pt"))
    assert len(ckpt["nf4"]) == 2 * 7 and all(type(t) is torch.Tensor for parts in ckpt["nf4"].values()
                                             for t in parts.values() if isinstance(t, torch.Tensor))
    assert os.path.getsize(tmp_path / "nf4.pt") < os.path.getsize(tmp_path / "float.pt") / 4
    kept, _ = lora.load_merged(str(tmp_path / "nf4.pt"), keep_nf4=True)
    float_model, _ = lora.load_merged(str(tmp_path / "float.pt"))
    quantized = lora.add_lora(float_model, rank=4, alpha=8.0, base_quant="nf4")
    theirs = {k.replace(".base.", "."): v for k, v in nf4_parts(quantized).items()}
    assert nf4_parts(kept).keys() == theirs.keys()
    assert all(torch.equal(v, theirs[k]) for k, v in nf4_parts(kept).items())
    dequantized, _ = lora.load_merged(str(tmp_path / "nf4.pt"))
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad(), lora.adapters_off(quantized):
        assert torch.equal(kept.eval()(tokens)[0], quantized.eval()(tokens)[0])
        # the same weights dequantized, multiplied by another kernel (a float Linear's): rounding apart
        torch.testing.assert_close(dequantized.eval()(tokens)[0], kept(tokens)[0], atol=1e-6, rtol=0)


def test_a_qlora_run_on_an_nf4_import_resumes_exactly_and_merges_to_its_logits(tmp_path, tokenizer_path):
    """The base stays the stored 4-bit codes through training, resume and merging (never re-quantized)."""
    import convert_hf
    cfg = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=512, max_seq_len=64)
    write_sharded_hf(tmp_path / "hf", cfg, shards=2)
    base = str(tmp_path / "nf4.pt")
    convert_hf.main(["--from_hf", str(tmp_path / "hf"), "--out", base, "--base_quant", "nf4"])
    sft(lora_config(tmp_path, base, tokenizer_path, out="straight", base_quant="nf4"))
    sft(lora_config(tmp_path, base, tokenizer_path, out="split", stop_at_step=2, base_quant="nf4"))
    sft(lora_config(tmp_path, base, tokenizer_path, out="split", resume=True, base_quant="nf4"))
    straight, split = (read_checkpoint(str(tmp_path / d / "last.pt")) for d in ("straight", "split"))
    assert all(torch.equal(straight["model"][k], split["model"][k]) for k in straight["model"])
    last = str(tmp_path / "split" / "last.pt")
    qlora = lora.with_adapters(read_checkpoint(last), last).eval()
    stored = {k.replace(".base.", "."): v for k, v in nf4_parts(qlora).items()}
    assert stored.keys() == nf4_parts(lora.load_merged(base, keep_nf4=True)[0]).keys()
    assert all(torch.equal(v, stored[k]) for k, v in nf4_parts(lora.load_merged(base, keep_nf4=True)[0]).items())
    tokens = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(lora.load_merged(last)[0].eval()(tokens)[0], qlora(tokens)[0], atol=1e-5, rtol=0)


def test_extending_the_context_of_an_nf4_base_is_one_line(tmp_path, tokenizer_path):
    import convert_hf
    from cli import UserError
    cfg = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=512, max_seq_len=64)
    write_sharded_hf(tmp_path / "hf", cfg, shards=1)
    convert_hf.main(["--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "nf4.pt"), "--base_quant", "nf4"])
    with pytest.raises(UserError, match="--rope_scaling cannot extend the context of the 4-bit base"):
        sft(lora_config(tmp_path, str(tmp_path / "nf4.pt"), tokenizer_path, base_quant="nf4", rope_scaling="yarn",
                        seq_len=128))


@pytest.mark.slow
def test_an_nf4_import_holds_about_one_shard_at_a_time(tmp_path):
    """The tensors alive at the import's peak (bench.PeakMemory): the 4-bit output, one tensor in fp32 and
    torchao's quantization scratch (about 0.16 GB), against the float import's whole fp32 model."""
    import convert_hf
    from bench import PeakMemory
    cfg = ModelConfig(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, hidden_dim=4096, vocab_size=512,
                      max_seq_len=256, tie_embeddings=False)
    write_sharded_hf(tmp_path / "hf", cfg, shards=4)
    sizes = [os.path.getsize(p) for p in (tmp_path / "hf").glob("*.safetensors")]
    shard = max(sizes)
    peaks, kept = {}, {}
    for quant in ("nf4", ""):
        with PeakMemory() as meter:
            model, _ = convert_hf.load_hf(str(tmp_path / "hf"), quant)
            kept[quant] = meter.live
        peaks[quant] = meter.peak
    kept = kept["nf4"]
    assert shard > 50 * 2**20 and kept < 0.3 * sum(sizes)  # the output: a quarter of bf16, and the fp32 embedding
    assert peaks["nf4"] < kept + shard + 160 * 2**20, peaks
    assert peaks[""] > 6 * shard  # a float import holds the whole fp32 model (its bf16 shards, doubled)
