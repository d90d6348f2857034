"""Tokenise eval sets into scoring requests, score them in packed batches, compute metrics.

Everything here follows lm-evaluation-harness 0.4 (``HFLM`` with default settings), so that the
same model on the same data gives the same log-likelihoods to fp32 rounding:

Start tokens (:class:`StartTokens`, ``--start-token``)
    ``auto`` (default, as lm-eval): every tokenised context and document gets the special tokens
    the tokenizer itself prepends (as transformers' tokenizer does when it is installed, else
    tokenizer.json's post-processor; Llama: BOS, Qwen3 base and our exports: nothing). ``bos`` / ``eos``:
    that one token is prepended; ``none``: nothing. A document (rolling log-likelihood) or an
    empty context is always predicted from one *prefix* token -- lm-eval's ``prefix_token_id``:
    the BOS if the tokenizer has one, else the EOS (``bos``/``eos``: that token) -- so its first
    token is scored. With ``auto`` and a BOS-adding tokenizer that prefix is followed by the
    tokenizer's BOS, which is then scored too (lm-eval does the same).
Context/continuation boundary
    Trailing whitespace of a context moves into the continuation (``"Answer: " + "Paris"`` is
    scored as ``"Answer:" + " Paris"``), then context + continuation is tokenised as one string
    and the continuation is what follows the context's own token count.
Windows
    A text longer than the context is scored in disjoint windows of ``context`` new tokens each,
    the last one ending at the text's end with a full context (lm_eval.utils.
    get_rolling_token_windows): ``stride = context`` (the default). A request longer than the
    context keeps its last ``context`` tokens (lm-eval's left truncation).
Bytes
    The bytes of a scored continuation are those of its scored tokens (byte-level BPE: exactly,
    from the token strings; other tokenizers: the text from the first scored token's offset).

Exactness: per-token losses come from the model's (fused) cross-entropy in fp32 with any z-loss
switched off, and are summed per example in float64, so a packed, batched score equals an
unbatched float64 computation on the same tokens to fp32 rounding (tested).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from relscale.errors import ConfigError
from relscale.eval.formats import BadRow, EvalSet
from relscale.eval.packing import Request, iter_batches, iter_row_batches

LN2 = math.log(2.0)
START_POLICIES = ("auto", "bos", "eos", "none")


# --------------------------------------------------------------------------------- start tokens
@dataclass(frozen=True)
class StartTokens:
    """What precedes the tokens of a context or document (see the module docstring).

    ``prefix``: ids prepended to every tokenised context and document (``auto``: the tokenizer's
    own special tokens); ``first``: the id a document or an empty context is predicted from
    (lm-eval's ``prefix_token_id``); ``first_text``: its text (lm-eval adds no special tokens to
    a string that already starts with it); ``policy``: how it was chosen, for provenance."""

    policy: str
    prefix: tuple[int, ...]
    first: int
    first_text: str = ""

    def describe(self) -> dict:
        """The policy and ids as a JSON-able dict (stored in the dumps' settings)."""
        return {"policy": self.policy, "prefix_ids": list(self.prefix), "first_id": self.first}


def tokenizer_prefix(tokenizer) -> tuple[int, ...]:
    """The special token ids a ``tokenizers.Tokenizer`` prepends when asked to add special tokens
    (its post-processor). Raises ConfigError when it also appends some (lm-eval would score
    them inside every continuation; choose an explicit --start-token instead)."""
    probe = "a b"
    plain = tokenizer.encode(probe, add_special_tokens=False).ids
    special = tokenizer.encode(probe, add_special_tokens=True).ids
    for k in range(len(special) - len(plain) + 1):
        if special[k : k + len(plain)] == plain:
            if k + len(plain) != len(special):
                raise ConfigError(
                    "the tokenizer appends special tokens after a text (its post-processor); "
                    "pass --start-token bos, eos or none"
                )
            return tuple(special[:k])
    raise ConfigError("cannot tell which special tokens the tokenizer adds; pass --start-token bos|eos|none")


def resolve_start(
    tokenizer,
    policy: str | None,
    *,
    bos_id: int | None,
    eos_id: int | None,
    add_bos: bool | None = None,
    where: str = "tokenizer",
) -> StartTokens:
    """The :class:`StartTokens` of a policy: ``auto`` (None) | ``bos`` | ``eos`` | ``none`` | a
    token string or integer id (prepended like ``bos``).

    ``bos_id``/``eos_id``: the tokenizer's configured BOS/EOS (None if it has none); ``add_bos``:
    whether the tokenizer prepends its BOS when known (transformers' answer, see
    :func:`hf_special_tokens`), else None: the post-processor decides. Raises ConfigError naming
    the missing token."""
    policy = "auto" if policy is None else str(policy)

    def text_of(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    def need(token_id: int | None, name: str) -> int:
        if token_id is None:
            raise ConfigError(f"--start-token {policy}: {where} has no {name} token configured")
        return token_id

    if policy == "auto":
        first = bos_id if bos_id is not None else need(eos_id, "BOS or EOS")
        if add_bos is True:
            prefix: tuple[int, ...] = (need(bos_id, "BOS"),)
        elif add_bos is False:
            prefix = ()
        else:
            prefix = tokenizer_prefix(tokenizer)
        return StartTokens("auto", prefix, first, text_of(first))
    if policy == "none":
        first = bos_id if bos_id is not None else need(eos_id, "BOS or EOS")
        return StartTokens("none", (), first, text_of(first))
    if policy in ("bos", "eos"):
        token_id = need(bos_id if policy == "bos" else eos_id, policy.upper())
        return StartTokens(policy, (token_id,), token_id, text_of(token_id))
    if policy.lstrip("-").isdigit():
        token_id = int(policy)
        if not 0 <= token_id < tokenizer.get_vocab_size(with_added_tokens=True):
            raise ConfigError(f"--start-token {policy}: id outside the vocabulary")
    else:
        token_id = tokenizer.token_to_id(policy)
        if token_id is None:
            raise ConfigError(
                f"--start-token {policy!r}: neither auto, bos, eos, none nor a token of the vocabulary"
            )
    return StartTokens(f"token:{policy}", (token_id,), token_id, text_of(token_id))


def _transformers_adds_bos(model_dir, bos_id: int | None) -> bool | None:
    """Whether transformers' tokenizer for ``model_dir`` prepends the BOS (what lm-eval's HF model
    uses): True / False, or None when transformers is missing or cannot load it. Whether
    ``add_bos_token`` counts depends on the tokenizer class (Llama's honours it, the generic
    PreTrainedTokenizerFast follows tokenizer.json's post-processor), so it is asked, not guessed."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        plain = tok("a b", add_special_tokens=False)["input_ids"]
        special = tok("a b")["input_ids"]
    except Exception:  # noqa: BLE001 -- any loading problem: fall back to the post-processor
        return None
    if special == plain:
        return False
    if bos_id is not None and special == [bos_id, *plain]:
        return True
    return None


def hf_special_tokens(model_dir, tokenizer) -> tuple[int | None, int | None, bool | None]:
    """(bos_id, eos_id, adds_bos) of a Hugging Face checkpoint directory, as transformers'
    tokenizer sees them: ``bos_token``/``eos_token`` of tokenizer_config.json (else
    special_tokens_map.json); the EOS falls back to config.json's ``eos_token_id``; a BOS only
    from the tokenizer files (Qwen3 base has none, so lm-eval's prefix token is its EOS).
    ``adds_bos``: whether transformers' tokenizer prepends the BOS (asked when transformers is
    installed), else None: then tokenizer.json's post-processor decides."""
    from pathlib import Path

    model_dir = Path(model_dir)

    def read(name: str) -> dict:
        path = model_dir / name
        if not path.is_file():
            return {}
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
        return value if isinstance(value, dict) else {}

    tok_config, special_map, config = (
        read("tokenizer_config.json"),
        read("special_tokens_map.json"),
        read("config.json"),
    )

    def token_id(key: str) -> int | None:
        for source in (tok_config, special_map):
            value = source.get(key)
            if isinstance(value, dict):  # {"content": "<s>", ...}
                value = value.get("content")
            if isinstance(value, str):
                return tokenizer.token_to_id(value)
        return None

    eos_id = token_id("eos_token")
    if eos_id is None:
        eos = config.get("eos_token_id")
        eos_id = eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None
    bos_id = token_id("bos_token")
    return bos_id, eos_id, _transformers_adds_bos(model_dir, bos_id)


def as_start(start: StartTokens | int) -> StartTokens:
    """An integer id means: prepend this token everywhere (the ``bos``/``eos`` policies)."""
    if isinstance(start, StartTokens):
        return start
    return StartTokens(f"id:{int(start)}", (int(start),), int(start))


# ------------------------------------------------------------------------------------- encoding
@dataclass
class Encoded:
    """Requests of an eval set for one tokenizer; ``kept`` indexes the examples scored.

    ``n_bytes``: UTF-8 bytes of the scored tokens, per request (text sets: one request per
    example; mc sets: one per choice); ``choice_slices``: the requests of each kept mc example."""

    requests: list[Request]
    kept: list[int]
    n_bytes: list[int]
    choice_slices: list[slice]
    bad_rows: list[BadRow]


def _encode(tokenizer, texts: list[str]):
    return tokenizer.encode_batch(texts, add_special_tokens=False)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2): printable Latin-1 bytes
    map to themselves, the other 68 to code points 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _is_byte_level(tokenizer) -> bool:
    spec = json.loads(tokenizer.to_str())

    def has(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(spec.get("pre_tokenizer")) or has(spec.get("decoder"))


@lru_cache(maxsize=8)
def _token_byte_lengths(tokenizer) -> np.ndarray | None:
    """Bytes per token id for a byte-level BPE (None for other tokenizers). Added (special)
    tokens count the UTF-8 bytes of their text."""
    if not _is_byte_level(tokenizer):
        return None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    lengths = np.zeros(size, dtype=np.int64)
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        lengths[token_id] = sum(1 if c in _UNICODE_TO_BYTE else len(c.encode("utf-8")) for c in token)
    specials = {a.content for a in tokenizer.get_added_tokens_decoder().values()}
    for token in specials:
        lengths[tokenizer.token_to_id(token)] = len(token.encode("utf-8"))
    return lengths


def scored_bytes(tokenizer, ids: list[int], text: str, offsets: list[tuple[int, int]], first: int) -> int:
    """UTF-8 bytes of ``ids[first:]``, the scored tokens of an encoding of ``text``."""
    lengths = _token_byte_lengths(tokenizer)
    if lengths is not None:
        return int(lengths[np.asarray(ids[first:], dtype=np.int64)].sum())
    if first >= len(ids):
        return 0
    return len(text[offsets[first][0] :].encode("utf-8"))


def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's boundary rule: the context's trailing whitespace moves into the continuation."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def _prefix_for(start: StartTokens, text: str) -> tuple[int, ...]:
    # lm-eval adds no special tokens to a text that already starts with its prefix token's text.
    if start.policy == "auto" and start.first_text and text.startswith(start.first_text):
        return ()
    return start.prefix


def encode_text_set(
    eval_set: EvalSet, tokenizer, start: StartTokens | int, prefix_tokens: int = 0
) -> Encoded:
    """``[first] + prefix + tokens(text)`` (lm-eval's rolling log-likelihood), every token after
    ``first`` scored; with ``prefix_tokens`` = K, only the document's tokens after its first K
    (a conditional continuation, whose bytes are those of its scored tokens)."""
    start = as_start(start)
    encodings = _encode(tokenizer, [ex.text for ex in eval_set.examples])
    out = Encoded([], [], [], [], [])
    for i, (example, encoding) in enumerate(zip(eval_set.examples, encodings, strict=True)):
        ids = encoding.ids
        if len(ids) <= prefix_tokens:
            out.bad_rows.append(
                BadRow(
                    eval_set.source,
                    example.example_id,
                    f"{len(ids)} tokens: nothing left to score after {prefix_tokens} prefix tokens",
                )
            )
            continue
        # With `auto`, lm-eval scores the tokenizer's own BOS too (after its prefix token); other
        # policies: the one start token is the prefix token.
        extra = list(_prefix_for(start, example.text)) if start.policy == "auto" else []
        skip = len(extra) + prefix_tokens if prefix_tokens else 0
        tokens = [start.first, *extra, *ids]
        out.requests.append(Request(np.asarray(tokens, dtype=np.int64), 1 + skip))
        out.kept.append(i)
        out.n_bytes.append(scored_bytes(tokenizer, ids, example.text, encoding.offsets, prefix_tokens))
    return out


def encode_mc_set(eval_set: EvalSet, tokenizer, start: StartTokens | int) -> Encoded:
    """One request per choice: context tokens, then the continuation's tokens, split as lm-eval
    splits them (see the module docstring). A choice that adds no token is a bad row."""
    start = as_start(start)
    examples = eval_set.examples
    pairs = [split_trailing_space(ex.context, c) for ex in examples for c in ex.continuations]
    contexts = _encode(tokenizer, [ctx for ctx, _ in pairs])
    wholes = _encode(tokenizer, [ctx + cont for ctx, cont in pairs])
    out = Encoded([], [], [], [], [])
    cursor = 0
    for i, example in enumerate(examples):
        choice_requests, choice_bytes, bad = [], [], None
        for k in range(cursor, cursor + len(example.continuations)):
            ctx_text, cont_text = pairs[k]
            whole = wholes[k]
            if ctx_text:
                prefix = list(_prefix_for(start, ctx_text))
                ctx = prefix + contexts[k].ids
                full = prefix + whole.ids
                cont = full[len(ctx) :]
                n_bytes = scored_bytes(
                    tokenizer, whole.ids, ctx_text + cont_text, whole.offsets, len(contexts[k].ids)
                )
            else:  # lm-eval: an empty context is the prefix token alone
                cont_enc = tokenizer.encode(cont_text, add_special_tokens=False)
                cont = cont_enc.ids
                ctx = [start.first]
                first = 0
                if cont and cont[0] == start.first:
                    ctx, cont, first = cont[:1], cont[1:], 1
                n_bytes = scored_bytes(tokenizer, cont_enc.ids, cont_text, cont_enc.offsets, first)
            if not cont:
                bad = f"choice {example.continuations[k - cursor]!r} tokenises to nothing after the prompt"
                break
            choice_requests.append(Request(np.asarray([*ctx, *cont], dtype=np.int64), len(ctx)))
            choice_bytes.append(n_bytes)
        cursor += len(example.continuations)
        if bad:
            out.bad_rows.append(BadRow(eval_set.source, example.example_id, bad))
            continue
        out.choice_slices.append(slice(len(out.requests), len(out.requests) + len(choice_requests)))
        out.requests.extend(choice_requests)
        out.n_bytes.extend(choice_bytes)
        out.kept.append(i)
    return out


def encode_set(eval_set: EvalSet, tokenizer, start: StartTokens | int, prefix_tokens: int = 0) -> Encoded:
    """Requests of a text or mc eval set (see :func:`encode_text_set`, :func:`encode_mc_set`)."""
    if eval_set.kind == "text":
        return encode_text_set(eval_set, tokenizer, start, prefix_tokens)
    return encode_mc_set(eval_set, tokenizer, start)


# -------------------------------------------------------------------------------------- scoring
@dataclass
class ScoreSettings:
    """How requests are scored: window length ``context`` and ``stride`` (tokens), row length
    ``pack_len`` and tokens per forward pass ``batch_tokens``, precision ``dtype``, row
    ``layout``. Built from options by :func:`relscale.eval.options.score_settings`."""

    context: int  # most tokens a window sees (default: the model's training sequence length)
    stride: int | None = None  # new targets per window after the first; None: context (lm-eval)
    pack_len: int | None = None  # row length; None: the context
    batch_tokens: int = 16384  # tokens per forward pass (rows = batch_tokens // pack_len)
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    progress: bool = False
    # packed: windows share rows (document-masked attention; fast with the GPU's varlen kernel);
    # rows: one window per row, rows of the batch's longest window (plain causal attention: the
    # fast path on the CPU, where a document mask means dense masked attention); auto: rows on
    # the CPU, packed elsewhere. Scores are the same either way.
    layout: str = "auto"

    def resolved(self) -> tuple[int, int, int]:
        """(stride, pack_len, rows per batch) with the defaults filled in."""
        stride = self.stride if self.stride is not None else self.context
        pack_len = self.pack_len if self.pack_len is not None else self.context
        return stride, pack_len, max(1, self.batch_tokens // pack_len)


@dataclass
class ScoreResult:
    """What :func:`score_requests` returns: per-request summed NLL and token counts, seconds."""

    nll: np.ndarray  # float64 (n_requests,): summed NLL (nats) of each request's scored tokens
    tokens_forward: int  # tokens run through the model, padding included
    tokens_real: int  # of which not padding
    tokens_scored: int
    seconds: float
    greedy: np.ndarray | None = None  # bool (n_requests,): every scored token was the argmax


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode with the z-loss off (we want the plain NLL); both restored afterwards."""
    core = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    cfg = getattr(core, "cfg", None)
    z_loss = getattr(cfg, "z_loss", 0.0)
    was_training = model.training
    model.eval()
    if cfg is not None:
        cfg.z_loss = 0.0
    try:
        yield
    finally:
        if cfg is not None:
            cfg.z_loss = z_loss
        model.train(was_training)


def autocast_for(device: torch.device, dtype: str):
    """The autocast context of ``dtype`` on ``device``: bf16 for "bf16" (and "auto" on CUDA),
    none for "fp32" (and "auto" elsewhere). ValueError for another dtype."""
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if dtype not in ("auto", "fp32"):
        raise ValueError(f"dtype {dtype!r}: choose auto, fp32 or bf16")
    return contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s (first) parameters: the one place eval asks a model this."""
    return next(model.parameters()).device


def _head_at_scored(core, tokens, targets, positions, cu_seqlens, max_seqlen):
    """Log-probabilities (n_scored, V) in fp32 at the scored positions only (the output head runs
    on those rows alone), and those positions' indices into the flattened batch."""
    hidden = core.hidden_states(tokens, positions, cu_seqlens, max_seqlen)
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    scored = torch.nonzero(targets.reshape(-1) >= 0).squeeze(1)
    return scored, torch.log_softmax(core.output(flat_h[scored]).float(), dim=-1)


def shared_single_token_groups(requests: list[Request]) -> list[list[int]]:
    """Groups (>= 2) of requests that score one token after the same input tokens: multiple-choice
    answers of one token ("A".."D") after one prompt. They need one forward pass between them
    (lm-eval's HF model does the same); the group's first request is the one run."""
    groups: dict[bytes, list[int]] = {}
    for i, request in enumerate(requests):
        if request.n_scored == 1 and request.score_from >= 1:
            groups.setdefault(request.tokens[:-1].tobytes(), []).append(i)
    return [members for members in groups.values() if len(members) > 1]


def score_requests(
    model: torch.nn.Module, requests: list[Request], settings: ScoreSettings, *, greedy: bool = False
) -> ScoreResult:
    """Summed NLL of every request's scored tokens, from packed, document-masked batches.

    ``greedy``: also whether every scored token is the model's argmax (lm-eval's ``is_greedy``),
    in ``ScoreResult.greedy``. Requests that score one token after identical input tokens are run
    once (:func:`shared_single_token_groups`); then, and with ``greedy``, the head runs on the
    scored positions only, in fp32, instead of the fused cross-entropy."""
    stride, pack_len, batch_rows = settings.resolved()
    device = model_device(model)
    # Past a torch.compile wrapper: eval shapes would trigger recompiles; FSDP's hooks live on
    # the module itself, so they still run.
    forward = getattr(model, "_orig_mod", model)
    n_all = len(requests)
    shared = shared_single_token_groups(requests)
    followers = {i for members in shared for i in members[1:]}
    run = [i for i in range(n_all) if i not in followers]  # the requests actually scored
    slot = {i: k for k, i in enumerate(run)}
    # slot of a group's lead -> (original ids, their target tokens)
    members_of = {
        slot[m[0]]: (np.asarray(m), np.asarray([int(requests[i].tokens[-1]) for i in m])) for m in shared
    }
    use_head = greedy or bool(shared)
    n = len(run)
    # One extra slot collects the (zero) losses of unscored positions, so no boolean indexing
    # (and no host-device sync) is needed per batch.
    sums = torch.zeros(n + 1, dtype=torch.float64, device=device)
    misses = torch.zeros(n + 1, dtype=torch.int64, device=device)  # non-argmax scored tokens
    member_nll = np.zeros(n_all)
    member_greedy = np.ones(n_all, dtype=bool)
    tokens_forward = real = 0
    layout = settings.layout if settings.layout != "auto" else ("rows" if device.type == "cpu" else "packed")
    if layout not in ("rows", "packed"):
        raise ValueError(f"layout {settings.layout!r}: choose auto, rows or packed")
    if layout == "rows":
        batches = iter_row_batches(
            [requests[i] for i in run], settings.context, stride, settings.batch_tokens
        )
    else:
        batches = iter_batches([requests[i] for i in run], settings.context, stride, pack_len, batch_rows)
    if settings.progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="scoring", unit="batch", leave=False)
    start = time.perf_counter()
    with torch.no_grad(), eval_mode(model), autocast_for(device, settings.dtype):
        for batch in batches:
            owner = np.where(batch.owner >= 0, batch.owner, n)
            tokens, targets, positions, owner_t = (
                torch.from_numpy(a).to(device, non_blocking=True)
                for a in (batch.tokens, batch.targets, batch.positions, owner)
            )
            cu_seqlens = torch.from_numpy(batch.cu_seqlens).to(device, non_blocking=True)
            if batch.one_per_row:  # padding only after each window: causal attention is exact
                cu_seqlens = None
            if not use_head:
                losses = forward(
                    tokens,
                    targets,
                    positions=positions,
                    cu_seqlens=cu_seqlens,
                    max_seqlen=batch.max_seqlen,
                    reduction="none",
                )
                sums.index_add_(0, owner_t, losses.reshape(-1).double())
            else:
                scored, logp = _head_at_scored(
                    forward, tokens, targets, positions, cu_seqlens, batch.max_seqlen
                )
                chosen = targets.reshape(-1)[scored]
                owners = owner_t[scored]
                sums.index_add_(0, owners, (-logp.gather(1, chosen[:, None])[:, 0]).double())
                if greedy:
                    misses.index_add_(0, owners, (logp.argmax(dim=-1) != chosen).long())
                if members_of:  # every member's token from its group's one scored position
                    scored_owner = owner[np.nonzero(batch.targets.reshape(-1) >= 0)[0]]
                    rows, cols, dest = [], [], []
                    for k, u in enumerate(scored_owner):
                        if u in members_of:
                            ids, toks = members_of[u]
                            rows += [k] * len(ids)
                            cols += toks.tolist()
                            dest += ids.tolist()
                    if rows:
                        rows_t = torch.as_tensor(rows, device=device)
                        cols_t = torch.as_tensor(cols, device=device)
                        member_nll[dest] = (-logp[rows_t, cols_t]).double().cpu().numpy()
                        member_greedy[dest] = (logp[rows_t].argmax(dim=-1) == cols_t).cpu().numpy()
            tokens_forward += batch.tokens.size
            real += batch.n_real_tokens
    run_nll = sums[:n].cpu().numpy()
    nll = np.empty(n_all)
    nll[run] = run_nll
    is_greedy = None
    if greedy:
        is_greedy = np.empty(n_all, dtype=bool)
        is_greedy[run] = (misses[:n] == 0).cpu().numpy()
    for members in shared:
        nll[members] = member_nll[members]
        if is_greedy is not None:
            is_greedy[members] = member_greedy[members]
    seconds = time.perf_counter() - start
    scored_tokens = sum(r.n_scored for r in requests)
    return ScoreResult(nll, tokens_forward, real, scored_tokens, seconds, is_greedy)


# -------------------------------------------------------------------------------------- metrics
def text_metrics(eval_set: EvalSet, encoded: Encoded, nll: np.ndarray) -> list[dict]:
    """Per example: summed NLL (nats), scored tokens and bytes, bits per byte."""
    rows = []
    for k, i in enumerate(encoded.kept):
        n_bytes = encoded.n_bytes[k]
        rows.append(
            {
                "example_id": eval_set.examples[i].example_id,
                "groups": eval_set.examples[i].groups,
                "nll": float(nll[k]),
                "n_tokens": int(encoded.requests[k].n_scored),
                "n_bytes": int(n_bytes),
                "bpb": float(nll[k]) / (LN2 * n_bytes) if n_bytes else float("nan"),
            }
        )
    return rows


def _softmax_at(values: np.ndarray, index: int) -> float:
    shifted = values - values.max()
    weights = np.exp(shifted)
    return float(weights[index] / weights.sum())


def mc_metrics(eval_set: EvalSet, encoded: Encoded, nll: np.ndarray) -> list[dict]:
    """Per example, as lm-evaluation-harness 0.4 computes them (api/task.py, multiple_choice):

    ``choice_logprobs`` (nats, summed over each continuation's tokens), ``acc`` = argmax is the
    answer (first index on ties); ``acc_norm``: argmax of logprob / characters of the choice text
    (lm-eval's ``acc_norm``; the text without the separator, ``len(str)``), ``acc_bytes``: the
    same per UTF-8 byte. ``choice_logprobs_norm``: logprob per UTF-8 byte of the choice text;
    ``choice_logprob`` / ``choice_logprob_norm``: those of the right answer; ``prob_correct`` /
    ``choice_prob_norm``: softmax over the choices of the raw / byte-normalised log-probs, at the
    answer. ``nll``, ``n_tokens``, ``n_bytes``, ``bpb``: the right answer's NLL, scored tokens,
    bytes of its scored tokens (whitespace moved from the prompt included) and bits per byte.
    """
    rows = []
    for k, i in enumerate(encoded.kept):
        example = eval_set.examples[i]
        part = encoded.choice_slices[k]
        logprobs = -nll[part]
        n_tokens = np.array([r.n_scored for r in encoded.requests[part]], dtype=np.int64)
        scored_bytes_ = np.asarray(encoded.n_bytes[part], dtype=np.int64)
        texts = example.choice_texts or example.continuations
        chars = np.array([max(len(t), 1) for t in texts], dtype=np.float64)
        text_bytes = np.array([max(len(t.encode("utf-8")), 1) for t in texts], dtype=np.float64)
        per_byte = logprobs / text_bytes
        answer = example.answer
        nll_correct = float(nll[part][answer])
        rows.append(
            {
                "example_id": example.example_id,
                "groups": example.groups,
                "prompt": example.context,
                "choices": list(example.continuations),
                "choice_logprobs": logprobs.tolist(),
                "choice_logprobs_norm": per_byte.tolist(),
                "choice_n_tokens": n_tokens.tolist(),
                "choice_n_bytes": scored_bytes_.tolist(),
                "answer": int(answer),
                "choice_logprob": float(logprobs[answer]),
                "choice_logprob_norm": float(per_byte[answer]),
                "choice_prob_norm": _softmax_at(per_byte, answer),
                "logprob_correct": float(logprobs[answer]),
                "prob_correct": _softmax_at(logprobs, answer),
                "acc": float(int(np.argmax(logprobs)) == answer),
                "acc_norm": float(int(np.argmax(logprobs / chars)) == answer),
                "acc_bytes": float(int(np.argmax(per_byte)) == answer),
                "nll": nll_correct,
                "n_tokens": int(n_tokens[answer]),
                "n_bytes": int(scored_bytes_[answer]),
                "bpb": nll_correct / (LN2 * scored_bytes_[answer]) if scored_bytes_[answer] else float("nan"),
            }
        )
    return rows


def metrics(eval_set: EvalSet, encoded: Encoded, nll: np.ndarray) -> list[dict]:
    """Per-example metric rows of a scored eval set (text or mc)."""
    return (text_metrics if eval_set.kind == "text" else mc_metrics)(eval_set, encoded, nll)
