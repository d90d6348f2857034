"""Attention throughput: relscale's Triton flash attention vs PyTorch SDPA backends and flash-attn.

TFLOP/s follow FlashAttention's convention: a causal forward counts half the dense FLOPs,
4 * B * S^2 * H * D / 2, and the backward 2.5x the forward. Document-masked (packed) shapes count
only the FLOPs of the unmasked causal blocks of each document, 4 * sum(len^2) * H * D / 2.

Profiles: 'ci' = tiny shapes that run on the CPU under TRITON_INTERPRET in seconds (they prove the
script works; the numbers mean nothing); 'full' = the GPU shapes (head dims 64/128, seq
512..16384, 16k and 64k tokens, bf16, plus documents of mean length ~600 packed in 4096-token
sequences); 'tune' = a sweep of block configurations of our kernels at seq 4096 (GPU).

    python bench/bench_attention.py [--profile ci|full|tune] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # our kernels only run on the CPU through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import datasheet_bf16_tflops, device_name, flops_record, time_fn, write_results  # noqa: E402
from relscale.kernels import flash_attention as fa  # noqa: E402

NAME = "attention"
GOALS = [
    "H100 bf16 causal d=128, seq >= 2048: forward >= 400 TFLOP/s",
    "H100 bf16 causal d=128, seq >= 2048: forward+backward >= 300 TFLOP/s",
    "faster than SDPA's default choice on every shape",
    "document-masked time proportional to the unmasked work (time_per_work_vs_causal ~ 1)",
]
PROFILES = {
    "ci": {
        "dtype": torch.bfloat16, "hidden": 128, "head_dims": (64,), "shapes": ((32, 64),),
        "packed": {"seq": 64, "tokens": 128, "mean_doc": 12, "head_dim": 64}, "warmup": 0, "rep": 0,
    },
    # quick: the headline shape only (d=128, seq 4096, causal, 16k tokens), no packed documents
    "quick": {
        "dtype": torch.bfloat16, "hidden": 2048, "head_dims": (128,), "shapes": ((4096, 16384),),
        "packed": None, "warmup": 25, "rep": 100,
    },
    "full": {
        "dtype": torch.bfloat16, "hidden": 2048, "head_dims": (64, 128),
        # (seq, total tokens): every length at 16k tokens, the long ones also at 64k
        "shapes": ((512, 16384), (1024, 16384), (2048, 16384), (4096, 16384), (8192, 16384),
                   (16384, 16384), (4096, 65536), (16384, 65536)),
        "packed": {"seq": 4096, "tokens": 32768, "mean_doc": 600, "head_dim": 128}, "warmup": 25, "rep": 100,
    },
}
GOAL_TFLOPS = {"fwd": 400.0, "fwd_bwd": 300.0}  # H100 bf16, causal, d=128, seq >= 2048
SDPA_BACKENDS = ("default", "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
DIRECTIONS = ("fwd", "bwd", "fwd_bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def causal_fwd_flops(batch: int, seq: int, heads: int, head_dim: int) -> float:
    return 4.0 * batch * seq * seq * heads * head_dim / 2


def packed_doc_lengths(n_seqs: int, seq: int, mean: float, seed: int = 0) -> list[list[int]]:
    """Document lengths per sequence: exponential draws of mean ``mean``, cut at sequence ends (packing)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_seqs):
        lengths, left = [], seq
        while left > 0:
            draw = 1 + int(torch.empty(1).exponential_(1.0 / max(mean - 1, 1e-9), generator=gen).item())
            lengths.append(min(draw, left))
            left -= lengths[-1]
        out.append(lengths)
    return out


def _sdpa_layout(*tensors: torch.Tensor) -> list[torch.Tensor]:
    # SDPA wants (B, H, S, D); transposing once outside the timed region keeps the copy out of it
    return [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in tensors]


def _sdpa_fn(backend: str, mask: torch.Tensor | None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call(q, k, v):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    if backend == "default":
        return call

    def restricted(q, k, v):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return call(q, k, v)

    return restricted


def _flash_attn_fn(cu_seqlens: torch.Tensor | None, max_seqlen: int):
    import flash_attn  # optional dependency: ImportError is recorded as "missing"

    if cu_seqlens is None:
        return lambda q, k, v: flash_attn.flash_attn_func(q, k, v, causal=True)
    return lambda q, k, v: flash_attn.flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True
    )


