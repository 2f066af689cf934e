"""Peak memory of a LoRA fine-tune step on an HF Llama decoder, with and without gradient checkpointing.

A random Llama of SmolLM-135M's shape (hidden 576, 30 layers, vocabulary 49152; the same config
`bench/generate.py --hf` uses) is personae's decoder (model.decoder.kind=hf) with
model.decoder.locked and LoRA rank 8 on q/k/v/o: one step is a forward, the next-token loss, the
backward and an AdamW step on what trains (the adapters and the projector). Each setting runs in
a fresh subprocess, so its high-water mark is its own: on CUDA `torch.cuda.max_memory_allocated`,
on CPU the process's peak RSS (`resource.getrusage(...).ru_maxrss`, which counts what torch's
allocator took from the OS; tracemalloc does not see torch's tensors).

    python bench/memory.py                  # plain, checkpointing, and both with bf16; batch 4 x 256
    python bench/memory.py --settings plain ckpt --steps 1
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, env_info, note, set_threads  # noqa: E402

from personae.config import DecoderCfg, load_preset  # noqa: E402
from personae.models import PersonaeModel  # noqa: E402
from personae.models.checkpointing import enable_checkpointing  # noqa: E402

SETTINGS = {"plain": (False, False), "ckpt": (True, False), "bf16": (False, True), "ckpt-bf16": (True, True)}


def write_llama(folder: Path, hidden: int, layers: int, vocab: int, max_len: int) -> None:
    """The random Llama of bench/generate.py --hf, saved to `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 3),
                         max_position_embeddings=max(2048, max_len), tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)


def peak_bytes(device: torch.device) -> int:
    """The process's memory high-water mark so far: CUDA's allocator peak, or the peak RSS (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    """Resident memory now (Linux /proc), to tell the step's own share from the model's."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def one_setting(args: argparse.Namespace) -> dict:
    """Build the model, run `args.steps` LoRA steps under one setting; the figures (in the child process)."""
    checkpointing, bf16 = SETTINGS[args.setting]
    device = torch.device(args.device)
    cfg = load_preset("tiny").model
    cfg.vision.locked = cfg.text.locked = True  # a role-play fine-tune of the LM: the towers take no part
    cfg.decoder = DecoderCfg(enabled=True, kind="hf", path=args.folder, max_len=args.seq_len, locked=True)
    cfg.lora_rank, cfg.lora_alpha = 8, 16.0
    model = PersonaeModel(cfg).to(device).train()
    if checkpointing:
        enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = int(model.decoder.lm.config.vocab_size)
    ids = torch.randint(5, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():  # read every weight once: memory-mapped weights are resident before the step starts
        sum(float(p.sum()) for p in model.parameters())
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model.lm_logits(None, ids)[:, :-1]
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
    peak = peak_bytes(device)
    return {"setting": args.setting, "peak_mib": peak / 2**20, "step_mib": max(0, peak - before) / 2**20,
            "model_mib": before / 2**20, "step_s": min(seconds), "loss": losses[0],
            "trainable": sum(p.numel() for p in params), "parameters": sum(p.numel() for p in model.parameters())}


def run_child(args: argparse.Namespace, setting: str, folder: Path) -> dict:
    """One setting in a fresh Python process (its own high-water mark); its JSON line."""
    command = [sys.executable, __file__, "--child", "--setting", setting, "--folder", str(folder),
               "--device", args.device, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--threads", str(args.threads or 0)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["plain", "ckpt", "bf16", "ckpt-bf16"], choices=list(SETTINGS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1, help="steps per setting (the peak is over all of them)")
    parser.add_argument("--hidden", type=int, default=576, help="the random Llama's hidden size")
    parser.add_argument("--layers", type=int, default=30, help="the random Llama's layers")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    set_threads(args.threads or None)
    if args.child:
        print(json.dumps(one_setting(args)), flush=True)
        return
    emit(bench="memory", device=args.device, batch=args.batch, seq_len=args.seq_len, **env_info())
    folder = Path(tempfile.mkdtemp(prefix="bench-memory-llama-"))
    try:
        write_llama(folder, args.hidden, args.layers, args.vocab, args.seq_len)
        rows = {}
        for setting in args.settings:
            note(f"{setting}: a fresh process, {args.steps} step(s) of batch {args.batch} x {args.seq_len}")
            rows[setting] = emit(bench="memory", device=args.device, **run_child(args, setting, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    base = rows.get("plain")
    for setting, row in rows.items():
        if base is not None and setting != "plain":
            emit(bench="memory", setting=setting, vs="plain", ratio_peak=row["peak_mib"] / base["peak_mib"],
                 ratio_step_memory=row["step_mib"] / max(base["step_mib"], 1e-9), ratio_time=row["step_s"] / base["step_s"])


if __name__ == "__main__":
    main()
