"""What every grove task shares: settings from luigi.cfg, the artifact target, progress reporting."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import luigi

from pipeline import artifacts, stages
from pipeline.config import apply_pins, load_config

log = logging.getLogger("luigi-interface")


class grove(luigi.Config):
    """The ``[grove]`` section of luigi.cfg. Operational only: none of it changes an artifact's bytes.

    Environment variables win over luigi.cfg: GROVE_ARTIFACTS, GROVE_MIRROR, GROVE_CONFIGS, GROVE_THREADS,
    GROVE_REBUILD_DATASETS.
    """

    artifacts = luigi.Parameter(default="", significant=False, description="artifact root (default ./artifacts)")
    mirror = luigi.Parameter(default="", significant=False, description="URL prefix tried before the configs' URLs")
    configs = luigi.Parameter(default="", significant=False, description="directory of extra dataset configs")
    threads = luigi.IntParameter(default=0, significant=False, description="threads for builds (0 = all cores)")
    rebuild_datasets = luigi.Parameter(default="mnist,glove", significant=False,
                                       description="comma-separated datasets that Rebuild covers")

    def artifact_root(self) -> Path:
        return Path(os.environ.get("GROVE_ARTIFACTS") or self.artifacts or "artifacts")

    def mirror_prefix(self) -> str | None:
        return os.environ.get("GROVE_MIRROR") or self.mirror or None

    def config_dir(self) -> str | None:
        return self.configs or None

    def rebuild_list(self) -> list[str]:
        names = os.environ.get("GROVE_REBUILD_DATASETS") or self.rebuild_datasets
        return [n.strip() for n in names.split(",") if n.strip()]

    def thread_count(self) -> int:
        n = int(os.environ.get("GROVE_THREADS") or self.threads or 0)
        return n if n > 0 else (os.cpu_count() or 1)


class ArtifactTarget(luigi.Target):
    """A published artifact version: it exists once its manifest is in place."""

    def __init__(self, ref: artifacts.ArtifactRef):
        self.ref = ref

    @property
    def path(self) -> Path:
        return self.ref.path

    def exists(self) -> bool:
        return self.ref.exists()


class GroveTask(luigi.Task):
    """One stage of one dataset. Subclasses set ``stage`` and implement ``write(tmp_dir)``."""

    dataset = luigi.Parameter(description="dataset name: a configs/<dataset>.toml")
    pins = luigi.DictParameter(default={}, description="sha256 of each mutable source, from a dated snapshot "
                               "(Chain and Rebuild fill it in; datasets without mutable sources leave it empty)")
    stage: str = ""

    def __repr__(self) -> str:
        # Luigi's repr, with pins shortened (train_images@f8a32ec2dfab) and left out when empty, so logs
        # and summaries read Evaluate(dataset=mnist) as before. The task id keeps the whole digests.
        params = dict(self.get_params())
        shown = []
        for name, value in self.param_kwargs.items():
            if name == "pins":
                if value:
                    shown.append("pins=" + ",".join(f"{src}@{sha[:12]}" for src, sha in sorted(value.items())))
            elif params[name].significant:
                shown.append(f"{name}={params[name].serialize(value)}")
        return f"{self.get_task_family()}({', '.join(shown)})"

    @property
    def cfg(self) -> dict:
        if "_cfg" not in self.__dict__:
            self.__dict__["_cfg"] = apply_pins(load_config(self.dataset, grove().config_dir()), self.pins)
        return self.__dict__["_cfg"]

    def stage_params(self) -> dict:
        return stages.stage_params(self.cfg, self.stage)

    def parent_tasks(self) -> dict[str, "GroveTask"]:
        return {}

    def requires(self):
        return self.parent_tasks()

    def parent_refs(self) -> dict[str, artifacts.ArtifactRef]:
        return {name: task.output().ref for name, task in self.parent_tasks().items()}

    def parent_path(self, name: str) -> Path:
        return self.parent_refs()[name].path

    def output(self) -> ArtifactTarget:
        ref = artifacts.make_ref(grove().artifact_root(), self.dataset, self.stage, stages.FORMATS[self.stage],
                                 self.stage_params(), self.parent_refs())
        return ArtifactTarget(ref)

    def report(self, fraction: float, message: str) -> None:
        """Progress to the scheduler, at most about once a second (each call is an RPC under luigid)."""
        now = time.monotonic()
        if fraction < 1.0 and now - self.__dict__.get("_last_report", 0.0) < 1.0:
            return
        self.__dict__["_last_report"] = now
        self.set_progress_percentage(round(100 * max(0.0, min(1.0, fraction))))
        self.set_status_message(message)

    def write(self, tmp: Path) -> dict | None:
        raise NotImplementedError

    def run(self) -> None:
        for name, ref in self.parent_refs().items():
            # A half-written or damaged parent is an error, not an input: every file is checked
            # against its manifest's sha256 (a flipped byte in embeddings or an index is caught here).
            artifacts.read_manifest(ref.path, verify="sha256")
        artifacts.publish(self.output().ref, self.write, self.stage_params(), self.parent_refs())
