"""Two CPU processes (gloo DDP) through XMask's three phases: student and teacher end equal on both ranks."""
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_rank(rank: int, out: str, port: int) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "NODE_RANK": "0"})
    torch.set_num_threads(1)
    import lightning as L
    from xmask_fixtures import tiny_datamodule, tiny_module, trainer_kwargs

    L.seed_everything(0)
    module = tiny_module(unit="step", phase1_end=1, phase2_end=2)  # one step per phase
    phases = []

    class Phases(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            phases.append(pl_module._phase)

    trainer = L.Trainer(max_steps=3, strategy="ddp", callbacks=[Phases()],
                        **trainer_kwargs(devices=2, enable_checkpointing=False))
    trainer.fit(module, datamodule=tiny_datamodule(num_train=10, labeled=2, batch=4))
    torch.save({"student": module.model.state_dict(), "teacher": module.teacher.state_dict(), "phases": phases,
                "step": trainer.global_step}, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_process_ddp_keeps_student_and_teacher_equal(tmp_path):
    from xmask_fixtures import tiny_module

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_rank, args=(str(tmp_path), port), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert a["phases"] == b["phases"] == [1, 2, 3] and a["step"] == b["step"] == 3
    for part in ("student", "teacher"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert int(a["teacher"]["n_averaged"]) == 3
    initial = tiny_module().teacher.state_dict()
    assert any(not torch.equal(initial[k], a["teacher"][k]) for k in initial if k != "n_averaged")  # it trained
