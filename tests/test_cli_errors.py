"""One error convention for every command: a bad input prints `crowdseg: error: <line>` on stderr,
nothing on stdout, and exits with code 2; a malformed command line stays argparse's."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from crowdseg.cli import EXPERIMENT_COMMANDS, RAW_COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """command -> (argv with a bad input, the start of the error line)."""
    missing = tmp / "missing.yaml"
    (tmp / "gt.txt").write_text("1 1 10 10 2 4 1\n")
    (tmp / "pred.txt").write_text("9 1 1 1\n")
    cases = {command: ([command, str(missing)], f"{missing}") for command in EXPERIMENT_COMMANDS}
    cases.update({
        "eval-loc": (["eval-loc", "--gt", str(tmp / "gt.txt"), "--pred", str(tmp / "pred.txt")],
                     f"{tmp / 'pred.txt'}: image 9 is not in the ground truth"),
        "splits": (["splits", "jhu", "--out", str(tmp / "splits")], "no official training list is known for 'jhu'"),
        "report": (["report", str(tmp)], "no runs (folders with config.yaml and checkpoints/) under"),
        "sweep": (["sweep", str(missing)], f"{missing}: unreadable sweep file"),
    })
    return cases


def test_every_command_has_a_bad_input_case(tmp_path):
    assert set(bad_inputs(tmp_path)) == set(EXPERIMENT_COMMANDS) | set(RAW_COMMANDS)


@pytest.mark.parametrize("command", EXPERIMENT_COMMANDS + tuple(RAW_COMMANDS))
def test_a_bad_input_is_one_line_on_stderr_and_exit_code_2(command, tmp_path, capsys):
    argv, start = bad_inputs(tmp_path)[command]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith(f"crowdseg: error: {start}"), err
    assert not (tmp_path / "splits").exists()


def test_the_process_exits_with_code_2_and_a_usage_error_stays_argparse_s(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "crowdseg", "splits", "jhu", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.splitlines() == ["crowdseg: error: no official training list is known for 'jhu'; pass "
                                        "--root with the dataset (the names of its training images are used)"]
    with pytest.raises(SystemExit) as usage:
        main(["eval-loc", "--gt"])
    assert usage.value.code == 2
