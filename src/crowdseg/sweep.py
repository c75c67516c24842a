"""`crowdseg sweep <sweep.yaml>`: run a wandb sweep file's grid locally, one `crowdseg fit` after another.

The sweep file is the one `wandb sweep` takes (experiments/sweeps/*.yaml): `command` names the
experiment and the fixed arguments, `parameters` the swept keys (a `values` list, or one `value`).
Every combination becomes plain `key=value` arguments in place of `${args_no_hyphens}`, as a wandb
agent passes them, so a local grid and a wandb sweep run the same commands. Each run lands in its
own run directory (`crowdseg.runs.run_dir`: the settings differ, so the directory does), and
`crowdseg report` compares them. Locally the whole grid runs, whatever the file's search `method`.

    crowdseg sweep experiments/sweeps/density_shb_cpu.yaml --dry-run        # print the commands
    crowdseg sweep experiments/sweeps/density_shb_cpu.yaml seed=1 runs_root=/data/runs
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from crowdseg.errors import ConfigError

ARGS = "${args_no_hyphens}"


def load_sweep(path: str | Path) -> dict[str, Any]:
    """The sweep file at `path`, checked: a `command` list holding `${args_no_hyphens}` and a mapping
    of `parameters`, each with `values` (a non-empty list) or `value`."""
    import yaml

    try:
        sweep = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: unreadable sweep file ({err})") from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("command"), list) or ARGS not in sweep["command"]:
        raise ConfigError(f"{path}: key 'command': a list holding {ARGS}, where the swept values go")
    parameters = sweep.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise ConfigError(f"{path}: key 'parameters': a mapping of the swept keys")
    for key, spec in parameters.items():
        ok = isinstance(spec, dict) and (("values" in spec and isinstance(spec["values"], list) and spec["values"])
                                         or "value" in spec)
        if not ok:
            raise ConfigError(f"{path}: key 'parameters.{key}': give `values: [...]` (a grid) or `value: x`")
    return sweep


def grid(sweep: dict[str, Any]) -> list[list[str]]:
    """Every combination of the swept values, as `key=value` arguments (keys in file order)."""
    keys = list(sweep["parameters"])
    choices = [spec["values"] if "values" in spec else [spec["value"]] for spec in sweep["parameters"].values()]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*choices)]


def commands(sweep: dict[str, Any], extra: list[str] = ()) -> list[list[str]]:
    """The `crowdseg ...` argument lists of the grid: the file's command with each combination (then
    `extra`, which wins over both) in place of `${args_no_hyphens}`; without the leading program."""
    base = [str(c) for c in sweep["command"]]
    if base and Path(base[0]).name == "crowdseg":
        base = base[1:]
    at = base.index(ARGS)
    return [base[:at] + combo + list(extra) + base[at + 1:] for combo in grid(sweep)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="crowdseg sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="a wandb sweep file (experiments/sweeps/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (after the swept values)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_intermixed_args(argv)
    runs = commands(load_sweep(args.sweep), args.overrides)
    failed = 0
    for i, run in enumerate(runs, 1):
        print(f"[crowdseg] sweep {i}/{len(runs)}: crowdseg {shlex.join(run)}", flush=True)
        if not args.dry_run:
            failed += subprocess.run([sys.executable, "-m", "crowdseg", *run]).returncode != 0
    if failed:
        print(f"[crowdseg] sweep: {failed} of {len(runs)} runs failed", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["load_sweep", "grid", "commands", "main"]
