"""Evaluate models on eval sets and write the per-example dumps.

What can be evaluated (:func:`discover_models`):
* a model directory written by :mod:`relscale.model_io` (``<run>/final``);
* a Hugging Face Llama/Qwen3 directory (:mod:`relscale.eval.hf`);
* a run directory (the trainer's ``out_dir``): its ``final/`` weights, and with ``checkpoints``
  also its DCP checkpoints ``checkpoints/step_*/`` (model id ``<run>@step_<step>``);
* a sweep directory: every finished run (``status == "done"`` in ``results.parquet``, plus runs
  marked done that the index does not list yet); model id = the run id, budget from the index;
* a Hugging Face cache repository ``models--ORG--NAME`` (model id NAME), and a folder holding
  any of these (e.g. downloaded released checkpoints), each under its folder name.

A folder named ``isoflop-<budget>-d<d>-L<L>-B<B>-<sweep>`` (the released IsoFLOP suite's names)
gives the budget, and for final weights without recorded tokens the training tokens and FLOPs
(:func:`relscale.eval.hf.meta_from_name`); ``--meta`` overrides.

Dumps that already exist are skipped before any weights are loaded (``force`` rewrites them).
Tokenised eval sets are cached per tokenizer, so a sweep whose runs share a tokenizer tokenises
each set once.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from relscale.config import ModelConfig, from_dict
from relscale.counting import param_counts, run_flops
from relscale.errors import DataError
from relscale.eval import hf
from relscale.eval.formats import EvalSet, SetOptions, check_bad_rows, load_eval_set, parse_spec
from relscale.eval.scoring import (  # eval: start-token policy
    Encoded,
    ScoreSettings,
    StartTokens,
    encode_set,
    hf_special_tokens,
    metrics,
    resolve_start,
    score_requests,
)
from relscale.eval.writer import (  # eval: is_finished_dump
    dump_path,
    format_summary,
    is_finished_dump,
    safe_name,
    summarize,
    write_dump,
)
from relscale.model_io import CONFIG, FORMAT, WEIGHTS, load_model, read_model_config, read_model_tokenizer
from relscale.sweep.layout import is_sweep_dir

FINAL = "final"
CHECKPOINTS = "checkpoints"
DONE = "done"
DEFAULT_MAX_CONTEXT = 4096


# ------------------------------------------------------------------------------------ discovery
@dataclass
class ModelEntry:
    kind: str  # "relscale" | "hf" | "dcp"
    path: Path
    model_id: str
    step: int | None = None
    run_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # columns known from the sweep index


def _is_relscale_model(path: Path) -> bool:
    """Whether ``path`` is a model folder written by :mod:`relscale.model_io`. A folder with
    weights whose config.json cannot be read raises DataError naming the file (eval-hf), rather
    than being passed over as "not a model"."""
    config = path / CONFIG
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        if (path / WEIGHTS).is_file() or (path / hf.INDEX_FILE).is_file():
            raise DataError(f"{config}: unreadable model config ({err})") from err
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def checkpoint_entries(run_dir: Path, run_id: str, extra: dict | None = None) -> list[ModelEntry]:
    from relscale.train.checkpoint import META, STEP_DIR

    root = run_dir / CHECKPOINTS
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / META).is_file():  # complete checkpoints only
                found.append((int(match.group(1)), path))
    return [
        ModelEntry("dcp", path, f"{run_id}@step_{step:07d}", step, run_dir, dict(extra or {}))
        for step, path in sorted(found)
    ]


def _run_entries(
    run_dir: Path, run_id: str, checkpoints: bool, extra: dict | None = None
) -> list[ModelEntry]:
    entries = checkpoint_entries(run_dir, run_id, extra) if checkpoints else []
    if _is_relscale_model(run_dir / FINAL):
        entries.append(ModelEntry("relscale", run_dir / FINAL, run_id, None, run_dir, dict(extra or {})))
    return entries


def _sweep_runs(sweep_dir: Path) -> list[tuple[str, Path, dict]]:
    """(run id, run dir, index columns) of the finished runs of a sweep, in index order."""
    from relscale.sweep.layout import finished_runs

    return [(run.run_id, run.run_dir, run.row) for run in finished_runs(sweep_dir)]


def _hub_entry(repo: Path, required: bool = False) -> ModelEntry | None:
    """eval-hf: the checkpoint of a hub-cache repository ``models--ORG--NAME``, model id NAME;
    None (or, when ``required``, a DataError) if its snapshot is not a Hugging Face model."""
    snapshot = hf.hub_snapshot(repo)
    if not hf.is_hf_dir(snapshot):
        if required:
            raise DataError(f"{snapshot}: not a Hugging Face model (no config.json with a model_type)")
        return None
    return ModelEntry("hf", snapshot, hf.model_name(repo))


def _folder_entries(folder: Path, checkpoints: bool) -> list[ModelEntry]:
    """eval-hf: the models directly inside a folder of checkpoints -- Hugging Face folders (e.g.
    downloaded released checkpoints), hub-cache repositories, relscale model folders and runs --
    in name order, each under its folder name; anything else in the folder is ignored."""
    entries: list[ModelEntry] = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _is_relscale_model(child):
            entries.append(ModelEntry("relscale", child, child.name))
        elif hf.is_hf_dir(child):
            entries.append(ModelEntry("hf", child, child.name))
        elif hf.is_hub_repo(child):
            entry = _hub_entry(child)
            entries += [entry] if entry is not None else []
        elif _is_relscale_model(child / FINAL):
            entries += _run_entries(child, child.name, checkpoints)
    return entries


def discover_models(paths: list[str | Path], *, checkpoints: bool = False) -> list[ModelEntry]:
    """The models under ``paths``: relscale model folders, Hugging Face folders (or hub-cache
    repositories), run folders, sweep folders, or a folder holding any of the first four.
    Raises DataError naming a path that is none of these, or two models with one id."""
    entries: list[ModelEntry] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if _is_relscale_model(path):
            run_id = path.parent.name if path.name == FINAL else path.name
            if checkpoints and path.name == FINAL:
                entries += checkpoint_entries(path.parent, run_id)
            entries.append(
                ModelEntry("relscale", path, run_id, None, path.parent if path.name == FINAL else None)
            )
        elif hf.is_hf_dir(path):
            entries.append(ModelEntry("hf", path, hf.model_name(path)))  # eval-hf: hub snapshots by repo
        elif hf.is_hub_repo(path):  # eval-hf: a repository folder of the Hugging Face cache
            entries.append(_hub_entry(path, required=True))
        elif is_sweep_dir(path):
            runs = _sweep_runs(path)
            if not runs:
                raise DataError(f"{path}: sweep directory with no finished runs")
            for run_id, run_dir, row in runs:
                found = _run_entries(run_dir, run_id, checkpoints, {"budget": row.get("budget")})
                if not found:
                    print(f"relscale eval: {run_id}: finished but no weights in {run_dir / FINAL}; skipped")
                entries += found
        elif (path / FINAL).is_dir() or (path / CHECKPOINTS).is_dir():
            found = _run_entries(path, path.name, checkpoints)
            if not found:
                raise DataError(
                    f"{path}: run has no final weights (pass --checkpoints for its DCP checkpoints)"
                )
            entries += found
        elif path.is_dir() and (found := _folder_entries(path, checkpoints)):  # eval-hf
            entries += found
        elif path.exists():
            raise DataError(f"{path}: not a model, Hugging Face, run or sweep folder, nor a folder of them")
        else:
            raise DataError(f"{path}: no such model directory")
    ids = [e.model_id for e in entries]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(
            f"two models share the id(s) {duplicates}; evaluate them in separate calls with --out"
        )
    return entries


# --------------------------------------------------------------------------------- model loading
@dataclass
class RunOptions:
    out_dir: Path = Path("evals")
    sets: SetOptions = field(default_factory=SetOptions)
    context: int | None = None
    stride: int | None = None
    pack_len: int | None = None
    batch_tokens: int = 16384
    prefix_tokens: int = 0
    device: str = "auto"
    dtype: str = "auto"
    tokenizer: Path | None = None
    start_token: str | None = None  # eval: auto (None) | bos | eos | none | a token string or id
    meta: dict[str, Any] = field(default_factory=dict)  # column overrides (tokens, budget, ...)
    skip_bad: bool = False
    force: bool = False
    progress: bool = False
    quiet: bool = False
    threads: int | None = None  # eval: torch.set_num_threads (None: torch's default)


@dataclass
class ModelInfo:
    """What is known about a model before its weights are loaded."""

    cfg: ModelConfig
    meta: dict[str, Any]
    data_dir: Path | None


def _resolve_data_dir(explicit: Path | None, meta: dict[str, Any]) -> Path | None:
    if explicit is not None:
        return Path(explicit)
    raw = meta.get("data_path")
    return Path(raw) if raw else None


def read_info(entry: ModelEntry, opts: RunOptions) -> ModelInfo:
    """Config and meta of a model before its weights are loaded: the saved meta, then
    ``opts.meta`` (``--meta``), then what an IsoFLOP folder name adds (eval-hf). Raises
    DataError naming the file for an unreadable config or a name that contradicts it."""
    if entry.kind == "relscale":
        cfg, meta = read_model_config(entry.path)
    elif entry.kind == "hf":
        cfg = hf.hf_to_model_config(hf.read_hf_config(entry.path), str(entry.path / "config.json"))
        meta_file = entry.path / hf.META_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    else:
        cfg, meta = _checkpoint_info(entry)
    meta = {**meta, **opts.meta}
    # eval-hf: budget, tokens and FLOPs of an isoflop-<budget>-d<d>-L<L>-B<B>-<sweep> checkpoint;
    # a run's intermediate checkpoint did not train the whole budget: no tokens from the name
    meta = hf.meta_from_name(_entry_name(entry), cfg, meta, str(entry.path), tokens=entry.kind != "dcp")
    return ModelInfo(cfg, meta, _resolve_data_dir(opts.sets.data_dir, meta))


def _entry_name(entry: ModelEntry) -> str:
    """eval-hf: the folder name that describes a model: its own (a hub snapshot: the repository
    name), or the run folder's for a run's final weights and checkpoints."""
    if entry.kind == "hf":
        return hf.model_name(entry.path)
    return (entry.run_dir or entry.path).name


def _checkpoint_info(entry: ModelEntry) -> tuple[ModelConfig, dict[str, Any]]:
    """Model config and meta of a DCP checkpoint, from the run fingerprint it was saved with."""
    from relscale.train.checkpoint import read_meta

    fingerprint = read_meta(entry.path).get("fingerprint") or {}
    model_keys = {k.split(".", 1)[1]: v for k, v in fingerprint.items() if k.startswith("model.")}
    if not model_keys:
        raise DataError(f"{entry.path}: checkpoint.json has no model fingerprint to rebuild the model from")
    cfg = from_dict(ModelConfig, model_keys, "model")
    cfg.validate()
    seq_len = fingerprint.get("data.seq_len")
    meta: dict[str, Any] = {"seq_len": seq_len}
    final = entry.run_dir / FINAL if entry.run_dir else None
    if final is not None and _is_relscale_model(final):
        meta["data_path"] = read_model_config(final)[1].get("data_path")
    if seq_len and fingerprint.get("global_batch") and entry.step is not None:
        meta["tokens"] = entry.step * fingerprint["global_batch"] * seq_len
    return cfg, meta


def load_weights(entry: ModelEntry, cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    if entry.kind == "relscale":
        return load_model(entry.path, device)[0]
    if entry.kind == "hf":
        return hf.load_hf_model(entry.path, device)[0]
    return load_dcp_model(entry.path, cfg, device)


def load_dcp_model(path: Path, cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model weights of a trainer checkpoint (saved as ``{"model": ..., "optim": ...}``)."""
    from relscale.model import Transformer
    from relscale.train.checkpoint import load_dcp_state, read_checkpoint_metadata

    model = Transformer(cfg)
    state = model.state_dict()
    # restricted unpickler: a planted pickle in .metadata is refused (DataError), never run
    saved = read_checkpoint_metadata(path).state_dict_metadata
    wanted = {k: v for k, v in state.items() if f"model.{k}" in saved}
    tied = {"output.weight"} if cfg.tie_embeddings else set()
    missing = sorted(set(state) - set(wanted) - tied)
    if missing:
        raise DataError(f"{path}: checkpoint lacks model weights {missing[:6]}")
    load_dcp_state(path, {"model": wanted})  # in place, into the model's tensors; checksums verified
    return model.to(device)


