"""python -m benchmarks run STUDY [--tasks, --seeds, --factors ...] [--dry] [--quick --runs DIR] | report (STUDY... |
--all): ``run`` trains what the study needs and is not on file (resumable), ``report`` writes its report from the
runs on file."""

import argparse
import os
import sys
from pathlib import Path

import torch

from benchmarks import overhead, report, runner


def main(argv=None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train what the study needs and is not on file")
    run.add_argument("study", choices=runner.study_names())
    run.add_argument("--dry", action="store_true", help="list the runs that would be trained, train none")
    run.add_argument("--seeds", type=int, nargs="+",
                     help="train only these seeds' runs (every method's seed 0 first, then 1, ...: a session cut short "
                          "still has each method on a seed); the cells still wait for all of theirs")
    run.add_argument("--factors", type=float, nargs="+",
                     help="train only the cells of these factors of the best LR (e.g. 1 3: the best LR and 3x)")
    run.add_argument("--methods", nargs="+", help="train only these methods in the cells, whatever the rule's stage")
    run.add_argument("--spectra", metavar="TASK", help="record the candidates' factor spectra on TASK instead")
    rep = sub.add_parser("report", help="write reports from the runs on file")
    rep.add_argument("studies", nargs="*")
    rep.add_argument("--all", action="store_true")
    for p in (run, rep):
        p.add_argument("--tasks", nargs="+", help="only these of the study's tasks")
        p.add_argument("--quick", action="store_true", help="30 steps, 1 seed: checks that a study runs")
        p.add_argument("--runs", type=Path, help="the run store (default: the study's runs/; --quick: required)")
        p.add_argument("--output", type=Path, help="where the report goes (default: the study's folder)")
        p.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared machine's noise low)")
    args = parser.parse_args(argv)
    if args.quick and args.runs is None:
        parser.error("--quick writes to --runs DIR, never into a study's committed runs")
    torch.set_num_threads(args.threads)
    for name in [args.study] if args.command == "run" else runner.study_names() if args.all else args.studies:
        if runner.load_config(name).get("kind") == "overhead":
            done = (overhead.run(name, args.runs, args.quick) if args.command == "run"
                    else overhead.report(name, args.runs, args.output))
        elif args.command == "run":
            study = runner.Study(name, args.quick, args.runs, training=True, dry=args.dry, tasks=args.tasks,
                                 seeds=args.seeds, factors=args.factors, methods=args.methods)
            runner.record_spectra(study, args.spectra) if args.spectra else study.run()
            done = ("\n".join(" ".join(map(str, m)) for m in study.missing) or f"{name}: every run is on file") \
                if args.dry else f"{name}: its runs are in {study.store.directory}"
        else:
            done = report.write(runner.Study(name, args.quick, args.runs, tasks=args.tasks), args.output)
        print(done, file=sys.stderr)


if __name__ == "__main__":
    main()
