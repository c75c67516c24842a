"""The private Lightning APIs crowdseg.runs relies on (named in its comments) still behave as it expects:
these tests fail on the Lightning upgrade that changes them, not a resumed run weeks later."""
import csv
import inspect

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from crowdseg.runs import _AppendingWriter


def test_the_appending_csv_writer_keeps_the_rows_of_the_run_it_resumes(tmp_path):
    first = _AppendingWriter(log_dir=str(tmp_path))
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.save()
    resumed = _AppendingWriter(log_dir=str(tmp_path))       # Lightning's own writer would delete metrics.csv
    resumed.log_metrics({"train/loss": 0.5}, step=1)
    resumed.save()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"]) for r in rows] == [("0", "1.0"), ("1", "0.5")]


def test_model_checkpoint_private_methods_keep_their_signatures():
    def params(name):
        return list(inspect.signature(getattr(ModelCheckpoint, name)).parameters)

    assert params("_should_skip_saving_checkpoint") == ["self", "trainer"]
    assert params("_monitor_candidates") == ["self", "trainer"]
    assert params("_save_last_checkpoint") == ["self", "trainer", "monitor_candidates"]


def test_wandb_logger_keeps_its_init_kwargs_in_wandb_init(tmp_path):
    logger = WandbLogger(project="p", save_dir=str(tmp_path), mode="disabled", id="abc")
    assert logger._wandb_init["id"] == "abc" and "anonymous" in logger._wandb_init