def default_context(info: ModelInfo) -> int:
    """The training sequence length when the meta records it; else the model's maximum length,
    capped at DEFAULT_MAX_CONTEXT (released checkpoints often declare far more than they trained)."""
    if info.meta.get("seq_len"):
        return int(info.meta["seq_len"])
    return min(info.cfg.max_seq_len, DEFAULT_MAX_CONTEXT)


def model_columns(entry: ModelEntry, info: ModelInfo) -> dict[str, Any]:
    cfg, meta = info.cfg, info.meta
    counts = param_counts(cfg)
    tokens = meta.get("tokens")
    flops_train, flops_marin = meta.get("flops_train"), meta.get("flops_marin")
    seq_len = meta.get("seq_len")
    if tokens is not None and seq_len and (flops_train is None or flops_marin is None):
        flops = run_flops(cfg, int(seq_len), int(tokens))
        flops_train = flops.flops_train if flops_train is None else flops_train
        flops_marin = flops.flops_marin if flops_marin is None else flops_marin
    budget = meta.get("budget", entry.extra.get("budget"))
    return {
        "model_id": entry.model_id,
        "step": entry.step,
        "params": counts.total,
        "non_embedding_params": counts.non_embedding,
        "tokens": None if tokens is None else int(tokens),
        "flops_train": None if flops_train is None else float(flops_train),
        "flops_marin": None if flops_marin is None else float(flops_marin),
        "budget": None if budget is None else float(budget),
        "hidden": cfg.hidden,
        "layers": cfg.layers,
        "source": str(entry.path),
    }


