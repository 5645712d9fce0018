"""evaluate.py's report card: our lm-evaluation-harness model against lm-eval's own `hf` model on our --to_hf export
(per-item log-likelihoods, accuracies, generations, rolling log-likelihoods), the chat template, the card on LoRA and
int8 checkpoints, and one line for a missing task or an offline hub. Offline: every task is written by the test."""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

import evaluate  # noqa: E402
from conftest import ROOT, spread_weights  # noqa: E402
from model import ModelConfig, Transformer, save_checkpoint  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

WORDS = "Tom found a red ball in the park . Lily painted the boat three apples and".split()


@pytest.fixture
def checkpoint(tmp_path, tokenizer_path):
    """A small random model with wide weights (clear greedy choices), saved with the test tokenizer."""
    torch.manual_seed(0)
    model = spread_weights(Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                                                   max_seq_len=48)), std=0.1)
    path = str(tmp_path / "base.pt")
    save_checkpoint({"model": model.state_dict(), "config": asdict(model.cfg), "step": 0,
                     "tokenizer": tokenizer_path}, path)
    return path


def write_tasks(folder):
    """A multiple-choice task, a generation task and a rolling (perplexity) task, as lm-eval configs over jsonl."""
    import random
    rng = random.Random(0)
    mc = [{"q": " ".join(rng.choices(WORDS, k=5)), "choices": [" ".join(rng.choices(WORDS, k=rng.randint(1, 3)))
                                                             for _ in range(3)], "label": i % 3} for i in range(6)]
    gen = [{"q": " ".join(rng.choices(WORDS, k=6)), "a": "Tom"} for _ in range(3)]
    text = [{"text": " ".join(rng.choices(WORDS, k=n))} for n in (8, 120)]  # the second spans several windows
    for name, rows in (("mc", mc), ("gen", gen), ("text", text)):
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    evaluate.write_task(str(folder), "t_mc", str(folder / "mc.jsonl"), "multiple_choice", doc_to_text="{{q}}:",
                        doc_to_choice="{{choices}}", doc_to_target="{{label}}",
                        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    evaluate.write_task(str(folder), "t_gen", str(folder / "gen.jsonl"), "generate_until", doc_to_text="{{q}}",
                        doc_to_target="{{a}}", generation_kwargs={"until": ["."], "max_gen_toks": 10,
                                                                  "do_sample": False},
                        metric_list=[{"metric": "exact_match"}])
    evaluate.write_task(str(folder), "t_text", str(folder / "text.jsonl"), "loglikelihood_rolling", doc_to_text="",
                        doc_to_target="{{text}}", metric_list=[{"metric": "word_perplexity"}])


def run_tasks(lm, folder):
    from lm_eval.tasks import TaskManager
    out = lm_eval.simple_evaluate(model=lm, tasks=["t_mc", "t_gen", "t_text"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(folder)), verbosity="ERROR")
    return out["results"], {task: [s["resps"] for s in samples] for task, samples in out["samples"].items()}


def test_our_model_scores_as_lm_evals_hf_model_on_our_export(tmp_path, checkpoint, tokenizer_path):
    import convert_hf
    from lm_eval.models.huggingface import HFLM
    write_tasks(tmp_path)
    model, _ = evaluate.load_checkpoint(checkpoint)
    tok = load_tokenizer(tokenizer_path)
    ours = run_tasks(evaluate.harness_model(model.eval(), tok, batch_size=4), tmp_path)
    convert_hf.main(["--to_hf", checkpoint, "--out", str(tmp_path / "hf")])
    hf_lm = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", dtype="float32", batch_size=4,
                 prefix_token_id=tok.eos_id)  # their separator before an empty context: ours (</s>)
    # The random model emits byte pieces that are not valid UTF-8, which SentencePiece and tokenizer.json's byte
    # fallback spell differently: their generated ids are decoded by our tokenizer, so the texts compare the ids.
    hf_lm.tok_decode = lambda ids, skip_special_tokens=True: tok.decode(ids)
    theirs = run_tasks(hf_lm, tmp_path)
    def choices(resps, part):  # each item's resps: one [(log-likelihood, is_greedy)] per choice
        return [choice[0][part] for item in resps for choice in item]
    assert choices(ours[1]["t_mc"], 0) == pytest.approx(choices(theirs[1]["t_mc"], 0), abs=1e-4)
    assert choices(ours[1]["t_mc"], 1) == choices(theirs[1]["t_mc"], 1)
    assert {k: ours[0]["t_mc"][k] for k in ("acc,none", "acc_norm,none")} == \
        {k: theirs[0]["t_mc"][k] for k in ("acc,none", "acc_norm,none")}
    assert ours[1]["t_gen"] == theirs[1]["t_gen"] and any(item[0] for item in ours[1]["t_gen"])  # the same, not ""
    assert [item[0][0] for item in ours[1]["t_text"]] == pytest.approx([item[0][0] for item in theirs[1]["t_text"]],
                                                                    abs=1e-4)


