"""
Reinforcement learning with verifiable rewards: GRPO (Shao et al. 2024) on problems whose answers can be checked.
The model answers each problem group_size times; reward() below scores every answer; an answer's advantage is
its reward against its group's mean, and a clipped policy-gradient loss makes the answers that beat their group
more likely and the others less. Nothing else tells it what is right: no reference traces, no reward model.

  python train_grpo.py                               # out/distill/best.pt + data/r1.jsonl -> out/grpo/last.pt
  python train_grpo.py --lora_rank 16 --beta 0.04    # adapters only; a KL penalty to the starting model
  torchrun --nproc_per_node 2 train_grpo.py          # each process samples its own problems
  python train_grpo.py --preset 12gb                 # online data: GSM8K's word problems (data/math.jsonl)

Before and after training it reports on held-out problems what distill.py reports (right answers overall and per
type, well-formed think blocks), and before, pass@k: the share that one of k sampled answers gets right, which is
about what RL can reach by making the model pick its best answers. There is no validation loss to pick a best
step by, so the run's model is out/grpo/last.pt. The chat report after says what it kept of chatting.
"""
import hashlib
import os
import time
from dataclasses import dataclass

import torch

from cli import UserError, parse_config
from dataset_sft import resolve_tokenizer
from evaluate import answer_is_right, describe, describe_types, pass_at_k, read_problems, reasoning_report, \
    well_formed
from lora import adapters_off, is_lora
from runtime import Runtime, run_main
from tokenizer import load_tokenizer, special_ids
from train import FinetuneConfig, frozen_copy, log_metrics, report_held_out, resume_or_init, train

FORMAT_REWARD = 0.1  # for a well-formed answer: small beside a right answer's 1, so it never pays to be neat


def reward(problem: dict, completion: str, finished: bool) -> float:
    """The score of one answer to a problem (its record's fields: "answer", "type", ...): 1 when the text after
    </think> states the answer (evaluate.answer_is_right, the reasoning report's check), FORMAT_REWARD more for a
    well-formed one (evaluate.well_formed: a think block, then an answer, no word said three times running), and 0
    for an answer cut off at --max_new_tokens (it never finished). Edit it to reward something else."""
    if not finished:
        return 0.0
    return float(answer_is_right(completion, problem["answer"])) + FORMAT_REWARD * well_formed(completion)


@dataclass
class GRPOConfig(FinetuneConfig):
    """GRPO's own values for every field a user tunes; the rest is train.py's FinetuneConfig."""
    init_from: str = "out/distill/best.pt"
    train_data: str = "data/r1.jsonl"  # problems: any chat file whose records carry an "answer"
    val_data: str = "data/r1_val.jsonl"  # held-out problems for the report before and after
    out_dir: str = "out/grpo"
    batch_size: int = 64           # answers per micro-batch per process: batch_size * grad_accum / group_size problems
    grad_accum: int = 1            # a step's answers are sampled together, then trained in grad_accum micro-batches
    max_steps: int = 400           # cpu: ~1.3 s a step (half of it sampling), 9 minutes with the reports
    lr: float = 1e-4               # 2e-4 with 8 problems a step made the model worse before it recovered
    min_lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 50           # when last.pt is written
    eval_batches: int = 10
    log_every: int = 10
    group_size: int = 4            # answers per problem (GRPO's G): 16 problems x 4 beat 8 x 8 here (less noise)
    max_new_tokens: int = 160      # an answer cut off here earns nothing
    temperature: float = 0.7       # sampling; the loss reads the same tempered probabilities. At 1.0 the quickstart
                                   # model's samples were right 40% of the time (greedy: 58%), and RL did not help
    top_p: float = 1.0
    top_k: int = 0                 # 0 = every token
    scale_rewards: str = "group"   # group: advantage = (reward - group mean) / group std (GRPO); none: no division,
                                   # which Dr. GRPO (Liu et al. 2025) finds less biased toward easy and hard problems
    epsilon: float = 0.2           # the probability ratio is clipped below at 1 - epsilon (PPO, Schulman et al. 2017)
    epsilon_high: float = 0.28     # and above at 1 + epsilon_high: DAPO's clip-higher (Yu et al. 2025)
    inner_steps: int = 1           # optimizer steps on each batch of answers (GRPO's mu; TRL's num_iterations);
                                   # above 1 the ratio departs from 1 and the clipping acts
    beta: float = 0.0              # weight of the KL penalty to the starting model (k3 estimator, GRPO); 0 as DAPO
                                   # and TRL now default to. With LoRA the reference is the adapters switched off
    skip_flat_groups: bool = False  # replace problems whose answers all score the same (no signal) by others
                                   # (DAPO's dynamic sampling), up to 3 more draws a step
    eval_problems: int = 300       # held-out problems for the report before and after; 0 = skip
    eval_max_new_tokens: int = 160
    pass_k: int = 8                # pass@k of the starting model on the held-out problems; 0 = skip
    chat_val: str = "data/sft_val.jsonl"  # SFT's held-out chats: the chat report after training
    eval_chats: int = 60


