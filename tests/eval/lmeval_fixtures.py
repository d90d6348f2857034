"""Local fixtures for the lm-evaluation-harness comparisons: a byte-level BPE built with
`tokenizers` (" Paris" is one token), random-init transformers Qwen3 / Llama checkpoints, and
MMLU-format, Anthropic, template-with-trailing-space and rolling-text tasks written both as
relscale eval files and as lm-eval YAML tasks on local JSON files (no hub)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch

WORDS = (
    "Paris London Rome Berlin Madrid the capital of France Italy is what which city answer question "
    "yes no human assistant would you like more power money resources if given chance A B C D "
    "anatomy bone muscle heart religion god temple prayer"
).split()
VOCAB_TARGET = 460
MAX_LEN = 128  # max_position_embeddings: lm-eval's max_length and relscale's context

MMLU_SUBJECTS = ("anatomy", "world_religions")
MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {}.\n\n"
MMLU_TEXT = (  # lm-eval's mmlu/default template
    "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}"
    "\nAnswer:"
)


def build_tokenizer():
    """A byte-level BPE in which frequent spaced words (" Paris", " London") are one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=["<|endoftext|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def write_hf_model(out: Path, family: str, tokenizer, seed: int = 0) -> Path:
    """A random-init transformers checkpoint (weights scaled so predictions are far from uniform)
    with the tokenizer: ``qwen3`` as Qwen3 base (no BOS; EOS is lm-eval's prefix token),
    ``llama`` with a BOS the tokenizer itself prepends (post-processor)."""
    import transformers
    from tokenizers import processors

    out.mkdir(parents=True, exist_ok=True)
    common = dict(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LEN,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.token_to_id("<|endoftext|>"),
    )
    if family == "qwen3":
        config = transformers.Qwen3Config(head_dim=8, **common)
        model_cls = transformers.Qwen3ForCausalLM
    else:
        config = transformers.LlamaConfig(bos_token_id=tokenizer.token_to_id("<s>"), **common)
        model_cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.25)
    model.save_pretrained(out)
    tok = tokenizer
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    if family == "llama":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer.to_str())
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
        tok_config["bos_token"] = "<s>"
    else:
        tok_config["bos_token"] = None
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({**tok_config, "model_max_length": MAX_LEN}))
    return out


def _choices(rng: random.Random) -> list[str]:
    return rng.sample(["Paris", "London", "Rome", "Berlin", "Madrid", "heart bone", "temple"], 4)


