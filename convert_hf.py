"""
Convert between our checkpoints and Hugging Face transformers' Llama format.

  python convert_hf.py --from_hf path/to/llama_folder --out out/base.pt   # then fine-tune it with our scripts
  python convert_hf.py --to_hf out/sft/best.pt --out out/hf               # tokenizer: the one the checkpoint names
  python convert_hf.py --to_hf out/sft/best.pt --out out/hf --tokenizer data/tokenizer.model
  python convert_hf.py --to_peft out/sft_lora/best.pt --out out/adapter  # a LoRA run's adapters, for PEFT

An imported model keeps its own tokenizer: a tokenizer.json is copied beside the checkpoint (into
CKPT_tokenizer/) with the chat markers <|im_start|> <|im_end|> and the think tags added where it lacks
them; the model grows an embedding and output row for each (the mean of the existing rows), which
fine-tuning then trains (a LoRA run too). Pass that tokenizer.json to the other scripts with --tokenizer.

The export is a plain LlamaForCausalLM (config.json + model.safetensors; a LoRA checkpoint is merged
first) with its tokenizer (our tokenizer.model plus an exact tokenizer.json, or an imported model's
tokenizer.json) and dataset_sft.py's ChatML template, so
transformers' AutoModelForCausalLM / AutoTokenizer load it. tokenizer_config.json also tells GGUF
converters which pieces are special (llama.cpp's convert_hf_to_gguf.py makes the chat markers
control tokens and <think> </think> user-defined ones) and that no space prefix is added; a
Modelfile beside it runs the converted model.gguf in ollama with the same template.

Our weights already use HF's rotate-half RoPE layout, so converting is a renaming of tensors:
nothing is permuted. Needs the `safetensors` package (pip install safetensors); transformers
is not needed to convert, only to use the result.

Token ids in the export: the tokenizer adds no <s>/</s> by itself, so tokenizer.encode(text)
equals SentencePiece's. Our pretraining data separates documents with </s>, so for base
completion put </s> before a prompt (as inference.py does). For chat, eos is <|im_end|>;
generation_config.json stops at <|im_end|> and </s>.
"""
import json
import os
import shutil
import struct
import sys
from dataclasses import asdict, dataclass, field

import torch

from cli import UserError, parse_config, run_guarded
from dataset_sft import CHAT_TEMPLATE_JINJA
from lora import load_model
from model import ModelConfig, ModelError, Transformer, load_state_dict_checked, read_checkpoint, save_checkpoint
from records import atomic_path, atomic_write
from tokenizer import (CHAT_MARKERS, SPECIAL_PIECES, add_chat_pieces, load_tokenizer, special_ids,
                       without_space_prefix)

# Our per-layer module names -> Hugging Face's (under model.layers.{i}.)
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


def hf_names(cfg: ModelConfig) -> dict:
    """Our tensor name -> Hugging Face's, for every tensor a model with this config stores."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:  # tied: HF stores no lm_head and ties it on load
        names["output.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        for ours, theirs in LAYER_NAMES.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


# ----------------------------------------------------------------------------- config

# The rope scaling types we run, and the keys of each that transformers reads
ROPE_KEYS = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                      "truncate")}


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a LlamaForCausalLM config.json; one-line error for what we cannot run."""
    def refuse(why):
        raise UserError(f"{source}: {why}; only plain Llama models convert")

    def need(key):
        if key not in hf:
            raise UserError(f"{source}: no {key!r}")
        return hf[key]

    if hf.get("model_type") != "llama":
        refuse(f"model_type is {hf.get('model_type')!r}, not 'llama'")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act is {hf['hidden_act']!r}, not 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            refuse(f"{flag} is true (we have no biases)")
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
    return ModelConfig(
        dim=dim, n_layers=need("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, vocab_size=need("vocab_size"),
        hidden_dim=need("intermediate_size"), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), rope_scaling=rope_scaling,
        max_seq_len=max_len, tie_embeddings=hf.get("tie_word_embeddings", False))


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32, token_ids: dict = None) -> dict:
    """config.json for a LlamaForCausalLM equal to our model (token_ids: bos/eos/pad ids or None)."""
    rope = {"rope_type": "llama3", **cfg.rope_scaling} if cfg.rope_scaling else {"rope_type": "default"}
    max_len = cfg.max_seq_len
    if rope["rope_type"] == "dynamic":  # transformers scales beyond max_position_embeddings: the trained length
        max_len = rope.pop("original_max_position_embeddings")
    token_ids = token_ids or {}
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": max_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        # Both spellings: transformers >= 5 reads rope_parameters; transformers 4, llama.cpp
        # and vLLM read rope_theta and rope_scaling.
        "rope_parameters": {**rope, "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta, "rope_scaling": rope if cfg.rope_scaling else None,
        "bos_token_id": token_ids.get("bos"), "eos_token_id": token_ids.get("eos"),
        "pad_token_id": token_ids.get("pad"), "dtype": dtype_name, "torch_dtype": dtype_name,
    }


