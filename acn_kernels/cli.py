"""Command line: `python -m acn_kernels {demo,paper,info,stacks,compile-report,cuda-report,cuda-host-check,traffic,
bench}`."""
from __future__ import annotations

import argparse
import sys

from ._extras import MissingExtra, check_extra
from .backend import BACKENDS

EXTRAS = {"demo": "demo", "paper": "paper", "bench": "bench", "train": "train"}  # subcommand -> the extra it needs


class UsageError(Exception):
    """An argument the command cannot run with: one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line naming the command and what is wrong, with exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message}\n")


def check_cpu_backend(backend: str) -> None:
    """The demo trains on the CPU: a backend that cannot run there is refused before any work."""
    import torch

    from .backend import resolve_backend
    try:
        resolve_backend(backend, torch.device("cpu"))
    except (ValueError, RuntimeError) as error:
        raise UsageError(str(error)) from error


def positive_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def regex(text: str) -> str:
    import re
    try:
        re.compile(text)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"expected a regular expression, got {text!r} ({error})")
    return text


def _add_demo(commands) -> None:
    demo = commands.add_parser("demo", help="train acn/residual/ffn twins on digits and probe every depth")
    demo.add_argument("--model", choices=("mlp", "mixer"), default="mlp")
    demo.add_argument("--depth", type=positive_int, default=None, help="blocks (default: 12 for mlp, 8 for mixer)")
    demo.add_argument("--epochs", type=positive_int, default=None, help="default: 40 for mlp, 15 for mixer")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plot", default=None, help="PNG path (default: acn_demo_<model>.png)")
    demo.add_argument("--backend", choices=BACKENDS, default="auto",
                      help="the models' backend (auto: the reference on a CPU without TRITON_INTERPRET=1)")


def _run_traffic(args, argv: list[str]) -> int:
    """The traffic model needs the kernels interpreted, which is decided when they are imported;
    without TRITON_INTERPRET=1 the command runs itself again with it (and its arguments), and says so."""
    import os
    import subprocess

    from .backend import TRITON_INTERPRETED
    if TRITON_INTERPRETED:
        from .tools.traffic import run_traffic
        return run_traffic(args.only, args.model, args.jobs)
    print("(running again under TRITON_INTERPRET=1 to count the Triton kernels' loads and stores)", flush=True)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "acn_kernels", *argv], env=env).returncode


def _add_page_options(command, check: bool) -> None:
    command.add_argument("--markdown", metavar="PAGE", default=None,
                         help="also write the output into PAGE's generated block for this command (docs/)")
    if check:
        command.add_argument("--check", metavar="PAGE", default=None,
                             help="exit 1 when PAGE's generated block differs from this run's output")


def _with_page(args, argv: list[str]) -> int:
    """run_command, its output also written into (--markdown) or compared with (--check) a docs page;
    traffic's child process does that itself."""
    page = getattr(args, "markdown", None) or getattr(args, "check", None)
    if page is None or (args.command == "traffic" and not _interpreted()):
        return run_command(args, argv)
    from .tools.pages import block_difference, captured_stdout, write_block
    with captured_stdout() as output:
        code = run_command(args, argv)
    if args.markdown:
        write_block(args.markdown, args.command, output.getvalue())
        return code
    difference = block_difference(args.check, args.command, output.getvalue())
    if difference:
        print(f"python -m acn_kernels {args.command}: {args.check} is not this run's output; rewrite it with "
              f"--markdown {args.check}\n{difference}", file=sys.stderr)
        return 1
    return code


def check_page(path: str | None, command: str) -> None:
    from .tools.pages import missing_block
    problem = None if path is None else missing_block(path, command)
    if problem:
        raise UsageError(problem)


