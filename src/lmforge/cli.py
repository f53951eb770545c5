"""`lmforge <verb>`: a thin command line over the library.

Each verb is a ``cmd_*`` function of a few lines over a public function, registered in
``build_parser``. Errors that a user can fix (bad paths, bad configs, bad inputs) are printed as
one sentence and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


def cmd_info(args: argparse.Namespace) -> None:
    from lmforge.checkpoints import describe

    for key, value in describe(args.model).items():
        print(f"{key:>16}: {value}")
    if args.dtype or args.quantize:  # how load_model would hold it
        from lmforge.checkpoints import load_model
        from lmforge.inference.quantize import describe_linears

        print(f"{'loaded as':>16}: {describe_linears(load_model(args.model, **_load_options(args)))}")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from lmforge.data import PRETRAIN_SPECIAL_TOKENS
    from lmforge.tokenizer import train_bpe

    specials = args.special_tokens or PRETRAIN_SPECIAL_TOKENS
    tok = train_bpe(args.files, args.vocab_size, special_tokens=specials)
    tok.save(args.out)
    print(f"wrote {args.out}/tokenizer.json ({tok.vocab_size} tokens, {len(specials)} special)")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from lmforge.data import prepare

    prepare(args.inputs, args.out, args.tokenizer, val_fraction=args.val_fraction, field=args.field,
            shard_tokens=args.shard_tokens)  # fmt: skip


def cmd_pretrain(args: argparse.Namespace) -> None:
    from lmforge.train import load_recipe, pretrain

    recipe = load_recipe(args.config, args.overrides)
    pretrain(recipe.train, recipe.model, args.data, args.out, resume=args.resume)


def cmd_sample(args: argparse.Namespace) -> None:
    from lmforge.train.sample import sample

    texts = sample(args.model, args.prompt, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed)  # fmt: skip
    print("\n---------------\n".join(texts))


def _generation_setup(args: argparse.Namespace):
    """Model, tokenizer, Generator and sampling parameters from the shared generate/chat options."""
    from lmforge.checkpoints import load_model
    from lmforge.inference import Generator
    from lmforge.tokenizer import load_tokenizer

    options = _load_options(args)
    if args.tensor_parallel > 1 and options["quantize"] == "auto":
        options["quantize"] = "none"  # the shards are float linear layers (DTensor splits nn.Linear)
    model, tokenizer = load_model(args.model, **options), load_tokenizer(args.model)
    draft = load_model(args.draft) if args.draft else None
    compile = args.compile
    if args.tensor_parallel > 1:  # under torchrun: every rank runs the same steps on its shard
        from lmforge.parallel.tensor import init_tensor_parallel, tensor_parallel

        model = tensor_parallel(model, init_tensor_parallel(args.tensor_parallel))
        compile = False  # the sharded (DTensor) step runs eagerly
    if compile == "background" and (draft is not None or model.config.arch != "decoder"):
        compile = False  # only a decoder's sampling loop has a compiled step to take over
    if compile == "background":  # say when the compiled step takes over (once)
        import logging

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("(%(message)s)"))
        engine_log = logging.getLogger("lmforge.engine")
        engine_log.addHandler(handler)
        engine_log.setLevel(logging.INFO)
    gen = Generator(model, tokenizer, compile=compile, draft_model=draft)
    params = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop))
    return gen, params


def _print_stream(gen, reply) -> None:
    """Print a reply (``gen.stream(...)``) to stdout as it comes, then its token count and speed to stderr."""
    import time

    start = time.perf_counter()
    for piece in reply:
        print(piece, end="", flush=True)
    elapsed = time.perf_counter() - start
    n = len(reply.completion.token_ids)
    print(flush=True)
    t = reply.timing
    if t.get("decode_steps", 0) > 1:  # the prompt and a compilation apart from the steady rate
        steps, secs, compiling = t["decode_steps"], t["decode_s"], ""
        if t.get("step") == "compiled":  # the first step of a new shape compiles (or loads) its graph
            steps, secs = steps - 1, secs - t["first_step_s"]
            compiling = f", step compiled in {t['first_step_s']:.1f} s" if t["first_step_s"] > 0.5 else ""
        speed = f"first token after {t['prefill_s']:.2f} s{compiling}, then {steps / secs:.1f} tokens/s"
    else:
        speed = f"{n / elapsed:.1f} tokens/s"
    print(f"[{n} tokens, {speed}]", file=sys.stderr, flush=True)


def _note_compile_at_exit(gen) -> None:
    """Let a background compile finish before exiting (one cut off at exit is lost, and the next
    start would compile again); Ctrl-C skips it."""
    if gen.compiling:
        print("(finishing the compiled step so the next start is warm; Ctrl-C skips)", file=sys.stderr, flush=True)
        gen.finish_compiling()


def _is_main_rank() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def cmd_generate(args: argparse.Namespace) -> None:
    from lmforge.prompts import build_messages

    gen, params = _generation_setup(args)
    prompt = args.prompt
    if args.chat or args.system or args.few_shot or args.cot:
        prompt = build_messages(prompt, system=args.system, few_shot=args.few_shot, cot=args.cot)
    reply = gen.stream(prompt, **params)
    if _is_main_rank():
        _print_stream(gen, reply)
    else:  # tensor parallel: the other ranks take the same steps and print nothing
        for _ in reply:
            pass
    _note_compile_at_exit(gen)


def cmd_chat(args: argparse.Namespace) -> None:
    from lmforge.inference import PromptError

    from lmforge.errors import UserError
    from lmforge.prompts import build_messages, chain_of_thought

    if args.tensor_parallel > 1:
        raise UserError("chat reads the terminal in one process; use `lmforge generate --tensor-parallel N` under torchrun.")
    gen, params = _generation_setup(args)
    system = build_messages("", system=args.system, few_shot=args.few_shot)[:-1]  # system prompt and few-shot turns
    history: list[dict] = []
    print("Chat with the model. /reset clears the history, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return _note_compile_at_exit(gen)
        if line.strip() in ("/exit", "/quit"):
            return _note_compile_at_exit(gen)
        if line.strip() == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        while True:  # drop the oldest turns while the conversation overflows the context
            try:
                turns = chain_of_thought(history) if args.cot else history
                reply = gen.stream(system + turns, **params)  # checks the prompt before any output
                break
            except PromptError:
                if len(history) <= 1:
                    raise
                history = history[2:]
                print("(oldest turn dropped: the conversation outgrew the context)", file=sys.stderr)
        try:
            _print_stream(gen, reply)
        except KeyboardInterrupt:  # Ctrl-C ends the reply, not the chat
            print("\n(reply interrupted)", file=sys.stderr)
        history.append({"role": "assistant", "content": reply.completion.text})


def cmd_serve(args: argparse.Namespace) -> None:
    from lmforge.serve.server import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("LMFORGE_API_KEY"),
          max_queue=args.max_queue, embedding_model=args.embedding_model, kv_cache_gb=args.kv_cache_gb,
          max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, max_body_bytes=args.max_body_bytes,
          allowed_origins=args.allowed_origins, served_model_name=args.served_model_name, grammar_file=args.grammar,
          rag_db=args.rag_db, max_prompt_tokens=args.max_prompt_tokens, tensor_parallel=args.tensor_parallel,
          compile=bool(args.compile), **_load_options(args))  # fmt: skip


def _add_load_options(s: argparse.ArgumentParser) -> None:
    """--dtype / --quantize: how ``load_model`` holds the weights (info, generate, chat, serve)."""
    s.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default=None, help="float weights and activations (default: auto = fp32)")
    s.add_argument("--quantize", choices=["auto", "none", "int8", "int4"], default=None,
                   help="auto (default): a GGUF's Q4_0/Q4_1/Q8_0 weights run in int4/int8 kernels as stored; none: dequantize "
                        "to float; int8/int4: weight-only, quantized on load (see docs/quantization.md)")  # fmt: skip


def _load_options(args: argparse.Namespace) -> dict:
    return {"dtype": args.dtype or "auto", "quantize": args.quantize or "auto"}


def _add_generation_options(s: argparse.ArgumentParser, temperature: float, top_p: float) -> None:
    s.add_argument("model", nargs="?", default=None, help="HF directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    s.add_argument("--system", default=None, help="system message (chat template)")
    s.add_argument("--few-shot", default=None, metavar="FILE",
                   help="JSONL of {\"input\": ..., \"output\": ...} examples, given as earlier chat turns")
    s.add_argument("--cot", action="store_true", help="ask for step-by-step reasoning before the answer (chain of thought)")
    s.add_argument("--max-new-tokens", type=int, default=512)
    s.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default: {temperature:g})")
    s.add_argument("--top-k", type=int, default=0, help="0 = off")
    s.add_argument("--top-p", type=float, default=top_p, help=f"1 = off (default: {top_p:g})")
    s.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    # default: answer at once, eagerly, while the compiled step builds ($LMFORGE_COMPILE: background, on, off)
    s.set_defaults(compile={"on": True, "off": False}.get(os.environ.get("LMFORGE_COMPILE", ""), "background"))
    s.add_argument("--compile", action="store_const", const=True, dest="compile",
                   help="wait for the compiled decode step after the first token (default: compile in the background while answering)")
    s.add_argument("--no-compile", action="store_const", const=False, dest="compile", help="decode eagerly only")
    _add_load_options(s)
    s.add_argument("--draft", default=None, help="draft model for speculative decoding (greedy: --temperature 0)")
    s.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N processes: torchrun --nproc_per_node N -m lmforge.cli generate ...")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description="A complete, fast, hackable LLM stack on PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="describe a checkpoint: family, parameters, dims, context, tokenizer")
    s.add_argument("model", nargs="?", default=None, help="HF directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    _add_load_options(s)
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("tokenizer", help="tokenizer tools: train a byte-level BPE")
    tsub = s.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a byte-level BPE on text files; writes DIR/tokenizer.json")
    t.add_argument("files", nargs="+", help="text files to learn from")
    t.add_argument("--vocab-size", type=int, required=True, help="number of token ids, special tokens included")
    t.add_argument("-o", "--out", required=True, help="output directory")
    t.add_argument("--special-tokens", nargs="+", default=None,
                   help="special tokens, the first being BOS/EOS (default: <|endoftext|> <pad> <mask> and 100 T5 sentinels)")
    t.set_defaults(func=cmd_tokenizer_train)

    s = sub.add_parser("data", help="corpora: tokenize text into training shards")
    dsub = s.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    d = dsub.add_parser("prepare", help="tokenize .txt/.md/.jsonl files or folders into memory-mapped shards + meta.json")
    d.add_argument("inputs", nargs="+", help="files or folders")
    d.add_argument("-o", "--out", required=True, help="output directory")
    d.add_argument("--tokenizer", required=True, help="char, bpe:N (train a BPE of N ids here), or a tokenizer path")
    d.add_argument("--val-fraction", type=float, default=0.1, help="share of the token stream kept for validation (the end)")
    d.add_argument("--field", default="text", help="text field of .jsonl records")
    d.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    d.set_defaults(func=cmd_data_prepare)

    s = sub.add_parser(
        "pretrain", allow_abbrev=False,
        help="pretrain a model from a YAML recipe; any config key can be overridden with --key=value",
        epilog="Run under `torchrun --nproc_per_node N` for DDP (--strategy=ddp) or FSDP2 (--strategy=fsdp).",
    )  # fmt: skip
    s.add_argument("config", help="YAML recipe (see configs/)")
    s.add_argument("--data", required=True, help="prepared data directory, or a raw .txt/.md/.jsonl corpus (prepared on the fly)")
    s.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, loss.png, final model")
    s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    s.set_defaults(func=cmd_pretrain, accepts_overrides=True)

    s = sub.add_parser("sample", help="print text sampled from a trained model or run directory")
    s.add_argument("model", help="run directory or checkpoint directory")
    s.add_argument("-p", "--prompt", default=None, help="text to continue (default: a newline)")
    s.add_argument("-n", "--num-samples", type=int, default=3)
    s.add_argument("--max-new-tokens", type=int, default=300)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=200)
    s.add_argument("--seed", type=int, default=1337)
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("generate", help="stream a completion of a prompt to the terminal (greedy unless --temperature)")
    _add_generation_options(s, temperature=0.0, top_p=1.0)
    s.add_argument("-p", "--prompt", required=True, help="the prompt text")
    s.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="interactive chat through the model's chat template (/reset, /exit)")
    _add_generation_options(s, temperature=0.2, top_p=0.9)  # SmolLM2's recommended sampling
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server: continuous batching over a paged KV cache")
    s.add_argument("model", nargs="?", default=None, help="HF directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $LMFORGE_API_KEY, else none)")
    s.add_argument("--max-queue", type=int, default=1024, help="waiting sequences before requests get 429")
    s.add_argument("--rag-db", default=None, metavar="FILE",
                   help="a database from `lmforge rag index`: POST /v1/rag/query and the chat page's document toggle")
    s.add_argument("--grammar", default=None, metavar="FILE",
                   help="a Lark grammar every reply must match unless the request brings response_format / guided_*")
    s.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger request bodies get 413 (default: 8 MiB)")
    s.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                   help="longer prompts get 400 (default: the context, --max-model-len)")
    s.add_argument("--allowed-origins", nargs="*", default=[], metavar="ORIGIN",
                   help="web origins allowed to call the API from a browser (CORS; default: none)")
    s.add_argument("--embedding-model", default=None, help="an encoder (e.g. MiniLM) to serve /v1/embeddings")
    s.add_argument("--kv-cache-gb", type=float, default=1.0, help="memory for the paged KV cache")
    s.add_argument("--max-model-len", type=int, default=None, help="context per sequence (default: the model's)")
    s.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together in one batch")
    s.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N processes: torchrun --nproc_per_node N -m lmforge.cli serve ... (rank 0 serves HTTP)")
    s.add_argument("--served-model-name", default=None,
                   help="the name clients pass as 'model' (default: the checkpoint's file or directory name)")
    # default: serve at once, eagerly, while a thread compiles the decode step per batch bucket ($LMFORGE_COMPILE=off: never)
    s.set_defaults(compile=os.environ.get("LMFORGE_COMPILE", "") != "off")
    s.add_argument("--no-compile", action="store_false", dest="compile", help="decode eagerly only")
    _add_load_options(s)
    s.set_defaults(func=cmd_serve)

    # Other verbs register here (one add_parser block each).
    __import__("lmforge.nn.bench", fromlist=["add_parser"]).add_parser(sub)  # bench-attention
    __import__("lmforge.rag.cli", fromlist=["add_parser"]).add_parser(sub)
    __import__("lmforge.eval.cli", fromlist=["add_parser"]).add_parser(sub)  # eval, scaling, viz
    __import__("lmforge.align.rl_cli", fromlist=["add_parser"]).add_parser(sub)  # rm, dpo, ppo, grpo
    __import__("lmforge.eval.passkey", fromlist=["add_parser"]).add_parser(sub)
    __import__("lmforge.align.cli", fromlist=["add_parser"]).add_parser(sub)  # sft, cai, lora merge
    return p


def path_problem(e: OSError) -> str:
    """One sentence for a file-system error on a path the user named (an output that is a file, ...)."""
    name = e.filename
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        return f"{name} is a file (or lies inside one) where a directory is needed; choose another path."
    if isinstance(e, IsADirectoryError):
        return f"{name} is a directory where a file is needed."
    if isinstance(e, FileNotFoundError):
        return f"{name} does not exist."
    if isinstance(e, PermissionError):
        return f"{name} cannot be read or written here (permission denied)."
    return f"{name}: {e.strerror or e}."


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    from lmforge.errors import UserError

    try:
        args.func(args)
    except UserError as e:
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not a path the user gave (sockets, devices): a real failure, with its traceback
            raise
        print(f"lmforge {args.command}: error: {path_problem(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
