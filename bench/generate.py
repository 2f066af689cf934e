"""Greedy generation: personae's decoder (KV cache) vs Hugging Face GPT2LMHeadModel.generate().

Both models have the same width, depth, heads, MLP ratio and vocabulary, random weights, and
generate exactly `--new-tokens` tokens greedily from the same prompt (text only: GPT-2 has no
image prefix). Runs alternate round by round in one process; medians are reported.

    python bench/generate.py            # batch 1 and 8, 64 new tokens, preset tiny
    python bench/generate.py --quick    # a few seconds
    python bench/generate.py --hf       # a random 135 M Llama (SmolLM-135M's shape) as personae's
                                        # decoder (model.decoder.kind=hf) vs its own HF generate()
    python bench/generate.py --hf --hf-folder DIR   # a local causal LM folder instead

With ``--hf`` both sides run the very same Hugging Face module: personae's engine (its KV cache and
batching, models/hf.py) against ``generate()`` with a padded batch.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, emit, env_info, median, note, set_threads, spread  # noqa: E402

from personae.config import DecoderCfg, load_preset  # noqa: E402
from personae.models import PersonaeModel  # noqa: E402
from personae.models.generation import SamplingParams, generate  # noqa: E402


class NoEosTokenizer:
    """Just what generate() needs: no token ends a reply, so both sides make every token."""

    eos_id, pad_id = -1, 0

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def build_models(preset: str, vocab: int, max_len: int) -> tuple[PersonaeModel, torch.nn.Module]:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = load_preset(preset).model
    cfg.text.vocab_size, cfg.decoder.enabled, cfg.decoder.max_len = vocab, True, max_len
    ours = PersonaeModel(cfg).eval()
    dec = cfg.decoder
    config = GPT2Config(
        vocab_size=vocab, n_positions=max_len, n_embd=dec.width, n_layer=dec.depth, n_head=dec.heads,
        n_inner=int(dec.width * dec.mlp_ratio), activation_function="gelu_new", resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    config._attn_implementation = "sdpa"  # the fastest attention transformers offers on CPU
    theirs = GPT2LMHeadModel(config).eval()
    return ours, theirs


def build_hf_models(preset: str, folder: str | None, hidden: int, layers: int, vocab: int,
                    max_len: int) -> tuple[PersonaeModel, torch.nn.Module]:
    """personae's model around an HF causal LM (a random Llama written to a temporary folder unless given)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    made = folder is None
    if made:
        folder = tempfile.mkdtemp(prefix="bench-llama-")
        heads = max(1, hidden // 64)
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 3),
                             max_position_embeddings=max(2048, max_len), tie_word_embeddings=True)
        LlamaForCausalLM(config).save_pretrained(folder)
    cfg = load_preset(preset).model
    cfg.decoder = DecoderCfg(enabled=True, kind="hf", path=folder, max_len=max_len)
    ours = PersonaeModel(cfg).eval()
    if made:  # the weights are loaded: the half-gigabyte folder can go
        shutil.rmtree(folder)
    theirs = ours.decoder.lm
    note(f"hf decoder {folder}: {sum(p.numel() for p in theirs.parameters()) / 1e6:.0f} M parameters")
    return ours, theirs


def runners(ours: PersonaeModel, theirs: torch.nn.Module, batch: int, prompt_len: int, new_tokens: int,
            vocab: int) -> dict[str, callable]:
    prompt = torch.randint(1, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    tokenizer = NoEosTokenizer()

    def personae(n: int = new_tokens):
        out = generate(ours, tokenizer, prompt.tolist(), None, SamplingParams(max_new_tokens=n))
        assert all(len(g.token_ids) == n for g in out)

    def hf(n: int = new_tokens):
        out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, use_cache=True, pad_token_id=0)
        assert out.shape[1] == prompt_len + n

    # with --hf, "hf_gpt2" is the HF decoder's own generate()
    return {"personae": personae, "hf_gpt2": hf, "personae_ttft": lambda: personae(1), "hf_gpt2_ttft": lambda: hf(1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 16 new tokens")
    parser.add_argument("--hf", action="store_true", help="an HF Llama as personae's decoder vs its own generate()")
    parser.add_argument("--hf-folder", default=None, help="with --hf: a local causal LM folder (default: a random Llama)")
    parser.add_argument("--hf-hidden", type=int, default=576, help="with --hf: the random Llama's hidden size")
    parser.add_argument("--hf-layers", type=int, default=30, help="with --hf: the random Llama's layers")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens = 3, 16
    set_threads(args.threads)
    emit(bench="generate", **env_info())
    torch.manual_seed(0)
    max_len = args.prompt_len + args.new_tokens + 8
    if args.hf:
        vocab = 49152 if args.hf_folder is None and args.vocab == 4096 else args.vocab  # SmolLM's vocabulary
        ours, theirs = build_hf_models(args.preset, args.hf_folder, args.hf_hidden, args.hf_layers, vocab, max_len)
        args.vocab = int(theirs.config.vocab_size)
    else:
        ours, theirs = build_models(args.preset, args.vocab, max_len)
    with torch.inference_mode():
        for batch in args.batches:
            fns = runners(ours, theirs, batch, args.prompt_len, args.new_tokens, args.vocab)
            note(f"batch {batch}: {args.rounds} alternating rounds")
            times = alternate(fns, rounds=args.rounds, warmup=2)
            tps = {}
            for name in ("personae", "hf_gpt2"):
                tps[name] = batch * args.new_tokens / median(times[name])
                emit(bench="generate", preset=args.preset, hf=args.hf, batch=batch, impl=name, tokens_per_s=tps[name],
                     ttft_ms=1000 * median(times[f"{name}_ttft"]), spread=spread(times[name]))
            emit(bench="generate", preset=args.preset, hf=args.hf, batch=batch, ratio_tokens_per_s=tps["personae"] / tps["hf_gpt2"],
                 ratio_ttft=median(times["hf_gpt2_ttft"]) / median(times["personae_ttft"]))


if __name__ == "__main__":
    main()
