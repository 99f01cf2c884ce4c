"""The ``modegpt`` command: ``compress``, ``eval``, ``serve`` and ``bench``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="compress a model into a ModeGPT checkpoint (training-free)")
    p.add_argument("model", help="HF model dir, .gguf file, 'smollm2-135m' or 'random:<preset>'")
    p.add_argument("--ratio", type=float, required=True, help="fraction of decoder-block linear parameters to remove, in [0, 0.8]")
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--calib", default="wikitext2", help="'wikitext2' or a .txt / .jsonl (\"text\" field) file")
    p.add_argument("--calib-samples", type=int, default=None, help="default: 128 on CUDA, 32 on CPU")
    p.add_argument("--calib-seqlen", type=int, default=None, help="default: 2048 on CUDA, 256 on CPU")
    p.add_argument("--allocation", choices=["bi", "uniform"], default="bi")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--eps", type=float, default=0.1, help="entropic softmax temperature of the BI allocation")
    p.add_argument("--cap", type=float, default=0.8, help="maximum sparsity of one layer")
    p.add_argument("--ridge", type=float, default=0.1, help="ridge of the leverage scores, relative to the mean eigenvalue")
    p.add_argument("--align", type=int, default=None,
                   help="round kept MLP widths to this multiple (default: 128 for MLPs at least 2048 wide, else 8)")
    p.add_argument("--head-align", type=int, default=None,
                   help="round kept q/k and v head dims to this multiple (default: 16 for MLPs at least 2048 wide, "
                        "else 8: 16-byte bf16 cache rows; 1: finest)")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate each layer on the outputs of the already compressed layers before it")
    p.add_argument("--head-rank-ratio", type=float, default=None, metavar="F",
                   help="also factorize the LM head (whitened SVD) and the embedding, keeping the fraction F in "
                        "(0, 1] of their rank (tied: one shared factorization); default off, see docs/COMPRESSION.md")
    p.add_argument("--batch-size", type=int, default=4, help="calibration sequences per forward")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint")
    p.add_argument("--quiet", action="store_true")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model or checkpoint")
    p.add_argument("model", help="MODEL spec or ModeGPT checkpoint directory")
    p.add_argument("--tasks", default="wikitext2,piqa,arc_easy,arc_challenge")
    p.add_argument("--limit", type=int, default=None, help="items per task (windows for wikitext2)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quiet", action="store_true")


def run_compress(args) -> int:
    from .pipeline import CompressOptions, compress

    if not 0.0 <= args.ratio <= args.cap:
        raise SystemExit(f"error: --ratio must be in [0, {args.cap}] (got {args.ratio})")
    if args.head_rank_ratio is not None and not 0 < args.head_rank_ratio <= 1:
        raise SystemExit(f"error: --head-rank-ratio must be in (0, 1] (got {args.head_rank_ratio})")
    opts = CompressOptions(
        ratio=args.ratio, calib=args.calib, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
        allocation=args.allocation, device=args.device, eps=args.eps, cap=args.cap, ridge=args.ridge,
        align=args.align, head_align=args.head_align, sequential=args.sequential, batch_size=args.batch_size,
        head_rank_ratio=args.head_rank_ratio, progress=not args.quiet,
    )
    report = compress(args.model, args.out, opts, overwrite=args.force)
    t = report["timings"]
    print(f"wrote {args.out}: removed {report['block_linear_ratio']:.2%} of decoder-block linear parameters "
          f"({report['whole_model_ratio']:.2%} of the whole model) in {t['total_s']:.1f} s")
    if report.get("lm_head"):
        h = report["lm_head"]
        print(f"LM head {'and embedding ' if h['shared'] else ''}factorized at rank {h['rank']} "
              f"(relative logit error {h['head_output_error']:.3f})")
    return 0


def load_for_eval(spec: str, device: str):
    """An HF model + tokenizer: checkpoints through ModeGPTForCausalLM, originals through transformers."""
    from .checkpoint import is_checkpoint
    from .loading import load_modegpt
    from .sources import resolve

    path = Path(spec).expanduser()
    if path.is_dir() and is_checkpoint(path):
        loaded = load_modegpt(spec)
        model, tokenizer = loaded.hf_model(), loaded.tokenizer
    else:
        source = resolve(spec)
        model, tokenizer = source.hf_model(), source.load_tokenizer()
    if tokenizer is None:
        raise SystemExit(f"error: {spec} has no tokenizer; evaluation needs text")
    return model.to(device), tokenizer


def run_eval(args) -> int:
    from .evaluate import TASKS, average_accuracy, evaluate

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise SystemExit(f"error: unknown task(s) {bad}; choose from {', '.join(TASKS)}")
    model, tokenizer = load_for_eval(args.model, args.device)
    results = evaluate(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size, seqlen=args.seqlen,
                       progress=not args.quiet)
    if any(t != "wikitext2" for t in tasks):
        results["average_acc"] = average_accuracy(results, "acc")
        results["average_acc_norm"] = average_accuracy(results, "acc_norm")
    results["model"] = args.model
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modegpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compress(sub)
    _add_eval(sub)
    from .bench import add_bench_parser

    try:
        from server.cli import add_serve_parser
    except ImportError as e:  # the server's dependencies are missing
        reason = str(e)
        serve = sub.add_parser("serve", help=f"unavailable: {reason}")
        serve.set_defaults(func=lambda _args: sys.exit(f"error: modegpt serve is unavailable: {reason}"))
    else:
        add_serve_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) if hasattr(args, "func") else {"compress": run_compress, "eval": run_eval}[args.command](args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        print(f"error: out of memory ({e}); lower --calib-samples / --batch-size or use a larger device",
              file=sys.stderr)
        return 3
    except MemoryError:
        print("error: out of memory; lower --calib-samples / --batch-size or use a larger device", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