# ------------------------------------------------------------------------------------ tokenizers
@dataclass
class TokenizerInfo:
    tokenizer: Any
    start: StartTokens  # eval: the start-token policy resolved for this tokenizer
    key: str  # sha256 of tokenizer.json: equal keys tokenise identically

    @property
    def start_id(self) -> int:
        """The token a document's first token is predicted from (lm-eval's prefix_token_id)."""
        return self.start.first


def _file_key(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def own_tokenizer(entry: ModelEntry) -> tuple[Path, int | None] | None:
    """eval-hf: (tokenizer.json, EOS id) stored next to a relscale model's weights (for a run's
    DCP checkpoints: its final/ folder's), so a moved run folder needs no prepared data."""
    if entry.kind == "relscale":
        folder = entry.path
    elif entry.kind == "dcp" and entry.run_dir is not None:
        folder = entry.run_dir / FINAL
    else:
        return None
    return read_model_tokenizer(folder) if _is_relscale_model(folder) else None


def load_tokenizer_for(entry: ModelEntry, info: ModelInfo, opts: RunOptions) -> TokenizerInfo:
    """The tokenizer of a model and its start tokens under ``opts.start_token`` (eval: policies
    in :func:`relscale.eval.scoring.resolve_start`)."""
    from tokenizers import Tokenizer

    from relscale.data.tokenizer import EOS_TOKEN

    if opts.tokenizer is not None:
        tokenizer = Tokenizer.from_file(str(opts.tokenizer))
        where, key = str(opts.tokenizer), _file_key(opts.tokenizer)
        if entry.kind == "hf":
            bos_id, eos_id, add_bos = hf_special_tokens(entry.path, tokenizer)
        else:
            bos_id, eos_id, add_bos = None, tokenizer.token_to_id(EOS_TOKEN), None
    elif entry.kind == "hf":
        tokenizer = hf.load_hf_tokenizer(entry.path)
        where, key = str(entry.path), _file_key(entry.path / "tokenizer.json")
        bos_id, eos_id, add_bos = hf_special_tokens(entry.path, tokenizer)
    elif (own := own_tokenizer(entry)) is not None:  # eval-hf: tokenizer.json saved with the weights
        tokenizer, where, key = Tokenizer.from_file(str(own[0])), str(own[0]), _file_key(own[0])
        bos_id, eos_id, add_bos = None, own[1], None  # our data: an EOS between documents
    else:
        if info.data_dir is None:
            raise DataError(f"{entry.path}: the model's meta names no data_path; pass --data or --tokenizer")
        from relscale.data import PreparedData

        data = PreparedData(info.data_dir)
        tokenizer, where = data.tokenizer, str(info.data_dir)
        key = _file_key(info.data_dir / data.manifest["tokenizer"]["file"])
        bos_id, eos_id, add_bos = None, data.eos_id, None  # our data: an EOS between documents
    start = resolve_start(
        tokenizer, opts.start_token, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, where=where
    )
    return TokenizerInfo(tokenizer, start, key)


# ---------------------------------------------------------------------------------------- running
@dataclass
class Outcome:
    model_id: str
    dataset: str
    path: Path
    status: str  # "written" | "exists"
    examples: int = 0
    tokens_scored: int = 0
    seconds: float = 0.0


class Evaluator:
    """Evaluates entries on eval specs, caching loaded and tokenised sets across models."""

    def __init__(self, specs: list[str], opts: RunOptions):
        if not specs:
            raise DataError("no eval set given (use --eval default, or a file / folder)")
        self.specs, self.opts = specs, opts
        self._sets: dict[tuple[str, str], EvalSet] = {}
        self._encoded: dict[tuple[int, str, int, int], Encoded] = {}
        self._checked: set[tuple[int, str]] = set()

    def eval_set(self, spec: str, data_dir: Path | None) -> EvalSet:
        is_default = parse_spec(spec)[1] == "default"
        key = (spec, str(data_dir) if is_default else "")
        if key not in self._sets:
            sets = self.opts.sets
            options = replace(sets, data_dir=data_dir) if is_default else sets
            self._sets[key] = load_eval_set(spec, options)
        return self._sets[key]

    def encoded(self, eval_set: EvalSet, tok: TokenizerInfo) -> Encoded:
        key = (id(eval_set), tok.key, tok.start, self.opts.prefix_tokens)
        if key not in self._encoded:
            self._encoded[key] = encode_set(eval_set, tok.tokenizer, tok.start, self.opts.prefix_tokens)
        return self._encoded[key]

    def check(self, eval_set: EvalSet, encoded: Encoded, tok_key: str) -> None:
        if (id(eval_set), tok_key) in self._checked:
            return
        bad = EvalSet(eval_set.name, eval_set.kind, [], eval_set.bad_rows + encoded.bad_rows, eval_set.source)
        report = self.opts.out_dir / safe_name(eval_set.name) / "bad_rows.jsonl"
        check_bad_rows(bad, self.opts.skip_bad, report)
        self._checked.add((id(eval_set), tok_key))

    def device(self) -> torch.device:
        if self.opts.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.opts.device)

    def run(self, entries: list[ModelEntry]) -> list[Outcome]:
        outcomes = []
        for entry in entries:
            outcomes += self.run_one(entry)
        return outcomes

    def run_one(self, entry: ModelEntry) -> list[Outcome]:
        opts = self.opts
        info = read_info(entry, opts)
        sets = [self.eval_set(spec, info.data_dir) for spec in self.specs]
        check_unique_names(sets)  # eval: two sets under one name would overwrite each other
        todo, outcomes = [], []
        for eval_set in sets:
            path = dump_path(opts.out_dir, eval_set.name, entry.model_id)
            if is_finished_dump(path) and not opts.force:  # eval: garbage at the path is not done
                outcomes.append(Outcome(entry.model_id, eval_set.name, path, "exists"))
                self._say(f"{entry.model_id} / {eval_set.name}: {path} exists, skipped (--force rewrites)")
            else:
                todo.append((eval_set, path))
        if not todo:
            return outcomes
        tok = load_tokenizer_for(entry, info, opts)
        prepared = []
        for eval_set, path in todo:
            encoded = self.encoded(eval_set, tok)
            self.check(eval_set, encoded, tok.key)
            prepared.append((eval_set, path, encoded))
        context = opts.context or default_context(info)
        if context > info.cfg.max_seq_len:  # eval: refuse before allocating
            raise DataError(
                f"--context {context} exceeds the model's max_seq_len {info.cfg.max_seq_len} ({entry.path})"
            )
        device = self.device()
        model = load_weights(entry, info.cfg, device)
        columns = model_columns(entry, info)
        settings = ScoreSettings(
            context=context,
            stride=opts.stride,
            pack_len=opts.pack_len,
            batch_tokens=opts.batch_tokens,
            dtype=opts.dtype,
            progress=opts.progress,
        )
        for eval_set, path, encoded in prepared:
            outcomes.append(
                self.score_and_write(model, entry, columns, eval_set, encoded, path, settings, tok)
            )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return outcomes

    def score_and_write(self, model, entry, columns, eval_set, encoded, path, settings, tok) -> Outcome:
        if not encoded.requests:  # eval: nothing to score -> no dump (an empty one would read as done)
            self._say(f"{entry.model_id} / {eval_set.name}: 0 examples to score; no dump written")
            return Outcome(entry.model_id, eval_set.name, path, "empty")
        result = score_requests(model, encoded.requests, settings)
        rows = metrics(eval_set, encoded, result.nll)
        stride, pack_len, _ = settings.resolved()
        provenance = {
            "dataset": eval_set.name,
            "kind": eval_set.kind,
            "source": eval_set.source,
            "set_settings": eval_set.settings,
            "context": settings.context,
            "stride": stride,
            "pack_len": pack_len,
            "prefix_tokens": self.opts.prefix_tokens,
            "start_id": tok.start_id,
            "start_tokens": tok.start.describe(),
            "tokenizer_sha256_16": tok.key,
            "dtype": settings.dtype,
            "device": str(model_device_of(model)),
            "torch": torch.__version__,
            "skipped_bad_rows": len(eval_set.bad_rows) + len(encoded.bad_rows),
        }
        written = write_dump(
            path, eval_set.kind, columns, eval_set.name, rows, provenance, force=self.opts.force
        )
        seconds = max(result.seconds, 1e-9)
        title = (
            f"{entry.model_id} / {eval_set.name}: {len(rows)} examples, {result.tokens_scored} tokens "
            f"scored in {result.seconds:.1f}s ({len(rows) / seconds:.1f} examples/s, "
            f"{result.tokens_scored / seconds:.0f} tokens/s) -> {path}"
        ) + ("" if written else " (exists, kept)")
        self._say(format_summary(title, summarize(eval_set.kind, rows)))
        return Outcome(
            entry.model_id,
            eval_set.name,
            path,
            "written" if written else "exists",
            len(rows),
            result.tokens_scored,
            result.seconds,
        )

    def _say(self, text: str) -> None:
        if not self.opts.quiet:
            print(text, flush=True)


