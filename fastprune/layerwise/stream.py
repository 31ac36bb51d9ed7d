"""Prune a model larger than memory: one decoder layer at a time, read from its safetensors files, written back
shard by shard.

The model is built on the meta device (no weights); each layer's tensors are read through memory maps when its
turn comes, converted to float32 for the computation, and released (or, once cut, written out in the dtype they
were stored in) before the next one. Embeddings are looked up row by row from the file. Peak memory is about one
layer (plus the criterion's per-layer statistics, e.g. obs's Gram matrices) and the calibration activations.

The scoring pass and the cutting pass (fastprune.layerwise.driver) save their position after every layer in a
hidden directory beside the output (``.<out>.stream-partial``), which becomes the output only when complete; a
run interrupted in either pass and started again with the same settings resumes from the last finished layer.
Under torch.distributed every process streams the layers over its share of the calibration batches, statistics
are all-reduced, every process checks that it made the same plan, and rank 0 writes.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastprune.adapters import adapter_for
from fastprune.budget import memory_budget
from fastprune.config import PruningConfig
from fastprune.data import DEFAULT_CALIBRATION
from fastprune.distributed import agree, barrier, current, device, shard
from fastprune.errors import CheckpointError, ConfigError, ModelNotFoundError
from fastprune.io import INFO_FILE, PLAN_FILE, atomic_write_text, check_output_dir, has_per_layer_widths, publish_dir
from fastprune.layerwise.calls import capture_calls
from fastprune.layerwise.driver import Progress, Timings, cut_layers, score_layers, scoring_criteria
from fastprune.layerwise.shards import SafetensorsCheckpoint, copy_tensors, numel, write_index, write_shard
from fastprune.planning import Plan, check_feasible, make_plan
from fastprune.scoring.scores import Scores

logger = logging.getLogger("fastprune")

SCORES_FILE = "scores.json"


class StreamHolder:
    """A model skeleton on the meta device whose layers are loaded one at a time from a safetensors checkpoint."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, model: torch.nn.Module, out: Path | None = None):
        self.checkpoint, self.model, self.out = checkpoint, model, out
        self.adapter = adapter_for(model)
        names = {id(m): n for n, m in model.named_modules()}
        self.prefixes = [names[id(layer)] for layer in self.adapter.layers]
        self.container = self.prefixes[0].rsplit(".", 1)[0]
        self.embedding = names[id(model.get_input_embeddings())] + ".weight"
        self.compute_dtype = torch.float32
        self.device = device()  # this process's GPU under NCCL, else the CPU
        for module in model.modules():  # buffers (rotary frequencies) are real: move them where layers run
            for name, buffer in module._buffers.items():
                if buffer is not None and not buffer.is_meta:
                    module._buffers[name] = buffer.to(self.device)

    def layer_names(self, i: int) -> dict[str, str]:
        """Layer i's state-dict keys -> checkpoint names."""
        return {k: f"{self.prefixes[i]}.{k}" for k in self.adapter.layers[i].state_dict()}

    def calls(self, batches, indices):
        def embed(ids: torch.Tensor) -> torch.Tensor:
            return self.checkpoint.rows(self.embedding, ids, self.compute_dtype).to(self.device)

        return capture_calls(self.adapter, batches, indices, embed)

    def load(self, i: int) -> None:
        _trim_heap()  # what the previous layer freed goes back to the system before this one is read
        names = self.layer_names(i)
        tensors = self.checkpoint.load(list(names.values()), self.compute_dtype)
        state = {k: tensors[n].to(self.device) for k, n in names.items()}
        self.adapter.layers[i].load_state_dict(state, assign=True)

    def unload(self, i: int) -> None:
        self.adapter.layers[i].to("meta")

    def keep(self, i: int, new_index: int) -> None:
        """Write the cut layer i as layer ``new_index`` of the output (rank 0), in its tensors' stored dtypes."""
        if self.out is not None and current().is_main:
            stored = {k: self.checkpoint.entries[n].dtype for k, n in self.layer_names(i).items()}
            tensors = {
                f"{self.container}.{new_index}.{k}": t.detach().to("cpu", stored[k])
                for k, t in self.adapter.layers[i].state_dict().items()
            }
            write_shard(self.out / f"model-layer-{new_index:05d}.safetensors", tensors)
        self.unload(i)

    def finish(self, plan: Plan) -> None:
        """Drop layers, write the config's new widths, and copy the tensors outside the layers (rank 0)."""
        if plan.drop_layers:
            self.adapter.set_layers(plan.kept_layers())
        self.adapter.write_config()
        if self.out is None or not current().is_main:
            return
        inside = tuple(p + "." for p in self.prefixes)
        rest = [n for n in self.checkpoint.names() if not n.startswith(inside) and n in self.model.state_dict()]
        copy_tensors(self.out / "model-rest.safetensors", self.checkpoint, rest)


