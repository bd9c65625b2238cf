"""`fedprune prune` jobs: CNN one-shot end to end, reports written as blocks finish, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from fedprune.prune.job import PruneJob, run_job, validate

MNIST = dict(model="mnist:convnet:8", calib="mnist:128", eval="mnist", cnn_epochs=1)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "admm"])
def test_cnn_one_shot_job(tmp_path, data_root, method):
    report = run_job(PruneJob(method=method, sparsity=0.5, out=str(tmp_path), **MNIST),
                     progress=False)
    assert report["status"] == "done"
    # each layer is exactly 50% sparse (rounded per comparison group)
    # 50% per layer, up to rounding per comparison group (Wanda: 12 of 25 per row)
    assert all(abs(v["sparsity"] - 0.5) <= 0.021 for v in report["layers"].values())
    assert report["dense"]["accuracy"] > 0.8  # briefly trained reference convnet on MNIST
    assert 0.0 <= report["pruned"]["accuracy"] <= 1.0
    assert "accuracy" in report["pruned_bn_recalibrated"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["status"] == "done" and saved["blocks_done"] == 1
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "model" / "model.safetensors"))
    block = load_file(str(tmp_path / "blocks" / "block_000.safetensors"))
    for key, mask in block.items():
        if key.endswith(".mask"):
            weight = state[key[: -len(".mask")] + ".weight"]
            assert torch.all(weight[~mask.bool()] == 0), key


@pytest.mark.slow
def test_calibration_methods_beat_magnitude_on_cnn(tmp_path, data_root):
    acc = {}
    for method in ("magnitude", "sparsegpt"):
        report = run_job(PruneJob(method=method, sparsity=0.8, out=str(tmp_path / method),
                                  save_model=False, **MNIST), progress=False)
        acc[method] = report["pruned"]["accuracy"]
    assert acc["sparsegpt"] > acc["magnitude"], acc


def test_report_and_blocks_survive_a_crash(tmp_path, monkeypatch):
    """A failure in block 1 leaves block 0's masks and the report on disk."""
    from fedprune.lm.tiny_models import tiny_llama
    from fedprune.prune import job as job_mod
    from fedprune.prune.methods.magnitude import MagnitudePruner
    from fedprune.prune.pipeline import prune_model

    calls = {"n": 0}
    original = MagnitudePruner.prune

    def flaky(self, weight, stats, target):
        calls["n"] += 1
        if calls["n"] > 7:  # a llama block has 7 linear layers: fail inside block 1
            raise RuntimeError("boom")
        return original(self, weight, stats, target)

    monkeypatch.setattr(MagnitudePruner, "prune", flaky)
    model = tiny_llama()
    writer = job_mod.ReportWriter(tmp_path, {"status": "running", "layers": {}})
    from fedprune.prune.base import SparsityTarget, get_pruner

    with pytest.raises(RuntimeError, match="boom"):
        prune_model(model, get_pruner("magnitude"), SparsityTarget(0.5), progress=False,
                    on_block_done=lambda i, info: writer.block_done(model, i, info))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["blocks_done"] == 1 and len(saved["layers"]) == 7
    assert (tmp_path / "blocks" / "block_000.safetensors").exists()
    assert not (tmp_path / "blocks" / "block_001.safetensors").exists()


@pytest.mark.parametrize("changes, needle", [
    ({"sparsity": 1.0}, "--sparsity"),
    ({"sparsity": -0.1}, "--sparsity"),
    ({"method": "obc"}, "--method"),
    ({"pattern": "2-4"}, "--pattern"),
    ({"pattern": "4:2"}, "--pattern"),
    ({"model": "/no/such/model/dir"}, "--model"),
    ({"calib": "ptb:64"}, "ptb:64"),
    ({"calib": "imagenet:4x128"}, "imagenet"),
    ({"method_options": ["blocksize=0"], "method": "sparsegpt"}, "blocksize"),
    ({"method_options": ["nosuch=1"]}, "nosuch"),
    ({"sequential": "maybe"}, "--sequential"),
    ({"model": "cifar10:resnet50"}, "resnet50"),
    ({"model": "cifar10:hf:"}, "after 'hf:'"),
    ({"model": "cifar10:hf:/no/such/vit"}, "/no/such/vit"),
    ({"method": "wanda", "scope": "layer"}, "--opt scope"),
])
def test_bad_settings_fail_before_any_work(changes, needle):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        validate(PruneJob(**changes))
    assert needle in str(err.value)