def test_rolling_log_likelihood_is_our_perplexity(checkpoint, tokenizer_path):
    """One window: log p of every token after the separator, as the model's own loss gives it."""
    from lm_eval.api.instance import Instance
    model, _ = evaluate.load_checkpoint(checkpoint)
    tok = load_tokenizer(tokenizer_path)
    text = "Tom found a red ball in the park"
    ids = [tok.eos_id] + tok.encode(text)
    with torch.no_grad():
        _, loss = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    lm = evaluate.harness_model(model.eval(), tok)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    assert lm.loglikelihood_rolling([request], disable_tqdm=True)[0] == pytest.approx(
        -loss.item() * (len(ids) - 1), abs=1e-4)


def test_chat_mode_renders_our_template(checkpoint, tokenizer_path):
    model, _ = evaluate.load_checkpoint(checkpoint)
    tok = load_tokenizer(tokenizer_path)
    lm = evaluate.harness_model(model, tok, chat=True)
    text = lm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert lm.tok_encode(text) == evaluate.render_prompt(tok, [{"role": "user", "content": "Hi"}])


def card(tmp_path, ckpt, tasks, **flags):
    """evaluate.py run as a user runs it (its own process: the hub check happens before datasets is imported)."""
    args = [sys.executable, str(ROOT / "evaluate.py"), "--ckpt", ckpt, "--tasks", tasks, "--limit", "4",
            *[str(x) for kv in flags.items() for x in (f"--{kv[0]}", kv[1])]]
    return subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300)


@pytest.mark.slow
def test_lora_and_int8_checkpoints_get_a_card_and_unknown_or_offline_tasks_are_one_line(tmp_path, checkpoint,
                                                                                        tokenizer_path):
    from test_lora import lora_config
    from train_sft import sft
    sft(lora_config(tmp_path, checkpoint, tokenizer_path, max_steps=2))
    from quantize import quantize_model, quantized_checkpoint
    float_model, _ = evaluate.load_checkpoint(checkpoint)
    save_checkpoint(quantized_checkpoint(quantize_model(float_model), {"tokenizer": tokenizer_path}, checkpoint),
                    str(tmp_path / "int8.pt"))
    (tmp_path / "r1_val.jsonl").write_text("".join(json.dumps({"conversations": [
        {"role": "user", "content": f"What is {a} + 2?"}, {"role": "assistant", "content": f"{a + 2}"}],
        "answer": str(a + 2)}) + "\n" for a in range(6)))
    for ckpt in (str(tmp_path / "lora" / "last.pt"), str(tmp_path / "int8.pt")):
        r = card(tmp_path, ckpt, "tinychat_sums,no_such_task", problems="r1_val.jsonl", text_val="")
        assert r.returncode == 0, r.stderr
        saved = json.loads(open(os.path.join(os.path.dirname(ckpt), "eval.json")).read())
        assert set(saved["results"]["tinychat_sums"]) >= {"acc", "acc_norm"}
        assert "skipped (lm-eval has no such task): no_such_task" in r.stdout
    r = card(tmp_path, checkpoint, "arc_easy", text_val="", problems="")
    assert r.returncode == 0, r.stderr  # (this machine has no hub: the probe finds it unreachable)
    assert "skipped (offline, and not in the datasets cache): arc_easy" in r.stdout


def test_the_local_sum_task_offers_four_different_choices_for_every_answer_zero_included(tmp_path):
    """The card's own multiple-choice task: the right total among four, so its random-guess score is 1/4."""
    problems = tmp_path / "r1_val.jsonl"
    problems.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"Work out {n} + 0."},
                                                              {"role": "assistant", "content": str(n)}],
                                            "answer": str(n)}) + "\n" for n in (0, 1, 2, 17)))
    cfg = evaluate.EvalConfig(problems=str(problems), text_val="")
    assert evaluate.local_tasks(str(tmp_path), cfg) == [evaluate.LOCAL_TASK]
    rows = [json.loads(line) for line in open(tmp_path / "sums.jsonl")]
    assert [r["choices"][r["label"]] for r in rows] == ["0", "1", "2", "17"]
    for r in rows:
        assert len(set(r["choices"])) == 4 and all(int(c) >= 0 for c in r["choices"]), r