def _time_directions(fn, inputs: list[torch.Tensor], warmup: float, rep: float) -> dict[str, dict]:
    """Median times of forward (with autograd recording, as in training), backward, and both."""
    out = fn(*inputs)
    grad = torch.randn_like(out)
    calls = {
        "fwd": lambda: fn(*inputs),
        "bwd": lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True),
        "fwd_bwd": lambda: torch.autograd.grad(fn(*inputs), inputs, grad),
    }
    return {name: time_fn(call, warmup=warmup, rep=rep) for name, call in calls.items()}


def _measure(
    base: dict, fn, inputs, fwd_flops: float, device: str, warmup: float, rep: float,
    reference: torch.Tensor | None = None,
) -> list[dict]:
    """One record per direction; an implementation that cannot run gives one record with the reason."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if reference is not None:  # never time a wrong result
                with torch.no_grad():
                    out = fn(*inputs).float()
                diff = (out - reference).abs().max().item()
                base = {**base, "max_abs_diff_vs_reference": diff, "matches_reference": diff < 0.05}
            times = _time_directions(fn, inputs, warmup, rep)
    except ImportError as err:
        return [{**base, "status": "missing", "reason": f"{type(err).__name__}: {err}"}]
    except Exception as err:  # noqa: BLE001 - a backend refusing a shape is a result to record
        notes = "; ".join(str(w.message) for w in caught)[:1500]
        reason = f"{type(err).__name__}: {str(err)[:500]}" + (f" | warnings: {notes}" if notes else "")
        return [{**base, "status": "error", "reason": reason}]
    return [
        {**base, "status": "ok", "direction": d, **times[d],
         **flops_record(FLOP_FACTOR[d] * fwd_flops, times[d]["median_ms"], device)}
        for d in DIRECTIONS
    ]


def _random(shape, dtype, device, gen) -> torch.Tensor:
    return (
        torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_()
    )


def _compare_with_sdpa_default(records: list[dict], shape: dict, device: str) -> None:
    """Annotate our records of one shape with the speed-up over SDPA's default and the H100 goals."""
    same = [r for r in records if r["status"] == "ok" and all(r.get(key) == v for key, v in shape.items())]
    sdpa_ms = {r["direction"]: r["median_ms"] for r in same if r.get("backend") == "default"}
    on_h100 = "h100" in device_name(device).lower()
    goal_shape = shape["head_dim"] == 128 and shape["seq"] >= 2048
    for rec in same:
        if rec["impl"] != "relscale":
            continue
        if rec["direction"] in sdpa_ms:
            rec["speedup_vs_sdpa_default"] = sdpa_ms[rec["direction"]] / rec["median_ms"]
        goal = GOAL_TFLOPS.get(rec["direction"]) if goal_shape else None
        if goal is not None:
            rec["goal_tflops_h100"] = goal
            rec["meets_goal"] = rec["tflops"] >= goal if on_h100 else None


def _causal_records(settings: dict, device: str) -> list[dict]:
    records = []
    gen = torch.Generator().manual_seed(0)
    dtype, warmup, rep = settings["dtype"], settings["warmup"], settings["rep"]
    for head_dim in settings["head_dims"]:
        heads = settings["hidden"] // head_dim
        config = fa.block_config(fa._head_dim_padded(head_dim), torch.device(device))._asdict()
        for seq, tokens in settings["shapes"]:
            batch = tokens // seq
            q, k, v = (_random((batch, seq, heads, head_dim), dtype, device, gen) for _ in range(3))
            shape = {"kind": "causal", "batch": batch, "seq": seq, "heads": heads, "kv_heads": heads,
                     "head_dim": head_dim, "tokens": batch * seq, "dtype": str(dtype).removeprefix("torch.")}
            flops = causal_fwd_flops(batch, seq, heads, head_dim)
            timing = (flops, device, warmup, rep)
            qs, ks, vs = _sdpa_layout(q, k, v)
            with torch.no_grad():
                ref = F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), is_causal=True)
            for det in (False, True):
                ours = lambda q, k, v, det=det: fa.flash_attention(q, k, v, deterministic=det)  # noqa: E731
                base = {**shape, "impl": "relscale", "deterministic": det, "config": config}
                records += _measure(base, ours, [q, k, v], *timing, ref.transpose(1, 2))
            for backend in SDPA_BACKENDS:
                base = {**shape, "impl": "sdpa", "backend": backend}
                records += _measure(base, _sdpa_fn(backend, None), [qs, ks, vs], *timing, ref)
            _compare_with_sdpa_default(records, shape, device)
            flash = lambda *x: _flash_attn_fn(None, 0)(*x)  # noqa: E731 - imports inside _measure's try
            base = {**shape, "impl": "flash_attn"}
            records += _measure(base, flash, [q, k, v], *timing, ref.transpose(1, 2))
            del q, k, v, qs, ks, vs, ref
    return records


