"""Parameter and FLOP counts against numbers worked out by hand (arithmetic in the comments)."""

import torch

from relscale.config import ModelConfig
from relscale.counting import flops_per_token_marin, flops_per_token_train, param_counts, run_flops
from relscale.model import Transformer


def test_counts_of_a_447m_llama_style_model():
    # d=1024, 11 layers, 8 heads of 128, d_ff=4096, vocab 128256, untied, QK-norm.
    cfg = ModelConfig(vocab_size=128256, hidden=1024, layers=11, heads=8, head_dim=128, mlp_hidden=4096)
    # per layer: attention 4*1024^2 = 4,194,304; QK-norm 2*128 = 256; SwiGLU 3*1024*4096 = 12,582,912;
    # two norms 2*1024 = 2,048 -> 16,779,520; 11 layers = 184,574,720; + final norm 1,024.
    non_embedding = 184_575_744
    embedding = 2 * 128256 * 1024  # input embedding + untied head = 262,668,288
    counts = param_counts(cfg)
    assert counts.non_embedding == non_embedding
    assert counts.embedding == embedding
    assert counts.total == 447_244_032 == non_embedding + embedding


def _small() -> ModelConfig:
    return ModelConfig(vocab_size=100, hidden=16, layers=2, heads=4, kv_heads=2, mlp_hidden=32, max_seq_len=8)


def test_counts_of_a_tiny_gqa_model_by_hand_and_by_numel():
    cfg = _small()  # head_dim = 16 / 4 = 4
    # per layer: wq 16*16=256, wk 16*(2*4)=128, wv 128, wo 16*16=256 -> 768; QK-norm 2*4=8;
    # SwiGLU 3*16*32=1536; norms 2*16=32 -> 2,344; 2 layers = 4,688; + final norm 16 = 4,704.
    # embeddings: 100*16 = 1,600 each, untied -> 3,200; total 7,904.
    counts = param_counts(cfg)
    assert (counts.non_embedding, counts.embedding, counts.total) == (4704, 3200, 7904)
    model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == 7904

    tied = ModelConfig(**{**cfg.__dict__, "tie_embeddings": True})
    # tied: the head shares the embedding, 7,904 - 1,600 = 6,304
    assert param_counts(tied).total == 6304
    assert sum(p.numel() for p in Transformer(tied).parameters()) == 6304  # parameters() dedups


def test_flops_per_token_both_conventions_by_hand():
    cfg, seq = _small(), 8
    # train: 6 * N_matmul + 6 * L * s * h * d_head, N_matmul = 4,704 + 100*16 = 6,304
    #   6 * 6,304 = 37,824; 6 * 2 * 8 * 4 * 4 = 1,536 -> 39,360
    assert flops_per_token_train(cfg, seq) == 39_360
    # marin, per layer: 2*3*16*32 = 3,072; 2*16*(4 + 2*2)*4 = 1,024; 2*(4*4)*16 = 512;
    #   4*8*16 + 3*8*4 = 512 + 96 = 608 -> 5,216; 2 layers = 10,432; head 2*16*100 = 3,200 -> 13,632
    assert flops_per_token_marin(cfg, seq) == 13_632
    run = run_flops(cfg, seq, tokens=1000)
    assert run.flops_train == 39_360_000 and run.flops_marin == 13_632_000


def test_train_flops_match_a_count_of_the_forward_matmuls():
    # Independent check of the 2*N_matmul forward term: count multiply-adds of every nn.Linear in
    # one forward with torch's FLOP counter (attention scores excluded: the reference path uses SDPA).
    from torch.utils.flop_counter import FlopCounterMode

    cfg = _small()
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 8))
    with FlopCounterMode(display=False) as counter:
        model(tokens)
    mm_flops = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "mm" in str(op))
    n_matmul = param_counts(cfg).non_embedding + cfg.vocab_size * cfg.hidden
    norms = 2 * cfg.layers * cfg.hidden + cfg.hidden + 2 * cfg.layers * cfg.d_head  # not matmul weights
    assert mm_flops == 2 * (n_matmul - norms) * tokens.numel()
