"""
Preference tuning with DPO (Rafailov et al. 2023, "Direct Preference Optimization"): starting from a chat
model, make it prefer the chosen reply of each pair over the rejected one, measured against a frozen
reference (the starting model), with no reward model and no sampling. Same loop, precision, atomic
checkpoints, --resume and LoRA as train_sft.py; the data is preference pairs (dataset_sft.py).

  python train_dpo.py                                  # out/distill/best.pt + data/dpo.jsonl -> out/dpo
  python train_dpo.py --loss ipo --beta 0.5
  python train_dpo.py --precompute_reference true      # reference log-probs computed once: no second model
  python train_dpo.py --lora_rank 16 --init_from out/sft/best.pt   # reference: the same model, adapters off

With r = beta * (log pi(y|x) - log ref(y|x)), the reward of a reply y (its log-probability summed over its
tokens: the reply and its <|im_end|>; prompt and template tokens are masked), and h = r_chosen - r_rejected:
  sigmoid   -log sigmoid(h)                                      (DPO)
            --label_smoothing e: -(1 - e) log sigmoid(h) - e log sigmoid(-h)   (conservative DPO)
  ipo       (h / beta - 1 / (2 beta))^2                          (IPO, Azar et al. 2023)
  --sft_weight w adds w times the chosen replies' mean token NLL   (RPO, Pang et al. 2024)
A micro-batch's chosen and rejected rows go through the model together (one forward of 2 x batch_size rows).

The reference: a frozen copy of the starting checkpoint (or --reference), in the compute dtype; with LoRA
the model itself with its adapters switched off (no copy); with --precompute_reference its log-probs for
every pair are computed once before training and kept beside the data (out_dir/reference_logps.pt, reused
by --resume), and no reference model stays in memory. Reported on the held-out pairs before and after:
rewards, margin, reward accuracy, and how often the model itself gives the chosen reply the higher
log-probability; and the answer accuracy on held-out reasoning problems (evaluate.py's reasoning report).
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import UserError, parse_config
from dataset_sft import PreferenceData, chat_data
from evaluate import describe, reasoning_report
from lora import adapters_off, is_lora
from records import atomic_path, file_sha256
from runtime import Runtime, run_main
from train import FinetuneConfig, frozen_copy, place_model, report_held_out, resume_or_init, train

LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOConfig(FinetuneConfig):
    """DPO's own values for every field a user tunes (none is inherited from another stage's); the tokenizer,
    seq_len, LoRA and the plumbing of the loop are train.py's FinetuneConfig."""
    init_from: str = "out/distill/best.pt"
    train_data: str = "data/dpo.jsonl"
    val_data: str = "data/dpo_val.jsonl"
    out_dir: str = "out/dpo"
    batch_size: int = 8            # pairs per micro-batch per process: 2 x batch_size rows
    grad_accum: int = 1
    max_steps: int = 100
    lr: float = 3e-5               # 1e-4 sharpened the preference as much but cost answers (README: Measured)
    min_lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 10
    log_every: int = 10
    beta: float = 0.5              # how far from the reference the rewards may pull (higher: closer)
    loss: str = "sigmoid"          # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0   # sigmoid: the share of pairs taken to be mislabelled (conservative DPO)
    # + this x the chosen replies' token NLL (RPO); 0: pure DPO. On the built-in data pure DPO lowered both
    # replies' likelihood and broke the model's answers; with 1.0 they held (README: Measured).
    sft_weight: float = 1.0
    reference: str = ""            # the frozen reference checkpoint; empty: init_from (LoRA: adapters off)
    precompute_reference: bool = False
    eval_data: str = "data/r1_val.jsonl"  # reasoning problems for the answer-accuracy report
    eval_problems: int = 50        # 0 = no answer-accuracy report
    eval_max_new_tokens: int = 160
    chat_val: str = "data/sft_val.jsonl"  # SFT's held-out chats: the chat report after training


PRESETS = {
    "cpu": {},  # the defaults above
    # 4 x 16 = 64 pairs a step; beta 0.1 as in the DPO paper's dialogue runs (not run on a GPU yet)
    "12gb": dict(batch_size=4, grad_accum=16, max_steps=1000, lr=5e-6, min_lr=5e-7, warmup_steps=50, beta=0.1,
                 eval_every=250, eval_batches=50, log_every=20, compile=True, precompute_reference=True),
}


