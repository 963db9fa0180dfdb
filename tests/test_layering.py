"""Issue 10's shape of the Lightning layer, checked on the source and on runs: a small module
signature, no callback scanning or reads of other objects' private attributes, data read through
DataSpec only, the one likelihood path, and design-document pointers that resolve."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import yaml

from hosm_lightning.cli import main
from hosm_lightning.lit.module import HOSMModule

ROOT = Path(__file__).resolve().parents[1]
LIT = sorted((ROOT / "hosm_lightning" / "lit").glob("*.py"))


def test_module_takes_at_most_eight_arguments():
    params = [p for p in inspect.signature(HOSMModule.__init__).parameters if p != "self"]
    assert params == ["net", "sde", "parameterization", "objective", "stages", "optimizer", "ode", "fit"]


@pytest.mark.parametrize("path", LIT, ids=lambda p: p.name)
def test_lit_layer_reads_no_callback_list_and_no_data_module_attributes(path):
    src = path.read_text()
    # no callback scanning (HOSMTrainer may list its *own* evaluators, as Trainer.checkpoint_callbacks does)
    assert not re.search(r"trainer\.callbacks", src), path.name
    # data modules are read through describe(datamodule) (a DataSpec), not attribute by attribute
    assert not re.search(r"getattr\((dm|datamodule|trainer\.datamodule)\b", src), path.name
    assert not re.search(r"\b(dm|datamodule)\.(mixture|entropy|image_shape|centered|name|dim)\b", src), path.name
    # no other object's private attribute (pl_module._x, trainer._x, dm._x)
    assert not re.search(r"\b(pl_module|trainer|dm|datamodule|model)\._[a-z]", src), path.name


def test_design_pointers_resolve():
    """Every 'docs/design.md §N' in the repository names a section that exists; no DESIGN.md pointer."""
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", design, re.M))
    for path in [*ROOT.glob("hosm_lightning/**/*.py"), *ROOT.glob("configs/*.yaml"), ROOT / "README.md",
                 *ROOT.glob("benchmarks/*.py"), *ROOT.glob("docs/*.md")]:
        text = path.read_text()
        assert "DESIGN.md" not in text, path
        for sec in re.findall(r"docs/design\.md §(\d+)", text):
            assert sec in sections, (path, sec)


def _config(tmp: Path, with_evaluator: bool) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 0, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"save_last": True}}]},
        "model": {"net": {"class_path": "hosm_lightning.nets.ToyScoreNet",
                          "init_args": {"dim": 1, "encoder_width": 16, "embed_dim": 8, "decoder_width": 32}},
                  "ode": {"rtol": 1e-3, "atol": 1e-3}, "fit": {"val_likelihood": False}},
        "data": {"class_path": "hosm_lightning.data.SyntheticDataModule",
                 "init_args": {"name": "mog1d", "batch_size": 16, "steps_per_epoch": 2, "test_size": 12, "val_size": 4}},
    }
    if with_evaluator:
        cfg["trainer"]["callbacks"].append({"class_path": "hosm_lightning.lit.evaluation.LikelihoodEvaluator",
                                            "init_args": {"num_repeats": 2}})
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_test_without_an_evaluator_still_reports_the_exact_nll(tmp_path):
    """test_step computes nothing; `test` adds a default LikelihoodEvaluator when none is configured,
    and its value is the module's own likelihood path over the whole split."""
    cfg = _config(tmp_path, with_evaluator=False)
    fitted = main(["fit", "--config", str(cfg)])
    ckpt = fitted.trainer.checkpoint_callback.last_model_path
    tested = main(["test", "--config", str(cfg), "--ckpt_path", ckpt])
    nll = tested.trainer.callback_metrics["test/nll"].item()
    model, dm = tested.model, tested.datamodule
    x = dm.test_dataloader().dataset.tensors[0]
    logp, _ = model.log_likelihood(x, [torch.Generator().manual_seed(0)] * len(x))  # exact divergence in 1-D
    assert nll == pytest.approx(-logp.mean().item(), abs=2e-3)


def test_likelihood_command_leaves_the_configured_callbacks_alone(tmp_path):
    """`likelihood` evaluates in a trainer of its own: the configured evaluator keeps its settings and
    the trainer's callback list is the same objects before and after."""
    cfg = _config(tmp_path, with_evaluator=True)
    cli = main(["fit", "--config", str(cfg)])
    before = list(cli.trainer.callbacks)
    configured = cli.trainer.likelihood_evaluators[0]
    res = cli.trainer.likelihood(cli.model, cli.datamodule, ckpt_path=cli.trainer.checkpoint_callback.last_model_path,
                                 num_repeats=1, out_dir=str(tmp_path / "ll"))
    assert res["n"] == 12 and res["num_repeats"] == 1
    assert cli.trainer.callbacks == before and configured.num_repeats == 2 and configured.results == {}
