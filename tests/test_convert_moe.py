"""convert_hf.py with a mixture of experts: parity with transformers' MixtralForCausalLM and Qwen2MoeForCausalLM
both ways (the hub's per-expert layout, and transformers 5's fused one on import), and one-line refusals."""
import json
from dataclasses import asdict

import pytest
import torch

import convert_hf
from model import ModelConfig, Transformer, load_model, save_checkpoint
from test_convert_hf import assert_same_model

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")

LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16.0}
SMALL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64, rope_theta=5000.0,
             n_experts=4, moe_hidden_dim=24)
QWEN = dict(n_shared_experts=1, shared_expert_gate=True)
# Our mixtures, each exported to the family that expresses it
OURS = {
    "mixtral-tied": ("MixtralForCausalLM", dict(tie_embeddings=True)),
    "mixtral-untied-top3-llama3": ("MixtralForCausalLM", dict(n_experts_per_tok=3, tie_embeddings=False,
                                                              rope_scaling=LLAMA3)),
    "qwen2moe-raw-untied": ("Qwen2MoeForCausalLM", dict(**QWEN, norm_topk_prob=False, tie_embeddings=False)),
    "qwen2moe-norm-tied-dense-yarn": ("Qwen2MoeForCausalLM", dict(
        n_shared_experts=2, shared_expert_gate=True, norm_topk_prob=True, first_dense_layers=1, hidden_dim=40,
        tie_embeddings=True, rope_scaling=YARN)),
    "qwen2moe-top1-raw": ("Qwen2MoeForCausalLM", dict(**QWEN, n_experts_per_tok=1, norm_topk_prob=False)),
}
HF_COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 5000.0})
# transformers' mixtures (config class, its fields) and the config we read from them
THEIRS = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                      tie_word_embeddings=True, router_aux_loss_coef=0.02),
                dict(hidden_dim=24, tie_embeddings=True, router_aux_loss_coef=0.02)),
    "qwen2moe-raw": ("Qwen2MoeConfig", dict(intermediate_size=40, moe_intermediate_size=24, num_experts=4,
                                            num_experts_per_tok=2, shared_expert_intermediate_size=48, qkv_bias=False),
                     dict(hidden_dim=40, n_shared_experts=2, shared_expert_gate=True, norm_topk_prob=False,
                          router_aux_loss_coef=0.001, tie_embeddings=False)),
    "qwen2moe-norm-mlp-only": ("Qwen2MoeConfig", dict(
        intermediate_size=40, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=3, norm_topk_prob=True,
        shared_expert_intermediate_size=24, qkv_bias=False, mlp_only_layers=[0], tie_word_embeddings=True),
        dict(hidden_dim=40, n_experts_per_tok=3, n_shared_experts=1, shared_expert_gate=True, norm_topk_prob=True,
             first_dense_layers=1, router_aux_loss_coef=0.001, tie_embeddings=True)),
    "qwen2moe-sparse-step-2": ("Qwen2MoeConfig", dict(  # layer 0 dense by decoder_sparse_step: first_dense_layers 1
        intermediate_size=40, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
        shared_expert_intermediate_size=24, qkv_bias=False, decoder_sparse_step=2),
        dict(hidden_dim=40, n_shared_experts=1, shared_expert_gate=True, norm_topk_prob=False, first_dense_layers=1,
             router_aux_loss_coef=0.001, tie_embeddings=False)),
}


