"""
Convert checkpoints: to and from Hugging Face transformers' Llama, Mixtral and Qwen2-MoE formats, a LoRA run's
adapters for PEFT or merged into their base, and float weights to int8 for faster inference.

  python convert_hf.py --from_hf path/to/llama_folder --out out/base.pt   # then fine-tune it with our scripts
  python convert_hf.py --to_hf out/sft/best.pt --out out/hf               # tokenizer: the one the checkpoint names
  python convert_hf.py --to_hf out/sft/best.pt --out out/hf --tokenizer data/tokenizer.model
  python convert_hf.py --to_peft out/sft_lora/best.pt --out out/adapter  # a LoRA run's adapters, for PEFT
  python convert_hf.py --merge_lora out/sft_lora/best.pt                  # -> out/sft_lora/best_merged.pt
  python convert_hf.py --to_int8 out/distill/best.pt                      # -> best_int8.pt, and its quality report

An imported model keeps its own tokenizer: a tokenizer.json is copied beside the checkpoint (into
CKPT_tokenizer/) with the special pieces it lacks added: the chat markers <|im_start|> <|im_end|>, the think tags
<think> </think> and the tool tags <tool_call> </tool_call> <tool_response> </tool_response> (SmolLM2's, which
has the markers, gets 6); the model grows an embedding and output row for each (the mean of the existing rows),
which fine-tuning then trains (a LoRA run too). Pass that tokenizer.json to the other scripts with --tokenizer.

The export is a plain LlamaForCausalLM (config.json + model.safetensors; a LoRA checkpoint is merged
first), or for a mixture of experts a MixtralForCausalLM (no shared expert: Mixtral renormalises the top-k
weights and has no dense layers, so norm_topk_prob false or first_dense_layers are refused) or a
Qwen2MoeForCausalLM (a shared expert, which Qwen2-MoE always gates), with its tokenizer (our
tokenizer.model plus an exact tokenizer.json, or an imported model's tokenizer.json) and our ChatML template
(tokenizer.py's, tools included), so transformers' AutoModelForCausalLM / AutoTokenizer load it. tokenizer_config.json
also tells GGUF converters which pieces are special (llama.cpp's convert_hf_to_gguf.py makes the chat markers
control tokens and the think and tool tags user-defined ones) and that no space prefix is added, and gives them
the template; a Modelfile beside it runs the converted model.gguf in ollama with the same template, tools too.

Our weights already use HF's rotate-half RoPE layout, so converting is a renaming of tensors:
nothing is permuted. Experts are written one tensor each, as hub checkpoints hold them and llama.cpp's
converter reads them; import also takes transformers 5's fused gate_up_proj / down_proj. llama.cpp runs a
Mixtral export as it runs Llama's; its qwen2moe adds the top-k weights as they are and has no dense layers
(so only norm_topk_prob false and first_dense_layers 0 run there), needs an output tensor (a tied model's is
written too) and its converter reads only a byte-level BPE tokenizer.json such as Qwen's, not our
SentencePiece one. Needs the `safetensors` package (pip install safetensors); transformers
is not needed to convert, only to use the result.

--to_int8 writes quantize.py's int8 checkpoint and reports what it costs on held-out text (--val_data, a token
shard, or --text_file): the mean cross-entropy before and after, greedy agreement with the float model, and
batch-1 decoding speed.

Token ids in the export: the tokenizer adds no <s>/</s> by itself, so tokenizer.encode(text)
equals SentencePiece's. Our pretraining data separates documents with </s>, so for base
completion put </s> before a prompt (as inference.py does). For chat, eos is <|im_end|>;
generation_config.json stops at <|im_end|> and </s>.
"""
import copy
import functools
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm

from cli import UserError, parse_config, run_guarded
from dataset import TokenShards
from lora import BASE_QUANTS, NF4Linear, base_projections, load_merged, merged_model, nf4_checkpoint_state, to_nf4
from model import ModelConfig, ModelError, Transformer, empty_model, read_checkpoint, save_checkpoint
from quantize import format_report, int8_model, quality_report, quantize_model, quantized_checkpoint
from records import atomic_path, atomic_write
from tokenizer import (CHAT_MARKERS, CHAT_TEMPLATE_JINJA, SPECIAL_PIECES, TOOLS_INTRO, TOOLS_OUTRO, add_chat_pieces,
                       load_tokenizer, read_sentencepiece, special_ids, tokenizer_json, without_space_prefix)