def preference_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg: DPOConfig) -> tuple:
    """(per-pair losses, chosen rewards, rejected rewards), each (B,), for the chosen loss."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = cfg.beta * (chosen_ratio - rejected_ratio)
    if cfg.loss == "ipo":
        losses = (h / cfg.beta - 1 / (2 * cfg.beta)) ** 2
    else:
        e = cfg.label_smoothing
        losses = -(1 - e) * F.logsigmoid(h) - e * F.logsigmoid(-h)
    return losses, cfg.beta * chosen_ratio, cfg.beta * rejected_ratio


def pair_logps(model, batch: dict) -> tuple:
    """Log-probabilities of the chosen and the rejected replies, (B,) each: rows 0..B-1 of the batch are the
    chosen replies, rows B..2B-1 the rejected replies of the same pairs."""
    # each row's trained targets (its reply): log-probabilities (2B, T), 0 where masked, summed per row
    return model(batch["tokens"], targets=batch["targets"], target_logprobs=True)[1].sum(-1).chunk(2)


def dpo_loss(cfg: DPOConfig, reference):
    """loss_fn(model, batch) for train.py's loop. reference(model, batch) gives the reference's (chosen,
    rejected) log-probs, unless the batch carries them (precomputed)."""
    def loss_fn(model, batch):
        chosen, rejected = pair_logps(model, batch)
        if "reference_logps" in batch:
            ref_chosen, ref_rejected = batch["reference_logps"].unbind(1)
        else:
            with torch.no_grad():
                ref_chosen, ref_rejected = reference(model, batch)
        loss = preference_losses(chosen, rejected, ref_chosen, ref_rejected, cfg)[0].mean()
        if cfg.sft_weight:
            chosen_tokens = (batch["targets"][:len(chosen)] != -100).sum().clamp(min=1)
            loss = loss + cfg.sft_weight * -chosen.sum() / chosen_tokens
        return loss
    return loss_fn


class WithReference:
    """PreferenceData whose batches also carry the reference's log-probs of their pairs, computed once."""

    def __init__(self, data: PreferenceData, table: torch.Tensor):
        self.data, self.table = data, table  # table: (pairs, 2) chosen and rejected log-probs

    def __getattr__(self, name):
        return getattr(self.data, name)

    def batch(self, index: int) -> dict:
        batch = self.data.batch(index)
        return {**batch, "reference_logps": self.table[batch["pair_index"]]}


def table_reference(table: torch.Tensor):
    """A reference that reads precomputed log-probs (pairs, 2) for the pairs of a pair_batches() batch."""
    return lambda policy, batch: table[batch["pair_index"]].to(batch["tokens"].device).unbind(1)


def pair_batches(data: PreferenceData, device):
    """Every pair of data in order, batch_size pairs at a time, with their pair_index (on the CPU)."""
    for start in range(0, data.pairs, data.batch_size):
        index = torch.arange(start, min(start + data.batch_size, data.pairs))
        rows = data.pair_rows(index.tolist())
        yield {**{k: t.to(device) for k, t in rows.items()}, "pair_index": index}


