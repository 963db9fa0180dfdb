"""configs/mog1d_finetune.yaml composed on configs/mog1d.yaml: fine-tunes a checkpoint's weights with
order 3 at the recipe's learning rate (the README's two commands, at tiny scale)."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from hosm_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data.init_args.batch_size=32", "--data.init_args.val_size=16", "--data.init_args.test_size=16",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"]


class _Record(L.Callback):
    def __init__(self):
        self.lrs, self.orders, self.start = [], [], None

    def on_train_start(self, trainer, pl_module):
        self.start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.orders.append(pl_module.current_stage()[1].order)


def test_finetune_config_trains_order3_from_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli.py"])
    first = tmp_path / "order1"
    main(["fit", "--config", str(ROOT / "configs/mog1d.yaml"), "--model.stages=[{order: 1}]",
          "--trainer.max_steps=3", f"--trainer.default_root_dir={first}", *TINY])
    ckpt = first / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    cli = main(["--config", str(ROOT / "configs/mog1d.yaml"), "--config", str(ROOT / "configs/mog1d_finetune.yaml"),
                f"--model.fit.init_from={ckpt}", "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path / 'ft'}",
                *TINY], run=False)
    assert [(st.order, st.lr) for st in cli.model.stages] == [(3, 2.0e-4)]
    assert cli.model.fit_options.grad_norm_every == 50 and cli.model.objective.lambda3 == pytest.approx(0.02)
    rec = _Record()
    cli.trainer.callbacks.append(rec)
    loaded = torch.load(ckpt, weights_only=True)["state_dict"]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert rec.orders == [3, 3, 3] and rec.lrs == pytest.approx([2.0e-4] * 3)
    # it started from the checkpoint's (EMA) weights, not from a fresh initialisation
    fresh = main(["--config", str(ROOT / "configs/mog1d.yaml"), *TINY], run=False).model.state_dict()
    assert all(torch.equal(rec.start[k], v) for k, v in loaded.items() if k in rec.start)
    assert any(not torch.equal(fresh[k], v) for k, v in loaded.items() if k in fresh)
    assert json.dumps(cli.model.hparams["stages"]) == json.dumps([{"order": 3, "steps": None, "lr": 2.0e-4}])
