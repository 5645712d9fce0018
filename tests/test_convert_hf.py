"""convert_hf.py: parity with transformers' LlamaForCausalLM both ways, and the tokenizer export."""
import json
import re
from dataclasses import asdict

import pytest
import sentencepiece as spm
import torch

import convert_hf
from model import ModelConfig, Transformer, load_model, read_checkpoint, save_checkpoint
from tokenizer import (CHAT_MARKERS, SPECIAL_PIECES, TOOL_PIECES, TOOLS_INTRO, TOOLS_OUTRO, encode_conversation,
                       load_tokenizer, render_prompt, render_text)

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
LINEAR = {"rope_type": "linear", "factor": 4.0}
DYNAMIC = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 16}  # runs to 64 positions
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16.0}
ODD = dict(dim=48, n_layers=2, n_heads=4, vocab_size=97, hidden_dim=80, max_seq_len=64, rope_theta=5000.0)
VARIANTS = {
    "mha-tied": dict(n_kv_heads=4, tie_embeddings=True),
    "gqa-untied": dict(n_kv_heads=2, tie_embeddings=False),
    "gqa-tied-llama3": dict(n_kv_heads=2, tie_embeddings=True, rope_scaling=LLAMA3),
    "mha-untied-llama3": dict(n_kv_heads=4, tie_embeddings=False, rope_scaling=LLAMA3),
    "gqa-tied-linear": dict(n_kv_heads=2, tie_embeddings=True, rope_scaling=LINEAR),
    "mha-untied-dynamic": dict(n_kv_heads=4, tie_embeddings=False, rope_scaling=DYNAMIC),
    "gqa-untied-yarn": dict(n_kv_heads=2, tie_embeddings=False, rope_scaling=YARN),
}


def hf_rope(scaling) -> tuple:
    """(transformers' rope parameters, its max_position_embeddings) for one of ours: a dynamic model is declared
    at its trained length, which transformers scales beyond."""
    if not scaling:
        return {"rope_type": "default"}, ODD["max_seq_len"]
    if scaling["rope_type"] == "dynamic":
        return {k: v for k, v in scaling.items() if k != "original_max_position_embeddings"}, \
            scaling["original_max_position_embeddings"]
    return dict(scaling), ODD["max_seq_len"]


def to_legacy_config(folder):
    """Rewrite a saved config.json in transformers 4's spelling: rope_theta and rope_scaling at the top level
    (with the old "type" key), no rope_parameters."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    kind = params.pop("rope_type")
    config["rope_scaling"] = {"type": kind, **params} if kind != "default" else None
    path.write_text(json.dumps(config))


def perturb_norms(module: torch.nn.Module):
    """Norm weights start at 1 in both libraries; make them differ so a wrong mapping shows."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)


def assert_same_model(ours: Transformer, hf, vocab_size: int):
    tokens = torch.randint(0, vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(tokens)[0] - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4, f"logits differ by {diff}"
    prompt = tokens[0, :5].tolist()
    mine = ours.generate(prompt, max_new_tokens=20, temperature=0)
    theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),  # (else a
                         max_new_tokens=20, do_sample=False,  # prompt's id 0 is masked as padding)
                         pad_token_id=0, eos_token_id=None)[0, 5:].tolist()  # (min_new_tokens would forbid id 2)
    assert mine == theirs