def test_nm_pattern_that_does_not_divide_fails_before_pruning(tmp_path, data_root):
    """convnet's first conv has 1*5*5 = 25 inputs: 2:4 cannot apply; nothing is written."""
    with pytest.raises(ValueError, match="2:4") as err:
        run_job(PruneJob(method="magnitude", pattern="2:4", out=str(tmp_path), **MNIST),
                progress=False)
    assert "0" in str(err.value)  # names the layer ("0" is the first conv of the Sequential)
    assert not any((tmp_path / "blocks").glob("*.safetensors"))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, monkeypatch, method):
    """Block 0 saved by a run that then crashed + --resume == one uninterrupted run.

    SparseGPT runs sequentially (block 1 calibrates on block 0's pruned outputs), Wanda
    on dense outputs: both must see exactly the inputs they would have seen."""
    from dataclasses import asdict

    from fedprune.lm.tiny_models import ByteTokenizer, tiny_llama
    from fedprune.prune import job as job_mod
    from fedprune.prune.base import SparsityTarget, get_pruner
    from fedprune.prune.pipeline import prune_model

    calib = [torch.tensor([ByteTokenizer()("resume me please " * 4)["input_ids"][:48]])
             for _ in range(2)]
    sequential = method == "sparsegpt"
    target = SparsityTarget(0.5)

    reference = tiny_llama()
    prune_model(reference, get_pruner(method), target, calib, sequential=sequential,
                progress=False)

    job = PruneJob(model="tiny", method=method, out=str(tmp_path),
                   sequential="yes" if sequential else "no")
    crashed = tiny_llama()
    writer = job_mod.ReportWriter(tmp_path, {"job": asdict(job), "layers": {}})
    pruner = get_pruner(method)
    original = type(pruner).prune
    calls = {"n": 0}

    def flaky(self, weight, stats, tgt):
        calls["n"] += 1
        if calls["n"] > 7:
            raise RuntimeError("interrupted")
        return original(self, weight, stats, tgt)

    monkeypatch.setattr(type(pruner), "prune", flaky)
    with pytest.raises(RuntimeError, match="interrupted"):
        prune_model(crashed, pruner, target, calib, sequential=sequential, progress=False,
                    on_block_done=lambda i, info: writer.block_done(crashed, i, info))
    monkeypatch.setattr(type(pruner), "prune", original)

    resumed = tiny_llama()
    calls["n"] = 0
    prune_model(resumed, get_pruner(method), target, calib, sequential=sequential,
                progress=False, resume=job_mod.resume_source(tmp_path, job))
    for (name, a), (_, b) in zip(reference.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)

    with pytest.raises(ValueError, match="sparsity"):
        job_mod.resume_source(tmp_path, PruneJob(model="tiny", method=method, sparsity=0.6,
                                                 out=str(tmp_path)))


@pytest.mark.slow
def test_llm_job_saves_a_model_plain_transformers_loads(tmp_path, data_root):
    """SmolLM2-135M, Wanda 2:4 on a small protocol; the saved model needs no fedprune."""
    report = run_job(PruneJob(model="smollm2-135m", method="wanda", pattern="2:4",
                              calib="ptb:4x128", eval="wikitext2:2x128", out=str(tmp_path)),
                     progress=False)
    assert report["status"] == "done" and report["blocks_done"] == 30
    assert report["protocol"]["calibration"] == {
        "spec": "ptb:4x128", "split": "train", "segments": 4, "tokens": 128, "seed": 0}
    assert report["dense"]["ppl"] < report["pruned"]["ppl"] < 1e4
    assert len(report["layers"]) == 30 * 7 and report["sparsity"]["overall"] == 0.5
    for phase in ("load", "eval_dense", "calib_data", "prune_total", "eval_pruned", "save"):
        assert report["timings"][phase] >= 0, phase
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    weight = model.model.layers[3].mlp.down_proj.weight.detach()  # (576, 1536)
    groups = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1)
    assert bool((groups >= 2).all())  # 2:4 survived save/load
