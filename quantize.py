"""
Quantize a checkpoint's weights to int8 for faster inference, and report what it costs in quality.

Weight-only: every linear layer (attention wq wk wv wo, feed-forward w1 w2 w3 and the output head) keeps its
weight as int8 with one scale per output row, dequantized on the fly inside the matmul. Batch-1 decoding
reads every weight once per token, so a quarter of float32's bytes is what makes it faster; the embedding and
the norms stay in the compute dtype.

  python convert_hf.py --to_int8 out/distill/best.pt   # writes out/distill/best_int8.pt, prints the quality report

Symmetric, per output channel: scale = max |w| / 127 for each row, q = round(w / scale) in [-127, 127]. A
head tied to the embedding gets an int8 copy of its own (the embedding lookups keep the float table; the
matmul over the whole vocabulary, the largest in the model, reads the int8 one), so the file holds the
embedding twice, once in float and once in int8.

The quantized checkpoint loads with torch.load(..., weights_only=True) like every checkpoint of this project:
{"model": int8 state, "config", "quantization": "int8", "tokenizer", "step", "source"}. It is for inference
only: int8_model() below builds it (evaluate.load_checkpoint reads every kind of checkpoint).

The report compares the float and the int8 model on held-out text: the mean cross-entropy (and perplexity)
before and after, greedy-token agreement on continuations of held-out prompts (how long the int8 model's
continuation stays identical to the float one's, and how many are identical throughout), and batch-1
decoding speed (quality_report; convert_hf.py --to_int8 prints it).

Imports torch and model.py only: the two files can be copied into another project together.
"""
import math
import time
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ModelConfig, ModelError, Transformer, load_state_dict_checked


class Int8Linear(nn.Module):
    """A bias-free linear layer whose weight is int8 (out, in) times scales (out,): y = (x q^T) * scales.
    Both are buffers (plain tensors, no gradient): scales follow the model's dtype under model.to(dtype),
    the int8 weight stays int8."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        # Scales of 1 for the CPU kernel, which takes bfloat16 ones only: ours are applied after it, in the model's
        # dtype (a cast to bfloat16 in forward is what torch.compile's lowering of the kernel fails on, in torch
        # 2.13). A plain attribute, as model.to(dtype) would cast a buffer; not state, never saved.
        self.unit_scales = torch.ones(out_features, dtype=torch.bfloat16)

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        if linear.bias is not None:
            raise ModelError("int8 quantization covers bias-free linear layers (all of this model's)")
        w = linear.weight.detach().float()
        layer = cls(linear.in_features, linear.out_features, linear.weight.dtype, linear.weight.device)
        layer.scales.copy_(w.abs().amax(dim=1) / 127)  # rounded to the model's dtype: q is made against that
        scales = layer.scales.float().clamp(min=torch.finfo(torch.float32).tiny)[:, None]  # a zero row: q = 0
        layer.weight.copy_((w / scales).round().clamp(-127, 127))
        return layer

    @classmethod
    @torch.no_grad()
    def stacked(cls, layers: list) -> "Int8Linear":
        """One layer giving the outputs of `layers` (of the same input) side by side, their rows stacked, for
        model.fuse_projections; the layers then hold views of those rows, so nothing is stored twice."""
        first = layers[0]
        fused = cls(first.in_features, sum(layer.out_features for layer in layers), first.scales.dtype,
                    first.weight.device)
        for name in ("weight", "scales", "unit_scales"):
            setattr(fused, name, torch.cat([getattr(layer, name) for layer in layers]))
            for layer, view in zip(layers, getattr(fused, name).split([layer.out_features for layer in layers])):
                setattr(layer, name, view)
        return fused

    def forward(self, x):
        if x.device.type != "cpu" or self.in_features % 16:
            # Dequantize: a float copy of the weight per call. On CUDA torch.compile fuses the cast into the
            # matmul (it never exists whole in memory); eager it is slower than the float model. The CPU
            # kernel below steps through rows 16 values at a time: other widths would read past a row.
            return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        # CPU: aten's int8 weight-only matmul (gpt-fast's and torchao's), vectorized on x86 only for bfloat16 in
        # this torch (float32 and float16 run a scalar loop, slower than the float model): x is cast to bfloat16,
        # products are summed in float32 and the sum rounded to bfloat16, then scaled in the model's dtype.
        # The cast also gives the kernel a new, aligned tensor: its aligned loads fault on a view that starts
        # mid-vector.
        lead = x.shape[:-1]
        out = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16, copy=True),
                                        self.weight, self.unit_scales) * self.scales
        return out.view(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def replace_linears(model: nn.Module, make) -> nn.Module:
    """Every nn.Linear of the model (in place) replaced by make(linear)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child))
    return model