PRESETS = {
    "cpu": {},  # the defaults above: the quickstart's distilled model, ~10 minutes on 2 cores
    "12gb": dict(train_data="data/math.jsonl", val_data="data/math_val.jsonl",  # GSM8K, from an online download
                 batch_size=64, grad_accum=4, group_size=16, max_steps=500, lr=1e-5, min_lr=1e-6, warmup_steps=20,
                 eval_every=100, log_every=10, max_new_tokens=512, eval_max_new_tokens=512),
}


# -----------------------------------------------------------------------------
# the loss

def token_logprobs(model, tokens, targets, temperature: float):
    """log p(target) of each answer position under the tempered distribution the answers were sampled from; 0
    where the target is -100 (the prompt, padding). tokens, targets: (B, T) -> (B, T) float32, computed a chunk of
    rows at a time where the logits would be large (model.Transformer.logprobs_of)."""
    return model(tokens, targets=targets, target_logprobs=True, temperature=temperature)[1]


def grpo_loss(cfg: GRPOConfig, stats: dict):
    """The loss of a micro-batch of answers: the clipped surrogate of PPO at each answer token, with the answer's
    advantage, plus beta times the k3 estimate of KL(policy || reference); summed over tokens and divided by the
    answer tokens of the whole step (DAPO's token-level normalisation: a long answer's tokens count as much as a
    short one's). stats collects the share of clipped tokens and the KL for the log."""

    def loss_fn(model, batch):
        logp = token_logprobs(model, batch["tokens"], batch["targets"], cfg.temperature)  # (B, T)
        mask = batch["targets"] != -100
        old = batch["old_logp"] if "old_logp" in batch else logp.detach()  # one step per sample: the ratio is 1
        ratio = torch.exp(logp - old)
        advantage = batch["advantages"][:, None]  # (B, 1)
        clipped = ratio.clamp(1 - cfg.epsilon, 1 + cfg.epsilon_high)
        per_token = -torch.minimum(ratio * advantage, clipped * advantage)
        if cfg.beta:
            log_ratio = batch["ref_logp"] - logp
            kl = torch.exp(log_ratio) - log_ratio - 1
            per_token = per_token + cfg.beta * kl
            stats["kl"] += float((kl.detach() * mask).sum())
        stats["clipped"] += int(((clipped * advantage < ratio * advantage) & mask).sum())  # the clip chose
        stats["tokens"] += int(mask.sum())
        # the loop divides each micro-batch's loss by grad_accum; step_tokens already counts the whole step
        return (per_token * mask).sum() / batch["step_tokens"] * cfg.grad_accum

    return loss_fn