# Our per-layer module names -> Hugging Face's (under model.layers.{i}.): all of a Llama layer, and the attention,
# the norms and a dense feed-forward (Qwen2-MoE's mlp_only_layers) of a mixture of experts
LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# The feed-forward of an MoE layer as each family's hub checkpoints store it ({e}: an expert), which is also what
# transformers' save_pretrained and llama.cpp's converter write and read. (transformers 5 fuses the experts in
# memory: split_fused_experts reads that layout.)
MOE_NAMES = {
    "mixtral": {
        "feed_forward.router": "block_sparse_moe.gate",
        "feed_forward.experts.{e}.w1": "block_sparse_moe.experts.{e}.w1",
        "feed_forward.experts.{e}.w2": "block_sparse_moe.experts.{e}.w2",
        "feed_forward.experts.{e}.w3": "block_sparse_moe.experts.{e}.w3",
    },
    "qwen2_moe": {
        "feed_forward.router": "mlp.gate",
        "feed_forward.experts.{e}.w1": "mlp.experts.{e}.gate_proj",
        "feed_forward.experts.{e}.w2": "mlp.experts.{e}.down_proj",
        "feed_forward.experts.{e}.w3": "mlp.experts.{e}.up_proj",
        "feed_forward.shared.w1": "mlp.shared_expert.gate_proj",
        "feed_forward.shared.w2": "mlp.shared_expert.down_proj",
        "feed_forward.shared.w3": "mlp.shared_expert.up_proj",
        "feed_forward.shared_gate": "mlp.shared_expert_gate",
    },
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def hf_family(cfg: ModelConfig) -> str:
    """The model_type that runs a model with this config: llama, mixtral (experts only) or qwen2_moe (with a
    gated shared expert); a one-line error for a mixture that neither expresses."""
    if not cfg.n_experts:
        return "llama"
    if cfg.n_shared_experts:
        if not cfg.shared_expert_gate:
            raise UserError("Qwen2-MoE, the family with a shared expert, always gates it: a shared expert without "
                            "shared_expert_gate does not export")
        return "qwen2_moe"
    if not cfg.norm_topk_prob:
        raise UserError("Mixtral, the family without a shared expert, always renormalises the top-k weights: "
                        "norm_topk_prob false does not export")
    if cfg.first_dense_layers:
        raise UserError("Mixtral, the family without a shared expert, has no dense layers: first_dense_layers "
                        f"{cfg.first_dense_layers} does not export")
    return "mixtral"


def hf_names(cfg: ModelConfig) -> dict:
    """Our tensor name -> Hugging Face's, for every tensor a model with this config stores (and uses)."""
    family = hf_family(cfg)
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:  # tied: HF stores no lm_head and ties it on load
        names["output.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        layer = dict(LAYER_NAMES)
        if cfg.is_moe_layer(i):
            layer = {ours: theirs for ours, theirs in layer.items() if not ours.startswith("feed_forward.")}
            for ours, theirs in MOE_NAMES[family].items():
                if "{e}" in ours:
                    layer.update({ours.format(e=e): theirs.format(e=e) for e in range(cfg.n_experts)})
                elif not ours.startswith("feed_forward.shared") or cfg.n_shared_experts:
                    layer[ours] = theirs
        for ours, theirs in layer.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def split_fused_experts(hf: dict, family: str) -> dict:
    """The hub's per-expert tensors from transformers 5's in-memory layout (a file written from its state_dict):
    each layer's experts fused into mlp.experts.gate_up_proj (E, 2H, D), the gate's H rows first as its
    chunk(2) reads them, and mlp.experts.down_proj (E, D, H); Mixtral's block_sparse_moe is named mlp there."""
    names, out = MOE_NAMES[family], {}
    for name, tensor in hf.items():
        layer, _, module = name.partition(".mlp.")
        if module == "experts.gate_up_proj":
            parts = dict(zip(("w1", "w3"), tensor.chunk(2, dim=1)))
        elif module == "experts.down_proj":
            parts = {"w2": tensor}
        elif module == "gate.weight":  # the router
            out[f"{layer}.{names['feed_forward.router']}.weight"] = tensor
            continue
        else:
            out[name] = tensor
            continue
        for w, stacked in parts.items():
            for e, weight in enumerate(stacked):
                out[f"{layer}.{names['feed_forward.experts.{e}.' + w].format(e=e)}.weight"] = weight
    return out


# ----------------------------------------------------------------------------- config

# The rope scaling types we run, and the keys of each that transformers reads
ROPE_KEYS = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                      "truncate")}


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a Llama, Mixtral or Qwen2-MoE config.json; one-line error for what we cannot run."""
    def refuse(why):
        raise UserError(f"{source}: {why}; only plain Llama, Mixtral and Qwen2-MoE models convert")

    def need(key):
        if key not in hf:
            raise UserError(f"{source}: no {key!r}")
        return hf[key]

    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        refuse(f"model_type is {family!r}, not {', '.join(map(repr, ARCHITECTURES))}")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act is {hf['hidden_act']!r}, not 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            refuse(f"{flag} is true (we have no biases)")
    if family == "qwen2_moe" and hf.get("qkv_bias", True):  # transformers' default, as in Qwen1.5-MoE
        refuse("qkv_bias is true (our attention has no biases)")
    if hf.get("use_sliding_window") or (family == "mixtral" and hf.get("sliding_window") is not None
                                        and hf["sliding_window"] < need("max_position_embeddings")):
        refuse("it attends over a sliding window (we attend over the whole context)")
    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    if hf.get("head_dim") not in (None, dim // n_heads):
        refuse(f"head_dim {hf['head_dim']} is not hidden_size / num_attention_heads = {dim // n_heads}")
    # transformers >= 5 keeps theta and scaling in rope_parameters; older files have
    # top-level rope_theta and rope_scaling (which wins if both are present, as in transformers).
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_KEYS:
        refuse(f"rope scaling type {rope_type!r} is not supported (only {', '.join(ROPE_KEYS)})")
    if scaling.get("mscale") or scaling.get("mscale_all_dim"):
        refuse("YaRN's mscale / mscale_all_dim (DeepSeek's variant) are not supported")
    max_len = need("max_position_embeddings")
    rope_scaling = None
    if rope_type != "default":
        rope_scaling = {"rope_type": rope_type, **{k: scaling[k] for k in ROPE_KEYS[rope_type] if k in scaling}}
        if rope_type in ("llama3", "yarn", "dynamic"):  # transformers' default: the model's own length
            rope_scaling.setdefault("original_max_position_embeddings", max_len)
        if rope_type == "dynamic":  # transformers scales beyond max_position_embeddings, which is the trained length
            rope_scaling["original_max_position_embeddings"] = max_len
            max_len = int(max_len * scaling["factor"])
        if rope_scaling.get("factor") is None:  # YaRN's default: the extended over the original length
            rope_scaling["factor"] = max_len / rope_scaling["original_max_position_embeddings"]
    n_layers = need("num_hidden_layers")
    moe = {}
    if family == "mixtral":  # softmax, top k, renormalised; every layer a mixture of intermediate_size experts
        moe = dict(n_experts=need("num_local_experts"), moe_hidden_dim=need("intermediate_size"),
                   norm_topk_prob=True, router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001))
    elif family == "qwen2_moe":  # the same routing (renormalised or not), and a shared expert behind a sigmoid gate
        expert, shared = need("moe_intermediate_size"), need("shared_expert_intermediate_size")
        if shared <= 0 or shared % expert:
            refuse(f"shared_expert_intermediate_size {shared} is not a multiple of moe_intermediate_size {expert}")
        # transformers makes layer i dense when it is in mlp_only_layers or (i + 1) % decoder_sparse_step != 0
        step, only = hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
        dense = [i for i in range(n_layers) if i in only or (i + 1) % step]
        if dense != list(range(len(dense))) or len(dense) == n_layers:
            refuse(f"its dense layers {dense} (mlp_only_layers, decoder_sparse_step) are not the first ones "
                   f"before at least one mixture (first_dense_layers)")
        moe = dict(n_experts=need("num_experts"), moe_hidden_dim=expert, n_shared_experts=shared // expert,
                   shared_expert_gate=True, norm_topk_prob=hf.get("norm_topk_prob", False),
                   first_dense_layers=len(dense), router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001))
    if moe:
        if moe["n_experts"] < 1:
            refuse("it has no experts")
        moe["n_experts_per_tok"] = need("num_experts_per_tok")
    return ModelConfig(
        dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, vocab_size=need("vocab_size"),
        hidden_dim=need("intermediate_size"), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), rope_scaling=rope_scaling,
        max_seq_len=max_len, tie_embeddings=hf.get("tie_word_embeddings", False), **moe)


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32, token_ids: dict = None) -> dict:
    """config.json for a Llama, Mixtral or Qwen2-MoE model (hf_family) equal to ours (token_ids: bos/eos/pad
    ids or None)."""
    family = hf_family(cfg)
    rope = {"rope_type": "llama3", **cfg.rope_scaling} if cfg.rope_scaling else {"rope_type": "default"}
    max_len = cfg.max_seq_len
    if rope["rope_type"] == "dynamic":  # transformers scales beyond max_position_embeddings: the trained length
        max_len = rope.pop("original_max_position_embeddings")
    token_ids = token_ids or {}
    dtype_name = str(dtype).removeprefix("torch.")
    if family == "llama":
        layers = {"intermediate_size": cfg.hidden_dim, "attention_bias": False, "mlp_bias": False}
    elif family == "mixtral":
        layers = {"intermediate_size": cfg.moe_hidden_dim, "num_local_experts": cfg.n_experts, "sliding_window": None}
    else:  # Qwen2-MoE: dense layers first (mlp_only_layers) of intermediate_size, then the mixtures
        layers = {"intermediate_size": cfg.hidden_dim, "moe_intermediate_size": cfg.moe_hidden_dim,
                  "shared_expert_intermediate_size": cfg.n_shared_experts * cfg.moe_hidden_dim,
                  "num_experts": cfg.n_experts, "norm_topk_prob": cfg.norm_topk_prob, "qkv_bias": False,
                  "decoder_sparse_step": 1, "mlp_only_layers": list(range(cfg.first_dense_layers)),
                  "use_sliding_window": False}
    if family != "llama":
        layers.update(num_experts_per_tok=cfg.n_experts_per_tok, router_aux_loss_coef=cfg.router_aux_loss_coef)
    return {
        "architectures": [ARCHITECTURES[family]], "model_type": family,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, **layers,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": max_len, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        # Both spellings: transformers >= 5 reads rope_parameters; transformers 4, llama.cpp
        # and vLLM read rope_theta and rope_scaling.
        "rope_parameters": {**rope, "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta, "rope_scaling": rope if cfg.rope_scaling else None,
        "bos_token_id": token_ids.get("bos"), "eos_token_id": token_ids.get("eos"),
        "pad_token_id": token_ids.get("pad"), "dtype": dtype_name, "torch_dtype": dtype_name,
    }


# ----------------------------------------------------------------------------- weights

def hf_tensor_files(model_dir: str) -> dict:
    """Which file holds each tensor of a HF model folder (model.safetensors, its sharded index, or
    pytorch_model.bin): tensor name -> path. Nothing is read but the names."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                return {name: os.path.join(model_dir, shard) for name, shard in json.load(f)["weight_map"].items()}
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise UserError(f"{index}: not a safetensors index (no weight_map)") from None
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            return dict.fromkeys(weights_file(path).keys(), path)
    raise UserError(f"{model_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


@functools.lru_cache(maxsize=1)
def weights_file(path: str):
    """One .safetensors file opened (memory-mapped: a tensor is read when asked for) or a .bin file's tensors (mapped
    too), with a one-line error if it is damaged."""
    try:
        if path.endswith(".safetensors"):
            return _safetensors().safe_open(path, framework="pt")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # never run pickled code
    except Exception as e:  # safetensors, zip and unpickling errors share no narrower base class
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: cannot read the weights (corrupt or truncated?): {detail}") from None


def read_hf_tensor(files: dict, name: str) -> torch.Tensor:
    """One tensor of a HF model folder (hf_tensor_files), read from its file alone."""
    opened = weights_file(files[name])
    try:
        return opened.get_tensor(name) if hasattr(opened, "get_tensor") else opened[name]
    except Exception as e:
        raise UserError(f"{files[name]}: cannot read {name} (corrupt or truncated?): {e}") from None


def load_hf(model_dir: str, base_quant: str = "") -> "tuple[Transformer, ModelConfig]":
    """Our Transformer (fp32, CPU) from a Hugging Face Llama, Mixtral or Qwen2-MoE folder, read one tensor at a time
    into a model that holds nothing else (a shard is never whole in memory); base_quant "nf4": each projection
    quantized as it is read (lora.py), so an 8B import needs about 8 GB, not 32."""
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{model_dir}: no config.json (expected a Hugging Face model folder)")
    with open(config_path, encoding="utf-8") as f:
        try:
            hf_cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{config_path}: not valid JSON ({e})") from None
    cfg = config_from_hf(hf_cfg, config_path)
    files = hf_tensor_files(model_dir)
    stored, read = files.keys(), functools.partial(read_hf_tensor, files)  # a tensor read when it is loaded
    if cfg.n_experts:  # (transformers 5 fuses the experts: a mixture is read whole, to split them)
        split = split_fused_experts({name: read_hf_tensor(files, name) for name in files}, hf_cfg["model_type"])
        stored, read = split.keys(), split.__getitem__
    names = hf_names(cfg)
    ignored = {"lm_head.weight"} if cfg.tie_embeddings else set()  # some tied models store it anyway
    extra = sorted(k for k in stored if k not in names.values() and k not in ignored
                   and not k.endswith("rotary_emb.inv_freq"))  # old files keep RoPE's buffer
    if extra:
        raise UserError(f"{model_dir}: unexpected tensor {extra[0]}" +
                        (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    missing = [theirs for theirs in names.values() if theirs not in stored]
    if missing:
        raise UserError(f"{model_dir}: missing tensor {missing[0]}")
    model = empty_model(cfg)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    quantized = set()
    if base_quant:
        modules = {module: name for name, module in model.named_modules()}
        quantized = {f"{modules[parent]}.{attr}.weight" for parent, attr in base_projections(model)}
    for ours, theirs in tqdm(names.items(), desc="import", unit="tensor", leave=False):
        tensor = read(theirs).float()
        if tensor.shape != shapes[ours]:
            raise UserError(f"{model_dir}: {theirs} has shape {tuple(tensor.shape)}, but config.json gives "
                            f"{tuple(shapes[ours])}")
        if ours in quantized:
            parent, attr = ours.removesuffix(".weight").rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, NF4Linear(to_nf4(tensor)))
        else:
            model.load_state_dict({ours: tensor}, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model, cfg


def save_hf(model: Transformer, out_dir: str, tokenizer: str = None):
    """Write `model` as a HF Llama, Mixtral or Qwen2-MoE folder (hf_family), with the tokenizer files when given
    its tokenizer (our SentencePiece model, or an imported tokenizer.json). Every file is written under a
    temporary name and renamed; config.json comes last, so a folder with a config.json is complete."""
    save_file = _safetensors().save_file
    hf_family(model.cfg)  # refuse a mixture no family expresses before writing anything
    os.makedirs(out_dir, exist_ok=True)
    token_ids = None
    if tokenizer:
        save = save_tokenizer_json if tokenizer.endswith(".json") else save_tokenizer
        token_ids = save(tokenizer, out_dir, model.cfg)
    state = model.state_dict()
    tensors = {theirs: state[ours].detach().cpu().contiguous() for ours, theirs in hf_names(model.cfg).items()}
    if model.cfg.tie_embeddings and hf_family(model.cfg) == "qwen2_moe":
        # llama.cpp's qwen2moe needs an output tensor (its converter does not tie); transformers ties it anyway
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    with atomic_path(os.path.join(out_dir, "model.safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    dtype = model.tok_embeddings.weight.dtype
    if token_ids:
        write_json(os.path.join(out_dir, "generation_config.json"), {
            "bos_token_id": token_ids["bos"], "eos_token_id": [token_ids["im_end"], token_ids["eos"]],
            "pad_token_id": token_ids["pad"]})
        with atomic_write(os.path.join(out_dir, "Modelfile")) as f:
            f.write(OLLAMA_MODELFILE)
    write_json(os.path.join(out_dir, "config.json"), hf_config(model.cfg, dtype, token_ids))


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError("converting needs the safetensors package: pip install safetensors") from None
    return safetensors.torch


def write_json(path: str, obj):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ----------------------------------------------------------------------------- tokenizer

# For ollama, beside the export: `ollama create NAME -f Modelfile` once model.gguf is made (see the README). Its Go
# template renders CHAT_TEMPLATE_JINJA's turns, laid out as ollama's own Qwen2.5 and Qwen3 templates: the tools in the
# system turn, then every message but the system prompt they took in, a run of tool results as one user turn (ollama
# writes a tool's function and a call's arguments as compact JSON, where transformers puts a space after ":" and ",").
# ollama takes the tag that starts a call from the first text under `if .ToolCalls`, so that text must be <tool_call>:
# the newline between a reply's content and its first call is a variable for that reason. Without tools a chat renders
# as plain ChatML.
OLLAMA_MODELFILE = """FROM ./model.gguf
TEMPLATE \"\"\"{{- if .Tools }}<|im_start|>system
{{ if and .Messages (eq (index .Messages 0).Role "system") }}{{ (index .Messages 0).Content }}

{{ end }}""" + TOOLS_INTRO + """
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}""" + TOOLS_OUTRO + """<|im_end|>
{{ end }}
{{- $previous := "" }}
{{- range $i, $_ := .Messages }}
{{- if and $.Tools (eq $i 0) (eq .Role "system") }}
{{- else if eq .Role "tool" }}
{{- if ne $previous "tool" }}<|im_start|>user
{{ else }}
{{ end }}<tool_response>
{{ .Content }}
</tool_response>
{{- if or (eq (len (slice $.Messages $i)) 1) (ne (index (slice $.Messages $i) 1).Role "tool") }}<|im_end|>
{{ end }}
{{- else }}<|im_start|>{{ .Role }}
{{ .Content }}
{{- $newline := "" }}{{ if .Content }}{{ $newline = "\\n" }}{{ end }}
{{- if .ToolCalls }}{{ range .ToolCalls }}{{ $newline }}<tool_call>
{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
</tool_call>{{ $newline = "\\n" }}{{ end }}{{ end }}<|im_end|>
{{ end }}
{{- $previous = .Role }}
{{- end }}<|im_start|>assistant
\"\"\"
PARAMETER stop <|im_end|>
"""


def save_tokenizer(tokenizer_model: str, out_dir: str, cfg: ModelConfig) -> dict:
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json (with the ChatML template)
    and special_tokens_map.json for a model with config `cfg`; return the ids of bos, eos, pad
    and <|im_end|>."""
    info = read_sentencepiece(tokenizer_model)
    if len(info["pieces"]) > cfg.vocab_size:
        raise UserError(f"{tokenizer_model} has {len(info['pieces'])} pieces but the model's vocab_size is "
                        f"{cfg.vocab_size}: pass the tokenizer it was trained with")
    if not info["bpe"] or info["normalizer"] != "identity" or info["add_dummy_prefix"] \
            or info["remove_extra_whitespaces"] or info["whitespace_as_suffix"]:
        raise UserError(f"{tokenizer_model}: only tokenizers made by train_tokenizer.py export exactly "
                        "(BPE, identity normalization, no dummy prefix, whitespace kept)")
    ids = {piece: i for i, (piece, _, _) in enumerate(info["pieces"])}
    missing = [p for p in ("<unk>", "<s>", "</s>", "<pad>") + CHAT_MARKERS if p not in ids]
    if missing:
        raise UserError(f"{tokenizer_model}: no {missing[0]} piece")
    with atomic_path(os.path.join(out_dir, "tokenizer.model")) as tmp:
        shutil.copyfile(tokenizer_model, tmp)
    fast = tokenizer_json(info)
    write_json(os.path.join(out_dir, "tokenizer.json"), fast)
    special = {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "<pad>"}
    write_tokenizer_config(out_dir, fast["added_tokens"], special, cfg)
    return {"bos": ids["<s>"], "eos": ids["</s>"], "pad": ids["<pad>"], "im_end": ids["<|im_end|>"]}


def write_tokenizer_config(out_dir: str, added_tokens: list, special: dict, cfg: ModelConfig):
    """special_tokens_map.json and tokenizer_config.json, with the ChatML template and <|im_end|> as eos.
    The same added tokens as tokenizer.json: llama.cpp's converter reads them here, and makes a special one
    a control token (the chat markers, <s>, </s>...) and the others user-defined (the think and tool tags: always
    one token, and shown in the output). add_prefix_space false: our pieces carry no dummy "▁" prefix."""
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    added = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added_tokens}
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",  # load tokenizer.json as written, no rebuilding
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_seq_len,
        "chat_template": CHAT_TEMPLATE_JINJA, "added_tokens_decoder": added, **special})


def save_tokenizer_json(path: str, out_dir: str, cfg: ModelConfig) -> dict:
    """An imported model's tokenizer.json (with the special pieces convert_hf.py added) as it is, plus
    tokenizer_config.json with our template: <|im_end|> ends a reply, as in our fine-tuning."""
    tok = load_tokenizer(path)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"{path} has {tok.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}: "
                        f"pass the tokenizer it was trained with")
    ids = special_ids(tok)
    with open(path, encoding="utf-8") as f:
        added_tokens = json.load(f).get("added_tokens", [])
    with atomic_path(os.path.join(out_dir, "tokenizer.json")) as tmp:
        shutil.copyfile(path, tmp)
    piece = {i: tok.decode([i]) for i in (tok.bos_id, tok.eos_id, ids["pad"]) if i is not None}
    special = {"bos_token": piece.get(tok.bos_id), "eos_token": SPECIAL_PIECES["im_end"],
               "pad_token": piece[ids["pad"]]}
    write_tokenizer_config(out_dir, added_tokens, special, cfg)
    return {"bos": tok.bos_id, "eos": tok.eos_id, "pad": ids["pad"], "im_end": ids["im_end"]}


# ----------------------------------------------------------------------------- importing a tokenizer

def import_tokenizer(model_dir: str, ckpt_path: str, model: Transformer) -> tuple:
    """(model, tokenizer path, ids of the tokens added) for a model imported from model_dir. A tokenizer.json
    is copied into CKPT_tokenizer/ (with the eos, bos and pad roles of its tokenizer_config.json, and without a
    Llama 2 style space prefix), the special pieces it lacks (chat markers, think and tool tags) are added, and the
    model grows rows for them. A tokenizer.model is used where it is when it has them all (our own export) or is
    the only tokenizer (pieces cannot be added to it)."""
    source, sentencepiece = (os.path.join(model_dir, name) for name in ("tokenizer.json", "tokenizer.model"))
    if os.path.exists(sentencepiece) and (not os.path.exists(source) or has_chat_pieces(sentencepiece)):
        return model, sentencepiece, []  # our own export (or a tokenizer.model alone): as it is
    if not os.path.exists(source):
        return model, "", []
    folder = ckpt_path.removesuffix(".pt") + "_tokenizer"
    os.makedirs(folder, exist_ok=True)
    roles = {}
    config = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.exists(config):
        with open(config, encoding="utf-8") as f:
            roles = {k: v for k, v in json.load(f).items() if k in ("bos_token", "eos_token", "pad_token")}
    write_json(os.path.join(folder, "tokenizer_config.json"), roles)
    path = os.path.join(folder, "tokenizer.json")
    with atomic_path(path) as tmp:
        had_prefix = without_space_prefix(source, tmp)
    if had_prefix:
        print(f"note: {source} puts a space before every text it encodes (Llama 2 style); the imported copy does "
              f"not, so the chat template encodes piece by piece exactly")
    with atomic_path(path) as tmp:
        added = add_chat_pieces(path, tmp)
    model = with_vocab(model, load_tokenizer(path).vocab_size, added)
    return model, path, added


def has_chat_pieces(path: str) -> bool:
    """Whether the tokenizer has every special piece: an export from before the tool tags is imported through its
    tokenizer.json, which gets them."""
    tok = load_tokenizer(path)
    return all(tok.piece_id(piece) is not None for piece in SPECIAL_PIECES.values())


@torch.no_grad()
def with_vocab(model: Transformer, vocab_size: int, new_ids: list) -> Transformer:
    """The model with at least vocab_size embedding and output rows (grown in place: the blocks, perhaps in 4 bits,
    are not copied); the rows of new_ids start at the mean of the existing rows (a neutral start: a random row
    could dominate the output)."""
    cfg = model.cfg
    rows = max(vocab_size, cfg.vocab_size)
    for module in (model.tok_embeddings, model.output):
        old = module.weight
        if cfg.tie_embeddings and module is model.output:
            model.output.weight = model.tok_embeddings.weight
            continue
        grown = torch.cat([old, old.new_zeros(rows - cfg.vocab_size, cfg.dim)])
        grown[new_ids] = old.mean(0)
        module.weight = nn.Parameter(grown)
    model.tok_embeddings.num_embeddings = model.output.out_features = rows
    model.cfg = ModelConfig.from_dict({**asdict(cfg), "vocab_size": rows})
    return model


# ----------------------------------------------------------------------------- PEFT adapters

def save_peft(ckpt_path: str, out_dir: str) -> str:
    """A LoRA checkpoint's adapters as PEFT writes them (adapter_config.json + adapter_model.safetensors), for
    peft.PeftModel.from_pretrained on the base exported with --to_hf. Trained new-token rows become PEFT's
    trainable_token_indices."""
    ckpt = read_checkpoint(ckpt_path)
    if "lora" not in ckpt:
        raise UserError(f"{ckpt_path} is not a LoRA checkpoint (train_sft.py --lora_rank N makes one)")
    meta, cfg = ckpt["lora"], ModelConfig.from_dict(ckpt["config"])
    if cfg.n_experts and "experts" in meta["targets"]:
        raise UserError(f"{ckpt_path} adapts the routed experts, which transformers 5 fuses into one parameter per "
                        f"layer that PEFT's LoRA layers do not reach: export it merged (--to_hf {ckpt_path})")
    rows, names = {"tok_embeddings.rows": "model.embed_tokens", "output.rows": "lm_head"}, hf_names(cfg)
    tensors = {}
    for name, tensor in ckpt["model"].items():
        if name in rows:
            theirs = f"{rows[name]}.token_adapter.trainable_tokens_delta"
        else:  # layers.{i}.attention.wq.lora_A -> model.layers.{i}.self_attn.q_proj.lora_A.weight
            where, kind = name.rsplit(".", 1)
            theirs = f"{names[where + '.weight'].removesuffix('.weight')}.{kind}.weight"
        tensors[f"base_model.model.{theirs}"] = tensor.float().contiguous()
    new_ids = meta["new_token_ids"]
    token_indices = None  # a tied head shares the embedding's rows
    if new_ids:
        token_indices = {"embed_tokens": new_ids, **({} if cfg.tie_embeddings else {"lm_head": new_ids})}
    hf_targets = sorted(LAYER_NAMES[m].split(".")[1] for m in LAYER_NAMES if m.split(".")[-1] in meta["targets"])
    os.makedirs(out_dir, exist_ok=True)
    with atomic_path(os.path.join(out_dir, "adapter_model.safetensors")) as tmp:
        _safetensors().save_file(tensors, tmp, metadata={"format": "pt"})
    write_json(os.path.join(out_dir, "adapter_config.json"), {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": meta["rank"], "lora_alpha": meta["alpha"],
        "lora_dropout": meta["dropout"], "target_modules": hf_targets, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "inference_mode": True,
        "modules_to_save": None, "trainable_token_indices": token_indices, "base_model_name_or_path": None})
    return meta["base"]


# ----------------------------------------------------------------------------- LoRA merged, int8

def merge(ckpt_path: str, out: str, base: str = ""):
    """A LoRA checkpoint's adapters folded into their base: a plain checkpoint (for any tool that reads ours)."""
    model, ckpt = load_merged(ckpt_path, base=base)
    if "lora" not in ckpt:
        raise UserError(f"{ckpt_path} is not a LoRA checkpoint: nothing to merge")
    out = out or ckpt_path.removesuffix(".pt") + "_merged.pt"
    save_checkpoint({"model": model.state_dict(), "config": ckpt["config"], "step": ckpt.get("step", 0),
                     "tokenizer": ckpt.get("tokenizer", "")}, out)
    print(f"wrote {out}: {model.num_params() / 1e6:.1f}M parameters, adapters of rank {ckpt['lora']['rank']} merged")


def held_out(cfg: "ConvertConfig", tokenizer: str, length: int, count: int, seed: int) -> torch.Tensor:
    """(count, length) token ids: windows drawn from --val_data (seed picks them), or the first consecutive
    pieces of --text_file (as many as it holds, up to count)."""
    if not cfg.text_file:
        rows = TokenShards(cfg.val_data, length - 1, count, seed=seed).batch(0)
        return torch.cat([rows["tokens"], rows["targets"][:, -1:]], dim=1)
    try:
        with open(cfg.text_file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--text_file {cfg.text_file}: {e}") from None
    tok = load_tokenizer(tokenizer)
    ids = [tok.eos_id] + tok.encode(text)  # a document start, as in pretraining
    if len(ids) < length:
        raise UserError(f"--text_file {cfg.text_file} has {len(ids)} tokens; one window needs {length}")
    count = min(count, len(ids) // length)
    return torch.tensor(ids[:count * length]).view(count, length)


def to_int8(cfg: "ConvertConfig"):
    """--to_int8: the int8 checkpoint, then the quality report on the file as written."""
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {cfg.dtype}: use float32, bfloat16 or float16")
    if min(cfg.eval_windows, cfg.prompts, cfg.prompt_tokens, cfg.new_tokens) < 1 or cfg.speed_tokens < 0:
        raise UserError("--eval_windows, --prompts, --prompt_tokens and --new_tokens must be at least 1")
    ckpt = read_checkpoint(cfg.to_int8)
    if ckpt.get("quantization"):
        raise UserError(f"{cfg.to_int8} is quantized already: give the float checkpoint it was made from "
                        f"({ckpt.get('source') or 'its source'})")
    float_model = merged_model(ckpt, cfg.to_int8).to(cfg.device)
    out = cfg.out or cfg.to_int8.removesuffix(".pt") + "_int8.pt"
    save_checkpoint(quantized_checkpoint(quantize_model(copy.deepcopy(float_model)), ckpt, cfg.to_int8), out)
    quantized = int8_model(read_checkpoint(out), out).to(cfg.device)  # the report is on the file as written
    dtype = getattr(torch, cfg.dtype)
    float_model.to(dtype).eval()
    quantized.to(dtype)
    float_bytes, with_optimizer = float_model.num_params() * 4, " with its optimizer state" * ("optimizer" in ckpt)
    print(f"wrote {out}: {os.path.getsize(out) / 2**20:.2f} MiB against {float_bytes / 2**20:.2f} MiB of float32 "
          f"weights ({float_bytes / os.path.getsize(out):.1f}x smaller; {cfg.to_int8} is "
          f"{os.path.getsize(cfg.to_int8) / 2**20:.2f} MiB{with_optimizer})")
    seq_len = cfg.seq_len or float_model.cfg.max_seq_len
    if cfg.prompt_tokens + cfg.new_tokens > float_model.cfg.max_seq_len or seq_len > float_model.cfg.max_seq_len:
        raise UserError(f"the model's context is {float_model.cfg.max_seq_len} tokens: lower --seq_len or "
                        f"--prompt_tokens + --new_tokens")
    tokenizer = cfg.tokenizer or ckpt.get("tokenizer") or "data/tokenizer.model"
    windows = held_out(cfg, tokenizer, seq_len + 1, cfg.eval_windows, cfg.seed)
    prompts = held_out(cfg, tokenizer, cfg.prompt_tokens, cfg.prompts, cfg.seed + 1)
    if windows.max() >= float_model.cfg.vocab_size:
        raise UserError(f"the held-out ids reach {int(windows.max())}, beyond the model's vocabulary of "
                        f"{float_model.cfg.vocab_size}: give text made with its tokenizer")
    print(format_report(quality_report(float_model, quantized, windows, prompts, cfg.new_tokens, cfg.speed_tokens)))


# ----------------------------------------------------------------------------- command line

@dataclass
class ConvertConfig:
    from_hf: str = field(default="", metadata={"help": "Hugging Face Llama folder to convert into our checkpoint"})
    to_hf: str = field(default="", metadata={"help": "our checkpoint to export as a Hugging Face folder"})
    to_peft: str = field(default="", metadata={"help": "a LoRA checkpoint whose adapters to export for PEFT"})
    merge_lora: str = field(default="", metadata={"help": "a LoRA checkpoint to merge into its base: a plain one"})
    base: str = field(default="", metadata={
        "help": "with --merge_lora: its base checkpoint (empty: the path it records)"})
    to_int8: str = field(default="", metadata={"help": "a float checkpoint to quantize to int8 (quantize.py)"})
    base_quant: str = field(default="", metadata={
        "help": "with --from_hf: nf4 writes the projections in 4 bits as they are read (a QLoRA base, lora.py)"})
    out: str = field(default="", metadata={"help": "the checkpoint (.pt) or folder to write (empty with "
                                                   "--merge_lora: CKPT_merged.pt; --to_int8: CKPT_int8.pt)"})
    tokenizer: str = field(default="", metadata={
        "help": "with --to_hf: tokenizer.model or tokenizer.json to export; with --to_int8: the one that reads "
                "--text_file (empty: the one recorded in the checkpoint)"})
    # the --to_int8 quality report
    val_data: str = field(default="data/pretrain_val.bin", metadata={"help": "held-out token shard for the report"})
    text_file: str = field(default="", metadata={"help": "held-out text instead of --val_data (a UTF-8 file)"})
    eval_windows: int = field(default=32, metadata={"help": "windows of seq_len + 1 tokens for the loss"})
    seq_len: int = field(default=0, metadata={"help": "window length for the loss (0: the model's context)"})
    prompts: int = field(default=20, metadata={"help": "held-out prompts for greedy agreement"})
    prompt_tokens: int = field(default=32, metadata={"help": "length of each prompt"})
    new_tokens: int = field(default=64, metadata={"help": "greedy tokens compared per prompt"})
    speed_tokens: int = field(default=128, metadata={"help": "tokens generated to time decoding; 0: not timed"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16: the compute dtype"})
    seed: int = 0


def convert(cfg: ConvertConfig):
    if sum(map(bool, (cfg.from_hf, cfg.to_hf, cfg.to_peft, cfg.merge_lora, cfg.to_int8))) != 1 or \
            not (cfg.out or cfg.merge_lora or cfg.to_int8):
        raise UserError("give one of --from_hf DIR, --to_hf CKPT or --to_peft CKPT with --out, or --merge_lora CKPT "
                        "or --to_int8 CKPT")
    if cfg.merge_lora:
        merge(cfg.merge_lora, cfg.out, cfg.base)
    elif cfg.to_int8:
        to_int8(cfg)
    elif cfg.from_hf:
        if cfg.base_quant not in BASE_QUANTS:
            raise UserError(f"--base_quant {cfg.base_quant!r}: use nf4, or leave it empty")
        model, _ = load_hf(cfg.from_hf, cfg.base_quant)
        model, tokenizer, added = import_tokenizer(cfg.from_hf, cfg.out, model)
        state, nf4 = nf4_checkpoint_state(model)
        save_checkpoint({"model": state, **({"nf4": nf4} if nf4 else {}), "config": asdict(model.cfg), "step": 0,
                         "tokenizer": tokenizer, "added_token_ids": added}, cfg.out)
        print(f"wrote {cfg.out}: {model.num_params() / 1e6:.1f}M parameters, {model.cfg.n_layers} layers" +
              (", the projections in 4-bit NF4 (fine-tune it with --lora_rank and --base_quant nf4)" if nf4 else ""))
        if added:
            print(f"added {len(added)} tokens the tokenizer lacked (ids {added[0]}-{added[-1]}), their rows starting "
                  f"at the mean of the others: fine-tuning trains them")
        if tokenizer:
            print(f"its tokenizer: {tokenizer} (fine-tune with --init_from {cfg.out} --tokenizer {tokenizer})")
        else:
            print(f"note: {cfg.from_hf} has no tokenizer.json or tokenizer.model; pass its tokenizer "
                  "to the other scripts with --tokenizer", file=sys.stderr)
    elif cfg.to_peft:
        base = save_peft(cfg.to_peft, cfg.out)
        print(f"wrote {cfg.out}/: PEFT adapters for {base} (export that base with --to_hf {base})")
    else:
        model, ckpt = load_merged(cfg.to_hf)
        tokenizer = cfg.tokenizer or ckpt.get("tokenizer") or ""
        if tokenizer and not os.path.exists(tokenizer):
            raise UserError(f"{tokenizer}: no such tokenizer (pass --tokenizer)")
        save_hf(model, cfg.out, tokenizer or None)
        print(f"wrote {cfg.out}/ " + ("with tokenizer " + tokenizer if tokenizer else
                                      "without a tokenizer (pass --tokenizer to include one)"))


def main(argv=None):
    run_guarded(convert, parse_config(ConvertConfig, argv, description=__doc__.strip().splitlines()[0]),
                errors=(ModelError,))


if __name__ == "__main__":
    main()
