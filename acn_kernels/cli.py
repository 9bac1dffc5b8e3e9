"""Command line: `python -m acn_kernels {demo,paper,info,compile-report,cuda-report,cuda-host-check,traffic,bench}`."""
from __future__ import annotations

import argparse

from .backend import BACKENDS


def _add_demo(commands) -> None:
    demo = commands.add_parser("demo", help="train acn/residual/ffn twins on digits and probe every depth")
    demo.add_argument("--model", choices=("mlp", "mixer"), default="mlp")
    demo.add_argument("--depth", type=int, default=None, help="blocks (default: 12 for mlp, 8 for mixer)")
    demo.add_argument("--epochs", type=int, default=None, help="default: 40 for mlp, 15 for mixer")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plot", default=None, help="PNG path (default: acn_demo_<model>.png)")
    demo.add_argument("--backend", choices=BACKENDS, default="auto",
                      help="the models' backend (auto: the reference on a CPU without TRITON_INTERPRET=1)")


def _run_traffic() -> int:
    """The traffic model needs the kernels interpreted, which is decided when they are imported;
    without TRITON_INTERPRET=1 the command runs itself again with it, and says so."""
    import os
    import subprocess
    import sys

    from .backend import TRITON_INTERPRETED
    if TRITON_INTERPRETED:
        from .tools.traffic import run_traffic
        return run_traffic()
    print("(running again under TRITON_INTERPRET=1 to count the Triton kernels' loads and stores)", flush=True)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "acn_kernels", "traffic"], env=env).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m acn_kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_demo(commands)
    paper = commands.add_parser("paper", help="the poster's claims measured here: compression, noise robustness, "
                                "continual learning, training speed (needs the [paper] extra)")
    paper.add_argument("--quick", action="store_true", help="fewer models, epochs and seeds (under 3 minutes)")
    paper.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 3, 2 with --quick)")
    paper.add_argument("--out", default="paper_results", help="folder for the CSVs and PNGs")
    paper.add_argument("--device", default=None, help="torch device (default: cuda when there is one, else cpu)")
    paper.add_argument("--si-c", type=float, default=None, help="Synaptic Intelligence's penalty strength (default 1)")
    paper.add_argument("--si-xi", type=float, default=None, help="Synaptic Intelligence's damping xi (default 1)")
    commands.add_parser("info", help="versions and available backends")
    report = commands.add_parser("compile-report", help="compile every Triton kernel for sm_80 and sm_90; "
                                 "registers, spills, shared memory")
    report.add_argument("--only", default=None, help="one kernel, by its function name")
    report.add_argument("--jobs", type=int, default=None, help="parallel compilations (default: all cores)")
    commands.add_parser("cuda-report", help="compile csrc/*.cu for sm_80 and sm_90 with nvcc; registers, spills")
    host = commands.add_parser("cuda-host-check", help="run every CUDA kernel on the CPU through a SIMT layer and "
                               "compare each op, forward and backward, with the reference")
    host.add_argument("--only", choices=("accumulate_norm", "hybrid_accumulate_norm", "probe_norm",
                                         "linear_act_accumulate"), default=None)
    host.add_argument("--verbose", action="store_true", help="a line for every case, not only the failures")
    bench = commands.add_parser("bench", help="fused ops and training steps against eager and torch.compile")
    bench.add_argument("--quick", action="store_true", help="small shapes on the CPU: reference against torch.compile")
    bench.add_argument("--suite", choices=("ops", "models", "all"), default="all")
    bench.add_argument("--out", default="results", help="folder for bench.csv and the plots")
    commands.add_parser("traffic", help="bytes and launches of eager PyTorch against the fused ops "
                        "(counted under Triton's interpreter, no GPU needed)")
    args = parser.parse_args(argv)
    if args.command == "traffic":
        return _run_traffic()
    if args.command == "cuda-report":
        from .tools.cuda_report import run_cuda_report
        return run_cuda_report()
    if args.command == "paper":
        from .experiments.paper import run_paper
        return run_paper(args.quick, args.seeds, args.out, args.device, args.si_c, args.si_xi)
    if args.command == "cuda-host-check":
        from .tools.cuda_host_check import run_check
        return run_check(only=args.only, verbose=args.verbose)
    if args.command == "bench":
        from .tools.benchmark import run_bench
        suites = ("ops", "models") if args.suite == "all" else (args.suite,)
        return run_bench(args.quick, suites, args.out)
    if args.command == "compile-report":
        from .tools.compile_report import run_report
        return run_report(args.only, args.jobs)
    if args.command == "demo":
        from .experiments.demo import run_demo
        return run_demo(args.model, depth=args.depth, epochs=args.epochs, seed=args.seed, plot=args.plot,
                        backend=args.backend)
    from .info import print_info
    return print_info()