@pytest.mark.parametrize("style", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_ours_to_hf(variant, style, tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**ODD, **VARIANTS[variant])).eval()
    perturb_norms(model)
    convert_hf.save_hf(model, str(tmp_path))
    if style == "rope_scaling":
        to_legacy_config(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    assert_same_model(model, hf, ODD["vocab_size"])


@pytest.mark.parametrize("style", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_to_ours(variant, style, tmp_path):
    v = VARIANTS[variant]
    rope, max_positions = hf_rope(v.get("rope_scaling"))
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=v["n_kv_heads"], max_position_embeddings=max_positions, rms_norm_eps=1e-5,
        tie_word_embeddings=v["tie_embeddings"], rope_parameters={**rope, "rope_theta": 5000.0})).eval()
    perturb_norms(hf)
    hf.save_pretrained(str(tmp_path))
    if style == "rope_scaling":
        to_legacy_config(tmp_path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    model, cfg = convert_hf.load_hf(str(tmp_path))
    assert cfg == ModelConfig(**ODD, **v)
    assert_same_model(model.eval(), hf, 97)


def test_sharded_and_pytorch_bin_files(tmp_path):
    torch.manual_seed(2)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(hf.state_dict(), legacy / "pytorch_model.bin")
    for folder in (tmp_path / "sharded", legacy):
        model, _ = convert_hf.load_hf(str(folder))
        assert_same_model(model.eval(), hf, 97)


def test_legacy_config_fields():
    """transformers 4 files: rope_theta and rope_scaling at the top level, no head_dim."""
    cfg = convert_hf.config_from_hf({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 96, "vocab_size": 100, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}})
    assert (cfg.n_kv_heads, cfg.rope_theta, cfg.rope_scaling, cfg.tie_embeddings) == (4, 500000.0, LLAMA3, False)


@pytest.mark.parametrize("change, words", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 32}, "head_dim"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "mscale": 1.0, "mscale_all_dim": 1.0}}, "mscale"),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4}}, "longrope"),
    ({"model_type": "mistral"}, "mistral"),
])
def test_unsupported_configs_are_refused(change, words):
    hf = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 96, "vocab_size": 100, "max_position_embeddings": 128, **change}
    with pytest.raises(ValueError, match=words) as err:
        convert_hf.config_from_hf(hf)
    assert "\n" not in str(err.value)


def test_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        convert_hf.load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 96, "vocab_size": 100, "max_position_embeddings": 128}))
    with pytest.raises(ValueError, match="no model.safetensors"):
        convert_hf.load_hf(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        convert_hf.load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    with pytest.raises(ValueError, match="no 'num_attention_heads'"):
        convert_hf.load_hf(str(tmp_path))


# ----------------------------------------------------------------------------- tokenizer

SAMPLES = [
    "Tom found a red ball in the park.",
    " Leading space, and  two   runs of spaces.  ",
    "It was 1234 steps away; 3.14 + 2 = 5.14",
    "今天天气很好。我们去公园散步。他有三个苹果。",
    "Mixed: Lily 看见了 a tiny bird 🐦 ζ∑ ünïcödé\n\nnew\tlines",
    "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n<think>3 + 4 = 7</think>7<|im_end|>",
    "glued<think>x</think>y<|im_end|>z",
]


@pytest.fixture(scope="module")
def exported(tokenizer_path, tmp_path_factory):
    """Our model + tokenizer exported together, as --to_hf does."""
    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(3)
    model = Transformer(ModelConfig(**{**ODD, "vocab_size": 512})).eval()
    convert_hf.save_hf(model, str(out), tokenizer_path)
    return model, str(out), spm.SentencePieceProcessor(model_file=tokenizer_path)


def test_tokenizer_encodes_like_sentencepiece(exported):
    _, out, sp = exported
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in SAMPLES:
        ids = sp.encode(text)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == sp.decode(ids) == text
    pieces = list(SPECIAL_PIECES.values())  # the chat markers, the think and the tool tags
    assert tok.convert_tokens_to_ids(pieces) == [sp.piece_to_id(p) for p in pieces] and sp.unk_id() not in \
        [sp.piece_to_id(p) for p in pieces]
    for piece in pieces:
        assert tok.encode(f"x{piece}y") == sp.encode(f"x{piece}y") and tok.encode(piece) == [sp.piece_to_id(piece)]
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == \
        (sp.piece_to_id("<|im_end|>"), sp.bos_id(), sp.pad_id())


def test_chat_template_matches_ours(exported, tokenizer_path):
    _, out, _ = exported
    tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3 + 4? 你好"},
                {"role": "assistant", "content": "<think>3 + 4 = 7</think>7"}, {"role": "user", "content": "Thanks"}]
    ours = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == ours + "<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == render_prompt(load_tokenizer(tokenizer_path), messages, add_generation_prompt=True)