def _trim_heap() -> None:
    """Return freed heap memory to the system (glibc keeps it otherwise: a few hundred MB per large layer)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_LIBC = _load_libc()


def skeleton(directory: Path) -> torch.nn.Module:
    """The model of ``directory``'s config with its parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from fastprune.adapters import adapter_class
    from fastprune.io import model_class

    if not (directory / "config.json").is_file():
        raise ModelNotFoundError(f"no model at {directory}: expected a directory with config.json and weights")
    config = AutoConfig.from_pretrained(directory)
    adapter = adapter_class(config.model_type)
    if not adapter.causal:
        raise ConfigError(f"streaming supports decoder models (Llama, Mistral, Qwen2/3); {config.model_type} is not")
    cls = model_class(config)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    model.tie_weights()  # from_config leaves tied embeddings untied on the meta device
    return model.eval()


def check_checkpoint(model: torch.nn.Module, checkpoint: SafetensorsCheckpoint) -> None:
    """Refuse shards that disagree with the config: a missing tensor, a tensor of another shape, or layer tensors
    the config does not have."""
    state = model.state_dict(keep_vars=True)
    present = set(checkpoint.names())
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    missing = [names[0] for names in groups.values() if not present & set(names)]
    wrong = [
        f"{n} {tuple(checkpoint.entries[n].shape)} (config: {tuple(t.shape)})"
        for n, t in state.items()
        if n in present and tuple(checkpoint.entries[n].shape) != tuple(t.shape)
    ]
    container = {n.rsplit(".", 1)[0] for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)}
    extra = sorted(n for n in present - state.keys() if any(n.startswith(c + ".") for c in container))
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} of another shape (e.g. {'; '.join(wrong[:3])})")
    if extra:
        problems.append(f"{len(extra)} layer tensors the config does not have (e.g. {', '.join(extra[:3])})")
    if problems:
        raise CheckpointError(
            f"the safetensors files of {checkpoint.directory} disagree with its config.json: {'; '.join(problems)}"
        )
    ignored = sorted(present - state.keys() - set(extra))
    if ignored:
        logger.warning("ignoring %d tensors the model does not use (e.g. %s)", len(ignored), ", ".join(ignored[:3]))


def memory_needed(directory: Path) -> int:
    """Bytes a prune held in memory takes: the model in float32 (as fastprune loads it), the pruned copy, and half
    as much again for activations, statistics and the interpreter."""
    checkpoint = SafetensorsCheckpoint(directory)
    fp32 = sum(numel(e.shape) * 4 for e in checkpoint.entries.values() if e.dtype.is_floating_point)
    return int(2.5 * fp32)


def memory_available() -> int:
    """Bytes this process can still use: the smaller of the system's available memory and its cgroup's room."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            room = int(limit) - used
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available if available is not None else 2**62


def should_stream(directory: Path) -> bool:
    """True when pruning ``directory``'s model in memory would not fit in the memory this process can see."""
    need, have = memory_needed(directory), memory_available()
    if need > have:
        logger.info(
            "pruning in memory would take about %.1f GiB but %.1f GiB are available: streaming layer by layer",
            need / 2**30,
            have / 2**30,
        )
        return True
    return False


@dataclass
class StreamResult:
    """What a streamed prune made: the output directory, the plan applied, the scores (when scored) and timings."""

    out: Path
    plan: Plan
    scores: Scores | None
    seconds: dict[str, float]
    layer_seconds: list[dict] = field(default_factory=list)
    peak_rss_bytes: int = 0