def check_unique_names(sets: list[EvalSet]) -> None:
    """eval: refuse two eval sets with one name (their dumps would share one file), naming both."""
    seen: dict[str, EvalSet] = {}
    for eval_set in sets:
        other = seen.setdefault(eval_set.name, eval_set)
        if other is not eval_set:
            raise DataError(
                f"eval sets {other.source} and {eval_set.source} are both named {eval_set.name!r}; "
                "name one with NAME=KIND:PATH"
            )


def model_device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def evaluate(
    paths: list[str | Path],
    specs: list[str],
    opts: RunOptions,
    *,
    checkpoints: bool = False,
    steps: list[int] | None = None,
) -> list[Outcome]:
    """Discover the models under ``paths`` and write their dumps on ``specs``."""
    if opts.threads is not None:  # eval: --threads
        torch.set_num_threads(opts.threads)
    entries = discover_models(paths, checkpoints=checkpoints)
    if steps is not None:
        entries = [e for e in entries if e.step is None or e.step in set(steps)]
    for entry in entries:  # eval-hf: every config and name checked before any model is scored
        read_info(entry, opts)
    started = time.perf_counter()
    outcomes = Evaluator(specs, opts).run(entries)
    if not opts.quiet:
        written = sum(o.status == "written" for o in outcomes)
        print(
            f"relscale eval: {written} dump(s) written, {len(outcomes) - written} already there, "
            f"{len(entries)} model(s), {time.perf_counter() - started:.1f}s"
        )
    return outcomes