def _packed_records(settings: dict, device: str) -> list[dict]:
    """Documents packed in fixed-length sequences: our varlen kernel vs our causal kernel on the same
    tokens (time should shrink with the unmasked work) and vs SDPA with an explicit block mask."""
    packed, dtype = settings["packed"], settings["dtype"]
    warmup, rep = settings["warmup"], settings["rep"]
    seq, head_dim = packed["seq"], packed["head_dim"]
    batch, heads = packed["tokens"] // seq, settings["hidden"] // head_dim
    lengths = [n for per_seq in packed_doc_lengths(batch, seq, packed["mean_doc"], seed=0) for n in per_seq]
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=device)
    # causal convention per document: the FLOPs of its len^2 / 2 unmasked scores
    fraction = sum(n * (n + 1) // 2 for n in lengths) / (batch * seq * (seq + 1) // 2)
    doc_flops = 4.0 * sum(n * n for n in lengths) * heads * head_dim / 2
    shape = {"kind": "packed", "batch": batch, "seq": seq, "heads": heads, "kv_heads": heads,
             "head_dim": head_dim, "tokens": batch * seq, "dtype": str(dtype).removeprefix("torch."),
             "n_docs": len(lengths), "mean_doc_len": sum(lengths) / len(lengths), "seed": 0,
             "unmasked_fraction_of_causal": fraction}
    gen = torch.Generator().manual_seed(1)
    q, k, v = (_random((batch * seq, heads, head_dim), dtype, device, gen) for _ in range(3))
    dense = [t.view(batch, seq, heads, head_dim) for t in (q, k, v)]
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).view(batch, seq)
    doc = doc.to(device)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (B, 1, S, S)
    qs, ks, vs = _sdpa_layout(*dense)
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), attn_mask=mask)
    ref_packed = ref.transpose(1, 2).reshape(batch * seq, heads, head_dim)
    timing = (doc_flops, device, warmup, rep)

    ours = lambda q, k, v: fa.flash_attention_varlen(q, k, v, cu_seqlens, seq)  # noqa: E731
    records = _measure({**shape, "impl": "relscale", "masking": "documents"}, ours, [q, k, v], *timing,
                       ref_packed)
    causal_flops = causal_fwd_flops(batch, seq, heads, head_dim)
    causal_recs = _measure({**shape, "impl": "relscale", "masking": "causal_only"}, fa.flash_attention, dense,
                           causal_flops, device, warmup, rep)
    causal_ms = {r["direction"]: r["median_ms"] for r in causal_recs if r["status"] == "ok"}
    for rec in records:
        if rec["status"] == "ok" and rec["direction"] in causal_ms:
            ratio = rec["median_ms"] / causal_ms[rec["direction"]]
            rec["time_vs_causal_only"] = ratio
            rec["time_per_work_vs_causal"] = ratio / fraction  # 1.0 = time exactly proportional to work
    records += causal_recs
    for backend in SDPA_BACKENDS:
        base = {**shape, "impl": "sdpa", "backend": backend, "masking": "explicit_bool_mask"}
        records += _measure(base, _sdpa_fn(backend, mask), [qs, ks, vs], *timing, ref)
    flash = lambda *x: _flash_attn_fn(cu_seqlens, max(lengths))(*x)  # noqa: E731
    records += _measure({**shape, "impl": "flash_attn", "masking": "varlen"}, flash, [q, k, v], *timing,
                        ref_packed)
    return records


TUNE_SHAPE = (4096, 32768)  # (seq, total tokens)
# changes to block_config's defaults worth timing, from sm_90 compiles (register spills, wgmma use)
TUNE_CANDIDATES = {
    64: [{}, {"dkdv_m": 64, "dkdv_stages": 1}, {"dkdv_m": 64, "dkdv_stages": 2}, {"dkdv_warps": 4},
         {"fwd_n": 128, "fwd_stages": 2}, {"fwd_m": 64}, {"dq_n": 64}],
    128: [{}, {"dkdv_stages": 1}, {"dkdv_m": 16}, {"dkdv_m": 64, "dkdv_stages": 1},
          {"dkdv_n": 64, "dkdv_warps": 4, "dkdv_stages": 1}, {"fwd_n": 128, "fwd_stages": 2},
          {"fwd_warps": 4}, {"fwd_stages": 2}, {"dq_n": 64}, {"dq_m": 64, "dq_warps": 4}],
}