TOOLS = [{"type": "function", "function": {"name": "weather", "description": "今天的天气 in a city", "parameters": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "calculator", "description": "Work out an arithmetic expression.",
                                           "parameters": {"type": "object", "properties": {"expression": {
                                               "type": "string"}}}}}]
TOOL_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in 北京, and 3 + 4?"},
             {"role": "assistant", "content": "<think>\nTwo calls.\n</think>\n", "tool_calls": [
                 {"name": "weather", "arguments": {"city": "北京"}},
                 {"name": "calculator", "arguments": {"expression": "3 + 4"}}]},
             {"role": "tool", "content": '{"sky": "晴", "temp": 21}'}, {"role": "tool", "content": "7"},
             {"role": "assistant", "content": "Sunny, 21 degrees; 3 + 4 = 7."}]


def openai_calls(messages) -> list:
    """The messages with each call as OpenAI's API sends it: {"type": "function", "function": {...}}, its arguments a
    JSON string."""
    return [{**m, "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {
        "name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
        for i, c in enumerate(m["tool_calls"])]} if m.get("tool_calls") else m for m in messages]


def assert_tool_chats_render_as_ours(hf_tok, tok):
    """transformers' apply_chat_template(tools=...) with an exported tokenizer gives render_text's text and our ids: a
    whole tool chat (calls, a run of results, the answer), and the prompts before its first reply (no system prompt)
    and before its answer (also enable_thinking=False); the calls in our form and in OpenAI's."""
    for messages, generation_prompt, thinking in [(TOOL_CHAT, False, None), (TOOL_CHAT[1:2], True, None),
                                                  (TOOL_CHAT[:-1], True, None), (TOOL_CHAT[:-1], True, False)]:
        text = render_text(messages, generation_prompt, thinking, tools=TOOLS)
        ours = render_prompt(tok, messages, generation_prompt, thinking, tools=TOOLS) if generation_prompt else \
            encode_conversation(tok, messages, tools=TOOLS)[0]
        for theirs in (messages, openai_calls(messages)):
            kwargs = dict(tools=TOOLS, add_generation_prompt=generation_prompt, enable_thinking=thinking)
            assert hf_tok.apply_chat_template(theirs, tokenize=False, **kwargs) == text
            assert list(hf_tok.apply_chat_template(theirs, tokenize=True, return_dict=False, **kwargs)) == ours


def test_chat_template_offers_tools_as_ours(exported, tokenizer_path):
    _, out, sp = exported
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = [sp.piece_to_id(piece) for piece in TOOL_PIECES.values()]
    assert tok.convert_tokens_to_ids(list(TOOL_PIECES.values())) == ids and sp.unk_id() not in ids
    assert_tool_chats_render_as_ours(tok, load_tokenizer(tokenizer_path))


def test_an_imported_tokenizer_gets_the_tool_tags_and_its_export_offers_tools_as_ours(hf_tokenizer_json, tmp_path):
    """A SmolLM2-like tokenizer.json (byte-level BPE with the chat markers, without the think and tool tags): the
    import appends the 6 missing pieces, the model grows 6 rows (the mean of the others, embedding and output), and the
    export carries the pieces (not special: llama.cpp's converter makes them user-defined) and renders tools as ours."""
    from tokenizers import AddedToken, Tokenizer
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    smol = Tokenizer.from_file(hf_tokenizer_json)
    smol.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in CHAT_MARKERS])
    smol.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    vocab = smol.get_vocab_size()
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=512, tie_word_embeddings=False)).save_pretrained(str(hf_dir))

    convert_hf.main(["--from_hf", str(hf_dir), "--out", str(tmp_path / "base.pt")])
    ckpt = read_checkpoint(str(tmp_path / "base.pt"))
    added = list(range(vocab, vocab + 6))
    assert ckpt["added_token_ids"] == added and ckpt["config"]["vocab_size"] == vocab + 6
    tok = load_tokenizer(ckpt["tokenizer"])
    assert [tok.piece_id(piece) for piece in list(SPECIAL_PIECES.values())[2:]] == added  # think, then tool tags
    for name in ("tok_embeddings.weight", "output.weight"):
        rows = ckpt["model"][name]
        assert rows.shape[0] == vocab + 6 and torch.equal(rows[added], rows[:vocab].mean(0).expand(6, -1)), name

    convert_hf.main(["--to_hf", str(tmp_path / "base.pt"), "--out", str(tmp_path / "export")])
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert exported.convert_tokens_to_ids(list(TOOL_PIECES.values())) == added[2:]
    config = json.load(open(tmp_path / "export" / "tokenizer_config.json"))
    assert {t["content"]: t["special"] for t in config["added_tokens_decoder"].values()} == {
        "<|endoftext|>": True, **dict.fromkeys(CHAT_MARKERS, True), "<think>": False, "</think>": False,
        **dict.fromkeys(TOOL_PIECES.values(), False)}
    assert_tool_chats_render_as_ours(exported, tok)


