"""One dual-encoder pretraining step: personae vs Hugging Face `transformers.CLIPModel`.

A step is forward + ITC contrastive loss + backward + AdamW step + zero_grad, on the same batch
(random pixels, padded random captions) for both, with the same widths, depths, heads, MLP
ratio, activation, patch and image size, vocabulary, text length, projection size and batch.
personae runs only its dual-encoder path (image tower, text tower, projections, ITC loss; no
fusion, ITM or MLM) and its optimizer holds only the parameters that path uses; the script checks
that this set is exactly the set of parameters that receive a gradient.

The implementations are timed alternately, step by step, and the medians are reported, one JSON
line per figure on stdout (progress notes on stderr):

    .venv/bin/python bench/pretrain_step.py              # tiny + small, ~2 minutes on 2 cores
    .venv/bin/python bench/pretrain_step.py --quick      # smoke run, a few seconds
    .venv/bin/python bench/pretrain_step.py --presets small --batch 64 --steps 20 --threads 2
    .venv/bin/python bench/pretrain_step.py --presets small --profile   # torch.profiler tables
    .venv/bin/python bench/pretrain_step.py --bf16       # both under torch.autocast("cpu", bfloat16)

See docs/guide/benchmarks.md for what is compared, why it is fair, and measured figures.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MatmulProbe, alternate, emit, env_info, median, note, set_threads, spread  # noqa: E402

from personae.config import ModelCfg, load_preset  # noqa: E402
from personae.models import PersonaeModel  # noqa: E402
from personae.objectives import ContrastiveLoss  # noqa: E402

BENCH = "pretrain_step"
# per preset: default batch, a fixed vocabulary size (the tokenizer's in real runs), timed rounds
DEFAULTS = {
    "tiny": {"batch": 64, "vocab": 1024, "rounds": 30},
    "small": {"batch": 32, "vocab": 8192, "rounds": 10},
}
GOAL = 1.3  # personae samples/s >= GOAL x CLIPModel's (the target)
LR, BETAS, WEIGHT_DECAY = 1e-4, (0.9, 0.98), 0.05  # the same AdamW for both


def model_cfg(preset: str, vocab: int) -> ModelCfg:
    cfg = load_preset(preset).model
    cfg.text.vocab_size = vocab
    cfg.dropout = 0.0  # CLIPModel has no residual dropout; keep both deterministic
    return cfg


def make_batch(cfg: ModelCfg, batch: int, padded: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Pixels, ids and masks that both models read the same way.

    Token 1 is <cls> at position 0 (personae pools there), token V-1 is the end-of-text token at
    the last valid position (CLIPModel pools there: it is its `eos_token_id`), 0 pads.
    """
    g = torch.Generator().manual_seed(seed)
    S, T, V = cfg.vision.image_size, cfg.text.max_len, cfg.text.vocab_size
    pixels = torch.randn(batch, 3, S, S, generator=g)
    ids = torch.randint(3, V - 1, (batch, T), generator=g)
    lengths = torch.randint(max(2, T // 4), T + 1, (batch,), generator=g) if padded else torch.full((batch,), T)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    ids[:, 0] = 1
    ids[torch.arange(batch), lengths - 1] = V - 1
    ids[~mask] = 0
    return {"pixel_values": pixels, "input_ids": ids, "mask_bool": mask, "mask_long": mask.long()}


def with_autocast(step: Callable[[], float], bf16: bool) -> Callable[[], float]:
    """The step itself, or the step under CPU bfloat16 autocast (the same for every impl)."""
    if not bf16:
        return step

    def autocast_step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return step()

    return autocast_step


# ----------------------------------------------------------------------------- personae


def dual_encoder_params(model: PersonaeModel) -> list[nn.Parameter]:
    """The parameters of the ITC path: both towers, both projections and the temperature."""
    params: list[nn.Parameter] = []
    for module in (model.vision, model.text, model.image_proj, model.text_proj):
        params.extend(module.parameters())
    params.append(model.logit_scale)
    return params


def personae_step(cfg: ModelCfg, batch: dict[str, torch.Tensor]) -> tuple[Callable[[], float], nn.Module, int]:
    torch.manual_seed(0)
    model = PersonaeModel(cfg).train()
    params = dual_encoder_params(model)
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    itc = ContrastiveLoss()
    pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["mask_bool"]

    def step() -> float:
        out = model(pixels, ids, mask)
        loss = itc(out.image_embed, out.text_embed, out.logit_scale)["loss_itc"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    # fairness check: the optimizer holds exactly the parameters that get a gradient
    out = model(pixels, ids, mask)
    itc(out.image_embed, out.text_embed, out.logit_scale)["loss_itc"].backward()
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    if with_grad != {id(p) for p in params}:
        raise RuntimeError("personae's dual-encoder parameter list does not match the parameters the ITC path uses")
    optimizer.zero_grad(set_to_none=True)
    return step, model, sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- transformers


def clip_step(cfg: ModelCfg, batch: dict[str, torch.Tensor], attn: str) -> tuple[Callable[[], float], nn.Module, int]:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    v, t = cfg.vision, cfg.text
    act = "gelu_pytorch_tanh"  # personae's MLP is F.gelu(approximate="tanh"); CLIP's default is quick_gelu
    text_cfg = CLIPTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio),
        num_hidden_layers=t.depth, num_attention_heads=t.heads, max_position_embeddings=t.max_len,
        hidden_act=act, projection_dim=cfg.embed_dim, pad_token_id=0, bos_token_id=1, eos_token_id=t.vocab_size - 1,
    )
    vision_cfg = CLIPVisionConfig(
        hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio), num_hidden_layers=v.depth,
        num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size, hidden_act=act,
        projection_dim=cfg.embed_dim,
    )
    config = CLIPConfig(
        text_config=text_cfg.to_dict(), vision_config=vision_cfg.to_dict(), projection_dim=cfg.embed_dim,
        logit_scale_init_value=math.log(1.0 / cfg.init_temperature),
    )
    torch.manual_seed(0)
    model = CLIPModel._from_config(config, attn_implementation=attn).train()
    if model.config._attn_implementation != attn:
        raise RuntimeError(f"CLIPModel did not take attn_implementation={attn!r}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["mask_long"]

    def step() -> float:
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, return_loss=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    return step, model, sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- FLOPs


def train_flops(cfg: ModelCfg, batch: int, text_lengths: torch.Tensor | None = None) -> float:
    """Model FLOPs of one training step: 3 x the forward's matmul FLOPs (2 per multiply-add).

    Counted as in the usual MFU definition: patch embedding, every layer's linear maps and full
    attention, the projections and the two B x B similarity matrices; LayerNorm, GELU, softmax
    and the optimizer are left out. Text positions are `max_len` per caption, padding included,
    or with `text_lengths` (B,) only the valid tokens (the work any implementation must do).
    """

    def tower(tokens: torch.Tensor, width: int, depth: int, mlp_ratio: float) -> float:
        hidden = int(width * mlp_ratio)
        linear = 2 * tokens * width * (3 * width + width + 2 * hidden)  # qkv, out, fc, proj
        attention = 2 * 2 * tokens**2 * width  # q @ k^T and attn @ v
        return float((depth * (linear + attention)).sum())

    v, t, E = cfg.vision, cfg.text, cfg.embed_dim
    patches = (v.image_size // v.patch_size) ** 2
    lengths = text_lengths.double() if text_lengths is not None else torch.full((batch,), float(t.max_len))
    image = batch * (2 * patches * 3 * v.patch_size**2 * v.width + 2 * v.width * E)
    image += tower(torch.full((batch,), 1.0 + patches), v.width, v.depth, v.mlp_ratio)
    text = tower(lengths, t.width, t.depth, t.mlp_ratio) + batch * 2 * t.width * E
    similarity = 2 * 2 * batch * batch * E  # the two B x B logit matrices
    return 3.0 * (image + text + similarity)


# ----------------------------------------------------------------------------- profiling


def profile(steps: dict[str, Callable[[], float]], n: int = 3, rows: int = 25) -> None:
    """torch.profiler tables (self CPU time) of `n` steps of each implementation, on stderr."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, step in steps.items():
        step()
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(n):
                step()
        note(f"\n=== {name}: {n} steps, by self CPU time ===")
        note(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
        note(f"=== {name}: by op and input shapes ===")
        note(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows))


# ----------------------------------------------------------------------------- main


def run_preset(preset: str, args: argparse.Namespace, probe: MatmulProbe) -> dict[str, Any]:
    d = DEFAULTS.get(preset, {"batch": 32, "vocab": 4096, "rounds": 10})
    batch_size = args.batch or d["batch"]
    rounds = args.steps or d["rounds"]
    cfg = model_cfg(preset, args.vocab or d["vocab"])
    batch = make_batch(cfg, batch_size, padded=not args.no_padding)

    steps: dict[str, Callable[[], float]] = {}
    params: dict[str, int] = {}
    steps["personae"], _, params["personae"] = personae_step(cfg, batch)
    for attn in args.clip_attn:
        name = f"clip-{attn}"
        steps[name], _, params[name] = clip_step(cfg, batch, attn)
    steps = {name: with_autocast(step, args.bf16) for name, step in steps.items()}

    if args.profile:
        profile(steps)
        return {}

    note(f"[{preset}] batch {batch_size}, {rounds} rounds of {', '.join(steps)} (warm-up {args.warmup})")
    # the matmul peak is sampled in every round too, under the same load as the models
    times = alternate({**steps, "matmul": probe}, rounds=rounds, warmup=args.warmup)
    matmul_times = times.pop("matmul")
    common = {"bench": BENCH, "preset": preset, "batch": batch_size, "rounds": rounds, "threads": args.threads_used,
              "dtype": "bf16-autocast" if args.bf16 else "float32", "padded": not args.no_padding}
    med = {name: median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        emit(**common, impl=name, params=params[name], step_ms=1e3 * med[name],
             samples_per_s=batch_size / med[name], iqr=spread(ts))

    # speedup vs each peer: the median of the per-round ratios (paired rounds share the noise)
    ours = times["personae"]
    peers = {name: statistics.median(p / o for p, o in zip(ts, ours)) for name, ts in times.items() if name != "personae"}
    if peers:
        best_peer = min(peers, key=lambda name: med[name])  # the faster CLIPModel variant is the bar
        emit(**common, kind="ratio", ours="personae", peer=best_peer, speedup=peers[best_peer],
             **{f"speedup_vs_{name}": r for name, r in peers.items()}, goal=GOAL, met=peers[best_peer] >= GOAL)

    return {
        "flops": train_flops(cfg, batch_size),
        "flops_valid": train_flops(cfg, batch_size, batch["mask_bool"].sum(1)),
        "seconds": med["personae"], "preset": preset, "batch": batch_size, "matmul_times": matmul_times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--presets", default="", help="comma-separated presets (default tiny,small; tiny with --quick)")
    parser.add_argument("--batch", type=int, default=0, help="batch size for every preset (default: 64 tiny, 32 small)")
    parser.add_argument("--steps", type=int, default=0, help="timed rounds per preset (default: 30 tiny, 10 small)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary size (default: 1024 tiny, 8192 small)")
    parser.add_argument("--clip-attn", default="sdpa,eager", help="CLIPModel attn_implementation(s) (default sdpa,eager)")
    parser.add_argument("--no-padding", action="store_true", help="full-length captions (no padding mask)")
    parser.add_argument("--bf16", action="store_true", help="run every step under CPU bfloat16 autocast")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables instead of timing")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny, batch 16, 3 rounds, 1024^3 matmul")
    args = parser.parse_args(argv)
    if args.quick:
        args.presets, args.batch, args.steps, args.warmup = args.presets or "tiny", args.batch or 16, args.steps or 3, 1
    args.presets = args.presets or "tiny,small"
    args.clip_attn = [a for a in args.clip_attn.split(",") if a]
    args.threads_used = set_threads(args.threads or None)
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        sys.exit("bench/pretrain_step.py needs transformers: pip install -c constraints.txt 'transformers>=4.40'")

    emit(bench=BENCH, kind="env", **env_info())
    peak_dtype = torch.bfloat16 if args.bf16 else torch.float32  # MFU against the peak of the dtype used
    probe = MatmulProbe(1024 if args.quick else 2048, peak_dtype)
    results = [run_preset(p.strip(), args, probe) for p in args.presets.split(",") if p.strip()]
    if args.profile:
        return 0
    # peak: the fastest of the big matmuls timed alongside the steps (the quietest moment);
    # MFU = model FLOPs / median step time / peak, so noise can only make it look lower
    samples = [t for r in results for t in r["matmul_times"]]
    peak = probe.flops(min(samples))
    emit(bench=BENCH, kind="matmul_peak", n=probe.n, dtype=str(peak_dtype).removeprefix("torch."),
         gflops=peak / 1e9, median_gflops=probe.flops(median(samples)) / 1e9, samples=len(samples))
    for r in results:
        achieved = r["flops"] / r["seconds"]
        emit(bench=BENCH, kind="mfu", preset=r["preset"], impl="personae", batch=r["batch"],
             model_gflop_per_step=r["flops"] / 1e9, achieved_gflops=achieved / 1e9, peak_gflops=peak / 1e9,
             mfu=achieved / peak, valid_gflop_per_step=r["flops_valid"] / 1e9,
             mfu_valid=r["flops_valid"] / r["seconds"] / peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