def _tune_one(q, k, v, dout, seq: int, cfg: fa.BlockConfig) -> dict[str, dict]:
    scale = q.shape[-1] ** -0.5
    out, lse = fa._forward(q, k, v, None, seq, True, scale, config=cfg)
    timings = {"fwd": time_fn(lambda: fa._forward(q, k, v, None, seq, True, scale, config=cfg))}
    for det in (False, True):
        backward = lambda det=det: fa._backward(  # noqa: E731
            dout, None, q, k, v, out, lse, None, seq, True, scale, det, config=cfg
        )
        timings[f"bwd_det{int(det)}"] = time_fn(backward)
    return timings


def _tune_records(device: str) -> list[dict]:
    """Our kernels under several block configurations (seq 4096, 32k tokens, bf16): a GPU sweep to
    pick the defaults of ``block_config``; 'change' names each candidate's departure from them."""
    records = []
    gen = torch.Generator().manual_seed(2)
    seq, tokens = TUNE_SHAPE
    for head_dim, candidates in TUNE_CANDIDATES.items():
        heads = 2048 // head_dim
        default = fa.block_config(head_dim, torch.device(device))
        q, k, v, dout = (
            _random((tokens, heads, head_dim), torch.bfloat16, device, gen).detach() for _ in range(4)
        )
        flops = causal_fwd_flops(tokens // seq, seq, heads, head_dim)
        shape = {"kind": "tune", "batch": tokens // seq, "seq": seq, "heads": heads, "head_dim": head_dim}
        for change in candidates:
            cfg = default._replace(**change)
            base = {**shape, "impl": "relscale", "config": cfg._asdict(), "change": change}
            try:
                timings = _tune_one(q, k, v, dout, seq, cfg)
            except Exception as err:  # noqa: BLE001 - e.g. out of shared memory for a candidate
                reason = f"{type(err).__name__}: {str(err)[:500]}"
                records.append({**base, "status": "error", "reason": reason})
                continue
            for name, t in timings.items():
                factor = 1.0 if name == "fwd" else 2.5
                records.append({**base, "status": "ok", "direction": name, **t,
                                **flops_record(factor * flops, t["median_ms"], device)})
    return records


def run(profile: str, device: str) -> list[dict]:
    if torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "bench_attention on the CPU needs TRITON_INTERPRET=1 set before relscale.kernels loads"
        )
    if profile == "tune":
        if torch.device(device).type != "cuda":
            raise ValueError("profile 'tune' times GPU block configurations; it needs --device cuda")
        return _tune_records(device)
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (ci, quick, full, tune)")
    settings = PROFILES[profile]
    records = _causal_records(settings, device)
    return records + (_packed_records(settings, device) if settings["packed"] else [])


def _summary(records: list[dict]) -> str:
    lines = []
    for r in records:
        if r.get("status") != "ok" or r.get("direction") not in ("fwd", "fwd_bwd", "bwd_det0", "bwd_det1"):
            continue
        who = r["impl"] + (f"/{r['backend']}" if "backend" in r else "")
        who += "/det" if r.get("deterministic") else ""
        who += f" {r['masking']}" if "masking" in r else ""
        who += f" {r['change']}" if "change" in r else ""
        peak = f"{r['pct_of_datasheet_bf16']:5.1f}% of peak" if r.get("pct_of_datasheet_bf16") else ""
        lines.append(f"{r['kind']:6} d={r['head_dim']:<3} S={r['seq']:<5} B={r['batch']:<3} {who:40} "
                     f"{r['direction']:8} {r['median_ms']:9.3f} ms {r['tflops']:8.2f} TFLOP/s {peak}")
    failed = [r for r in records if r.get("status") != "ok"]
    lines.append(f"{len(failed)} implementation/shape pairs did not run (reasons in the JSON)")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("ci", "quick", "full", "tune"), default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    profile = args.profile or ("full" if torch.device(args.device).type == "cuda" else "ci")
    results = run(profile, args.device)
    meta = {
        "profile": profile, "device": args.device, "goals": GOALS,
        "flop_convention": "causal fwd 4*B*S^2*H*D/2, bwd 2.5x fwd; packed: sum over documents of len^2",
        "device_name": device_name(args.device),
        "datasheet_bf16_tflops": datasheet_bf16_tflops(device_name(args.device)),
    }
    path = write_results(NAME, results, meta)
    print(_summary(results))
    print(f"wrote {path}")
    if not all(r.get("matches_reference", True) for r in results):
        sys.exit("an implementation disagrees with the fp32 reference (matches_reference false in the JSON)")
