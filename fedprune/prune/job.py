"""A one-shot pruning job: load -> (evaluate dense) -> calibrate + prune -> evaluate -> save.

The same job prunes a Hugging Face causal LM (perplexity on a text spec) and a CIFAR-10 /
MNIST CNN (``--model cifar10:resnet8[:WIDTH]``: trained briefly first, test accuracy), or a
Hugging Face ViT/DeiT classifier fine-tuned on CIFAR-10 (``--model cifar10:hf:FOLDER``).
Everything is validated before the model is loaded. The report (``report.json``) and the
per-block masks/weights (``blocks/block_XXX.safetensors``) are written as each block
completes, so a long run can be inspected while it goes and nothing pruned is lost.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..train import select_device
from . import methods  # noqa: F401  (registers the methods)
from .base import SparsityTarget, config_class, get_pruner, pruner_names
from .pipeline import LayerInfo, prune_model

CNN_DATASETS = ("cifar10", "mnist")


@dataclass
class PruneJob:
    model: str = "smollm2-135m"  # alias, HF folder, hub id, or DATASET:CNN[:WIDTH]
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str = ""  # "" or N:M (N pruned in every M consecutive inputs)
    scope: str = ""  # "" = the method's own comparison group
    calib: str = "ptb:64x512"  # LM: SOURCE[:SPLIT]:NxL; CNN: DATASET:N images
    eval: str = "wikitext2:64x512"  # "" = skip; CNN: DATASET (test accuracy)
    out: str = "runs/prune"
    device: str = "auto"
    seed: int = 0
    # "auto": every method that reads statistics (Wanda, SparseGPT, ADMM) calibrates each
    # block on the pruned model's outputs, as the Wanda and SparseGPT reference code do
    # (two block passes per block; Wanda's paper reports it better, and so do our runs);
    # "no" takes dense statistics in one forward pass. "yes"/"no" force either.
    sequential: str = "auto"
    eval_dense: bool = True
    save_model: bool = True
    method_options: list[str] = field(default_factory=list)  # key=value for the method config
    cnn_epochs: int = 3  # CNN reference training epochs (cached)
    resume: bool = False  # restore blocks an interrupted run in ``out`` finished, prune the rest

    def target(self) -> SparsityTarget:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"--sparsity {self.sparsity} must be in [0, 1)")
        try:
            return SparsityTarget.parse(self.sparsity if not self.pattern else 0.0,
                                        self.pattern, self.scope or "layer")
        except ValueError as err:
            raise ValueError(f"--pattern/--scope: {err}") from None

    def is_cnn(self) -> bool:
        return self.model.split(":")[0] in CNN_DATASETS


def method_config(name: str, options: list[str]) -> Any:
    """The method's typed config with ``key=value`` options (errors name the key)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cls = config_class(name)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.from_dotlist(options))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"--opt for method {name!r}: {str(err).splitlines()[0]}") from None


def is_sequential(job: PruneJob) -> bool:
    if job.sequential not in ("auto", "yes", "no"):
        raise ValueError(f"--sequential {job.sequential!r}; choose one of ['auto', 'yes', 'no']")
    if job.sequential == "auto":
        return bool(get_pruner(job.method).needs)
    return job.sequential == "yes"


def validate(job: PruneJob) -> tuple[SparsityTarget, Any]:
    """Check every setting before any work starts."""
    if job.method not in pruner_names():
        raise ValueError(f"--method {job.method!r} is not registered; choose one of "
                         f"{pruner_names()}")
    target = job.target()
    if job.scope and not job.pattern and job.scope not in ("layer", "row", "global"):
        raise ValueError(f"--scope {job.scope!r}; choose one of ['layer', 'row', 'global']")
    cfg = method_config(job.method, job.method_options)
    if job.scope and hasattr(cfg, "scope"):  # e.g. Wanda: its comparison group is its own
        raise ValueError(f"--scope does not apply to method {job.method!r}; set its comparison "
                         f"group with --opt scope=... (now {cfg.scope!r})")
    is_sequential(job)
    if job.is_cnn():
        if _parse_cnn_model(job.model)[1] == "hf":
            from ..lm.loading import resolve_model

            resolve_model(_hf_source(job.model))  # a missing folder fails here
        _parse_cnn_calib(job.calib)
    else:
        from ..lm import parse_spec
        from ..lm.loading import resolve_model

        parse_spec(job.calib)
        if job.eval:
            parse_spec(job.eval)
        resolve_model(job.model)  # a missing path fails here, naming --model
    return target, cfg