def _interpreted() -> bool:
    from .backend import TRITON_INTERPRETED
    return TRITON_INTERPRETED


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m acn_kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_demo(commands)
    paper = commands.add_parser("paper", help="the poster's claims measured here: compression, noise robustness, "
                                "continual learning, training speed (needs the [paper] extra)")
    paper.add_argument("--quick", action="store_true", help="fewer models, epochs and seeds (under 3 minutes)")
    paper.add_argument("--seeds", type=positive_int, default=None, help="seeds per configuration (default 3, 2 with --quick)")
    paper.add_argument("--out", default="paper_results", help="folder for the CSVs and PNGs")
    paper.add_argument("--device", default=None, help="torch device (default: cuda when there is one, else cpu)")
    paper.add_argument("--si-c", type=float, default=None, help="Synaptic Intelligence's penalty strength (default 1)")
    paper.add_argument("--si-xi", type=float, default=None, help="Synaptic Intelligence's damping xi (default 1)")
    paper.add_argument("--tables", choices=("all", "classification", "language"), default="all",
                       help="classification: tables 1-5 alone; language: table 6 alone")
    paper.add_argument("--lm-recipe", choices=("authors", "package"), default="authors",
                       help="table 6's training recipe: the authors' (default) or the package's earlier one")
    paper.add_argument("--lm-workers", type=positive_int, default=1,
                       help="table 6's runs in this many processes (one thread each: the same numbers, sooner)")
    paper.add_argument("--lm-models", metavar="DIR", default=None,
                       help="also save table 6's trained models' state_dicts in DIR (<task>-<twin>-seed<n>.pt)")
    _add_page_options(paper, check=False)
    commands.add_parser("info", help="versions and available backends")
    _add_page_options(commands.add_parser("stacks", help="the software stacks CI tests (acn_kernels/versions.py), "
                                          "as a table"), check=True)
    report = commands.add_parser("compile-report", help="compile every Triton kernel for sm_80 and sm_90; "
                                 "registers, spills, shared memory")
    report.add_argument("--only", default=None, help="one kernel, by its function name")
    report.add_argument("--jobs", type=positive_int, default=None, help="parallel compilations (default: all cores)")
    report.add_argument("--target", type=int, choices=(80, 90), default=None,
                        help="one GPU target (sm_80 or sm_90) instead of both")
    _add_page_options(report, check=True)
    cuda_report = commands.add_parser("cuda-report", help="compile csrc/*.cu for sm_80 and sm_90 with nvcc; "
                                      "registers, spills")
    cuda_report.add_argument("--build-log", metavar="FILE", default=None,
                             help="read ptxas's report from the extension build's output (pip -v) instead")
    _add_page_options(cuda_report, check=True)
    host = commands.add_parser("cuda-host-check", help="run every CUDA kernel on the CPU through a SIMT layer and "
                               "compare each op, forward and backward, with the reference")
    host.add_argument("--only", choices=("accumulate_norm", "hybrid_accumulate_norm", "probe_norm",
                                         "linear_act_accumulate", "depth_cross_entropy"), default=None)
    host.add_argument("--verbose", action="store_true", help="a line for every case, not only the failures")
    host.add_argument("--fuzz", type=positive_int, default=None, metavar="N",
                      help="N random cases of each op instead (widths 1..20000 and every path's edges, 1..64 rows, "
                      "1..132 SMs, sm_80 and sm_90, alignment, dtype, options)")
    host.add_argument("--seed", type=int, default=0, help="the random inputs' (and --fuzz cases') seed")
    _add_page_options(host, check=True)
    bench = commands.add_parser("bench", help="fused ops and training steps against eager and torch.compile")
    bench.add_argument("--quick", action="store_true", help="small shapes on the CPU: reference against torch.compile")
    bench.add_argument("--suite", choices=("ops", "models", "speculative", "loss", "all"), default="all",
                       help="ops: the fused ops; models: training steps; speculative: self-speculative decoding of "
                       "table 6's addition GPTs (acn, hybrid, residual) and a byte-level ACN; loss: every depth's "
                       "loss (depth_cross_entropy) at GPT-2's shapes, peak memory and time; all (the default): the four")
    bench.add_argument("--lm-models", metavar="DIR", default=None,
                       help="the speculative suite's models from `paper --lm-models DIR` (else trained first)")
    bench.add_argument("--out", default="results", help="folder for bench.csv and the plots")
    bench.add_argument("--cases", type=regex, default=None, metavar="REGEX",
                       help="only the cases whose name and dtype match, e.g. '8192x2048 bfloat16|ViT-S/16 224 acn'")
    _add_page_options(bench, check=False)
    traffic = commands.add_parser("traffic", help="bytes and launches of eager PyTorch against the fused ops "
                                  "(counted under Triton's interpreter, no GPU needed)")
    traffic.add_argument("--only", metavar="OP", default=None, help="the op table's rows of one op (e.g. "
                         "accumulate_norm) alone")
    traffic.add_argument("--model", metavar="NAME", default=None, help="the training-step table's rows of one "
                         "model (MLP, Mixer, ViT, Encoder, GPT, GPT-swiglu) alone")
    traffic.add_argument("--jobs", type=positive_int, default=None, help="rows measured in parallel (default: "
                         "all cores)")
    _add_page_options(traffic, check=True)
    _add_train(commands)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        if args.command in EXTRAS:
            check_extra(EXTRAS[args.command], args.command)
        if args.command == "demo":
            check_cpu_backend(args.backend)
        check_page(getattr(args, "check", None), args.command)
        return _with_page(args, argv)
    except (MissingExtra, UsageError) as error:  # one line, not a traceback
        print(f"python -m acn_kernels {args.command}: {error}", file=sys.stderr)
        return 2


