"""The `tuner` command: list-cfg, copy-cfg, train, convert, chat, serve, web, and the data tools.

Every subcommand exits 0 on success, 1 on an error the user can fix (one clear line,
no traceback), 2 on bad command-line usage, 130 on Ctrl-C, 141 when the reader of its output
has gone (`tuner list-cfg | head -1`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

from tuner.chat.prompts import SYSTEM_TEMPLATES
from tuner.config import TRACKERS
from tuner.dtypes import NAMES
from tuner.engine import allocator
from tuner.errors import TunerError


def cmd_list_cfg(args) -> int:
    from tuner.configs_index import builtin_configs

    pattern = (args.pattern or "").lower()
    names = [n for n in builtin_configs() if pattern in n.lower()]
    if not names:
        print(f"no built-in config matches {args.pattern!r}", file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


def cmd_copy_cfg(args) -> int:
    from tuner.configs_index import copy_config

    print(f"Copied to {copy_config(args.name, args.dest)}")
    return 0


def cmd_train(args) -> int:
    from tuner.config import load_config
    from tuner.engine import dist

    options = args.cfg_options + (["data.skip_bad_rows=true"] if args.skip_bad_rows else [])
    options += [f"train.report_to={','.join(args.report_to)}"] if args.report_to else []
    cfg = load_config(args.config, options)  # a bad config fails here, before any restart
    if args.argv_from_command_line:
        allocator.restart_with_faster_allocator(args.argv, lora=cfg.lora is not None)
    if args.launcher == "slurm":
        os.environ.update(dist.slurm_environment(dict(os.environ)))
    else:
        command = dist.torchrun_command(args.argv[args.argv.index("train") + 1:])
        if command:  # NPROC_PER_NODE > 1: torchrun starts the processes, each runs this command again
            return dist.launch(command)
    from tuner.engine.loop import Trainer

    started = time.perf_counter()
    trainer = Trainer(cfg, work_dir=args.work_dir, resume=args.resume, seed=args.seed, fsdp=args.fsdp,
                      deepspeed=args.deepspeed)
    trainer.train()
    trainer.info(f"Training finished in {time.perf_counter() - started:.1f}s; checkpoints in {trainer.work_dir}")
    trainer.dist.finish(0)
    return 0


def cmd_convert(args) -> int:
    if args.action == "xtuner-config":
        import sys
        from pathlib import Path

        from tuner.convert.xtuner_config import convert_file, convert_tree

        if Path(args.src).is_dir():
            done, refused, failed = convert_tree(args.src, args.dst, force=args.force)
            print(f"{done + refused + failed} files under {args.src}: {done} converted into {args.dst}, {refused} "
                  f"refused (the reason on each line), {failed} failed")
            return 1 if failed else 0
        converted = convert_file(args.src, args.dst, force=args.force)
        for note in converted.notes:
            print(f"note: {args.src} {note}", file=sys.stderr)
        notes = len(converted.notes)
        print(f"Wrote {args.dst} ({notes} note{'' if notes == 1 else 's'} in its header); "
              f"check it: tuner check-config {args.dst}")
        return 0
    if args.action == "gguf":
        from tuner.convert.gguf_export import export_gguf

        system = args.system
        if system is None and args.config:  # the system prompt the model was trained with
            from tuner.config import load_config

            system = load_config(args.config).data.system
        export_gguf(args.src, args.out, args.outtype, args.adapter, system)
        return 0
    from tuner.convert import hf

    if args.action == "pth_to_hf":
        from tuner.config import load_config

        cfg = load_config(args.config, args.cfg_options)
        out = hf.pth_to_hf(cfg, args.pth, args.save_dir, fp32=args.fp32, max_shard_size=args.max_shard_size,
                           save_format=args.save_format)
        kind = "adapter" if cfg.lora is not None else "model"
        if cfg.head == "reward":
            kind = "reward model" + (" (LoRA merged in)" if cfg.lora is not None else "")
        if cfg.llava is not None:
            kind = "LLaVA model" if args.save_format == "hf" else "LLaVA projector" + (
                " and adapter" if cfg.lora or cfg.llava.visual_encoder_lora else "")
        print(f"Saved the {kind} to {out}")
    else:
        out = hf.merge(args.base, args.adapter, args.save_dir, max_shard_size=args.max_shard_size, device=args.device,
                       trust_remote_code=args.trust_remote_code)
        print(f"Saved the merged model to {out}")
    return 0


def cmd_chat(args) -> int:
    from tuner.chat.cli import run_chat

    return run_chat(args)


def cmd_board(args) -> int:
    from tuner.board.run import run_board

    return run_board(args)


def cmd_serve(args) -> int:
    from tuner.serve.run import run_server

    return run_server(args, page=args.command == "web")


def cmd_eval(args) -> int:
    from tuner.chat.evaluate import run_eval

    return run_eval(args)


def cmd_mmbench(args) -> int:
    from tuner.chat.mmbench import run_mmbench

    return run_mmbench(args)


def cmd_score(args) -> int:
    import sys

    from tuner.generation.load import load_chat_model, load_reward_model
    from tuner.generation.score import score_pairs, score_with_reward_model

    reward = load_reward_model(args.model, args.torch_dtype, args.trust_remote_code)
    if reward is not None:
        model, tokenizer, compute = reward
        if args.adapter:
            raise TunerError(f"{args.model} is a reward model; --adapter is for a DPO run's adapter")
        print(score_with_reward_model(model, tokenizer, args.data, args.prompt_template, args.max_length,
                                      args.batch_size, compute).report())
        return 0
    model, tokenizer, compute = load_chat_model(args.model, args.adapter, args.torch_dtype,
                                                warn=lambda line: print(line, file=sys.stderr),
                                                trust_remote_code=args.trust_remote_code)
    scores = score_pairs(model, tokenizer, args.data, args.prompt_template, args.max_length, args.batch_size,
                         compute)
    print(scores.report(args.beta))
    return 0


def cmd_make_identity_data(args) -> int:
    from tuner.data.identity import GENERAL_QUESTIONS, write_identity_data

    replay = []
    if not args.no_replay and args.model and args.replay_repeats:
        from tuner.generation.replay import replay_samples
        replay = replay_samples(args.model, GENERAL_QUESTIONS, args.replay_repeats)
    n_identity, n_replay = write_identity_data(args.out, args.name, args.author, args.count, replay, args.seed)
    print(f"Wrote {n_identity} identity samples and {n_replay} replay samples to {args.out}")
    return 0


def cmd_list_dataset_format(args) -> int:
    from tuner.data.inspection import list_formats

    print(list_formats())
    return 0


def cmd_check_config(args) -> int:
    """Each config's plan, every part that resolves, then every problem found (exit 1 if any)."""
    from tuner.config import load_config
    from tuner.engine.plan import check_plan

    failed = 0
    for i, path in enumerate(args.config):
        if len(args.config) > 1:
            print(f"{'' if i == 0 else chr(10)}== {path}")
        try:
            lines, problems = check_plan(load_config(path, args.cfg_options))
        except TunerError as e:
            if len(args.config) == 1:
                raise
            print(f"tuner check-config: error: {e}", file=sys.stderr)
            failed += 1
            continue
        print("\n".join(lines), flush=True)
        for problem in problems:
            print(f"tuner check-config: error: {problem}", file=sys.stderr)
        if problems:
            failed += 1
            if len(args.config) == 1:
                return 1
    if len(args.config) > 1:
        print(f"\n{len(args.config) - failed} of {len(args.config)} configs checked; {failed} failed")
    return 1 if failed else 0