def _parse_cnn_model(spec: str) -> tuple[str, str, int]:
    """DATASET:MODEL[:WIDTH] -> (dataset, model, width); DATASET:hf:FOLDER_OR_HUB_ID ->
    (dataset, "hf", 0), a Hugging Face ViT/DeiT classifier fine-tuned on the dataset."""
    dataset, _, rest = spec.partition(":")
    if rest.startswith("hf:"):
        if not rest[3:]:
            raise ValueError(f"--model {spec!r}: give the folder or hub id after 'hf:'")
        return dataset, "hf", 0
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"--model {spec!r}: a CNN is DATASET:MODEL[:WIDTH], e.g. cifar10:resnet8")
    from ..config import MODELS

    if parts[1] not in MODELS:
        raise ValueError(f"--model {spec!r}: model {parts[1]!r} is not one of {list(MODELS)}")
    width = int(parts[2]) if len(parts) == 3 else 16
    return parts[0], parts[1], width


def _hf_source(spec: str) -> str:
    """The folder or hub id of DATASET:hf:FOLDER_OR_HUB_ID."""
    return spec.split(":", 2)[2]


def _parse_cnn_calib(spec: str) -> int:
    try:
        return int(spec.split(":")[-1])
    except ValueError:
        raise ValueError(f"--calib {spec!r}: for a CNN give DATASET:N (N images)") from None


class ReportWriter:
    """Writes report.json and one safetensors file per finished block, as they finish."""

    def __init__(self, out: Path, report: dict[str, Any]) -> None:
        self.out = out
        (out / "blocks").mkdir(parents=True, exist_ok=True)
        self.report = report
        self.flush()

    def flush(self) -> None:
        tmp = self.out / "report.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=2))
        tmp.replace(self.out / "report.json")

    def block_done(self, model: torch.nn.Module, index: int, info: dict[str, LayerInfo]) -> None:
        from safetensors.torch import save_file

        params = dict(model.named_modules())
        tensors = {}
        for name, layer in info.items():
            tensors[f"{name}.mask"] = layer.mask.to(torch.uint8).contiguous()
            tensors[f"{name}.weight"] = params[name].weight.detach().cpu().contiguous()
            self.report["layers"][name] = {"block": index, "sparsity": layer.sparsity,
                                           "zeros": layer.zeros, "numel": layer.numel}
        path = self.out / "blocks" / f"block_{index:03d}.safetensors"
        save_file(tensors, str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").replace(path)  # never a half-written block file
        self.report["blocks_done"] = index + 1
        self.flush()


# Settings that must match for --resume to reuse an interrupted run's blocks.
RESUME_KEYS = ("model", "method", "sparsity", "pattern", "scope", "calib", "seed",
               "sequential", "method_options", "cnn_epochs")


def resume_source(out: Path, job: PruneJob):
    """``block -> {name: (weight, mask)}`` from ``out/blocks``, after checking that the
    interrupted run used the same settings (a mismatch names the keys)."""
    from safetensors.torch import load_file

    previous = out / "report.json"
    if not previous.exists():
        raise FileNotFoundError(f"--resume: {previous} not found (no earlier run in --out)")
    old = json.loads(previous.read_text())["job"]
    new = asdict(job)
    diff = [k for k in RESUME_KEYS if old.get(k) != new.get(k)]
    if diff:
        raise ValueError(f"--resume: the run in {out} used different settings for {diff}: "
                         f"{ {k: old.get(k) for k in diff} }")

    def saved(block):
        path = out / "blocks" / f"block_{block.index:03d}.safetensors"
        if not path.exists():
            return None
        tensors = load_file(str(path))
        names = {k.rsplit(".", 1)[0] for k in tensors}
        return {n: (tensors[f"{n}.weight"], tensors[f"{n}.mask"]) for n in names}

    return saved


def peak_memory() -> dict[str, float]:
    """Peak RSS of this process so far (and peak CUDA allocation when used), in GB."""
    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def run_job(job: PruneJob, progress: bool = True) -> dict[str, Any]:
    """Run ``job``; return the final report (also in ``<out>/report.json``)."""
    target, method_cfg = validate(job)
    device = select_device(job.device)
    out = Path(job.out)
    resume = resume_source(out, job) if job.resume else None
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"job": asdict(job), "method_config": asdict(method_cfg),
                              "status": "running", "timings": {}, "layers": {}}
    writer = ReportWriter(out, report)
    task = _CnnTask(job, device) if job.is_cnn() else _LmTask(job, device)
    t0 = time.perf_counter()
    task.load()
    report["timings"]["load"] = time.perf_counter() - t0
    report["protocol"] = task.protocol()
    if job.eval and job.eval_dense:
        report["dense"] = _timed(report, "eval_dense", task.evaluate)
    calib = _timed(report, "calib_data", task.calibration) if task.needs_calibration(job) else None
    writer.flush()
    pruner = get_pruner(job.method, method_cfg)
    report["sequential"] = is_sequential(job)
    result = prune_model(task.model, pruner, target, calib, device, report["sequential"],
                         on_block_done=lambda i, info: writer.block_done(task.model, i, info),
                         progress=progress, resume=resume)
    report["timings"].update({f"prune_{k}": v for k, v in result.timings.items()})
    report["sparsity"] = _overall(result.sparsity, report["layers"])
    if job.eval:
        report["pruned"] = _timed(report, "eval_pruned", task.evaluate)
        report.update(task.after_prune(calib))
    if job.save_model:
        _timed(report, "save", lambda: task.save(out / "model"))
    report.update(peak_memory(), status="done")
    writer.flush()
    return report


