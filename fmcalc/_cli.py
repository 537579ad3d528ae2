"""The `fmcalc` command line.

`fmcalc check` verifies the library's identities on analytic flows and prints one row
per check as soon as it is computed (a progress bar on stderr says what runs): the
flow-map identities on the exact Gaussian and on a Gaussian mixture (diffrax
reference), in float64 and float32, with each derivative strategy; every consistency
rule built from primitives evaluated on the exact map; the marginal-from-conditional
test; and the fixed-point test of every registered training method (the exact map
must not move under its update). The methods it leaves out are listed at the end with
the reason. `--quick` runs the same checks on smaller batches. The checks and the
layout of their table are `fmcalc._verify`'s; this module parses and prints.

`fmcalc methods [NAME]` lists the registered methods, or describes one;
`fmcalc explain NAME` shows each network call's gradient role; `fmcalc train` and
`fmcalc sample` go from a data set to a trained map and a picture; `fmcalc --version`
prints the versions of fmcalc and jax.

Exit status: 0 on success; 1 if a check fails; 2 for a bad command line; 141
(128 + SIGPIPE, as a process the signal ended) when the reader of the output goes
away early, e.g. `fmcalc methods -v | head -1`, which is then not an error message.
"""

import argparse
import importlib.metadata
import os
import sys
import time

import jax

from . import _verify


# 128 + SIGPIPE: what a shell reports for a process ended by a closed pipe.
_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default `sys.argv[1:]`); **returns** the exit
    status (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="fmcalc",
        description="fmcalc: flow maps in JAX. `fmcalc check` verifies the library.",
        epilog="Exit status: 0 success, 1 a check failed, 2 bad command line, 141 "
        "output pipe closed early.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=(
            f"fmcalc {importlib.metadata.version('fmcalc')} "
            f"(jax {jax.__version__}, Python {sys.version.split()[0]})"
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check_parser = sub.add_parser(
        "check",
        help="verify every identity on analytic flows with every derivative strategy",
    )
    check_parser.add_argument(
        "--quick",
        action="store_true",
        help="the same checks on smaller batches (about half the time)",
    )
    methods_parser = sub.add_parser(
        "methods",
        help="list the registered training methods and their static cost, or "
        "describe one",
    )
    methods_parser.add_argument(
        "name",
        nargs="?",
        help="a registry name: print its full name, citation, formula, options with "
        "defaults, cost and known deviations",
    )
    methods_parser.add_argument(
        "-v", "--verbose", action="store_true", help="also print every residual"
    )
    explain_parser = sub.add_parser(
        "explain",
        help="a method's terms: each network call's gradient role and the update",
    )
    explain_parser.add_argument("name", help="a registry name (see `fmcalc methods`)")
    _add_run_commands(sub)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except BrokenPipeError:
        # Python flushes stdout again at exit; pointing it at /dev/null keeps that
        # flush from raising a second time and printing a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _BROKEN_PIPE


def _add_run_commands(sub) -> None:
    from .datasets import NAMES

    train = sub.add_parser(
        "train",
        help="train a method on a built-in data set or a .npy file into a run folder",
        description="Train a registry method with fmcalc.train.fit (progress bar, "
        "checkpoints; Ctrl-C saves, and the same command resumes). A method that "
        "distils a teacher first trains a flow-matching reference as its teacher "
        "(the ring's exact velocity is used instead).",
    )
    train.add_argument(
        "--method",
        required=True,
        help="a registry name (`fmcalc methods` lists them), or NAME[KEY=VALUE,...]",
    )
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set one of the method's options (repeatable), e.g. --set loss=squared "
        "or --set split=0.5,0.5; `fmcalc methods NAME` lists them with their "
        "defaults. Named values: loss squared|adaptive|pseudo-huber, derivative "
        "jvp|fd|central (fd:STEP, central:STEP), velocity teacher|conditional; "
        "also numbers, true/false, None",
    )
    train.add_argument(
        "--data",
        required=True,
        metavar="{" + ",".join(NAMES) + ",PATH.npy}",
        help="a built-in data set, or a .npy file of examples (N, dim), (N, H, W) "
        "or (N, H, W, C)",
    )
    train.add_argument("--labels", help="a .npy file of N integer class labels")
    train.add_argument("--steps", type=int, default=5000, help="default 5000")
    train.add_argument(
        "--batch-size", type=int, help="default 1024 for points, 256 for images"
    )
    train.add_argument(
        "--out",
        help="the run folder (default runs/METHOD-DATA, or runs/METHOD-KEY=VALUE-DATA "
        "with --set; reused to resume)",
    )
    train.add_argument(
        "--width", type=int, help="MLP width (default 256; 512 for MNIST)"
    )
    train.add_argument("--depth", type=int, help="MLP hidden layers (default 4)")
    train.add_argument(
        "--lr",
        type=float,
        help="Adam's learning rate, decayed by a cosine (default 3e-3 for points, "
        "2e-3 for images)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--schedules",
        choices=("run", "paper"),
        default="run",
        help="the method's curricula: 'run' (default) compresses them to settle by "
        "half the run; 'paper' keeps the papers' step counts",
    )
    train.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train flow matching, to draw beside the samples (default: only "
        "when it is the method's teacher)",
    )
    sample = sub.add_parser(
        "sample",
        help="draw samples of a trained run, save them and plot them",
    )
    sample.add_argument("--run", required=True, help="a folder made by fmcalc train")
    sample.add_argument(
        "--steps", type=int, nargs="+", default=[1, 2, 4], help="default 1 2 4"
    )
    sample.add_argument(
        "--n", type=int, help="how many samples (default 2000 points, 100 images)"
    )
    sample.add_argument(
        "--out", help="a .npy file for the samples (default RUN/samples.npy)"
    )
    sample.add_argument(
        "--plot", help="a .png: a scatter of points or a grid of images per panel"
    )
    sample.add_argument("--seed", type=int, default=0, help="seed of the noise")


