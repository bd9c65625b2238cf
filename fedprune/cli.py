"""Command line: `fedprune run [CONFIG] [key=value ...]`, `fedprune partition-report`,
`fedprune prune` (one-shot unstructured), `fedprune shrink` (structured / depth),
`fedprune certs` (TLS certificates and SuperNode keys for a deployment).

Configs are validated before any work starts; a bad key or value exits with status 2
and a message naming the key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config, to_yaml, with_absolute_paths


def _split(args: list[str]) -> tuple[str, list[str]]:
    """First positional without '=' is the config name; the rest are overrides."""
    name, overrides = "default", []
    for i, item in enumerate(args):
        if i == 0 and "=" not in item:
            name = item
        else:
            overrides.append(item)
    return name, overrides


def cmd_run(args: argparse.Namespace) -> int:
    from .data.sources import resolve_data_root
    from .fl.rundir import new_run_dir

    if args.resume:  # the run's own resolved config; nothing may change it
        if args.items:
            print("fedprune run: --resume takes no config or overrides (the run folder's "
                  "config.yaml is the run's)", file=sys.stderr)
            return 2
        run_dir = Path(args.resume).resolve()
        if not (run_dir / "config.yaml").is_file():
            print(f"fedprune run: {run_dir} has no config.yaml: not a run folder",
                  file=sys.stderr)
            return 2
        name, cfg = str(run_dir / "config.yaml"), load_config(str(run_dir / "config.yaml"))
    else:
        name, overrides = _split(args.items)
        # absolute paths: the ServerApp and ClientApps do not run in this directory
        cfg = with_absolute_paths(load_config(name, overrides))
    try:  # a wrong data root fails here, not after Flower and Ray have started
        resolve_data_root(cfg.data.root)
        if cfg.model.init_file and not Path(cfg.model.init_file).is_file():
            raise FileNotFoundError(f"model.init_file={cfg.model.init_file!r} does not exist")
    except FileNotFoundError as err:
        print(f"fedprune: {err}", file=sys.stderr)
        return 2
    if not args.resume:
        run_dir = new_run_dir(cfg, name)
        if (run_dir / "metrics.jsonl").exists():
            print(f"fedprune run: {run_dir} already holds a run: continue it with "
                  f"--resume {run_dir}, or choose another run.name", file=sys.stderr)
            return 2
    print(f"[fedprune] config {name!r}, {'resuming' if args.resume else 'writing to'} "
          f"{run_dir}", flush=True)
    if args.show_config:
        print(to_yaml(cfg), flush=True)
    from server.simulate import SimulationError, simulate  # Flower only from here on

    try:
        simulate(cfg, run_dir, verbose=args.verbose, resume=bool(args.resume))
    except SimulationError as err:
        print(f"fedprune run: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_partition_report(args: argparse.Namespace) -> int:
    name, overrides = _split(args.items)
    cfg = load_config(name, overrides)
    from .data import partition_report

    out = Path(args.out)
    result = partition_report(cfg.data, out)
    print((out / "partition.md").read_text())
    print(f"[fedprune] wrote {', '.join(str(v) for v in result.get('paths', {}).values())}")
    return 0


def _option_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _token_row(r: dict, speed: bool) -> str:
    if "accuracy" in r:  # an image model
        text = f"accuracy {100 * r['accuracy']:.2f}%, {r['flops'] / 1e6:.1f} MFLOPs"
        if speed:
            text += (f", {r['images_per_s_batch1']:.0f} im/s (b1), "
                     f"{r['images_per_s_batch64']:.0f} im/s (b64)")
        return text
    # a sentence encoder, against its unpruned embeddings
    text = (f"cosine {r['cosine_mean']:.4f} (min {r['cosine_min']:.4f}), retrieval "
            f"{100 * r['retrieval_top1']:.1f}%, {r['flops'] / 1e6:.1f} MFLOPs/sentence")
    if speed:
        text += (f", {r['sentences_per_s_batch1']:.0f} sent/s (b1), "
                 f"{r['sentences_per_s_batched']:.0f} sent/s (batched)")
    return text


def cmd_prune_tokens(args: argparse.Namespace) -> int:
    from .prune.tokens.job import TokenJob, run_token_job

    try:
        keep = [float(k) for k in args.keep.split(",") if k] if args.keep else []
        options = dict(o.split("=", 1) for o in (args.opt or []))
    except ValueError as err:
        print(f"fedprune prune: --keep / --opt: {err}", file=sys.stderr)
        return 2
    job = TokenJob(model=args.model, method=args.method, keep=keep, r=args.merge_r,
                   options={k: _option_value(v) for k, v in options.items()},
                   epochs=args.cnn_epochs, eval_images=args.eval_images,
                   eval_sentences=args.eval_sentences, out=args.out,
                   device=args.device, seed=args.seed, speed=not args.skip_speed)
    try:
        report = run_token_job(job)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"fedprune prune: {err}", file=sys.stderr)
        return 2
    for row in ("dense", "pruned"):
        print(f"{row:>6}: {_token_row(report[row], job.speed)}")
    quality = (f"accuracy {-100 * report['accuracy_drop']:+.2f} points" if "accuracy_drop"
               in report else f"embedding cosine {report['pruned']['cosine_mean']:.4f}, "
               f"twin retrieval {100 * report['pruned']['retrieval_top1']:.1f}%")
    print(f"FLOPs -{100 * report['flops_reduction']:.1f}%, {quality}; "
          f"report: {args.out}/report.json")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .prune.job import PruneJob, run_job
    from .prune.tokens import token_pruners

    if args.method in token_pruners():
        return cmd_prune_tokens(args)

    job = PruneJob(model=args.model, method=args.method, pattern=args.pattern or "",
                   sparsity=_prune_sparsity(args), scope=args.scope or "", calib=args.calib,
                   eval=args.eval, out=args.out, device=args.device, seed=args.seed,
                   sequential=args.sequential, eval_dense=not args.skip_dense_eval,
                   save_model=not args.no_save, method_options=list(args.opt or []),
                   cnn_epochs=args.cnn_epochs, resume=args.resume)
    try:
        report = run_job(job)
    except (ValueError, FileNotFoundError) as err:
        print(f"fedprune prune: {err}", file=sys.stderr)
        return 2
    _print_prune_summary(report)
    return 0


def cmd_shrink(args: argparse.Namespace) -> int:
    from .prune.structured.run import ShrinkJob, run_shrink

    job = ShrinkJob(model=args.model, mode=args.mode, criterion=args.criterion,
                    fraction=args.fraction, allocation=args.allocation, prune=args.prune,
                    heads=args.heads, skip_first=args.skip_first, skip_last=args.skip_last,
                    bias_compensation=args.bias_compensation, round_to=args.round_to,
                    calib=args.calib,
                    eval=args.eval, out=args.out, device=args.device, seed=args.seed,
                    speed=args.speed, eval_dense=not args.skip_dense_eval,
                    save_model=not args.no_save, recover_steps=args.recover_steps,
                    recover_text=args.recover_text, recover_lr=args.recover_lr)
    try:
        report = run_shrink(job)
    except (ValueError, FileNotFoundError) as err:
        print(f"fedprune shrink: {err}", file=sys.stderr)
        return 2
    _print_shrink_summary(report)
    return 0


def _print_shrink_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    job = report["job"]
    table = Table(title=f"fedprune shrink: {job['mode']} {job['criterion']} on {job['model']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("decoder parameters removed", f"{report['decoder_removed']:.4f}")
    table.add_row("parameters", f"{report['params_before']:,} -> {report['params_after']:,}")
    for source, ppl in report.get("pruned_ppl", {}).items():
        dense = report.get("dense_ppl", {}).get(source)
        recovered = report.get("recovered_ppl", {}).get(source)
        table.add_row(f"{source} ppl", (f"{dense:.2f} -> " if dense else "") + f"{ppl:.2f}"
                      + (f" -> {recovered:.2f} (recovered)" if recovered else ""))
    for key in ("prefill_tokens_per_s", "generate_tokens_per_s"):
        if "pruned_speed" in report:
            a, b = report["dense_speed"][key], report["pruned_speed"][key]
            table.add_row(key.replace("_", " "), f"{a:.1f} -> {b:.1f} ({b / a:.2f}x)")
    if "loads_with_transformers" in report:
        table.add_row("loads with plain transformers", str(report["loads_with_transformers"]))
    Console().print(table)


def _prune_sparsity(args: argparse.Namespace) -> float:
    """--sparsity is implied by --pattern N:M; giving both with different values is an error."""
    if not args.pattern:
        return 0.5 if args.sparsity is None else args.sparsity
    n, m = (int(v) for v in args.pattern.split(":")) if ":" in args.pattern else (0, 0)
    if args.sparsity is not None and m and abs(args.sparsity - n / m) > 1e-9:
        raise SystemExit(f"fedprune prune: --sparsity {args.sparsity} contradicts "
                         f"--pattern {args.pattern} (= {n / m})")
    return n / m if m else 0.5


def _print_prune_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fedprune prune: {report['job']['method']} on {report['job']['model']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("dense", "pruned", "pruned_bn_recalibrated"):
        if key in report:
            for metric in ("ppl", "accuracy"):
                if metric in report[key]:
                    table.add_row(f"{key} {metric}", f"{report[key][metric]:.4f}")
    table.add_row("sparsity (prunable)", f"{report['sparsity']['overall']:.4f}")
    prune_time = report["timings"].get("prune_total", 0.0)
    table.add_row("pruning wall time", f"{prune_time:.1f} s")
    table.add_row("peak RSS", f"{report['peak_rss_gb']:.2f} GB")
    Console().print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment as a Flower simulation")
    run.add_argument("items", nargs="*", metavar="CONFIG|key=value",
                     help="config name in experiments/configs/ or a YAML path "
                          "(default: 'default'), then key=value overrides")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="also stream Flower's own log (SuperLink, ServerApp, Ray, clients) "
                          "to the screen; it always goes to <run dir>/flower.log")
    run.add_argument("--resume", metavar="RUN_DIR", default="",
                     help="continue an interrupted run from its last checkpointed round")
    run.add_argument("--show-config", action="store_true",
                     help="print the resolved config before the run (always in config.yaml)")
    run.set_defaults(func=cmd_run)
    rep = sub.add_parser("partition-report",
                         help="per-client sizes and label histograms of a config's partition")
    rep.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    rep.add_argument("--out", default="runs/partition-report", help="output folder")
    rep.set_defaults(func=cmd_partition_report)
    pr = sub.add_parser("prune", help="one-shot pruning of an LLM or a CNN (no Flower)")
    pr.add_argument("--model", default="smollm2-135m",
                    help="LLM: alias (smollm2-135m), HF folder or hub id; "
                         "CNN: DATASET:MODEL[:WIDTH], e.g. cifar10:resnet8 (trained briefly first)")
    pr.add_argument("--method", default="wanda",
                    help="weights: magnitude | wanda | sparsegpt | admm; tokens (an image "
                         "transformer, --model cifar10:vit[:WIDTH], or a sentence encoder, "
                         "--model minilm): zero-tprune | tome | random | cls-attn")
    pr.add_argument("--sparsity", type=float, default=None,
                    help="fraction of each prunable layer set to zero, in [0, 1) (default 0.5)")
    pr.add_argument("--pattern", default="", help="N:M semi-structured, e.g. 2:4")
    pr.add_argument("--scope", default="", help="layer | row | global (default: the method's)")
    pr.add_argument("--calib", default="ptb:64x512",
                    help="LM: SOURCE[:SPLIT]:NxL (ptb, wikitext2, shakespeare); CNN: DATASET:N")
    pr.add_argument("--eval", default="wikitext2:64x512",
                    help="LM: SOURCE[:SPLIT]:NxL perplexity; CNN: DATASET; '' to skip")
    pr.add_argument("--out", default="runs/prune", help="output folder")
    pr.add_argument("--device", default="auto", help="auto | cpu | cuda")
    pr.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    pr.add_argument("--opt", action="append", metavar="KEY=VALUE",
                    help="method option, e.g. --opt blocksize=64 (repeatable)")
    pr.add_argument("--sequential", default="auto", choices=["auto", "yes", "no"],
                    help="calibrate each block on the pruned model's outputs (yes) or on the "
                         "dense model's (no: one forward pass); auto: yes for every method "
                         "that reads calibration statistics, as the references do")
    pr.add_argument("--skip-dense-eval", action="store_true", help="skip the dense evaluation")
    pr.add_argument("--no-save", action="store_true", help="do not save the pruned model")
    pr.add_argument("--resume", action="store_true",
                    help="continue an interrupted run in --out: restore its finished blocks")
    pr.add_argument("--cnn-epochs", type=int, default=3,
                    help="CNN / ViT: epochs of the (cached) reference training")
    pr.add_argument("--keep", default="",
                    help="zero-tprune / random / cls-attn: fraction of the tokens each block "
                         "keeps, comma-separated per block, e.g. 1,0.7,1,0.7,1,0.7")
    pr.add_argument("--merge-r", type=int, default=0, help="tome: tokens merged per block")
    pr.add_argument("--eval-images", type=int, default=0,
                    help="token pruning: test images evaluated (0: all)")
    pr.add_argument("--eval-sentences", type=int, default=512,
                    help="token pruning of a sentence encoder (--model minilm): held-out "
                         "WikiText-2 test sentences embedded")
    pr.add_argument("--skip-speed", action="store_true",
                    help="token pruning: do not measure images/s")
    pr.set_defaults(func=cmd_prune)
    sh = sub.add_parser("shrink", help="structured (heads, channels) or depth (blocks) pruning "
                                       "of a causal LM: a smaller, faster model")
    sh.add_argument("--model", default="smollm2-135m", help="alias, HF folder or hub id")
    sh.add_argument("--mode", default="width", choices=["width", "depth"])
    sh.add_argument("--criterion", default="taylor",
                    help="width: l1 | l2 | taylor (=taylor-first) | taylor-vector | "
                         "taylor-second | taylor-mix | wanda-sp | flap; depth: ppl | ppl+ | "
                         "taylor | taylor+ | block-influence")
    sh.add_argument("--fraction", type=float, default=0.2,
                    help="share of the decoder's parameters to remove (depth: blocks rounded)")
    sh.add_argument("--allocation", default="uniform", choices=["uniform", "adaptive"],
                    help="uniform: the same ratio in every layer (stock config); adaptive: "
                         "FLAP's global ranking of standardized scores")
    sh.add_argument("--prune", default="both", choices=["both", "heads", "mlp"])
    sh.add_argument("--heads", default="kv", choices=["kv", "query"],
                    help="GQA unit: a key/value head with its query heads, or query heads only")
    sh.add_argument("--skip-first", type=int, default=0, help="blocks left whole at the start")
    sh.add_argument("--skip-last", type=int, default=0, help="blocks left whole at the end")
    sh.add_argument("--bias-compensation", action="store_true",
                    help="FLAP: move removed inputs' mean contribution into the output bias")
    sh.add_argument("--round-to", type=int, default=32,
                    help="keep a multiple of this many MLP channels per layer (0: exact)")
    sh.add_argument("--calib", default="ptb:10x128", help="calibration text SOURCE:NxL")
    sh.add_argument("--eval", default="wikitext2:64x512,ptb:64x512",
                    help="comma-separated perplexity specs; '' to skip")
    sh.add_argument("--out", default="runs/shrink", help="output folder")
    sh.add_argument("--device", default="auto", help="auto | cpu | cuda")
    sh.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    sh.add_argument("--speed", action="store_true",
                    help="measure prefill and generation tokens/s before and after")
    sh.add_argument("--recover-steps", type=int, default=0,
                    help="LoRA recovery steps after pruning (rank 8, alpha 16, merged); 0: none")
    sh.add_argument("--recover-text", default="ptb:256x128",
                    help="recovery text SOURCE:NxL (training split)")
    sh.add_argument("--recover-lr", type=float, default=1e-4, help="LoRA learning rate")
    sh.add_argument("--skip-dense-eval", action="store_true", help="skip the dense evaluation")
    sh.add_argument("--no-save", action="store_true", help="do not save the pruned model")
    sh.set_defaults(func=cmd_shrink)
    ce = sub.add_parser("certs", help="CA, SuperLink TLS certificate and SuperNode keys for "
                                      "a secure deployment (or --check existing ones)")
    ce.add_argument("--out", default="runs/pki", help="folder for the certificates and keys")
    ce.add_argument("--hosts", default="127.0.0.1,localhost",
                    help="comma-separated names/addresses the SuperLink is reached at "
                         "(its certificate's subject alternative names)")
    ce.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to make")
    ce.add_argument("--runtime-hosts", default="",
                    help="comma-separated SuperNode host names whose Runtime API their "
                         "SuperExec reaches over a network (compose): one certificate each")
    ce.add_argument("--days", type=float, default=365.0, help="validity of the certificates")
    ce.add_argument("--check", action="store_true",
                    help="check the folder instead: in date, signed by its CA, naming the "
                         "first of --hosts, node keys readable")
    ce.set_defaults(func=cmd_certs)
    return parser


def cmd_certs(args: argparse.Namespace) -> int:
    from .deploy.pki import Pki, PkiError, check_node_key, check_server, make_pki

    hosts = [h for h in args.hosts.split(",") if h]
    runtime = [h for h in args.runtime_hosts.split(",") if h]
    try:
        if args.check:
            pki = Pki(Path(args.out))
            check_server(pki, hosts[0] if hosts else "127.0.0.1")
            for index in range(args.nodes):
                check_node_key(pki.node_key(index))
            for host in runtime:
                check_server(pki, host, None, pki.runtime_cert(host), pki.runtime_key(host))
            print(f"fedprune certs: {args.out}: server certificate valid for {hosts[:1]}, "
                  f"{args.nodes} node keys readable")
            return 0
        pki = make_pki(args.out, hosts, args.nodes, args.days, runtime_hosts=runtime)
    except PkiError as err:
        print(f"fedprune certs: {err}", file=sys.stderr)
        return 2
    print(f"fedprune certs: CA, server certificate for {hosts} ({args.days:g} days), "
          f"{args.nodes} SuperNode keys and a SuperExec secret in {pki.root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"fedprune: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
