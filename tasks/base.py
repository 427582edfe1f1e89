"""What every grove task shares: settings from luigi.cfg, the artifact target, progress reporting."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from pathlib import Path

import luigi

from pipeline import artifacts, stages, store
from pipeline.config import DatasetConfig, apply_pins, load_config
from pipeline.errors import ConfigError

from . import events, logs, settings  # noqa: F401  (events: Luigi's task events as grove reports them)

# Luigi is imported now: it reads the luigi.cfg grove located (from any working directory), and its
# own logging set-up stays off under grove's handlers.
settings.install()
logs.quiet_luigi()

log = logging.getLogger("luigi-interface")

# task_id -> output while ``fixed_outputs()`` is active (see there); None otherwise.
_fixed_outputs: contextvars.ContextVar[dict | None] = contextvars.ContextVar("grove_fixed_outputs", default=None)


@contextlib.contextmanager
def fixed_outputs():
    """Within this block every task's ``output()`` is computed once. An output names its parents'
    outputs, so without this a walk over a chain recomputes the chain below each task again (and a
    forest's digest reads the embedding's manifest each time). Only for blocks that build nothing."""
    if _fixed_outputs.get() is not None:
        yield
        return
    token = _fixed_outputs.set({})
    try:
        yield
    finally:
        _fixed_outputs.reset(token)


def dataset_config(dataset: str) -> DatasetConfig:
    """The validated config of ``dataset`` from the run's config directories (``[grove] configs``,
    GROVE_CONFIGS, the packaged ones). Read and checked once per process while the file is
    unchanged (``config.load_config``); every task of the dataset shares the one immutable object."""
    return load_config(dataset, grove().config_dir())


class grove(luigi.Config):
    """The ``[grove]`` section of luigi.cfg. Operational only: none of it changes an artifact's bytes.

    Environment variables win over luigi.cfg: GROVE_ARTIFACTS, GROVE_MIRROR, GROVE_CONFIGS, GROVE_THREADS,
    GROVE_REBUILD_DATASETS; for an object-store root, AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL over
    ``s3_endpoint`` and AWS_REGION / AWS_DEFAULT_REGION over ``s3_region``.
    """

    artifacts = luigi.Parameter(default="", significant=False, description="artifact root (default ./artifacts)")
    mirror = luigi.Parameter(default="", significant=False, description="URL prefix tried before the configs' URLs")
    configs = luigi.Parameter(default="", significant=False, description="directory of extra dataset configs")
    threads = luigi.IntParameter(default=0, significant=False, description="threads for builds (0 = all cores)")
    rebuild_datasets = luigi.Parameter(default="mnist,glove", significant=False,
                                       description="comma-separated datasets that Rebuild covers")
    s3_endpoint = luigi.Parameter(default="", significant=False,
                                  description="S3-compatible endpoint URL of an s3:// root (AWS_ENDPOINT_URL wins)")
    s3_region = luigi.Parameter(default="", significant=False,
                                description="region of an s3:// root (AWS_REGION wins)")

    shards = luigi.IntParameter(default=1, significant=False,
                                description="tasks that the embedding, the exact search and each forest are "
                                            "split into, for several workers (GROVE_SHARDS; changes no byte)")
    verbose = luigi.BoolParameter(default=False, significant=False,
                                  description="print Luigi's chatter and tracebacks on the terminal (GROVE_VERBOSE)")

    def artifact_root(self) -> Path | str:
        """GROVE_ARTIFACTS (relative to the working directory), else ``artifacts`` of luigi.cfg (relative
        to that file's directory), else ``artifacts`` beside luigi.cfg. An object store is its URI
        (``s3://bucket/prefix``); a scheme grove does not support is a ConfigError (exit 2)."""
        env = os.environ.get("GROVE_ARTIFACTS")
        value = env or self.artifacts or "artifacts"
        store.configure_store(self.s3_endpoint, self.s3_region)  # part of artifacts.store_of's cache key
        if "://" in value:
            return artifacts.store_of(value).uri  # checks the scheme and the bucket name; connects later
        path = Path(value).expanduser()
        if path.is_absolute() or env:
            return path
        return settings.base_dir() / path

    def mirror_prefix(self) -> str | None:
        return os.environ.get("GROVE_MIRROR") or self.mirror or None

    def config_dir(self) -> str | None:
        if not self.configs:
            return None
        path = Path(self.configs).expanduser()
        return str(path if path.is_absolute() else settings.base_dir() / path)

    def rebuild_list(self) -> list[str]:
        names = os.environ.get("GROVE_REBUILD_DATASETS") or self.rebuild_datasets
        return [n.strip() for n in names.split(",") if n.strip()]

    def shard_count(self) -> int:
        """GROVE_SHARDS, else ``[grove] shards``: how many tasks Embed, Exact and Forest split into (1 =
        none). An operational knob: the published versions are the same bytes for any value."""
        value = os.environ.get("GROVE_SHARDS") or self.shards or 1
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"GROVE_SHARDS / luigi.cfg [grove] shards = {value!r}: it must be a whole number >= 1")
        return n

    def thread_count(self) -> int:
        n = int(os.environ.get("GROVE_THREADS") or self.threads or 0)
        return n if n > 0 else (os.cpu_count() or 1)


class ArtifactTarget(luigi.Target):
    """A published artifact version: it exists once its manifest is in place."""

    def __init__(self, ref: artifacts.ArtifactRef):
        self.ref = ref

    @property
    def path(self) -> Path:
        """The version's directory (local roots only: see ``artifacts.local_dir``)."""
        return self.ref.path

    def exists(self) -> bool:
        return self.ref.exists()


class StoreTarget(luigi.Target):
    """One object under the artifact root (a dated record, a snapshot record): it exists once written."""

    def __init__(self, root, key: str):
        self.root, self.key = root, key

    @property
    def path(self) -> str:
        return artifacts.location(self.root, self.key)

    def exists(self) -> bool:
        return artifacts.store_of(self.root).exists(self.key)


class GroveTask(luigi.Task):
    """One stage of one dataset. Subclasses set ``stage`` and implement ``write(tmp_dir)``."""

    dataset = luigi.Parameter(description="dataset name: a configs/<dataset>.toml")
    pins = luigi.DictParameter(default={}, description="sha256 of each mutable source, from a dated snapshot "
                               "(Chain and Rebuild fill it in; datasets without mutable sources leave it empty)")
    stage: str = ""
    _by_stage: dict[str, type["GroveTask"]] = {}  # stage name -> its task class (the tasks of pipeline.stages.STAGES)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.stage in stages.STAGES:
            GroveTask._by_stage[cls.stage] = cls

    @property
    def spec(self) -> stages.Stage:
        """This task's stage in the registry (``pipeline.stages.STAGES``)."""
        return stages.stage_of(self.stage)

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
    def cfg(self) -> DatasetConfig:
        """The dataset's config with this task's pins (see ``dataset_config``)."""
        if "_cfg" not in self.__dict__:
            self.__dict__["_cfg"] = apply_pins(dataset_config(self.dataset), self.pins)
        return self.__dict__["_cfg"]

    def stage_context(self) -> dict:
        """What the stage's ``params`` take besides the config (``Stage.context``): the task's own
        parameters and what its published parents tell."""
        return {}

    def stage_params(self) -> dict:
        return self.spec.params(self.cfg, **self.stage_context())

    def parent_tasks(self) -> dict[str, "GroveTask"]:
        """The tasks of the parents this config needs (``Stage.parents_for``), by stage name."""
        if self.stage not in stages.STAGES:
            return {}  # not a stage of the chain (a snapshot): it reads no versions
        return {name: self.clone(GroveTask._by_stage[name]) for name in self.spec.parents_for(self.cfg)}

    def requires(self):
        return self.parent_tasks()

    def parent_refs(self) -> dict[str, artifacts.ArtifactRef]:
        return {name: task.output().ref for name, task in self.parent_tasks().items()}

    def parent_path(self, name: str) -> Path:
        """A local directory with the files of parent ``name``: its own directory on a local root, a
        verified copy in this machine's cache for an object store (``artifacts.local_dir``)."""
        return artifacts.local_dir(self.parent_refs()[name])

    def output(self) -> ArtifactTarget:
        memo = _fixed_outputs.get()
        if memo is not None and self.task_id in memo:
            return memo[self.task_id]
        ref = artifacts.make_ref(grove().artifact_root(), self.dataset, self.stage, self.spec.format,
                                 self.stage_params(), self.parent_refs())
        if memo is not None:
            memo[self.task_id] = ArtifactTarget(ref)
        return ArtifactTarget(ref)

    def complete(self) -> bool:
        """Published, and so is every version it was built from (at any depth): a stage whose parent
        is missing (removed as damaged, deleted by hand) is not complete, so Luigi looks below it and
        builds what is gone, then this stage again (see ``run``)."""
        with fixed_outputs():
            return self._complete({})

    def _complete(self, memo: dict[str, bool]) -> bool:
        # ``memo`` spans one complete() call: a diamond (split under exact, every forest and evaluate)
        # is looked at once. Nothing is kept between calls, so a removal is seen at once.
        if self.task_id not in memo:
            memo[self.task_id] = self.output().exists() and all(
                parent._complete(memo) if type(parent).complete is GroveTask.complete else parent.complete()
                for parent in self.parent_tasks().values())
        return memo[self.task_id]

    def report(self, fraction: float, message: str) -> None:
        """Progress to the terminal (``pipeline.progress``: a bar on a TTY, periodic log lines otherwise)
        and to the scheduler, at most about once a second (each call is an RPC under luigid)."""
        from pipeline import progress

        fraction = max(0.0, min(1.0, float(fraction)))
        if "_progress_name" not in self.__dict__:  # e.g. Train(mnist-cnn), Forest(glove, n_trees=10)
            params = dict(self.get_params())
            extra = [f"{n}={params[n].serialize(v)}" for n, v in self.param_kwargs.items()
                     if n not in ("dataset", "pins") and params[n].significant]
            self.__dict__["_progress_name"] = f"{self.get_task_family()}({', '.join([self.dataset, *extra])})"
        progress.update(self.task_id, self.__dict__["_progress_name"], fraction, message)
        now = time.monotonic()
        if fraction < 1.0 and now - self.__dict__.get("_last_report", 0.0) < 1.0:
            return
        self.__dict__["_last_report"] = now
        self.set_progress_percentage(round(100 * fraction))
        self.set_status_message(message)

    def write(self, tmp: Path) -> dict | None:
        raise NotImplementedError

    def run(self) -> None:
        for name, ref in self.parent_refs().items():
            # A half-written or damaged parent is an error, not an input: every file is checked
            # against its manifest's sha256 (a flipped byte in embeddings or an index is caught here;
            # on an object store, the copies fetched into this machine's cache are).
            artifacts.read_manifest(ref, verify="sha256")
        # Already published (this ran only because a version it was built from was gone and has been
        # built again): publish keeps it, as the same digest names the same bytes. `grove run --rebuild`
        # and the nightly repair remove such dependents first when their parent was damaged.
        artifacts.publish(self.output().ref, self.write, self.stage_params(), self.parent_refs())