# ----------------------------------------------------------------------------- weights

def read_hf_tensors(model_dir: str) -> dict:
    """All tensors of a HF model folder: model.safetensors, its sharded index, or pytorch_model.bin."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise UserError(f"{index}: not a safetensors index (no weight_map)") from None
        tensors = {}
        for shard in shards:
            tensors.update(read_weights_file(os.path.join(model_dir, shard)))
        return tensors
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(model_dir, name)):
            return read_weights_file(os.path.join(model_dir, name))
    raise UserError(f"{model_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def read_weights_file(path: str) -> dict:
    """The tensors of one .safetensors or .bin file, with a one-line error if it is damaged."""
    if path.endswith(".safetensors"):
        load = _safetensors().load_file
    else:
        def load(p):
            return torch.load(p, map_location="cpu", weights_only=True)  # never run pickled code
    try:
        return load(path)
    except Exception as e:  # safetensors, zip and unpickling errors share no narrower base class
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: cannot read the weights (corrupt or truncated?): {detail}") from None


def load_hf(model_dir: str) -> "tuple[Transformer, ModelConfig]":
    """Our Transformer (fp32, CPU) from a Hugging Face LlamaForCausalLM folder."""
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{model_dir}: no config.json (expected a Hugging Face model folder)")
    with open(config_path, encoding="utf-8") as f:
        try:
            hf_cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{config_path}: not valid JSON ({e})") from None
    cfg = config_from_hf(hf_cfg, config_path)
    hf = read_hf_tensors(model_dir)
    names = hf_names(cfg)
    ignored = {"lm_head.weight"} if cfg.tie_embeddings else set()  # some tied models store it anyway
    extra = sorted(k for k in hf if k not in names.values() and k not in ignored
                   and not k.endswith("rotary_emb.inv_freq"))  # old files keep RoPE's buffer
    if extra:
        raise UserError(f"{model_dir}: unexpected tensor {extra[0]}" +
                        (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    missing = [theirs for theirs in names.values() if theirs not in hf]
    if missing:
        raise UserError(f"{model_dir}: missing tensor {missing[0]}")
    state = {ours: hf[theirs] for ours, theirs in names.items()}
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model = Transformer(cfg)
    load_state_dict_checked(model, state, model_dir)  # copies into fp32 parameters
    return model, cfg


def save_hf(model: Transformer, out_dir: str, tokenizer: str = None):
    """Write `model` as a HF LlamaForCausalLM folder, with the tokenizer files when given its tokenizer
    (our SentencePiece model, or an imported tokenizer.json). Every file is written under a temporary
    name and renamed; config.json comes last, so a folder with a config.json is complete."""
    save_file = _safetensors().save_file
    os.makedirs(out_dir, exist_ok=True)
    token_ids = None
    if tokenizer:
        save = save_tokenizer_json if tokenizer.endswith(".json") else save_tokenizer
        token_ids = save(tokenizer, out_dir, model.cfg)
    state = model.state_dict()
    tensors = {theirs: state[ours].detach().cpu().contiguous() for ours, theirs in hf_names(model.cfg).items()}
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

def _varint(buf: bytes, pos: int):
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _proto_fields(buf: bytes):
    """Yield (field number, value) of a serialized protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise UserError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def read_sentencepiece(path: str) -> dict:
    """Pieces, scores, piece types and the settings an exact tokenizer.json depends on, read from
    the .model protobuf directly (sentencepiece's Python API hides piece types, and its proto
    module needs the protobuf package). Field numbers: sentencepiece_model.proto."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        pieces, trainer, normalizer = [], {}, {}
        for number, value in _proto_fields(data):
            if number == 1:
                piece = dict(_proto_fields(value))
                pieces.append((piece[1].decode("utf-8"), struct.unpack("<f", piece.get(2, b"\0\0\0\0"))[0],
                               piece.get(3, 1)))  # type 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
            elif number == 2:
                trainer = dict(_proto_fields(value))
            elif number == 3:
                normalizer = dict(_proto_fields(value))
    except (OSError, ValueError, IndexError, KeyError, UnicodeDecodeError, struct.error):
        raise UserError(f"{path}: cannot read the SentencePiece model") from None
    return {"pieces": pieces, "bpe": trainer.get(3, 1) == 2,
            "normalizer": normalizer.get(1, b"nmt_nfkc").decode(), "add_dummy_prefix": bool(normalizer.get(3, 1)),
            "remove_extra_whitespaces": bool(normalizer.get(4, 1)), "byte_fallback": bool(trainer.get(35, 0)),
            "whitespace_as_suffix": bool(trainer.get(24, 0))}


def tokenizer_json(spm_info: dict) -> dict:
    """A `tokenizers` BPE tokenizer that encodes exactly like the SentencePiece model:
    spaces become ▁ and nothing else is normalized, special and user-defined pieces are
    matched first, byte fallback for unknown characters, and merges ranked by piece score
    (SentencePiece's BPE merges the highest-scoring available pair first). One difference, as
    in every HF Llama tokenizer: the literal text "</s>" (or <s>, <pad>, <unk>) becomes that
    special token, where SentencePiece spells it out character by character."""
    pieces = spm_info["pieces"]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    normal = {piece for piece, _, kind in pieces if kind == 1}
    merges = []  # (rank key, left, right)
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != 1:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append(((-score, i, cut), left, right))
    merges.sort()
    added = [{"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind != 4 or piece in CHAT_MARKERS}
             for i, (piece, _, kind) in enumerate(pieces) if kind in (2, 3, 4)]
    unk = next((piece for piece, _, kind in pieces if kind == 2), None)
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": spm_info["byte_fallback"],
                  "ignore_merges": False, "vocab": vocab, "merges": [[left, right] for _, left, right in merges]},
    }


# For ollama, beside the export: `ollama create NAME -f Modelfile` once model.gguf is made (see the README).
OLLAMA_MODELFILE = """FROM ./model.gguf
TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
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
    a control token (the chat markers, <s>, </s>...) and the others user-defined (<think>, </think>: always
    one token, and shown in the output). add_prefix_space false: our pieces carry no dummy "▁" prefix."""
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    added = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added_tokens}
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",  # load tokenizer.json as written, no rebuilding
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_seq_len,
        "chat_template": CHAT_TEMPLATE_JINJA, "added_tokens_decoder": added, **special})


def save_tokenizer_json(path: str, out_dir: str, cfg: ModelConfig) -> dict:
    """An imported model's tokenizer.json (with the chat markers convert_hf.py added) as it is, plus
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
    Llama 2 style space prefix), the chat markers and think tags it lacks are added, and the model grows rows
    for them. A tokenizer.model is used where it is when it has the markers (our own export) or is the only
    tokenizer (markers cannot be added to it)."""
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
    if without_space_prefix(source, path):
        print(f"note: {source} puts a space before every text it encodes (Llama 2 style); the imported copy does "
              f"not, so the chat template encodes piece by piece exactly")
    added = add_chat_pieces(path, path)
    model = with_vocab(model, load_tokenizer(path).vocab_size, added)
    return model, path, added


def has_chat_pieces(path: str) -> bool:
    tok = load_tokenizer(path)
    return all(tok.piece_id(piece) is not None for piece in SPECIAL_PIECES.values())


@torch.no_grad()
def with_vocab(model: Transformer, vocab_size: int, new_ids: list) -> Transformer:
    """The model with at least vocab_size embedding and output rows; the rows of new_ids start at the mean
    of the existing rows (a neutral start: a random row could dominate the output)."""
    cfg = model.cfg
    rows = max(vocab_size, cfg.vocab_size)
    state = model.state_dict()
    for name in ("tok_embeddings.weight", "output.weight"):
        old = state[name]
        grown = torch.cat([old, old.new_zeros(rows - cfg.vocab_size, cfg.dim)])
        grown[new_ids] = old.mean(0)
        state[name] = grown
    grown_model = Transformer(ModelConfig.from_dict({**asdict(cfg), "vocab_size": rows}))
    load_state_dict_checked(grown_model, state, "the imported model")
    return grown_model


# ----------------------------------------------------------------------------- PEFT adapters

def save_peft(ckpt_path: str, out_dir: str) -> str:
    """A LoRA checkpoint's adapters as PEFT writes them (adapter_config.json + adapter_model.safetensors), for
    peft.PeftModel.from_pretrained on the base exported with --to_hf. Trained new-token rows become PEFT's
    trainable_token_indices."""
    ckpt = read_checkpoint(ckpt_path)
    if "lora" not in ckpt:
        raise UserError(f"{ckpt_path} is not a LoRA checkpoint (train_sft.py --lora_rank N makes one)")
    meta, cfg = ckpt["lora"], ModelConfig.from_dict(ckpt["config"])
    rows = {"tok_embeddings.rows": "model.embed_tokens", "output.rows": "lm_head"}
    tensors = {}
    for name, tensor in ckpt["model"].items():
        if name in rows:
            theirs = f"{rows[name]}.token_adapter.trainable_tokens_delta"
        else:  # layers.{i}.attention.wq.lora_A -> model.layers.{i}.self_attn.q_proj.lora_A.weight
            where, kind = name.rsplit(".", 1)
            _, layer, module = where.split(".", 2)
            theirs = f"model.layers.{layer}.{LAYER_NAMES[module]}.{kind}.weight"
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


# ----------------------------------------------------------------------------- command line

@dataclass
class ConvertConfig:
    from_hf: str = field(default="", metadata={"help": "Hugging Face Llama folder to convert into our checkpoint"})
    to_hf: str = field(default="", metadata={"help": "our checkpoint to export as a Hugging Face folder"})
    to_peft: str = field(default="", metadata={"help": "a LoRA checkpoint whose adapters to export for PEFT"})
    out: str = field(default="", metadata={"help": "the checkpoint (.pt) or folder to write"})
    tokenizer: str = field(default="", metadata={"help": "with --to_hf: tokenizer.model or tokenizer.json to "
                                                         "export (empty: the one recorded in the checkpoint)"})


def convert(cfg: ConvertConfig):
    if sum(map(bool, (cfg.from_hf, cfg.to_hf, cfg.to_peft))) != 1 or not cfg.out:
        raise UserError("give one of --from_hf DIR, --to_hf CKPT or --to_peft CKPT, and --out")
    if cfg.from_hf:
        model, _ = load_hf(cfg.from_hf)
        model, tokenizer, added = import_tokenizer(cfg.from_hf, cfg.out, model)
        save_checkpoint({"model": model.state_dict(), "config": asdict(model.cfg), "step": 0,
                         "tokenizer": tokenizer, "added_token_ids": added}, cfg.out)
        print(f"wrote {cfg.out}: {model.num_params() / 1e6:.1f}M parameters, {model.cfg.n_layers} layers")
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
        model, ckpt = load_model(cfg.to_hf)
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