def _timed(report: dict, phase: str, fn: Any) -> Any:
    t0 = time.perf_counter()
    value = fn()
    report["timings"][phase] = time.perf_counter() - t0
    return value


def _overall(per_layer: dict[str, float], layers: dict[str, dict]) -> dict[str, float]:
    zeros = sum(v["zeros"] for v in layers.values())
    numel = sum(v["numel"] for v in layers.values())
    return {"overall": zeros / numel if numel else 0.0,
            "min_layer": min(per_layer.values(), default=0.0),
            "max_layer": max(per_layer.values(), default=0.0),
            "prunable_params": numel}


class _LmTask:
    """A causal LM: perplexity on a text spec; save_pretrained."""

    def __init__(self, job: PruneJob, device: torch.device) -> None:
        self.job, self.device = job, device

    def load(self) -> None:
        from ..lm import load_causal_lm

        self.model, self.tokenizer = load_causal_lm(self.job.model)
        self.model.to(self.device)

    def protocol(self) -> dict[str, Any]:
        from ..lm import parse_spec

        calib, ev = parse_spec(self.job.calib), parse_spec(self.job.eval) if self.job.eval else None
        return {"calibration": {"spec": str(calib), "split": calib.calibration_split(),
                                "segments": calib.count, "tokens": calib.length,
                                "seed": self.job.seed},
                "evaluation": None if ev is None else {
                    "spec": str(ev), "split": ev.evaluation_split(), "windows": ev.count,
                    "tokens": ev.length, "windowing": "non-overlapping, first N"}}

    def needs_calibration(self, job: PruneJob) -> bool:
        return bool(get_pruner(job.method).needs)

    def calibration(self) -> torch.Tensor:
        from ..lm import calibration_batches

        ids = calibration_batches(self.tokenizer, self.job.calib, self.job.seed)  # (N, L)
        return list(ids.split(1))  # one sequence per batch, as the reference code does

    def evaluate(self) -> dict[str, Any]:
        from ..lm import perplexity

        return perplexity(self.model, self.tokenizer, self.job.eval, self.device,
                          progress=False)

    def after_prune(self, calib: Any) -> dict[str, Any]:
        return {}

    def save(self, path: Path) -> None:
        self.model.save_pretrained(path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)


class _CnnTask:
    """A CIFAR-10 / MNIST CNN: accuracy as pruned and after BN re-estimation."""

    def __init__(self, job: PruneJob, device: torch.device) -> None:
        self.job, self.device = job, device
        self.dataset, self.arch, self.width = _parse_cnn_model(job.model)

    def load(self) -> None:
        from ..config import ModelConfig
        from .cnn import reference_cnn

        if self.arch == "hf":  # loaded as given: no reference training
            from ..models.hf_image import load_image_classifier

            self.model = load_image_classifier(_hf_source(self.job.model),
                                               self.dataset).to(self.device)
            return
        cfg = ModelConfig(name=self.arch, width=self.width)
        self.model = reference_cnn(cfg, self.dataset, self.job.cnn_epochs, self.job.seed,
                                   device=self.device)

    def protocol(self) -> dict[str, Any]:
        return {"calibration": {"dataset": self.dataset, "images": _parse_cnn_calib(self.job.calib),
                                "split": "train", "seed": self.job.seed},
                "evaluation": {"dataset": self.dataset, "split": "test", "metric": "top-1"},
                "reference_training_epochs": None if self.arch == "hf" else self.job.cnn_epochs}

    def needs_calibration(self, job: PruneJob) -> bool:
        return True  # also used to re-estimate BN statistics after pruning

    def calibration(self) -> torch.Tensor:
        from .cnn import calibration_images

        return calibration_images(self.dataset, _parse_cnn_calib(self.job.calib), self.job.seed)

    def evaluate(self) -> dict[str, float]:
        from .cnn import accuracy_on_test

        return {"accuracy": accuracy_on_test(self.model, self.dataset, device=self.device)}

    def after_prune(self, calib: Any) -> dict[str, Any]:
        from .cnn import accuracy_on_test, recalibrate_bn_

        if not recalibrate_bn_(self.model, calib, device=self.device):
            return {}  # e.g. a ViT: no BN, so no second accuracy to report
        return {"pruned_bn_recalibrated": {
            "accuracy": accuracy_on_test(self.model, self.dataset, device=self.device)}}

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                  str(path / "model.safetensors"))