def _add_train(commands) -> None:
    from .experiments.train import TRAINABLE, TrainOptions

    train = commands.add_parser("train", help="train a byte-level ACN language model on a text file, in one "
                                "process or under torchrun (FSDP2, --tp for tensor parallelism), with checkpoints to "
                                "resume from")
    train.add_argument("--out", required=True, help="folder for the checkpoints, model.pt and config.json")
    train.add_argument("--text", default=None, help="a text file, read as bytes (default: the package's corpus)")
    train.add_argument("--row", choices=TRAINABLE, default=TrainOptions.row,
                       help="the GPT of table 6's row: acn, hybrid (the authors' H-ACN), lsn, residual, hybrid-unit")
    for name in ("depth", "dim", "heads", "context", "batch", "steps", "eval_every", "checkpoint_every"):
        train.add_argument(f"--{name.replace('_', '-')}", type=positive_int, default=getattr(TrainOptions, name))
    train.add_argument("--exit-loss", action="store_true", help="every exit's loss (uniform weights), not the last's")
    train.add_argument("--seed", type=int, default=TrainOptions.seed)
    train.add_argument("--resume", action="store_true", help="continue from --out's latest checkpoint")
    train.add_argument("--backend", choices=BACKENDS, default=TrainOptions.backend,
                       help="the model's ops (auto: the fused kernels on a GPU, PyTorch on a CPU)")
    train.add_argument("--tp", type=positive_int, default=TrainOptions.tp,
                       help="tensor-parallel ranks under torchrun (dividing the processes, the heads and the width); "
                            "FSDP2 over the rest")


def _run_train(args) -> int:
    from tqdm.auto import tqdm

    from .experiments.train import options_of, run
    try:
        run(options_of(args), progress=lambda steps: tqdm(steps, desc="train", unit="step"))
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(error) from None
    return 0


def _run_bench(args) -> int:
    from .tools.benchmark import run_bench

    suites = ("ops", "models", "speculative", "loss") if args.suite == "all" else (args.suite,)
    code = 0
    if "ops" in suites or "models" in suites:
        code = run_bench(args.quick, [s for s in suites if s in ("ops", "models")], args.out, args.cases)
    if "loss" in suites:
        from .tools.loss_bench import run_loss_bench
        run_loss_bench(args.quick, args.out)
    if "speculative" in suites:
        from tqdm.auto import tqdm
        from .experiments.lm import FULL, QUICK, ModelsDirError
        from .tools.speculative_bench import speculative_bench, user_settings
        try:
            settings = QUICK if args.quick else FULL
            speculative_bench(settings, args.out, args.lm_models, tqdm, args.quick,
                              None if args.quick else user_settings(settings))
        except ModelsDirError as error:
            raise UsageError(error) from None
    return code


def run_command(args, argv: list[str]) -> int:
    if args.command == "traffic":
        return _run_traffic(args, argv)
    if args.command == "cuda-report":
        from .tools.cuda_report import run_cuda_report
        return run_cuda_report(args.build_log)
    if args.command == "paper":
        from .experiments.paper import run_paper
        return run_paper(args.quick, args.seeds, args.out, args.device, args.si_c, args.si_xi, tables=args.tables,
                         lm_recipe=args.lm_recipe, lm_workers=args.lm_workers, lm_models=args.lm_models)
    if args.command == "cuda-host-check":
        from .tools.cuda_host_check import run_check
        return run_check(only=args.only, verbose=args.verbose, seed=args.seed, fuzz=args.fuzz)
    if args.command == "bench":
        return _run_bench(args)
    if args.command == "compile-report":
        from .tools.compile_report import run_report
        return run_report(args.only, args.jobs, args.target)
    if args.command == "demo":
        from .experiments.demo import run_demo
        return run_demo(args.model, depth=args.depth, epochs=args.epochs, seed=args.seed, plot=args.plot,
                        backend=args.backend)
    if args.command == "train":
        return _run_train(args)
    if args.command == "stacks":
        from .versions import stacks_table
        print(stacks_table())
        return 0
    from .info import print_info
    return print_info()
