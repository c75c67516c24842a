"""`crowdseg eval-loc`: JSON output, tables, missing images and clear errors for malformed files."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crowdseg.errors import DataError
from crowdseg.metrics import eval_loc
from crowdseg.metrics.nwpu import read_gt_file, read_pred_file, write_pred_file

NWPU = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nwpu_crowd_val_localization"
GT_FILE = NWPU / "val_gt_loc.txt"

SMALL_GT = (
    "1 2 10 10 2 4 1 50 50 3 6 2\n"
    "2 1 5 5 1 2 0\n"
    "3 0\n"
)


@pytest.fixture
def small_gt(tmp_path):
    path = tmp_path / "gt.txt"
    path.write_text(SMALL_GT)
    return path


def run_json(capsys, gt, pred):
    code = eval_loc.main(["--gt", str(gt), "--pred", str(pred), "--json"])
    out = capsys.readouterr().out
    return code, out


def test_json_output_has_the_documented_keys(capsys):
    code, out = run_json(capsys, GT_FILE, NWPU / "fasterRCNN_val_0.8_0.3.txt")
    assert code == 0
    report = json.loads(out)  # exactly one JSON object on stdout
    assert {"sigma_s", "sigma_l", "mae", "rmse", "nae", "images"} <= report.keys()
    for key in ("sigma_s", "sigma_l"):
        assert {"precision", "recall", "f1"} <= report[key].keys()
        assert all(0.0 <= report[key][k] <= 1.0 for k in ("precision", "recall", "f1"))
    assert report["images"] == 500
    # Faster R-CNN finds few, mostly right heads: high precision, very low recall
    assert report["sigma_l"]["precision"] > 0.9 and report["sigma_l"]["recall"] < 0.05


def test_table_output(capsys, small_gt, tmp_path):
    pred = tmp_path / "pred.txt"
    pred.write_text("1 2 11 10 50 55\n2 0\n3 1 7 7\n")
    assert eval_loc.main(["--gt", str(small_gt), "--pred", str(pred)]) == 0
    out = capsys.readouterr().out
    assert "sigma_l" in out and "MAE" in out


def test_small_files_hand_computed_with_a_missing_image(capsys, small_gt, tmp_path):
    # image 1: (11, 10) is 1 px from head (10, 10) -> TP at both radii; (50, 55) is 5 px from
    # head (50, 50): within sigma_l 6 but not sigma_s 3. Image 2 has no line: its head is a FN.
    # Image 3 has no head, one prediction: FP.
    pred = tmp_path / "pred.txt"
    pred.write_text("1 2 11 10 50 55\n3 1 7 7\n")
    code, out = run_json(capsys, small_gt, pred)
    r = json.loads(out)
    assert code == 0 and r["images"] == 3 and r["images_without_prediction"] == 1
    assert (r["sigma_s"]["tp"], r["sigma_s"]["fp"], r["sigma_s"]["fn"]) == (1, 2, 2)
    assert (r["sigma_l"]["tp"], r["sigma_l"]["fp"], r["sigma_l"]["fn"]) == (2, 1, 1)
    assert r["sigma_l"]["precision"] == pytest.approx(2 / 3) and r["sigma_l"]["recall"] == pytest.approx(2 / 3)
    assert r["sigma_l"]["recall_per_level"] == [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    # counts: pred 2, 0, 1 vs GT 2, 1, 0 -> errors 0, 1, 1; NAE over images 1 and 2: (0 + 1) / 2
    assert r["mae"] == pytest.approx(2 / 3) and r["rmse"] == pytest.approx(np.sqrt(2 / 3))
    assert r["nae"] == pytest.approx(0.5)


@pytest.mark.parametrize("content, message", [
    ("1 2 11 10\n", r"pred\.txt:1: image 1 declares 2 heads, so expects 4 numbers .* found 2"),
    ("1 1 11 10\n2 1 5 x\n", r"pred\.txt:2: not a number: 'x'"),
    ("1 1 11 10\n\n1 0\n", r"pred\.txt:3: image 1 appears twice"),
    ("a 1 11 10\n", r"pred\.txt:1: image id and count must be integers"),
    ("7\n", r"pred\.txt:1: expected `image_id num \.\.\.`"),
    ("9 1 1 1\n", r"pred\.txt: image 9 is not in the ground truth"),
])
def test_malformed_prediction_files_name_file_and_line(small_gt, tmp_path, content, message):
    pred = tmp_path / "pred.txt"
    pred.write_text(content)
    with pytest.raises(DataError, match=message):
        eval_loc.main(["--gt", str(small_gt), "--pred", str(pred), "--json"])


def test_malformed_ground_truth_files(tmp_path):
    gt = tmp_path / "gt.txt"
    gt.write_text("1 1 10 10 2 4\n")  # 4 numbers per head instead of 5
    with pytest.raises(DataError, match=r"gt\.txt:1: .*\(5 per head in a ground-truth file\)"):
        read_gt_file(gt)
    gt.write_text("1 1 10 10 2 4 1.5\n")
    with pytest.raises(DataError, match="levels must be integers"):
        read_gt_file(gt)
    with pytest.raises(DataError, match="missing.txt: ground-truth file not found"):
        read_gt_file(tmp_path / "missing.txt")


def test_prediction_file_round_trip(tmp_path):
    preds = {3: np.array([[1.4, 2.6], [10.0, 20.0]]), 5: np.zeros((0, 2))}
    path = tmp_path / "out" / "pred.txt"
    write_pred_file(path, preds)
    assert path.read_text() == "3 2 1 3 10 20\n5 0\n"
    back = read_pred_file(path)
    assert list(back) == [3, 5] and back[3].tolist() == [[1, 3], [10, 20]] and back[5].shape == (0, 2)
    write_pred_file(path, preds, decimals=1)
    assert read_pred_file(path)[3].tolist() == [[1.4, 2.6], [10.0, 20.0]]


def test_module_entry_point_and_crowdseg_cli(small_gt, tmp_path):
    pred = tmp_path / "pred.txt"
    pred.write_text("1 1 10 10\n")
    proc = subprocess.run([sys.executable, "-m", "crowdseg", "eval-loc", "--gt", str(small_gt),
                           "--pred", str(pred), "--json"], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["sigma_l"]["tp"] == 1
    from crowdseg.cli import main as crowdseg_main
    assert crowdseg_main(["eval-loc", "--gt", str(small_gt), "--pred", str(tmp_path / "nope.txt")]) == 2