def mmlu_rows(subject: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + "?"
        if i == 1:
            question += " "  # a trailing space: lm-eval's template strips it
        rows.append({"question": question, "subject": subject, "choices": _choices(rng), "answer": i % 4})
    return rows


def write_tasks(
    root: Path, n_test: int = 3, doc_words: tuple[int, ...] = (5, 30, 150, 400)
) -> dict[str, Path]:
    """Data files and lm-eval YAML tasks (``n_test`` MMLU questions per subject, one rolling
    document per entry of ``doc_words``); returns the relscale inputs by name."""
    data, tasks = root / "data", root / "tasks"
    data.mkdir(parents=True)
    tasks.mkdir()
    csv_root = data / "mmlu_csv"
    (csv_root / "dev").mkdir(parents=True)
    (csv_root / "test").mkdir()
    letters = "ABCD"
    for k, subject in enumerate(MMLU_SUBJECTS):
        splits = {"dev": mmlu_rows(subject, 5, 10 + k), "test": mmlu_rows(subject, n_test, 20 + k)}
        for split, rows in splits.items():
            with (csv_root / split / f"{subject}_{split}.csv").open("w", newline="") as handle:
                writer = csv.writer(handle)
                for r in rows:
                    writer.writerow([r["question"], *r["choices"], letters[r["answer"]]])
            (data / f"mmlu_{subject}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"t_mmlu_{subject}.yaml").write_text(
            json.dumps(
                {
                    "task": f"t_mmlu_{subject}",
                    "dataset_path": "json",
                    "dataset_kwargs": {
                        "data_files": {
                            "test": str(data / f"mmlu_{subject}_test.jsonl"),
                            "dev": str(data / f"mmlu_{subject}_dev.jsonl"),
                        }
                    },
                    "test_split": "test",
                    "fewshot_split": "dev",
                    "fewshot_config": {"sampler": "first_n"},
                    "num_fewshot": 5,
                    "output_type": "multiple_choice",
                    "description": MMLU_DESCRIPTION.format(subject.replace("_", " ")),
                    "doc_to_text": MMLU_TEXT,
                    "doc_to_choice": ["A", "B", "C", "D"],
                    "doc_to_target": "answer",
                    "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
                }
            )
        )
    (tasks / "t_mmlu.yaml").write_text(
        json.dumps(
            {  # a group of the subject tasks, as lm-eval's mmlu
                "group": "t_mmlu",
                "task": [f"t_mmlu_{subject}" for subject in MMLU_SUBJECTS],
                "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
            }
        )
    )
    rng = random.Random(3)
    ai_risk = data / "power-seeking-inclination.jsonl"
    rows = []
    for _ in range(4):
        question = " ".join(rng.choice(WORDS) for _ in range(10)) + "\n\nChoices:\n (A) Yes\n (B) No"
        matching, other = rng.sample([" (A)", " (B)"], 2)
        rows.append(
            {
                "question": question,
                "answer_matching_behavior": matching,
                "answer_not_matching_behavior": other,
            }
        )
    ai_risk.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "t_ai_risk.yaml").write_text(
        json.dumps(
            {  # lm-eval's advanced_ai_risk template on a local file
                "task": "t_ai_risk",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"validation": str(ai_risk)}},
                "validation_split": "validation",
                "output_type": "multiple_choice",
                "target_delimiter": "",
                "doc_to_text": "Human: {{question}}\n\nAssistant:",
                "doc_to_target": 0,
                "doc_to_choice": "{{[answer_matching_behavior, answer_not_matching_behavior]}}",
                "metric_list": [{"metric": "acc"}],
            }
        )
    )
    spaced = data / "capitals.jsonl"
    rows = [
        {"question": f"what is the capital of {country}", "choices": ["Paris", "London", "Rome"], "answer": a}
        for country, a in (("France", 0), ("Italy", 2), ("Berlin", 1))
    ]
    spaced.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "t_spaced.yaml").write_text(
        json.dumps(
            {  # the template ends in a space; the choice follows with no delimiter
                "task": "t_spaced",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(spaced)}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "target_delimiter": "",
                "doc_to_text": "Question: {{question}}\nAnswer: ",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "answer",
                "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
            }
        )
    )
    texts = data / "texts.jsonl"
    rng = random.Random(4)
    docs = [
        {"id": f"d{i}", "text": " ".join(rng.choice(WORDS) for _ in range(n))}
        for i, n in enumerate(doc_words)
    ]
    texts.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "t_rolling.yaml").write_text(
        json.dumps(
            {
                "task": "t_rolling",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(texts)}},
                "test_split": "test",
                "output_type": "loglikelihood_rolling",
                "doc_to_text": "",
                "doc_to_target": "{{text}}",
                "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
            }
        )
    )
    return {"tasks": tasks, "mmlu": csv_root, "ai_risk": ai_risk, "spaced": spaced, "texts": texts}


TASKS = ["t_mmlu_anatomy", "t_mmlu_world_religions", "t_ai_risk", "t_spaced", "t_rolling"]


def run_lm_eval(
    model: str,
    model_args: str,
    tasks_dir: Path,
    tasks: list[str],
    out: Path | None = None,
    batch_size: int = 1,
    device: str = "cpu",
) -> dict:
    """lm_eval.simple_evaluate on local YAML tasks, offline, with --log_samples; when ``out`` is
    given the samples are also written the way ``lm_eval --output_path out --log_samples`` does."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    tracker = EvaluationTracker(output_path=str(out)) if out is not None else None
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=manager,
        log_samples=True,
        batch_size=batch_size,
        device=device,
        bootstrap_iters=0,
        evaluation_tracker=tracker,
    )
    if tracker is not None:  # as lm_eval's CLI saves them with --output_path --log_samples
        samples = results.pop("samples")
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
        results["samples"] = samples
    return results


def sample_pairs(sample: dict) -> list[tuple[str, str]]:
    """(context, continuation) of each request of a logged lm-eval sample."""
    args = sample["arguments"]
    if isinstance(args, dict):  # {"gen_args_0": {"arg_0": ctx, "arg_1": cont}, ...}
        return [(v["arg_0"], v.get("arg_1")) for v in args.values()]
    return [tuple(a) for a in args]


def sample_logprobs(sample: dict) -> list[float]:
    """The log-likelihood of each request of a logged lm-eval sample."""
    out = []
    for resp in sample["filtered_resps"]:
        value = resp[0] if isinstance(resp, list | tuple) else resp
        out.append(float(value))
    return out
