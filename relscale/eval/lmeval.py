"""relscale models inside lm-evaluation-harness (optional extra ``lmeval``): ``--model relscale``.

lm-eval 0.4 finds models only in its own registry (``@register_model``; no entry points), so the
model must be registered by importing this module before lm-eval resolves the name. Two ways:

    relscale-lm-eval --model relscale --model_args pretrained=runs/tiny/final --tasks mmlu
    python -m relscale.eval.lmeval --model relscale --model_args pretrained=PATH --tasks ...

both run lm-eval's own command line (every lm-eval flag works) with the model registered; from
Python, ``import relscale.eval.lmeval`` then ``lm_eval.simple_evaluate(model="relscale", ...)``.

``pretrained``: anything ``relscale eval`` takes that holds one model -- a model directory
(``<run>/final``), a run, a Hugging Face Llama/Qwen3 directory, or a sweep or run with
``run=RUN_ID`` / ``step=N`` picking one model. Other model arguments: ``tokenizer`` (a
tokenizer.json), ``data`` (the prepared data directory, for the tokenizer), ``start_token``
(auto | bos | eos | none | a token; default auto, as lm-eval's HF model), ``max_length`` (the
context; default the model's ``max_seq_len``, which is what ``--model hf`` uses on our HF export),
``batch_tokens``, ``device``, ``dtype`` (auto | fp32 | bf16), ``threads``.

Requests are scored with relscale's packed scorer (:mod:`relscale.eval.scoring`): the same
tokenisation, start tokens and windows as lm-eval's HF model, many requests per packed forward.
``loglikelihood`` (with ``is_greedy``) and ``loglikelihood_rolling`` are supported; generation
is refused (relscale scores, it does not sample).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from relscale.errors import ConfigError

try:
    # lm-eval fills its registry with its own models only while the registry is empty, so they
    # are loaded first (lazily, by name) or registering ours would hide them.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # the optional extra is not installed
    raise ImportError(
        "relscale.eval.lmeval needs lm-evaluation-harness: pip install 'relscale[lmeval]'"
    ) from err

MODEL_NAME = "relscale"


def _none_or(value: Any, kind):
    return None if value in (None, "", "None") else kind(value)


@register_model(MODEL_NAME)
class RelscaleLM(LM):
    """An lm-eval ``LM`` scoring with a relscale (or HF Llama/Qwen3) checkpoint; see the module
    docstring for the arguments. Raises ConfigError / DataError for a path that holds no single
    model or an unknown start-token policy."""

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        data: str | None = None,
        start_token: str | None = "auto",
        max_length: int | None = None,
        batch_tokens: int = 16384,
        device: str | None = None,
        dtype: str = "auto",
        threads: int | None = None,
        run: str | None = None,
        step: int | None = None,
        batch_size: Any = None,  # lm-eval passes these; packing sizes batches by tokens instead
        max_batch_size: Any = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        import torch

        from relscale.eval.discover import discover_models, read_info
        from relscale.eval.models import load_tokenizer_for, load_weights, resolve_device
        from relscale.eval.options import RunOptions, score_settings
        from relscale.eval.sets import SetOptions

        if unused:
            raise ConfigError(f"--model_args: unknown argument(s) {sorted(unused)} for --model relscale")
        threads = _none_or(threads, int)
        if threads is not None:
            torch.set_num_threads(threads)
        step = _none_or(step, int)
        entries = discover_models([pretrained], checkpoints=step is not None)
        if run is not None:
            entries = [e for e in entries if e.model_id.split("@")[0] == str(run)]
        if step is not None:
            entries = [e for e in entries if e.step == step]
        if len(entries) != 1:
            ids = ", ".join(e.model_id for e in entries) or "none"
            raise ConfigError(
                f"pretrained={pretrained}: {len(entries)} models match ({ids}); pick one with run=ID / step=N"
            )
        entry = entries[0]
        opts = RunOptions(
            sets=SetOptions(data_dir=_none_or(data, Path)),
            tokenizer=_none_or(tokenizer, Path),
            start_token=None if start_token in (None, "", "auto") else str(start_token),
            dtype=str(dtype),
        )
        info = read_info(entry, opts)
        self._tok = load_tokenizer_for(entry, info, opts)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes device=cuda by default; its HF model falls back to the
            # CPU then, and so does this one (with a word, not a traceback)
            warnings.warn(f"relscale: device {device!r} requested but CUDA is not available; using the CPU",
                          stacklevel=2)
            device = "cpu"
        self._device = resolve_device("auto" if device in (None, "", "auto") else str(device))
        self._model = load_weights(entry, info.cfg, self._device)
        context = _none_or(max_length, int) or info.cfg.max_seq_len
        if context > info.cfg.max_seq_len:
            raise ConfigError(f"max_length={context} exceeds the model's max_seq_len {info.cfg.max_seq_len}")
        self._context = context
        opts.batch_tokens = max(int(batch_tokens), context)
        self._score_settings = score_settings(opts, context)
        self._entry = entry

    # lm-eval reads these
    @property
    def device(self):
        """The torch device the model runs on."""
        return self._device

    @property
    def max_length(self) -> int:
        """Tokens per window (lm-eval's max_length)."""
        return self._context

    @property
    def tokenizer_name(self) -> str:
        """A name lm-eval's request cache keys on: ``relscale-<tokenizer sha256, 16 hex>``."""
        return f"relscale-{self._tok.key}"

    def get_model_info(self) -> dict:
        """Provenance lm-eval stores in its results' config."""
        return {
            "relscale_model_id": self._entry.model_id,
            "relscale_source": str(self._entry.path),
            "relscale_start_tokens": self._tok.start.describe(),
            "relscale_context": self._context,
        }

    def _settings(self):
        """The scoring settings (built once from the model arguments)."""
        return self._score_settings

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log-probability in nats, is_greedy) of each request's continuation after its context,
        tokenised and split exactly as lm-eval's HF model does."""
        from relscale.eval.formats import EvalSet, MCExample
        from relscale.eval.scoring import encode_mc_set, score_requests

        pairs = [req.args for req in requests]
        examples = [MCExample(str(i), ctx, [cont], 0) for i, (ctx, cont) in enumerate(pairs)]
        encoded = encode_mc_set(EvalSet("lm-eval", "mc", examples), self._tok.tokenizer, self._tok.start)
        result = score_requests(self._model, encoded.requests, self._settings(), greedy=True)
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)  # a continuation of no tokens
        for k, i in enumerate(encoded.kept):
            out[i] = (-float(result.nll[k]), bool(result.greedy[k]))
        for pair, value in zip(pairs, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, value)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-probability (nats) of each whole text, in lm-eval's disjoint windows of
        ``max_length`` tokens, the first token predicted from the prefix token."""
        from relscale.eval.formats import EvalSet, TextExample
        from relscale.eval.scoring import encode_text_set, score_requests

        texts = [req.args[0] for req in requests]
        examples = [TextExample(str(i), text) for i, text in enumerate(texts)]
        encoded = encode_text_set(EvalSet("lm-eval", "text", examples), self._tok.tokenizer, self._tok.start)
        result = score_requests(self._model, encoded.requests, self._settings())
        out = [0.0] * len(texts)  # an empty text: no windows, 0 (as lm-eval)
        for k, i in enumerate(encoded.kept):
            out[i] = -float(result.nll[k])
        for text, value in zip(texts, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), value)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Refused: relscale scores log-likelihoods; generative tasks need --model hf (on an export:
        relscale eval MODEL --export-hf DIR)."""
        raise NotImplementedError(
            "--model relscale scores log-likelihoods only (multiple_choice, loglikelihood, "
            "loglikelihood_rolling tasks); for generative tasks export the model "
            "(relscale eval MODEL --export-hf DIR) and use --model hf"
        )


def main(argv: list[str] | None = None) -> None:
    """``relscale-lm-eval``: lm-eval's command line with ``--model relscale`` registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
