"""Run logging on process 0: `metrics.jsonl` (the record of a run, used by resume tests), TensorBoard
event files (tensorboardX, when installed) and Weights & Biases (when configured)."""

from __future__ import annotations

import json
import os
from typing import Mapping

from owl_jax.config import LoggingConfig


class MetricsWriter:
    def __init__(self, run_dir: str, cfg: LoggingConfig, *, enabled: bool, config_dict: dict | None = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = self._wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if cfg.tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:  # optional dependency
                self._tb = None
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed (pip install wandb)") from e
            self._wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=config_dict,
                                     dir=run_dir, resume="allow")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint a resumed run restarts from), so that
        metrics.jsonl reads as one uninterrupted run."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"{prefix}/{k}" if prefix != "train" else k: v for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class SampleLog:
    """Per-process record of the samples each step trained on: `samples/process-<i>.jsonl`, one line
    `{"step": s, "samples": [key, ...]}` per step. Keys are the caption shards' `__key__`s, or
    `source:record` for instruction sources."""

    def __init__(self, run_dir: str, *, enabled: bool, process_index: int, process_count: int):
        self.enabled = enabled
        self.directory = os.path.join(run_dir, "samples")
        self.path = os.path.join(self.directory, f"process-{process_index}.jsonl")
        self.process_index, self.process_count = process_index, process_count
        if enabled:
            os.makedirs(self.directory, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop steps past the checkpoint from this process's file, and (process 0) from the
        files of processes that no longer exist (the run resumed on fewer processes)."""
        if not self.enabled:
            return
        paths = [self.path]
        if self.process_index == 0:
            for name in os.listdir(self.directory):
                index = name.removeprefix("process-").removesuffix(".jsonl")
                if index.isdigit() and int(index) >= self.process_count:
                    paths.append(os.path.join(self.directory, name))
        for path in paths:
            if os.path.exists(path):
                with open(path) as f:
                    keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
                with open(path, "w") as f:
                    f.writelines(keep)

    def write(self, step: int, keys: list[str]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "samples": keys}) + "\n")


def batch_sample_keys(pipeline) -> list[str]:
    """The keys of the samples in the pipeline's last batch (`last_batch` of either pipeline)."""
    return [item.key if hasattr(item, "key") else f"{item.source}:{item.record}"  # captions | instructions
            for item in getattr(pipeline, "last_batch", [])]