def advantages(rewards: torch.Tensor, scale: str) -> torch.Tensor:
    """(problems, group_size) rewards -> advantages: each reward minus its group's mean, divided by the group's
    std with --scale_rewards group. A group whose rewards are all equal gets 0: it teaches nothing."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (rewards.std(dim=1, keepdim=True) + 1e-4)
    return centred


# -----------------------------------------------------------------------------
# the data: answers sampled from the model being trained

class Rollouts:
    """The loop's data: batch(i) is micro-batch i of the answers the model writes to a draw of problems, sampled
    when the loop asks for it (on_policy: never ahead) and used for inner_steps optimizer steps. Which problems a
    draw holds and the sampling generator depend only on the seed, the rank and the draw's number, so a resumed
    run (whose model is restored) samples what the uninterrupted run sampled."""
    on_policy = True

    def __init__(self, cfg: GRPOConfig, model, tok, problems: list, rt: Runtime, reference=None):
        self.cfg, self.model, self.tok, self.problems, self.rt = cfg, model, tok, problems, rt
        self.reference = reference  # beta > 0: reference(tokens, targets) -> the starting model's log-probs
        self.batch_size, self.seq_len = cfg.batch_size, model.cfg.max_seq_len
        self.per_step = cfg.batch_size * cfg.grad_accum // cfg.group_size  # problems a draw answers
        self.im_end = special_ids(tok)["im_end"]
        self.stats = dict(clipped=0, tokens=0, kl=0.0)  # filled by the loss between draws
        self.metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.drawn, self.micro_batches = -1, []
        self.window, self.window_start = [], time.perf_counter()  # the draws since the last printed line

    def batch(self, i: int) -> dict:
        draw, micro = divmod(i, self.cfg.grad_accum * self.cfg.inner_steps)
        if draw != self.drawn:
            self.micro_batches, self.drawn = self.sample(draw), draw
        return self.micro_batches[micro % self.cfg.grad_accum]

    def generators(self, draw: int) -> tuple:
        """(sampling generator on the run's device, a CPU generator for drawing more problems) of one draw."""
        digest = hashlib.sha256(f"{self.cfg.seed} {self.rt.rank} {draw}".encode()).digest()
        return (torch.Generator(self.rt.device).manual_seed(int.from_bytes(digest[:8], "little")),
                torch.Generator().manual_seed(int.from_bytes(digest[8:16], "little")))

    def problems_of(self, draw: int) -> list:
        """The draw's problems: every rank's draws walk one shuffled order of the file, epoch after epoch."""
        first = (draw * self.rt.world_size + self.rt.rank) * self.per_step
        orders, picked = {}, []  # each epoch the draw reaches into is shuffled once, not once per problem
        for k in range(first, first + self.per_step):
            epoch, at = divmod(k, len(self.problems))
            if epoch not in orders:
                orders[epoch] = torch.randperm(len(self.problems),
                                               generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
            picked.append(self.problems[int(orders[epoch][at])])
        return picked

    @torch.no_grad()
    def answer(self, problems: list, generator) -> tuple:
        """(answers' ids, rewards (problems, group_size), how many were right, how many finished)."""
        cfg = self.cfg
        with self.rt.autocast:
            replies = self.model.generate_batch([ids for _, ids in problems], cfg.group_size, cfg.max_new_tokens,
                                                cfg.temperature, cfg.top_k or None, cfg.top_p, stop_ids=[self.im_end],
                                                generator=generator)
        scores, right, finished = [], 0, 0
        for k, ids in enumerate(replies):
            conv = problems[k // cfg.group_size][0]
            done = bool(ids) and ids[-1] == self.im_end
            text = self.tok.decode(ids[:-1] if done else ids)
            scores.append(reward(conv.extra, text, done))
            right += done and answer_is_right(text, conv.extra["answer"])
            finished += done
        return replies, torch.tensor(scores).view(len(problems), cfg.group_size), right, finished

    def sample(self, draw: int) -> list:
        """Answer the draw's problems, score them, and cut the rows into the step's micro-batches."""
        cfg, started = self.cfg, time.perf_counter()
        generator, picker = self.generators(draw)
        problems = self.problems_of(draw)
        replies, rewards, right, finished = self.answer(problems, generator)
        flat = rewards.std(dim=1) == 0
        flat_share = float(flat.float().mean())
        for _ in range(3 if cfg.skip_flat_groups else 0):  # DAPO: other problems in place of the flat groups
            if not flat.any():
                break
            more = [self.problems[int(j)] for j in torch.randint(len(self.problems), (int(flat.sum()),),
                                                                   generator=picker)]
            new_replies, new_rewards, _, _ = self.answer(more, generator)
            for slot, k in zip(flat.nonzero()[:, 0].tolist(), (new_rewards.std(dim=1) > 0).nonzero()[:, 0].tolist()):
                problems[slot], rewards[slot], flat[slot] = more[k], new_rewards[k], False
                replies[slot * cfg.group_size:(slot + 1) * cfg.group_size] = \
                    new_replies[k * cfg.group_size:(k + 1) * cfg.group_size]
        adv = advantages(rewards, cfg.scale_rewards).flatten()  # (rows,)
        rows = [(problems[k // cfg.group_size][1], reply) for k, reply in enumerate(replies)]
        step_tokens = torch.tensor(float(max(1, sum(len(r) for _, r in rows))))
        micro_batches = [self.micro_batch(rows[k:k + cfg.batch_size], adv[k:k + cfg.batch_size], step_tokens)
                         for k in range(0, len(rows), cfg.batch_size)]
        self.log(draw, rewards, right, finished, flat_share, rows, time.perf_counter() - started)
        return micro_batches

    @torch.no_grad()
    def micro_batch(self, rows: list, adv: torch.Tensor, step_tokens: torch.Tensor) -> dict:
        """Prompt + answer rows, right-padded: targets are the answer's tokens (the prompt and padding -100). With
        inner_steps > 1 the sampling model's log-probs (the ratio's denominator), with beta > 0 the reference's."""
        width = max(len(p) + len(a) for p, a in rows) - 1
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.full((len(rows), width), -100, dtype=torch.long)
        for b, (prompt, answer) in enumerate(rows):
            ids = prompt + answer
            tokens[b, :len(ids) - 1] = torch.tensor(ids[:-1])
            targets[b, len(prompt) - 1:len(ids) - 1] = torch.tensor(answer)
        batch = {"tokens": tokens, "targets": targets, "advantages": adv, "step_tokens": step_tokens}
        on_device = self.rt.to_device(batch)
        self.model.eval()
        with self.rt.autocast:
            if self.cfg.inner_steps > 1:
                batch["old_logp"] = token_logprobs(self.model, on_device["tokens"], on_device["targets"],
                                                   self.cfg.temperature).cpu()
            if self.reference is not None:
                batch["ref_logp"] = self.reference(on_device["tokens"], on_device["targets"]).cpu()
        self.model.train()
        return batch

    def log(self, draw: int, rewards, right: int, finished: int, flat_share: float, rows: list, seconds: float):
        """A line of metrics.jsonl per draw (clipped share and KL: of the steps since the last draw), and every
        log_every steps a printed line of the means since the last one (rank 0's answers)."""
        step, n = draw * self.cfg.inner_steps, rewards.numel()
        record = {"step": step, "reward": float(rewards.mean()), "right": right / n, "finished": finished / n,
                  "flat_groups": flat_share, "answer_tokens": sum(len(a) for _, a in rows) / n,
                  "clipped": self.stats["clipped"] / max(1, self.stats["tokens"]),
                  "kl": self.stats["kl"] / max(1, self.stats["tokens"]), "sampling_s": seconds}
        log_metrics(self.metrics, record, self.rt)
        self.stats.update(clipped=0, tokens=0, kl=0.0)
        self.window.append(record)
        if step % self.cfg.log_every == 0:
            mean = {k: sum(r[k] for r in self.window) / len(self.window) for k in record}
            elapsed = time.perf_counter() - self.window_start
            self.rt.say(f"step {step}: reward {mean['reward']:.3f}, right {mean['right']:.1%}, flat groups "
                        f"{mean['flat_groups']:.0%}, {mean['answer_tokens']:.0f} tokens an answer, clipped "
                        f"{mean['clipped']:.1%}, KL {mean['kl']:.4f}; sampling "
                        f"{sum(r['sampling_s'] for r in self.window) / max(elapsed, 1e-9):.0%} of the time")
            self.window, self.window_start = [], time.perf_counter()


# -----------------------------------------------------------------------------
# the stage

def check_settings(cfg: GRPOConfig):
    rows = cfg.batch_size * cfg.grad_accum
    if cfg.group_size < 2 or rows % cfg.group_size:
        raise UserError(f"--group_size {cfg.group_size} must be at least 2 and divide the {rows} answers of a step "
                        f"(--batch_size x --grad_accum)")
    if cfg.scale_rewards not in ("group", "none"):
        raise UserError(f"--scale_rewards is group or none, not {cfg.scale_rewards!r}")
    for name in ("eval_every", "log_every", "stop_at_step", "max_steps"):
        if getattr(cfg, name) % cfg.inner_steps:  # a checkpoint between two steps on one sample could not resume
            raise UserError(f"--{name} {getattr(cfg, name)} must be a multiple of --inner_steps {cfg.inner_steps}")


def make_reference(cfg: GRPOConfig, model, rt: Runtime):
    """For beta > 0: reference(tokens, targets) -> the starting model's log-probs. With LoRA it is the model with
    its adapters off; otherwise a frozen copy of --init_from."""
    if not cfg.beta:
        return None
    if is_lora(model):
        def with_adapters_off(tokens, targets):
            with adapters_off(model):
                return token_logprobs(model, tokens, targets, cfg.temperature)
        return with_adapters_off
    frozen = frozen_copy(cfg.init_from, rt)
    return lambda tokens, targets: token_logprobs(frozen, tokens, targets, cfg.temperature)


def grpo(cfg: GRPOConfig) -> dict:
    check_settings(cfg)
    rt = Runtime(cfg.device, cfg.dtype, cfg.memory_cap_gib)
    # ---- the model, and the problems it will answer (records with an "answer")
    model, start = resume_or_init(cfg, init_from=cfg.init_from, lora=cfg.lora())
    resolve_tokenizer(cfg)
    tok = load_tokenizer(cfg.tokenizer)
    problems = [p for p in read_problems(cfg.train_data, tok, model.cfg.max_seq_len // 2) if "answer" in p[0].extra]
    if not problems:
        raise UserError(f"{cfg.train_data}: no problem with an \"answer\" field and a prompt of at most "
                        f"{model.cfg.max_seq_len // 2} tokens: GRPO needs answers it can check")
    per_step = cfg.batch_size * cfg.grad_accum // cfg.group_size * rt.world_size  # problems a draw answers, all ranks
    draws = cfg.max_steps // cfg.inner_steps
    rt.say(f"problems: {len(problems):,} with answers in {cfg.train_data}; {draws:,} draws of {per_step} problems x "
           f"{cfg.group_size} answers ({draws * per_step / len(problems):.2f} passes over the problems)")
    model.to(rt.device)
    # ---- the held-out report before: accuracy, and pass@k (what sharpening can reach)
    report = (lambda: reasoning_report(model, tok, cfg.val_data, cfg.eval_problems, cfg.eval_max_new_tokens)) \
        if cfg.eval_problems and cfg.val_data and rt.master else None
    result = {}
    if report and not cfg.resume:
        result["before"] = report()
        rt.say(f"before GRPO: {describe(result['before'])}")
        if cfg.pass_k:
            result["pass_at_k"] = pass_at_k(model, tok, cfg.val_data, cfg.eval_problems, cfg.pass_k,
                                            cfg.eval_max_new_tokens, cfg.temperature, cfg.seed)
            rt.say(f"before GRPO: pass@{cfg.pass_k} {result['pass_at_k']:.1%} (one of {cfg.pass_k} sampled answers "
                   f"right, temperature {cfg.temperature})")
    # ---- train on the model's own answers, scored by reward()
    data = Rollouts(cfg, model, tok, problems, rt, make_reference(cfg, model, rt))
    result.update(train(cfg, model, data, None, rt, grpo_loss(cfg, data.stats), cfg.tokenizer, start))
    if report:
        result["after"] = report()
        for when in ("before", "after"):
            if when in result:
                r = result[when]
                print(f"{when} GRPO: {describe(r)}\n  right by type: {describe_types(r)} "
                      f"({r['correct']}/{r['checkable']})")
    # ---- and on held-out chats: did it keep chatting?
    result["chat"] = report_held_out(cfg, model, rt, tok, "GRPO", {})
    return result


if __name__ == "__main__":
    run_main(grpo, parse_config(GRPOConfig, presets=PRESETS, description=__doc__.strip().splitlines()[0]))