def prune_streaming(
    source: str | Path | None,
    config: PruningConfig,
    out: str | Path,
    calibration=DEFAULT_CALIBRATION,
    plan: Plan | None = None,
    overwrite: bool = False,
) -> StreamResult:
    """Prune a model (a safetensors model directory, or a bundled name or .gguf file, converted once to one) into
    ``out`` one layer at a time (see the module docstring).

    Criteria must be layer-local (fastprune.layerwise.LAYER_LOCAL_CRITERIA); parameter and memory targets, ratios,
    global ranking, layer removal, sequential calibration and a given ``plan`` work as in memory.
    """
    from transformers import AutoTokenizer

    from fastprune.models import resolve_source
    from fastprune.pipeline import calibration_windows, fit_to_calibration, provenance

    t0 = time.perf_counter()
    if current().is_main:  # a GGUF source is converted once, by one process
        found = resolve_source(None if source is None else str(source))
    barrier()
    if not current().is_main:
        found = resolve_source(None if source is None else str(source))
    source, out = found.directory.resolve(), Path(out).expanduser().resolve()
    check_output_dir(out, list(found.inputs), overwrite)
    if config.target_latency_ms is not None:
        raise ConfigError("a latency target is checked by timing the pruned model in memory; it cannot be streamed")
    if config.ranking == "loss_weighted":
        raise ConfigError(
            "ranking loss_weighted measures the whole model's loss with each layer cut; it needs the model in "
            "memory (stream with ranking global or per_layer)"
        )
    model = skeleton(source)
    checkpoint = SafetensorsCheckpoint(source)
    check_checkpoint(model, checkpoint)
    adapter = adapter_for(model)
    shape, costs = adapter.shape(), adapter.param_costs()
    budget = None
    if plan is None:
        criteria = scoring_criteria(config)
        budget = _memory_budget(adapter, checkpoint, config)
        check_feasible(shape, config, costs, budget)
    else:
        plan.check_fits(shape)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"no usable tokenizer in {source}: {exc}") from exc
    windows = calibration_windows(tokenizer, calibration, config)
    config = fit_to_calibration(adapter, windows, config)
    local, indices = shard(windows.batches(config.calibration.batch_size))

    partial = out.parent / f".{out.name}.stream-partial"
    work = partial / "work"
    fingerprint = _fingerprint(source, checkpoint, config, windows, plan)
    _prepare(partial, work, fingerprint)
    holder = StreamHolder(checkpoint, model, partial)
    progress, timings, seconds = Progress(work), Timings(), {}

    scores = None
    if plan is None and (work / PLAN_FILE).is_file():
        plan, scores = Plan.load(work / PLAN_FILE), Scores.load(work / SCORES_FILE)
        logger.info("resuming: the scoring pass had finished")
    elif plan is None:
        t = time.perf_counter()
        calls = holder.calls(local, indices)
        scores = score_layers(holder, calls, *criteria, config.seed, config.damping, progress, timings)
        plan = make_plan(scores, config, costs, budget)
        plan.info["calibration"] = windows.describe()
        agree(plan.to_dict(), "the plan")
        if current().is_main:
            scores.save(work / SCORES_FILE)
            plan.save(work / PLAN_FILE)
        barrier()
        seconds["score"] = time.perf_counter() - t
    t = time.perf_counter()
    calls = holder.calls(local, indices)
    applied = cut_layers(holder, calls, plan, scores, config, progress, timings)
    seconds["cut"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    peak = _peak_rss()
    if current().is_main:
        from fastprune.pipeline import PruneResult

        result = PruneResult(None, applied, scores, None, windows.describe(), seconds)
        info = provenance(result, config, found.name)
        info["stream"] = {"processes": current().world, "peak_rss_bytes": peak, "layers": timings.rows}
        _write_outputs(partial, work, holder, tokenizer, applied, scores, info)
        publish_dir(partial, out, overwrite)
        logger.info("saved pruned model to %s", out)
    barrier()
    return StreamResult(out, applied, scores, seconds, timings.rows, peak)


def _memory_budget(adapter, checkpoint: SafetensorsCheckpoint, config: PruningConfig):
    if config.target_memory_mb is None:
        return None
    counts = adapter.count_parameters()
    itemsize = checkpoint.entries[next(iter(checkpoint.entries))].dtype.itemsize
    return memory_budget(
        adapter.shape(),
        adapter.param_costs(),
        counts["total"] - counts["non_embedding"],
        itemsize,
        config.memory_context,
        config.target_memory_mb,
    )


def _fingerprint(source: Path, checkpoint: SafetensorsCheckpoint, config, windows, plan) -> dict:
    """What must be the same for an interrupted stream to be resumed."""
    files = [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in checkpoint.files]
    return {
        "source": str(source),
        "files": files,
        "config": config.to_dict(),
        "calibration": windows.describe(),
        "processes": current().world,
        "plan": None if plan is None else hashlib.sha256(json.dumps(plan.to_dict()).encode()).hexdigest(),
    }


def _prepare(partial: Path, work: Path, fingerprint: dict) -> None:
    """Make the partial output directory, reusing the one an interrupted run with the same settings left."""
    stamp = work / "fingerprint.json"
    if current().is_main:
        if partial.exists():
            same = stamp.is_file() and json.loads(stamp.read_text()) == fingerprint
            if same:
                logger.info("resuming the interrupted stream in %s", partial)
            else:
                logger.warning("discarding %s: it was left by a run with other settings", partial)
                shutil.rmtree(partial)
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, json.dumps(fingerprint) + "\n")
    barrier()


def _write_outputs(partial: Path, work: Path, holder: StreamHolder, tokenizer, plan, scores, info) -> None:
    from fastprune.remote import modeling_fastprune
    from fastprune.remote.modeling_fastprune import REMOTE_MODULE

    shards = sorted(partial.glob("model-*.safetensors"))
    write_index(partial, shards)
    config = holder.model.config
    config.save_pretrained(partial)
    source = holder.checkpoint.directory
    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", partial / "generation_config.json")
    tokenizer.save_pretrained(partial)
    if has_per_layer_widths(config):
        shutil.copyfile(modeling_fastprune.__file__, partial / f"{REMOTE_MODULE}.py")
    (partial / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=1) + "\n")
    if scores is not None:
        (partial / SCORES_FILE).write_text(json.dumps(scores.to_dict()))
    (partial / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(work)


def _peak_rss() -> int:
    """This process's peak resident memory so far, in bytes: the high-water mark of its own memory map (Linux
    VmHWM; ru_maxrss would also count the memory of the process that started this one, inherited until exec)."""
    try:
        return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
