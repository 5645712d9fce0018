"""Each training stage's settings: its own tuned values in its own file, listed by --help with the
presets' values, printed when a run starts and kept in its checkpoints; and which errors are one line."""
import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import distill
import runtime
import train
import train_dpo
import train_grpo
import train_sft
from cli import UserError
from conftest import ROOT, RandomTokens, small_corpus
from model import ModelConfig, ModelError, Transformer, save_checkpoint

# What a user tunes per stage: every script's config states these itself, none inherits another stage's.
TUNED = ["out_dir", "batch_size", "grad_accum", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay",
         "grad_clip", "eval_every", "eval_batches", "log_every"]
STAGES = [("train.py", train.PretrainConfig, train.PRESETS), ("train_sft.py", train_sft.SFTConfig, train_sft.PRESETS),
          ("distill.py", distill.DistillConfig, distill.PRESETS), ("train_dpo.py", train_dpo.DPOConfig, train_dpo.PRESETS),
          ("train_grpo.py", train_grpo.GRPOConfig, train_grpo.PRESETS)]
QUICK = dict(batch_size=2, max_steps=2, warmup_steps=1, eval_every=2, eval_batches=1, log_every=1, device="cpu",
             peak_tflops=1.0)  # peak_tflops: no CPU speed measurement


@pytest.mark.parametrize("cls", [train.TrainConfig, train_sft.SFTConfig, distill.DistillConfig, train_dpo.DPOConfig,
                                 train_grpo.GRPOConfig])
def test_each_stage_states_its_tuned_values_in_its_own_file(cls):
    assert set(TUNED) <= set(vars(cls)["__annotations__"])


def option_help(text: str, name: str) -> str:
    """The help of --name in argparse's output, on one line."""
    return " ".join(re.search(rf"^  --{name} {name.upper()}(.*?)(?=^  -|\Z)", text, re.M | re.S).group(1).split())


@pytest.mark.parametrize("script,cls,presets", STAGES, ids=[s[0] for s in STAGES])
def test_help_lists_the_stage_defaults_and_the_12gb_values(script, cls, presets):
    r = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("batch_size", "lr"):
        line = option_help(r.stdout, name)
        assert f"default: {getattr(cls(), name)}" in line, line
        assert f"12gb: {presets['12gb'][name]}" in line, line


def printed_settings(out: str) -> list:
    """The `key=value` items of the settings block, which must open the output."""
    first, *rest = out.splitlines()
    assert first.startswith("settings: "), out[:200]
    block = [first] + list(itertools.takewhile(lambda line: line.startswith("  "), rest))
    return " ".join(block).removeprefix("settings: ").split()


def assert_settings_printed_and_saved(cfg, out: str):
    assert printed_settings(out) == [f"{k}={v}" for k, v in asdict(cfg).items()]
    for name in ("last.pt", "best.pt"):
        assert torch.load(f"{cfg.out_dir}/{name}", weights_only=True)["train_config"] == asdict(cfg), name


def test_pretraining_prints_its_settings_first_and_keeps_them_in_checkpoints(tmp_path, tokenizer_path, capsys):
    from dataset import DatasetConfig, build_shards
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in small_corpus(400)))
    build_shards(DatasetConfig(inputs=str(corpus), val_inputs="", val_fraction=0.1, tokenizer=tokenizer_path,
                               out_dir=str(tmp_path / "data"), num_workers=1))
    capsys.readouterr()
    cfg = train.PretrainConfig(train_data=str(tmp_path / "data/pretrain_train_*.bin"),
                               val_data=str(tmp_path / "data/pretrain_val.bin"), tokenizer=tokenizer_path,
                               out_dir=str(tmp_path / "out"), dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                               seq_len=16, **QUICK)
    runtime.run_main(train.pretrain, cfg)
    assert_settings_printed_and_saved(cfg, capsys.readouterr().out)


def tiny_checkpoint(path, vocab_size: int, max_seq_len: int = 32):
    torch.manual_seed(0)
    model_cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=max_seq_len)
    save_checkpoint({"model": Transformer(model_cfg).state_dict(), "config": asdict(model_cfg)}, str(path))
    return str(path)


@pytest.mark.parametrize("stage", ["sft", "distill"])
def test_fine_tuning_prints_its_own_settings_and_keeps_them_in_checkpoints(stage, tmp_path, tokenizer_path, capsys):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"conversations": [
        {"role": "user", "content": f"What is {i} + 1?"},
        {"role": "assistant", "content": f"<think>{i} and one more.</think>{i + 1}"}]}) + "\n" for i in range(8)))
    init = tiny_checkpoint(tmp_path / "init.pt", vocab_size=512)
    common = dict(init_from=init, train_data=str(chats), val_data=str(chats), tokenizer=tokenizer_path,
                  out_dir=str(tmp_path / stage), **QUICK)
    if stage == "sft":
        cfg = train_sft.SFTConfig(**common)
        runtime.run_main(train_sft.sft, cfg)
    else:
        cfg = distill.DistillConfig(**common, eval_problems=0, replay_data=str(chats))
        runtime.run_main(distill.distill, cfg)
    assert_settings_printed_and_saved(cfg, capsys.readouterr().out)


TINY = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16)