def test_exported_folder_loads_and_stops_at_chat_end(exported):
    model, out, sp = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    eos = hf.generation_config.eos_token_id
    assert sorted(eos) == sorted([sp.piece_to_id("<|im_end|>"), sp.eos_id()])
    assert hf.config.bos_token_id == sp.bos_id()
    assert_same_model(model, hf, 512)


def test_export_tells_gguf_converters_the_special_pieces_and_no_space_prefix(exported):
    """What llama.cpp's convert_hf_to_gguf.py reads (tests/test_gguf.py runs it when llama.cpp is installed):
    added_tokens_decoder marks a token special (a control token in the GGUF) or not (user-defined), and
    add_prefix_space false becomes the GGUF's add_space_prefix false."""
    _, out, sp = exported
    config = json.load(open(f"{out}/tokenizer_config.json"))
    assert config["add_prefix_space"] is False and config["add_bos_token"] is False
    decoder = {t["content"]: (int(i), t["special"]) for i, t in config["added_tokens_decoder"].items()}
    for piece, special in [("<|im_start|>", True), ("<|im_end|>", True), ("<think>", False), ("</think>", False),
                           *((tag, False) for tag in TOOL_PIECES.values()),
                           ("<s>", True), ("</s>", True), ("<pad>", True), ("<unk>", True)]:
        assert decoder[piece] == (sp.piece_to_id(piece), special), piece
    assert {t["content"]: t["special"] for t in json.load(open(f"{out}/tokenizer.json"))["added_tokens"]} == \
        {piece: special for piece, (_, special) in decoder.items()}  # the same as transformers reads


def test_the_ollama_modelfile_offers_tools_as_the_chat_template_does(exported):
    """ollama is not installed here: the Modelfile is checked as text, in ollama's Go template syntax (docs.ollama.com
    /template: .Tools, each tool's .Function, .ToolCalls with .Function.Name and .Function.Arguments, the tool role).
    Its template was rendered by hand with Go's text/template against render_text(..., tools=...)."""
    _, out, _ = exported
    modelfile = open(f"{out}/Modelfile").read()
    assert modelfile.startswith('FROM ./model.gguf\nTEMPLATE """')
    assert modelfile.endswith('"""\nPARAMETER stop <|im_end|>\n') and modelfile.count('"""') == 2  # (ollama's parser
    template = modelfile.split('"""')[1]  # ends the value at the next triple quote)
    assert template.count("{{") == template.count("}}") and \
        len(re.findall(r"{{-? (?:if|range) ", template)) == len(re.findall(r"{{-? end }}", template))
    # the tools, in the system turn after the system prompt and a blank line, one line each, as CHAT_TEMPLATE_JINJA
    assert template.startswith("{{- if .Tools }}<|im_start|>system\n{{ if and .Messages (eq (index .Messages 0).Role "
                               '"system") }}{{ (index .Messages 0).Content }}\n\n{{ end }}' + TOOLS_INTRO +
                               '\n{{- range .Tools }}\n{"type": "function", "function": {{ .Function }}}\n{{- end }}' +
                               TOOLS_OUTRO + "<|im_end|>\n{{ end }}")
    # a reply's calls after its content, each in the tags (ollama parses what follows the first text under .ToolCalls)
    assert '{{- if .ToolCalls }}{{ range .ToolCalls }}{{ $newline }}<tool_call>\n{"name": "{{ .Function.Name }}", ' \
           '"arguments": {{ .Function.Arguments }}}\n</tool_call>{{ $newline = "\\n" }}{{ end }}{{ end }}<|im_end|>\n' \
           in template
    # a run of tool results, one user turn
    assert '{{- else if eq .Role "tool" }}\n{{- if ne $previous "tool" }}<|im_start|>user\n{{ else }}\n{{ end }}' \
           "<tool_response>\n{{ .Content }}\n</tool_response>" in template
    # without tools, every message as ChatML, then the assistant header
    assert "{{- else }}<|im_start|>{{ .Role }}\n{{ .Content }}\n" in template
    assert template.endswith("{{- end }}<|im_start|>assistant\n")


