"""`crowdseg <command> ...`: a thin layer over the pure entry points.

Commands that run an experiment take `<experiment.yaml> [key=value ...]`; the rest have their own
flags. Every command reports a user-input problem the same way: it raises `CrowdsegError` (or its
`ConfigError` / `DataError`), and `main` prints `crowdseg: error: <one line>` to stderr and exits
with code 2. A malformed command line is argparse's to report (usage on stderr, code 2).
"""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared CPU spinning made a training step ~4.5x
# slower (benchmarks/train_loop.py). Set before torch is imported; a user's own value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import importlib
import json
import sys
from typing import Callable, Optional, Sequence

from crowdseg.errors import CrowdsegError

USAGE = """crowdseg <command> [args]

experiment commands (crowdseg <command> <experiment.yaml> [key=value ...]):
  fit        train; resumes from <run_dir>/checkpoints/last.ckpt when present
  validate   evaluate on the validation split (the run's best.ckpt, else last.ckpt)
  test       evaluate on the test split (same checkpoint rule)
  predict    write per-image predictions (--images DIR for a folder; default the test split)
  config     print the resolved configuration
  show       write a PNG grid of augmented training samples (--n 8)
  masks      generate DPMO / EDP-SAM instance masks for a dataset split
validate, test and predict also take a checkpoint alone: crowdseg test --ckpt RUN/checkpoints/best.ckpt [key=value ...]

other commands:
  eval-loc   evaluate NWPU-format localization files (--gt FILE --pred FILE [--json])
  splits     write label-fraction split files (<dataset> --fractions 5 10 40 --seed S; into ./splits/<dataset> or --out DIR)
  report     table + PNG of runs by experiment and label fraction (<runs dir ...> | --wandb ENTITY/PROJECT)
  sweep      run a sweep file's grid locally, one `crowdseg fit` per combination (<sweep.yaml> [--dry-run])

methods (the `method:` key):
{methods}
"""


def usage() -> str:
    from crowdseg.methods import METHODS
    return USAGE.format(methods="\n".join(f"  {m.name:<10} {m.summary}" for m in METHODS.values()))


# Commands with their own argument parser: "module:function" taking argv, returning an exit code and
# raising CrowdsegError on a bad input. They never run on DDP ranks.
RAW_COMMANDS = {
    "eval-loc": "crowdseg.metrics.eval_loc:main",
    "splits": "datamodules.splits:main",
    "report": "crowdseg.report:main",
    "sweep": "crowdseg.sweep:main",
}


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


EVAL_COMMANDS = ("validate", "test", "predict")


def _experiment_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"crowdseg {command}")
    takes_ckpt = command in EVAL_COMMANDS
    parser.add_argument("experiment", nargs="?" if takes_ckpt else None, help="experiment YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, applied last")
    if takes_ckpt:
        parser.add_argument("--ckpt", default=None,
                            help="a checkpoint of crowdseg fit; without an experiment, its stored config is used")
    if command == "predict":
        parser.add_argument("--images", default=None, help="a folder of images to predict (default: the test split)")
        parser.add_argument("--out", default=None, help="output folder (default: <run_dir>/predictions/<folder>)")
    if command == "show":
        parser.add_argument("--n", type=int, default=8, help="number of samples in the grid")
        parser.add_argument("--out", default=None, help="PNG path (default: <run_dir>/pictures/samples.png)")
    return parser


def run_experiment_command(command: str, argv: Sequence[str]) -> int:
    from crowdseg.config import load_config, to_yaml

    parser = _experiment_parser(command)
    args = parser.parse_intermixed_args(list(argv))
    if args.experiment is not None and "=" in args.experiment and not args.experiment.endswith((".yaml", ".yml")):
        args.overrides, args.experiment = [args.experiment] + list(args.overrides), None
    if command in EVAL_COMMANDS:
        from crowdseg.train import evaluate
        if args.experiment is None:
            if not args.ckpt:
                parser.error("give an experiment YAML file or --ckpt PATH")
            from crowdseg.runs import config_from_checkpoint, run_dir_of_checkpoint
            cfg = config_from_checkpoint(args.ckpt, args.overrides)
            run_path = run_dir_of_checkpoint(args.ckpt)
        else:
            cfg = load_config(args.experiment, list(args.overrides) + ([f"ckpt_path={args.ckpt}"] if args.ckpt else []))
            run_path = None
        extra = {"images": args.images, "out": args.out} if command == "predict" else {}
        _report(evaluate(cfg, command, run_path=run_path, **extra))
        return 0
    cfg = load_config(args.experiment, args.overrides)
    if command == "config":
        print(to_yaml(cfg), end="")
        return 0
    if command == "fit":
        from crowdseg.train import train
        _report(train(cfg))
        return 0
    if command == "show":
        from crowdseg.show import show
        print(f"samples: {show(cfg, n=args.n, out=args.out)}")
        return 0
    if command == "masks":
        from crowdseg.dpmo.writer import run_masks
        _report(run_masks(cfg))
        return 0
    raise AssertionError(command)


def _report(result: dict) -> None:
    """Print where a run's results are, then its final metrics."""
    if not _is_rank_zero():
        return
    paths = {k: v for k, v in result.items() if isinstance(v, str)}
    metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key, value in paths.items():
        print(f"{key:>12}: {value}")
    if metrics:
        print(json.dumps(metrics, indent=2, sort_keys=True))
    if "val/mae" in metrics and "val/mae_mean_baseline" in metrics:
        mae, base = metrics["val/mae"], metrics["val/mae_mean_baseline"]
        change = f" ({abs(100 * (1 - mae / base)):.0f}% {'lower' if mae <= base else 'higher'})" if base > 0 else ""
        print(f"validation MAE {mae:.2f} vs. {base:.2f} for always predicting the training mean count{change}")


def one_line(err: Exception) -> str:
    """The user-facing line of an error; one raised in a DataLoader worker arrives wrapped in the
    worker's traceback text, whose last line is the original `Type: message`."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if last.startswith("crowdseg.errors.") else last
    return text


def _is_rank_zero() -> bool:
    from crowdseg.runs import is_global_zero
    return is_global_zero()


EXPERIMENT_COMMANDS = ("fit", "validate", "test", "predict", "config", "show", "masks")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command in EXPERIMENT_COMMANDS:
            return run_experiment_command(command, rest)
        if command in RAW_COMMANDS:
            return int(_resolve(RAW_COMMANDS[command])(rest) or 0)
        print(f"crowdseg: error: unknown command {command!r}\n\n{usage()}", end="", file=sys.stderr)
        return 2
    except CrowdsegError as err:
        # every DDP rank of an experiment command runs the same checks: one copy of the line is enough
        if command in RAW_COMMANDS or _is_rank_zero():
            print(f"crowdseg: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crowdseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