def cmd_check_custom_dataset(args) -> int:
    from tuner.config import load_config
    from tuner.data.inspection import check_custom_dataset
    from tuner.model.load import load_tokenizer

    cfg = load_config(args.config, args.cfg_options)
    report, bad = check_custom_dataset(cfg, load_tokenizer(cfg.model.path, cfg.model.trust_remote_code), args.samples)
    print(report)
    return 1 if bad else 0


def cmd_log_dataset(args) -> int:
    from tuner.config import load_config
    from tuner.data.inspection import log_dataset
    from tuner.model.load import load_tokenizer

    cfg = load_config(args.config, args.cfg_options)
    print(log_dataset(cfg, load_tokenizer(cfg.model.path, cfg.model.trust_remote_code), args.show, args.num))
    return 0


def cmd_check_template(args) -> int:
    from tuner.config import DataConfig
    from tuner.data.inspection import check_template, template_report_text
    from tuner.model.load import load_tokenizer

    data = DataConfig(path=args.data, format=args.format, template=args.template)
    report = check_template(args.template, load_tokenizer(args.tokenizer, args.trust_remote_code), data)
    print(template_report_text(report))
    return 0 if report.ok else 1


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """How chat, serve and web load a model and render prompts."""
    p.add_argument("--adapter", help="a LoRA adapter folder to apply")
    p.add_argument("--prompt-template", help="a named template (default: the tokenizer's own)")
    p.add_argument("--torch-dtype", choices=NAMES, default="auto")
    p.add_argument("--bits", type=int, choices=[4, 8], help="quantize the weights with bitsandbytes (NF4 / LLM.int8)")
    p.add_argument("--offload-folder", help="let accelerate place weights that do not fit on disk here")
    p.add_argument("--stop-words", nargs="+", default=[], help="extra stop words (the template's are always on)")
    p.add_argument("--context-length", type=int,
                   help="tokens of prompt + reply (default: the model's max_position_embeddings)")
    add_trust_argument(p)