@pytest.mark.parametrize("error", [UserError, ModelError, FloatingPointError])  # FloatingPointError: a NaN stop
def test_a_user_error_in_the_loop_is_one_line(tmp_path, monkeypatch, capsys, error):
    def broken(*args):
        raise error("something is wrong")
    monkeypatch.setattr(train, "lr_at", broken)  # called inside the loop, before the first step
    with pytest.raises(SystemExit) as e:
        runtime.run_main(lambda cfg: train.train(cfg, Transformer(TINY), RandomTokens(64, 2, 16)),
                       train.TrainConfig(out_dir=str(tmp_path), **QUICK))
    assert e.value.code == 1 and capsys.readouterr().err.splitlines()[-1] == "error: something is wrong"


@pytest.mark.parametrize("error", ["ValueError", "KeyError"])
@pytest.mark.slow
def test_a_bug_in_the_loop_keeps_its_traceback(tmp_path, error):
    """A bug that happens to raise ValueError is not hidden behind one line."""
    code = f"""
import model, runtime, train
from conftest import RandomTokens
def broken(*args):
    raise {error}("something is wrong")
train.lr_at = broken
runtime.run_main(lambda cfg: train.train(cfg, model.Transformer(model.{TINY!r}), RandomTokens(64, 2, 16)),
               train.TrainConfig(out_dir={str(tmp_path)!r}, **{QUICK!r}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})  # for conftest's RandomTokens
    assert r.returncode == 1 and "Traceback" in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"{error}: ") and "something is wrong" in r.stderr


def test_a_bad_flag_of_a_fine_tuning_script_is_one_line(tmp_path):
    init = tiny_checkpoint(tmp_path / "init.pt", vocab_size=512)
    r = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), "--init_from", init, "--seq_len", "64",
                        "--out_dir", str(tmp_path / "sft")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr == "error: --seq_len 64 is longer than the model's max_seq_len 32\n"
    assert r.stdout.startswith("settings: ") and "seq_len=64" in r.stdout.split()


# (script, its config class, a default's line as written, the same line edited by a user)
INLINE_EDITS = [
    ("train.py", "PretrainConfig", "    lr: float = 2e-3 ", "    lr: float = 7e-3 "),
    ("train_sft.py", "SFTConfig", "    lr: float = 1e-3\n", "    lr: float = 7e-3\n"),
    ("distill.py", "DistillConfig", "    lr: float = 1e-3\n", "    lr: float = 7e-3\n"),
    ("train_dpo.py", "DPOConfig", "    lr: float = 3e-5 ", "    lr: float = 7e-3 "),
    ("train_tokenizer.py", "TokenizerConfig", "vocab_en: int = field(default=4096,", "vocab_en: int = field(default=7000,"),
    ("download_mini_data.py", "DownloadConfig", "n_sft: int = field(default=4000,", "n_sft: int = field(default=7000,"),
]


@pytest.mark.parametrize("script,cls,line,edited", INLINE_EDITS, ids=[e[0] for e in INLINE_EDITS])
def test_a_default_edited_in_the_file_is_the_cpu_recipe_with_or_without_preset(script, cls, line, edited, tmp_path):
    """A user edits the dataclass at the top of a script: `python X.py` and `python X.py --preset cpu` both use
    the edited value (the cpu preset is the defaults; it repeats none of them)."""
    import importlib.util
    from cli import parse_config
    source = (ROOT / script).read_text(encoding="utf-8")
    assert source.count(line) == 1, line
    copy = tmp_path / f"edited_{script}"
    copy.write_text(source.replace(line, edited), encoding="utf-8")
    spec = importlib.util.spec_from_file_location(copy.stem, copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    field = edited.split(":")[0].strip()
    value = getattr(getattr(module, cls)(), field)
    assert str(value) in ("0.007", "7000")
    config_class = getattr(module, cls)
    for argv in ([], ["--preset", "cpu"]):
        assert getattr(parse_config(config_class, argv, presets=module.PRESETS), field) == value, argv


def test_held_out_text_made_with_another_tokenizer_is_not_measured(tmp_path, tokenizer_path, capsys):
    """After a fine-tuning stage the loss on pretraining's held-out text is measured only when its shards hold the
    run's tokenizer's ids (a checkout where the quickstart made data/pretrain_val.bin with its own tokenizer)."""
    from dataset import DatasetConfig, build_shards
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in small_corpus(400)))
    build_shards(DatasetConfig(inputs=str(corpus), val_inputs="", val_fraction=0.1, tokenizer=tokenizer_path,
                               out_dir=str(tmp_path / "data"), num_workers=1))
    text_val = str(tmp_path / "data/pretrain_val.bin")
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=16))
    cfg = train.FinetuneConfig(text_val=text_val, tokenizer=tokenizer_path, seq_len=16, eval_batches=1, chat_val="")
    rt = runtime.Runtime("cpu")
    capsys.readouterr()
    train.report_held_out(cfg, model, rt, None, "SFT", {})
    assert "validation loss after SFT: pretraining text " in capsys.readouterr().out
    sidecar = json.loads(open(text_val + ".json").read())
    open(text_val + ".json", "w").write(json.dumps(dict(sidecar, tokenizer_sha256="0" * 64)))
    train.report_held_out(cfg, model, rt, None, "SFT", {})
    assert capsys.readouterr().out.strip() == (f"validation loss after SFT: none ({text_val} was made with another "
                                               f"tokenizer than {tokenizer_path}: not measured)")