def test_tokenizer_larger_than_vocabulary_is_refused(tokenizer_path, tmp_path):
    model = Transformer(ModelConfig(**ODD))  # 97 ids, the tokenizer has 512
    with pytest.raises(ValueError, match="512 pieces"):
        convert_hf.save_hf(model, str(tmp_path), tokenizer_path)
    assert not (tmp_path / "config.json").exists()


def test_cli_round_trip(tokenizer_path, tmp_path):
    torch.manual_seed(4)
    cfg = ModelConfig(**{**ODD, "vocab_size": 512, "rope_scaling": LLAMA3, "tie_embeddings": False})
    model = Transformer(cfg)
    save_checkpoint({"model": model.state_dict(), "config": asdict(cfg), "step": 7, "tokenizer": tokenizer_path},
                    str(tmp_path / "ckpt.pt"))
    convert_hf.main(["--to_hf", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "tokenizer.json").exists()  # taken from the checkpoint's "tokenizer"
    convert_hf.main(["--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back.pt")])
    back, ckpt = load_model(str(tmp_path / "back.pt"))
    assert ckpt["config"] == asdict(cfg) and ckpt["step"] == 0
    assert ckpt["tokenizer"].endswith("tokenizer.model")
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert_hf.main(["--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        convert_hf.main(["--from_hf", str(tmp_path), "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "config.json" in err[-1]


@pytest.mark.parametrize("style", ["prepend", "metaspace"])
def test_a_llama2_style_tokenizer_json_is_imported_without_its_space_prefix(tmp_path, style, capsys):
    """Llama 2 / TinyLlama tokenizers put "▁" before every text they encode (older files with a Prepend
    normalizer, newer ones with a Metaspace pre-tokenizer): the imported copy does not, so the template encodes
    piece by piece into ids that decode to the template, and the export's chat template gives the same ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from conftest import small_corpus
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    if style == "prepend":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first",
                                                                                     split=False)])
    tok.train_from_iterator(small_corpus(), trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({piece: len(vocab) + i for i, piece in enumerate(byte_pieces)})  # byte fallback's pieces
    tok = Tokenizer.from_str(json.dumps(spec))
    hf_dir = tmp_path / "hf"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64)).save_pretrained(str(hf_dir))
    tok.save(str(hf_dir / "tokenizer.json"))
    assert tok.encode("user", add_special_tokens=False).tokens[0].startswith("\u2581")  # as it comes

    convert_hf.main(["--from_hf", str(hf_dir), "--out", str(tmp_path / "base.pt")])
    assert "Llama 2 style" in capsys.readouterr().out
    imported = load_tokenizer(str(tmp_path / "base_tokenizer" / "tokenizer.json"))
    messages = [{"role": "user", "content": "Tom found three apples. 今天天气很好。"},
                {"role": "assistant", "content": " It was 12 steps away."}]
    ids, _ = encode_conversation(imported, messages)
    assert imported.decode(ids) == render_text(messages)
    convert_hf.main(["--to_hf", str(tmp_path / "base.pt"), "--out", str(tmp_path / "export")])
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    theirs = exported.apply_chat_template(messages, tokenize=True)
    assert list(getattr(theirs, "input_ids", theirs)) == ids