def add_trust_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model folder's own Python code (models transformers does not know; "
                        "InternLM2 never needs it: it loads as Llama)")


def add_llava_arguments(p: argparse.ArgumentParser) -> None:
    """How chat, serve, web and mmbench find the parts of a LLaVA model."""
    p.add_argument("--llava", metavar="DIR", help="LLaVA: the pth_to_hf folder (projector, adapter) for the LLM MODEL")
    p.add_argument("--visual-encoder", metavar="ENC", help="LLaVA: the vision encoder (default: the one trained with)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuner", description="Fine-tune LLMs from a config file.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list-cfg", help="list built-in configs")
    p.add_argument("-p", "--pattern", help="case-insensitive substring of the config name")
    p.set_defaults(func=cmd_list_cfg)

    p = sub.add_parser("copy-cfg", help="copy a built-in config to DEST/NAME_copy.py")
    p.add_argument("name")
    p.add_argument("dest")
    p.set_defaults(func=cmd_copy_cfg)

    p = sub.add_parser("train", help="train from a config file or built-in config name")
    p.add_argument("config")
    p.add_argument("--work-dir", help="default: ./work_dirs/<config name>")
    p.add_argument("--resume", metavar="PATH|auto", help="resume from a checkpoint, or the work dir's last one")
    p.add_argument("--seed", type=int)
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count rows that fail validation")
    p.add_argument("--report-to", nargs="+", choices=TRACKERS, default=[],
                   help="also send scalars and the config there (pip install tensorboard / wandb / swanlab / mlflow)")
    p.add_argument("--deepspeed", metavar="PRESET|JSON",
                   help="DeepSpeed ZeRO: deepspeed_zero1, deepspeed_zero2, deepspeed_zero2_offload, deepspeed_zero3, "
                        "deepspeed_zero3_offload, or a JSON file (batch, accumulation, clipping come from the config)")
    p.add_argument("--fsdp", action="store_true", help="with several processes: shard the model (FSDP2) "
                                                        "instead of replicating it (DDP)")
    p.add_argument("--launcher", choices=["torchrun", "slurm"], default="torchrun",
                   help="slurm: take ranks from srun's environment (NPROC_PER_NODE starts torchrun otherwise)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. optim.lr=1e-4 data.max_length=512")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert", help="pth_to_hf: checkpoint -> HF folder; merge: base + adapter -> model; "
                                       "xtuner-config: an XTuner config -> a tuner config")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = actions.add_parser("pth_to_hf", help="write a PEFT adapter (LoRA) or a full HF model (full)")
    c.add_argument("config")
    c.add_argument("pth")
    c.add_argument("save_dir")
    c.add_argument("--fp32", action="store_true", help="save float32 instead of the training dtype")
    c.add_argument("--save-format", choices=["tuner", "hf"], default="tuner",
                   help="LLaVA: 'tuner' = projector (+ adapter) and a recipe; 'hf' = a whole "
                        "LlavaForConditionalGeneration folder that plain transformers loads")
    c.add_argument("--max-shard-size", default="2GB")
    c.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    x = actions.add_parser("xtuner-config", help="an XTuner 0.1.x config -> a tuner config (xtuner not needed)")
    x.add_argument("src", help="the XTuner config (.py), or a folder of them (every .py under it, in one process)")
    x.add_argument("dst", help="the tuner config to write (a folder when SRC is one: the same tree under it)")
    x.add_argument("--force", action="store_true", help="overwrite what is there")
    g = actions.add_parser("gguf", help="a model folder (or base + --adapter) -> one GGUF file for llama.cpp / "
                                        "Ollama, and an Ollama Modelfile beside it")
    g.add_argument("src", help="HF folder, hub id, or smollm2-135m-instruct (the base, with --adapter)")
    g.add_argument("out", help="the .gguf file to write (never overwritten)")
    g.add_argument("--outtype", choices=["f16", "bf16", "q8_0", "q4_0"], default="f16")
    g.add_argument("--adapter", help="a LoRA adapter folder, merged into SRC first")
    g.add_argument("--system", help="a system prompt for the Modelfile")
    g.add_argument("--config", help="the training config: its data.system becomes the Modelfile's system prompt "
                                    "(--system wins)")
    m = actions.add_parser("merge", help="merge a LoRA adapter into its base model")
    m.add_argument("base")
    m.add_argument("adapter")
    m.add_argument("save_dir")
    m.add_argument("--max-shard-size", default="2GB")
    m.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_trust_argument(m)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("chat", help="chat with a model in the terminal")
    p.add_argument("model", help="HF folder, hub id, or smollm2-135m-instruct")
    add_model_arguments(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--system-template", help="a named system prompt: " + ", ".join(SYSTEM_TEMPLATES))
    p.add_argument("--bot-name", default="BOT", help="fills {bot_name} in a system template")
    p.add_argument("--with-plugins", nargs="+", default=[], choices=["calculate", "solve", "search"],
                   help="tools the model may call (search needs SERPER_API_KEY)")
    p.add_argument("--tool-format", choices=["json", "react"], default="json",
                   help="json: <tool_call> blocks, as tuner trains tool data; react: Action / Action Input text")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.1, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.75)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-streamer", action="store_true", help="print each answer at once")
    add_llava_arguments(p)
    p.add_argument("--image", nargs="+", metavar="PATH", help="LLaVA: image(s) that go with the first message")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="benchmarks with lm-evaluation-harness (pip install \"tuner[eval]\"): its tasks "
                                    "or tuner's offline ones, optionally against a base model")
    p.add_argument("model", help="HF folder, hub id, or smollm2-135m-instruct")
    p.add_argument("--adapter", help="a LoRA adapter folder to apply")
    p.add_argument("--tasks", default="tuner_general_knowledge",
                   help="comma-separated lm-eval task names (default: tuner_general_knowledge; also "
                        "tuner_identity_ava, and every lm-eval task)")
    p.add_argument("--include-path", metavar="DIR", help="a folder of your own lm-eval task YAML files")
    p.add_argument("--limit", type=int, help="at most N examples per task")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--compare", metavar="BASE", help="also evaluate BASE (a model) and print both with the difference")
    p.add_argument("--output", metavar="DIR", help="write the results JSON here")
    p.add_argument("--log-samples", action="store_true",
                   help="with --output: also every example's prompt, answers and scores (samples_TASK.jsonl)")
    p.add_argument("--dtype", choices=NAMES, default="auto")
    p.add_argument("--bits", type=int, choices=[4, 8], help="quantize the weights with bitsandbytes (NF4 / LLM.int8)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="ask every task through the model's chat template (tuner's chat tasks always are)")
    add_trust_argument(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="how often a model (or a DPO adapter) prefers the chosen answers of "
                                     "preference pairs; a reward model's rewards (and accuracy on pairs)")
    p.add_argument("model", help="HF folder, hub id, or smollm2-135m-instruct; or a reward model folder "
                                 "(pth_to_hf of a preference.method='reward' run)")
    p.add_argument("--adapter", help="a LoRA adapter folder: also scores the base with it switched off")
    p.add_argument("--data", required=True, help="preference pairs (any form tuner list-dataset-format names); "
                                                 "for a reward model also conversations")
    p.add_argument("--prompt-template", help="a named template (default: the tokenizer's own)")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per answer with its prompt")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta, for the reward margins")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--torch-dtype", choices=NAMES, default="auto")
    add_trust_argument(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("mmbench", help="accuracy of a LLaVA model on an MMBench-style multiple-choice TSV")
    p.add_argument("model", help="a LLaVA folder (pth_to_hf --save-format hf), or the LLM with --llava")
    p.add_argument("--data", required=True, help="the TSV: index, question, hint, A, B, C, D, answer, image")
    add_llava_arguments(p)
    p.add_argument("--prompt-template", help="a named template (default: the tokenizer's own)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--torch-dtype", choices=NAMES, default="auto")
    add_trust_argument(p)
    p.set_defaults(func=cmd_mmbench)

    for name, help_text, port in (("serve", "an OpenAI-compatible API server", 8000),
                                  ("web", "a chat page in the browser", 7860)):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", help="HF folder, hub id, or smollm2-135m-instruct")
        add_model_arguments(p)
        p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
        p.add_argument("--port", type=int, default=port)
        p.add_argument("--served-model-name", help="the model id clients send (default: the folder's name)")
        p.add_argument("--max-new-tokens", type=int, default=512, help="when a request gives no max_tokens")
        p.add_argument("--max-batch-size", type=int, default=16, help="requests generated together")
        add_llava_arguments(p)
        p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $TUNER_API_KEY)" +
                       ("; the page's address then carries it as #key=KEY" if name == "web" else ""))
        p.add_argument("--max-body-mb", type=float, default=16, help="largest request body, in MiB (413 above)")
        p.add_argument("--request-timeout", type=float, default=60,
                       help="seconds a request's headers and body may take to arrive, however slowly they trickle")
        p.set_defaults(func=cmd_serve)

    p = sub.add_parser("board", help="a web page over work dirs: runs, live loss curves (overlaid), evaluation "
                                     "answers, benchmark tables, configs; with --allow-launch, start, stop and "
                                     "resume runs from it")
    p.add_argument("work_dirs", nargs="*", help="folders of work dirs, or work dirs (default: ./work_dirs)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface (set --api-key)")
    p.add_argument("--port", type=int, default=6006)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $TUNER_API_KEY); the page's "
                                     "address then carries it as #key=KEY")
    p.add_argument("--allow-launch", action="store_true",
                   help="let the page start runs (built-in configs with edited fields, in a new work dir under the "
                        "first folder), stop and resume them; needs --api-key on a host other than loopback")
    p.set_defaults(func=cmd_board)

    p = sub.add_parser("list-dataset-format", help="list the dataset formats and the columns they read")
    p.set_defaults(func=cmd_list_dataset_format)

    p = sub.add_parser("check-config", help="load and type-check a config and print what training would do "
                                            "(no weights loaded, no data tokenized)")
    p.add_argument("config", nargs="+", help="one or more configs (each checked; exit 1 if any fails)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("check-custom-dataset", help="validate every row and show each stage for a few")
    p.add_argument("config")
    p.add_argument("--samples", type=int, default=2, help="rows to show stage by stage")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_check_custom_dataset)

    p = sub.add_parser("log-dataset", help="print training sequences as the model sees them")
    p.add_argument("config")
    p.add_argument("--show", default="all", choices=["text", "masked_text", "input_ids", "labels", "all"])
    p.add_argument("--num", type=int, default=1, help="how many sequences")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_log_dataset)

    p = sub.add_parser("check-template", help="does a named template render the data like the tokenizer's own "
                                              "chat template? (token ids, row by row)")
    p.add_argument("template", help="a named template, e.g. qwen2_5_chat")
    p.add_argument("--tokenizer", required=True, metavar="MODEL_OR_DIR", help="a model folder, hub id or "
                   "smollm2-135m-instruct: its tokenizer and chat template")
    p.add_argument("--data", required=True, help="a data file (or folder) in any format tuner reads")
    p.add_argument("--format", default="auto", help="the data format (default: detected from the columns)")
    add_trust_argument(p)
    p.set_defaults(func=cmd_check_template)

    p = sub.add_parser("make-identity-data", help="write personal-assistant (identity) training data")
    p.add_argument("--name", required=True, help="the assistant's new name")
    p.add_argument("--author", required=True, help="who made it")
    p.add_argument("--count", type=int, default=60, help="identity samples")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model that answers the replay questions")
    p.add_argument("--replay-repeats", type=int, default=3)
    p.add_argument("--no-replay", action="store_true", help="identity samples only (expect a parrot)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_identity_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    args.argv_from_command_line = argv is None  # only a real command line can be run again
    args.argv = list(map(str, argv)) if argv is not None else sys.argv[1:]
    if args.command not in ("list-cfg", "copy-cfg", "list-dataset-format"):  # these answer without torch
        _quiet_libraries()
    try:
        return args.func(args)
    except TunerError as e:
        print(f"tuner {args.command}: error: {e}", file=sys.stderr)
        return _exit_now_if_distributed(e.exit_code)
    except KeyboardInterrupt:
        print(f"tuner {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tuner list-cfg | head`: the reader has gone; no traceback at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _exit_now_if_distributed(code: int) -> int:
    """In a process group, exit at once: the other ranks may be waiting for this one."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _quiet_libraries() -> None:
    """transformers' per-load progress bars and advice drown tuner's own output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes and DeepSpeed announce optional kernels and accelerator probing on import.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import torch
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