def _run_command(args: argparse.Namespace) -> int:
    from . import _run

    try:
        if args.command == "train":
            _run.train(
                args.method,
                args.data,
                labels=args.labels,
                steps=args.steps,
                batch_size=args.batch_size,
                out=args.out,
                width=args.width,
                depth=args.depth,
                lr=args.lr,
                seed=args.seed,
                reference=args.reference,
                schedules=args.schedules,
                sets=args.set,
            )
        else:
            _run.sample_run(
                args.run,
                steps=args.steps,
                n=args.n,
                out=args.out,
                plot=args.plot,
                seed=args.seed,
            )
    except KeyboardInterrupt:
        print(
            "\ninterrupted: the training state is saved; run the same command to "
            "resume.",
            file=sys.stderr,
        )
        return 130
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"fmcalc {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command in ("train", "sample"):
        return _run_command(args)
    if args.command in ("methods", "explain") and args.name is not None:
        from . import explain, methods

        if args.name not in methods.names():
            print(
                f"fmcalc {args.command}: unknown method {args.name!r}; the "
                f"registered ones are {', '.join(methods.names())}.",
                file=sys.stderr,
            )
            return 2
        if args.command == "methods":
            print(methods.doc(args.name), flush=True)
        else:
            print(explain(args.name))
        return 0
    if args.command == "methods":
        print(_verify.methods_table(args.verbose), flush=True)
        return 0
    jax.config.update("jax_enable_x64", True)
    return _stream(quick=args.quick)


def _stream(*, quick: bool) -> int:
    """Print each row as soon as it is computed, under a progress bar on stderr
    when stderr is a terminal (into a file, a bar's redrawn lines would interleave
    with the rows)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    print(_verify.header(), flush=True)
    rows: list[_verify.Row] = []
    todo = _verify.groups(quick=quick)
    drawn = sys.stderr.isatty()
    with tqdm(
        total=len(todo), unit="check", file=sys.stderr, leave=False, disable=not drawn
    ) as bar:
        for title, compute in todo:
            bar.set_description(title)
            for row in compute():
                rows.append(row)
                bar.write(_verify.format_row(row), file=sys.stdout)
            sys.stdout.flush()
            bar.update()
    failed = [r for r in rows if not r.passed]
    elapsed = time.perf_counter() - start
    print("", *_verify.LEGEND, sep="\n")
    print("\nnot run:")
    for what, why in _verify.not_run():
        print(f"  {what}: {why}")
    print(
        f"\n{len(rows) - len(failed)} passed, {len(failed)} failed "
        f"({elapsed:.0f} s; jax {jax.__version__}, {jax.devices()[0].platform})",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