def randomise(module: torch.nn.Module):
    """Weights larger than at initialisation (transformers starts a router at zero: every expert tied) and norms
    away from 1, so that routing matters and a wrong mapping shows."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.normal_(0, 0.15)


@pytest.mark.parametrize("variant", OURS)
def test_ours_to_hf(variant, tmp_path):
    architecture, v = OURS[variant]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL, **v)).eval()
    randomise(model)
    convert_hf.save_hf(model, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(hf).__name__ == architecture
    assert hf.config.router_aux_loss_coef == model.cfg.router_aux_loss_coef
    assert_same_model(model, hf, model.cfg.vocab_size)


def hf_model(variant: str, seed: int):
    config_class, fields, _ = THEIRS[variant]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**HF_COMMON, **fields)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomise(hf)
    return hf


@pytest.mark.parametrize("variant", THEIRS)
def test_hf_to_ours(variant, tmp_path):
    hf = hf_model(variant, seed=1)
    hf.save_pretrained(str(tmp_path))  # the hub's layout: one tensor per expert
    assert any(".experts.0." in name for name in safetensors.load_file(str(tmp_path / "model.safetensors")))
    model, cfg = convert_hf.load_hf(str(tmp_path))
    assert cfg == ModelConfig(**{**SMALL, "n_experts_per_tok": 2, "norm_topk_prob": True, **THEIRS[variant][2]})
    assert_same_model(model.eval(), hf, model.cfg.vocab_size)


@pytest.mark.parametrize("variant", ["mixtral", "qwen2moe-norm-mlp-only"])
def test_transformers_fused_experts_import(variant, tmp_path):
    """A file written from transformers 5's state_dict keeps its fused experts (gate_up_proj, down_proj): which
    half of gate_up_proj is the gate shows in the logits (silu(gate) * up is not symmetric)."""
    hf = hf_model(variant, seed=2)
    hf.save_pretrained(str(tmp_path))
    state = {name: t.detach().clone().contiguous() for name, t in hf.state_dict().items()}  # (tied: separate copies)
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in state)
    safetensors.save_file(state, str(tmp_path / "model.safetensors"))
    model, _ = convert_hf.load_hf(str(tmp_path))
    assert_same_model(model.eval(), hf, model.cfg.vocab_size)


@pytest.mark.parametrize("variant", ["mixtral-tied", "qwen2moe-norm-tied-dense-yarn"])
def test_cli_round_trip(variant, tmp_path):
    """--to_hf then --from_hf gives back every tensor and the config (Mixtral's dense width is its experts')."""
    torch.manual_seed(3)
    cfg = ModelConfig(**{**SMALL, "moe_hidden_dim": None, **OURS[variant][1]})
    model = Transformer(cfg)
    save_checkpoint({"model": model.state_dict(), "config": asdict(cfg), "step": 7}, str(tmp_path / "ckpt.pt"))
    convert_hf.main(["--to_hf", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    convert_hf.main(["--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back.pt")])
    back, ckpt = load_model(str(tmp_path / "back.pt"))
    assert ckpt["config"] == asdict(cfg)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize("change, words", [
    (dict(norm_topk_prob=False), "norm_topk_prob false"),  # Mixtral always renormalises
    (dict(first_dense_layers=1), "first_dense_layers 1"),  # and has no dense layers
    (dict(n_shared_experts=1), "shared_expert_gate"),  # Qwen2-MoE always gates its shared expert
])
def test_exports_no_family_expresses_are_refused(change, words, tmp_path):
    model = Transformer(ModelConfig(**SMALL, **{"n_experts_per_tok": 2, **change}))
    with pytest.raises(ValueError, match=words) as err:
        convert_hf.save_hf(model, str(tmp_path))
    assert "\n" not in str(err.value) and not (tmp_path / "config.json").exists()


QWEN_CONFIG = {"model_type": "qwen2_moe", "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
               "intermediate_size": 40, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 48,
               "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 97, "max_position_embeddings": 64,
               "qkv_bias": False}


@pytest.mark.parametrize("change, words", [
    (dict(qkv_bias=True), "qkv_bias is true"),
    (dict(qkv_bias=None), "qkv_bias is true"),  # absent: transformers' default, Qwen1.5-MoE's biases
    (dict(mlp_only_layers=[1]), r"dense layers \[1\]"),
    (dict(decoder_sparse_step=2), r"dense layers \[0, 2\]"),
    (dict(mlp_only_layers=[0, 1, 2, 3]), "at least one mixture"),
    (dict(shared_expert_intermediate_size=30), "not a multiple"),
    (dict(use_sliding_window=True), "sliding window"),
    (dict(model_type="mixtral", num_local_experts=4, sliding_window=16), "sliding window"),
])
def test_unsupported_moe_configs_are_refused(change, words):
    hf = {k: v for k, v in {**QWEN_CONFIG, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=words) as err:
        convert_hf.config_from_hf(hf)
    assert "\n" not in str(err.value)


def test_mixtral_window_longer_than_the_context_is_no_window():
    hf = {**QWEN_CONFIG, "model_type": "mixtral", "num_local_experts": 4, "sliding_window": 64}
    assert convert_hf.config_from_hf(hf).n_experts == 4


def test_exported_config_names_the_family(tmp_path):
    model = Transformer(ModelConfig(**SMALL, **OURS["qwen2moe-norm-tied-dense-yarn"][1]))
    convert_hf.save_hf(model, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["architectures"], config["mlp_only_layers"], config["shared_expert_intermediate_size"]) == \
        (["Qwen2MoeForCausalLM"], [0], 48)
    # llama.cpp's qwen2moe needs an output tensor: a tied head is written too
    assert "lm_head.weight" in safetensors.load_file(str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("variant", ["mixtral-tied", "qwen2moe-norm-tied-dense-yarn"])
def test_peft_adapters_of_a_mixture_give_our_logits(variant, tmp_path):
    """LoRA on attention, the dense layers and the shared expert: PEFT's adapters on the exported base give the
    logits of our model with its adapters; adapters on the routed experts are refused in one line (transformers 5
    fuses the experts into parameters, not the Linear layers PEFT adapts)."""
    peft = pytest.importorskip("peft")
    import lora
    torch.manual_seed(4)
    cfg = ModelConfig(**SMALL, **OURS[variant][1])
    base = Transformer(cfg)
    randomise(base)
    save_checkpoint({"model": base.state_dict(), "config": asdict(cfg), "step": 0}, str(tmp_path / "base.pt"))
    model = lora.add_lora(base, rank=4, alpha=8.0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):  # zeros at the start: make the adapters count
                p.normal_(0, 0.1)
    ckpt = {"model": lora.adapter_state(model), "config": asdict(cfg), "step": 1,
            "lora": lora.base_entries(model, str(tmp_path / "base.pt"))}
    save_checkpoint(ckpt, str(tmp_path / "lora.pt"))
    convert_hf.main(["--to_hf", str(tmp_path / "base.pt"), "--out", str(tmp_path / "base_hf")])
    convert_hf.main(["--to_peft", str(tmp_path / "lora.pt"), "--out", str(tmp_path / "adapter")])
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base_hf"))
    with_peft = peft.PeftModel.from_pretrained(base_hf, str(tmp_path / "adapter")).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(with_peft(tokens).logits, model(tokens)[0], atol=1e-4, rtol=0)
    save_checkpoint({**ckpt, "lora": {**ckpt["lora"], "targets": [*lora.TARGETS, lora.EXPERTS]}},
                    str(tmp_path / "experts.pt"))
    with pytest.raises(ValueError, match="routed experts") as err:
        convert_hf.save_peft(str(tmp_path / "experts.pt"), str(tmp_path / "refused"))
    assert "\n" not in str(err.value)