# ------------------------------------------------------------------------------- training hook
def make_dump_hook(
    eval_spec: str | list[str],
    out_dir: str | Path,
    steps: list[int],
    *,
    data_path: str | Path | None = None,
    run_id: str = "run",
    seq_len: int | None = None,
    tokens_per_step: int | None = None,
    opts: RunOptions | None = None,
):
    """An ``on_step(step, model)`` hook for the trainer that writes the dumps of ``eval_spec``
    (``"default"``: the held-out split of ``data_path``) at the given ``steps``, under model id
    ``<run_id>@step_<step>``. Every rank scores (an FSDP forward is collective), rank 0 writes.
    ``tokens_per_step`` and ``seq_len`` give the tokens and FLOPs columns at each step."""
    opts = RunOptions(quiet=True) if opts is None else replace(opts)
    opts.out_dir = Path(out_dir)
    if data_path is not None:
        opts.sets = replace(opts.sets, data_dir=Path(data_path))
    specs = [eval_spec] if isinstance(eval_spec, str) else list(eval_spec)
    wanted = set(steps)
    evaluator = Evaluator(specs, opts)
    state: dict[str, Any] = {}

    def hook(step: int, model: torch.nn.Module) -> None:
        if step not in wanted:
            return
        core = getattr(model, "_orig_mod", model)
        cfg = core.cfg
        meta: dict[str, Any] = {"seq_len": seq_len, "data_path": str(data_path) if data_path else None}
        if tokens_per_step is not None:
            meta["tokens"] = step * tokens_per_step
        # source column: the run, as seen during training (there is no checkpoint path)
        entry = ModelEntry("live", Path(f"{run_id}@training"), f"{run_id}@step_{step:07d}", step)
        info = ModelInfo(cfg, {**meta, **opts.meta}, opts.sets.data_dir)
        if "tok" not in state:
            # eval-hf: "live": no model folder to read a tokenizer from, only the data
            state["tok"] = load_tokenizer_for(ModelEntry("live", Path("."), run_id), info, opts)
        tok = state["tok"]
        is_main = (
            not (torch.distributed.is_available() and torch.distributed.is_initialized())
            or torch.distributed.get_rank() == 0
        )
        columns = model_columns(entry, info)
        context = opts.context or int(seq_len or cfg.max_seq_len)
        settings = ScoreSettings(
            context=context,
            stride=opts.stride,
            pack_len=opts.pack_len,
            batch_tokens=opts.batch_tokens,
            dtype=opts.dtype,
        )
        for spec in specs:
            eval_set = evaluator.eval_set(spec, opts.sets.data_dir)
            path = dump_path(opts.out_dir, eval_set.name, entry.model_id)
            if _agreed_exists(path) and not opts.force:
                continue
            encoded = evaluator.encoded(eval_set, tok)
            evaluator.check(eval_set, encoded, tok.key)
            if is_main:
                evaluator.score_and_write(model, entry, columns, eval_set, encoded, path, settings, tok)
            else:  # score too (collective forward), write nothing
                score_requests(model, encoded.requests, settings)

    return hook


def _agreed_exists(path: Path) -> bool:
    """Whether the dump exists, as rank 0 sees it (so all ranks skip or score together)."""
    exists = is_finished_dump(path)  # eval: garbage at the path is not done
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = [exists]
        torch.distributed.broadcast_object_list(flag, src=0)
        exists = bool(flag[0])
    return exists