@torch.no_grad()
def reference_table(reference, model, data: PreferenceData, rt: Runtime, name: str) -> torch.Tensor:
    """(pairs, 2): the reference's chosen and rejected log-probs for every pair of data."""
    table = []
    for batch in tqdm(pair_batches(data, rt.device), total=-(-data.pairs // data.batch_size), disable=not rt.master,
                      desc=f"reference log-probs, {name}", dynamic_ncols=True):
        with rt.autocast:
            table.append(torch.stack(reference(model, batch), 1).float().cpu())
    return torch.cat(table)


@torch.no_grad()
def preference_report(model, data: PreferenceData, reference, cfg: DPOConfig, rt: Runtime) -> dict:
    """On every held-out pair: mean loss, chosen and rejected rewards and their margin, reward accuracy (chosen's
    reward above rejected's), and how often the model gives the chosen reply the higher log-probability."""
    model.eval()
    sums = dict(loss=0.0, chosen_reward=0.0, rejected_reward=0.0, accuracy=0.0, prefers_chosen=0.0)
    for batch in pair_batches(data, rt.device):
        with rt.autocast:
            chosen, rejected = pair_logps(model, batch)
            ref_chosen, ref_rejected = reference(model, batch)
        losses, chosen_reward, rejected_reward = preference_losses(chosen, rejected, ref_chosen, ref_rejected, cfg)
        for key, value in (("loss", losses), ("chosen_reward", chosen_reward), ("rejected_reward", rejected_reward),
                           ("accuracy", chosen_reward > rejected_reward), ("prefers_chosen", chosen > rejected)):
            sums[key] += value.float().sum().item()
    model.train()
    report = {k: v / data.pairs for k, v in sums.items()}
    return {**report, "margin": report["chosen_reward"] - report["rejected_reward"], "pairs": data.pairs}


def describe_preferences(r: dict) -> str:
    return (f"loss {r['loss']:.4f}, rewards chosen {r['chosen_reward']:+.3f} / rejected {r['rejected_reward']:+.3f} "
            f"(margin {r['margin']:+.3f}), reward accuracy {r['accuracy']:.1%}; the model gives the chosen reply the "
            f"higher log-probability in {r['prefers_chosen']:.1%} of {r['pairs']:,} held-out pairs")


def make_reference(cfg: DPOConfig, model, rt: Runtime) -> tuple:
    """(reference(policy, batch) -> (chosen, rejected) log-probs, its checkpoint, a description). With LoRA the
    reference is the model itself with its adapters off; otherwise a frozen copy of the reference checkpoint."""
    if is_lora(model) and not cfg.reference:
        def with_adapters_off(policy, batch):
            with adapters_off(policy):
                return pair_logps(policy, batch)
        return with_adapters_off, model.lora["base"], f"{model.lora['base']} (the LoRA base: adapters off)"
    path = cfg.reference or cfg.init_from
    frozen = frozen_copy(path, rt)  # never trained: no fp32 copy needed
    return (lambda policy, batch: pair_logps(frozen, batch)), path, f"a frozen copy of {path}"


def precompute(cfg: DPOConfig, model, reference, reference_path: str, train_data, val_data, rt: Runtime) -> dict:
    """{"train", "val"}: each pair's reference log-probs, computed once and kept in out_dir, reused while the
    reference, the data files, the tokenizer and seq_len are the same."""
    key = {"reference_sha256": file_sha256(reference_path), "tokenizer_sha256": file_sha256(cfg.tokenizer),
           "seq_len": train_data.seq_len, "train_sha256": file_sha256(cfg.train_data),
           "val_sha256": file_sha256(cfg.val_data) if val_data else None}
    path = os.path.join(cfg.out_dir, "reference_logps.pt")
    saved = torch.load(path, weights_only=True) if os.path.exists(path) else {}
    if saved.get("key") == key:
        if rt.master:
            print(f"reference log-probs: {path} (reused)")
        return saved
    tables = {"key": key, "train": reference_table(reference, model, train_data, rt, "train"),
              "val": reference_table(reference, model, val_data, rt, "val") if val_data else None}
    if rt.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(tables, tmp)
    return tables


def check_settings(cfg: DPOConfig):
    if cfg.loss not in LOSSES:
        raise UserError(f"--loss {cfg.loss!r}: use one of {', '.join(LOSSES)}")
    if cfg.pack:
        raise UserError("--pack is not supported by train_dpo.py: a pair's two replies share one prompt")
    if cfg.beta <= 0 or not 0 <= cfg.label_smoothing < 0.5:
        raise UserError("--beta must be above 0 and --label_smoothing in [0, 0.5)")


def report(model, data, reference, tok, cfg: DPOConfig, rt: Runtime, when: str) -> dict:
    """{when: the preference report on held-out pairs, f"answers_{when}": the reasoning report}, each printed;
    only what the data and settings give."""
    result = {}
    if data is not None:
        result[when] = preference_report(model, data, reference, cfg, rt)
        print(f"{when} DPO: {describe_preferences(result[when])}")
    if cfg.eval_problems:
        result[f"answers_{when}"] = reasoning_report(model, tok, cfg.eval_data, cfg.eval_problems,
                                                     cfg.eval_max_new_tokens)
        print(f"{when} DPO: {describe(result[f'answers_{when}'])}")
    return result


def dpo(cfg: DPOConfig) -> dict:
    check_settings(cfg)
    rt = Runtime(cfg.device, cfg.dtype, cfg.memory_cap_gib)
    # ---- the model, and the data: preference pairs, each two rows (the chosen reply, then the rejected one)
    model, start = resume_or_init(cfg, init_from=cfg.init_from, lora=cfg.lora())
    train_data, val_data = chat_data(cfg, model, rt, PreferenceData)
    # ---- the frozen reference the model is measured against (the model on its device first)
    place_model(model, rt)
    reference, reference_path, name = make_reference(cfg, model, rt)
    if rt.master:
        print(f"reference: {name}" + (", its log-probs computed once" if cfg.precompute_reference else ""))
    # with --precompute_reference every pair carries its reference log-probs instead
    held_out, held_out_reference = val_data, reference
    if cfg.precompute_reference:  # then the copy is dropped: only the tables stay
        tables = precompute(cfg, model, reference, reference_path, train_data, val_data, rt)
        reference = None
        train_data = WithReference(train_data, tables["train"])
        if val_data is not None:
            held_out_reference = table_reference(tables["val"])
            val_data = WithReference(val_data, tables["val"])
    # ---- report, train with the DPO loss, report again
    tok = train_data.tok
    before = report(model, held_out, held_out_reference, tok, cfg, rt, "before") if rt.master and not cfg.resume else {}
    result = train(cfg, model, train_data, val_data, rt, dpo_loss(cfg, reference), cfg.tokenizer, start)
    if rt.master:
        result.update(report(model, held_out, held_out_reference, tok, cfg, rt, "after"), **before)
    result["chat"] = report_held_out(cfg, model, rt, tok, "DPO", {})  # did the model keep chatting?
    return result


if __name__ == "__main__":
    run_main(dpo, parse_config(DPOConfig, presets=PRESETS, description=__doc__.strip().splitlines()[0]))
