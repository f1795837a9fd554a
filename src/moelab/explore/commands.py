"""`moelab explore TRACE... [--model CKPT] [--tokenizer PATH] [--port N]`: a local web app over traces."""

from __future__ import annotations

from moelab.config import MoelabError


def register(sub) -> None:
    p = sub.add_parser("explore", help="explore routing token by token in the browser",
                       description="Serve a local web app over routing traces: text view (tokens coloured by "
                                   "expert, per-layer paths), expert view, diff of two traces, and a live "
                                   "view with --model. Traces are queried on disk, never loaded whole.")
    p.add_argument("traces", nargs="+", metavar="TRACE", help="trace files (.parquet)")
    p.add_argument("--model", default=None,
                   help="a moelab checkpoint or run folder, or a transformers MoE model folder: enables the live view")
    p.add_argument("--revision", default=None, metavar="REV", help="--model (transformers): a hub branch, tag or commit (OLMoE's checkpoints are branches); for a local folder, its subfolder of that name")
    p.add_argument("--tokenizer", default=None, help="tokenizer to decode token ids (default: the model's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (0 picks a free one)")
    p.add_argument("--full-check", action="store_true",
                   help="also check every row of each trace before serving (slow on large traces)")
    p.add_argument("--interventions", nargs="+", default=[], metavar="JSON",
                   help="`moelab intervene` results (intervene.json): the expert view shows each expert's ablation effect")
    p.set_defaults(func=run_explore)


def build_explorer(traces: list[str], model: str | None = None, tokenizer: str | None = None,
                   full_check: bool = False, interventions: list[str] = ()):
    """Open and validate the traces, load the tokenizer/model, and check that their vocabularies agree."""
    from moelab.explore.app import Explorer, TraceSource
    from moelab.report.intervene_section import read_intervention

    ablations = []
    for path in interventions:  # read first: a wrong file fails before the traces are opened
        kind, result = read_intervention(str(path))
        if kind != "intervene":
            raise MoelabError(f"{path} is a `moelab diff` result: --interventions takes intervene.json files")
        ablations += [{**row, "file": str(path)} for row in result.get("ablation") or []]

    sources = [TraceSource(i, path, full_check) for i, path in enumerate(traces)]
    live = tok = None
    if model is not None:
        from moelab.explore.live import load_live

        live, tok = load_live(model, tokenizer)
        vocab, what = live.vocab_size, f"model {model}"
    elif tokenizer is not None:
        from moelab.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
        vocab, what = tok.vocab_size, f"tokenizer {tokenizer}"
    for s in sources:
        if tok is not None and s.max_token is not None and s.max_token >= vocab:
            raise MoelabError(f"{what} has a vocabulary of {vocab} but trace {s.path} holds token id "
                              f"{s.max_token}: not the model/tokenizer of this trace")
    return Explorer(sources, tokenizer=tok, live=live, ablations=ablations)


def run_explore(args) -> int:
    """The port is taken before the traces open: the background summary passes run DuckDB in native
    threads, and an interpreter that exits while they run aborts ('terminate called...', exit 134). For
    the same reason Ctrl-C leaves through os._exit once they may have started."""
    import os
    import sys

    from moelab.explore.server import ANY_HOST, bind, make_handler, url_of

    if not 0 <= args.port < 65536:
        raise MoelabError(f"--port {args.port} is not a port number (0-65535)")
    model = args.model
    if args.revision:
        if model is None:
            raise MoelabError("--revision applies to --model")
        from moelab.hf.hub import resolve_hf

        model = str(resolve_hf(model, args.revision))
    server = bind(None, args.host, args.port)
    if args.host in ANY_HOST:
        print(f"moelab explore: warning: --host {args.host!r} serves the traces and their paths (and the live "
              "model) to every machine that can reach this one, with no password", file=sys.stderr, flush=True)
    try:
        app = build_explorer(args.traces, model, args.tokenizer, args.full_check, args.interventions)
        server.RequestHandlerClass = make_handler(app)
        print(f"moelab explore: serving {len(app.sources)} trace(s) at {url_of(server)}  (Ctrl-C stops)",
              flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()
        print("moelab explore: stopped", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    except BaseException:
        server.server_close()
        raise
    server.server_close()
    return 0