def quantize_model(model: Transformer) -> Transformer:
    """The model (in place, put in eval mode) with int8 weights in every linear layer; the embedding and norms
    keep their dtype (float32, bfloat16 or float16). A head tied to the embedding gets its own int8 copy."""
    if is_quantized(model):
        raise ModelError("the model is int8-quantized already: quantize the float model, once")
    if getattr(model, "lora", None):
        raise ModelError("the model has LoRA adapters: merge them first (lora.merge_lora)")
    return replace_linears(model.eval(), Int8Linear.from_float)


def quantized_checkpoint(model: Transformer, ckpt: dict, source: str) -> dict:
    """What quantize.py writes: the int8 state with what inference needs from the float checkpoint."""
    return {"model": model.state_dict(), "config": asdict(model.cfg), "quantization": "int8",
            "tokenizer": ckpt.get("tokenizer", ""), "step": ckpt.get("step", 0), "source": source}


def int8_model(ckpt: dict, path: str) -> Transformer:
    """The int8 model of a checkpoint quantize_model's weights were saved in (read_checkpoint's dict, from path),
    in eval mode; float32 like every loaded model (its scales, embedding and norms)."""
    kind = ckpt.get("quantization")
    if kind != "int8":
        raise ModelError(f"{path} holds weights quantized as {kind!r}; this version reads int8 only")
    model = Transformer(ModelConfig.from_dict(ckpt["config"]))
    replace_linears(model, lambda linear: Int8Linear(linear.in_features, linear.out_features))
    load_state_dict_checked(model, ckpt["model"], path)
    return model.eval()


# -----------------------------------------------------------------------------
# the quality report

@torch.no_grad()
def mean_cross_entropy(model: Transformer, windows: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) over rows of token ids (n, seq_len + 1), a row at a time."""
    device = model.tok_embeddings.weight.device
    losses = [model(row[None, :-1].to(device), row[None, 1:].to(device))[1].item() for row in windows]
    return sum(losses) / len(losses)


def greedy_agreement(reference: Transformer, model: Transformer, prompts: torch.Tensor, new_tokens: int) -> dict:
    """How far `model`'s greedy continuation of each prompt (a row of ids) follows `reference`'s: the mean share
    of the new_tokens positions before the first differing token, and the share of continuations identical
    throughout."""
    prefixes = []
    for prompt in prompts.tolist():
        a = reference.generate(prompt, max_new_tokens=new_tokens, temperature=0)
        b = model.generate(prompt, max_new_tokens=new_tokens, temperature=0)
        prefixes.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) / len(a))
    return {"prefix_share": sum(prefixes) / len(prefixes),
            "identical_share": sum(p == 1.0 for p in prefixes) / len(prefixes), "prompts": len(prefixes)}


def decode_speed(model: Transformer, prompt: list, new_tokens: int, repeats: int = 3) -> float:
    """Tokens per second of batch-1 greedy generation, the best of `repeats` runs after a warm-up."""
    model.generate(prompt, max_new_tokens=new_tokens, temperature=0)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, temperature=0)
        best = min(best, time.perf_counter() - t0)
    return len(out) / best


def quality_report(float_model: Transformer, int8_model: Transformer, windows: torch.Tensor, prompts: torch.Tensor,
                   new_tokens: int = 64, speed_tokens: int = 128) -> dict:
    """The float and the int8 model compared: mean cross-entropy on `windows` (n, seq_len + 1) before and after,
    greedy agreement on continuations of `prompts` (n, prompt_len), and decode tokens/s (speed_tokens 0: not
    timed). The two speeds are taken back to back, float first."""
    report = {"loss_float": mean_cross_entropy(float_model, windows), "loss_int8": mean_cross_entropy(int8_model, windows),
              "eval_tokens": windows.shape[0] * (windows.shape[1] - 1),
              **greedy_agreement(float_model, int8_model, prompts, new_tokens), "new_tokens": new_tokens}
    if speed_tokens:
        prompt = prompts[0].tolist()
        report["tokens_per_s_float"] = decode_speed(float_model, prompt, speed_tokens)
        report["tokens_per_s_int8"] = decode_speed(int8_model, prompt, speed_tokens)
    return report


def format_report(r: dict) -> str:
    lines = [f"held-out loss ({r['eval_tokens']:,} tokens): float {r['loss_float']:.4f} (perplexity "
             f"{math.exp(r['loss_float']):.3f}), int8 {r['loss_int8']:.4f} (perplexity {math.exp(r['loss_int8']):.3f}): "
             f"{r['loss_int8'] - r['loss_float']:+.4f}",
             f"greedy agreement over {r['new_tokens']} new tokens of {r['prompts']} held-out prompts: "
             f"{r['prefix_share']:.1%} of positions before the first difference, "
             f"{r['identical_share']:.0%} of continuations identical"]
    if "tokens_per_s_float" in r:
        lines.append(f"batch-1 greedy decode: float {r['tokens_per_s_float']:.1f} tokens/s, int8 "
                     f"{r['tokens_per_s_int8']:.1f} tokens/s ({r['tokens_per_s_int8'] / r['tokens_per_s_float']:.2f}x)")
    return "\n".join(lines)
