"""svdkit.tasks: zero-shot multiple-choice items built from held-out text, scored as lm-eval scores
them, exported as an lm-eval task (and run there: the accuracies must agree)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from svdkit.data import calibration_documents, evaluation_documents, sentence_runs
from svdkit.overlap import shared_passages
from svdkit.tasks import (
    MultipleChoiceItem,
    MultipleChoiceTask,
    build_task,
    choice_loglikelihoods,
    encode_pair,
    export_lm_eval,
    get_task,
    lm_eval_task_name,
    load_task,
    save_task,
    score_multiple_choice,
    task_names,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    from lm_helpers import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    return tiny_llama(len(tokenizer)), tokenizer


@pytest.fixture(scope="module")
def small_tasks():
    return [build_task("next-sentence", n_items=24, seed=3), build_task("last-word", n_items=24, seed=3)]


# --- items and task files -------------------------------------------------------------------------


def test_an_item_with_fewer_than_two_choices_or_a_bad_target_is_refused():
    with pytest.raises(ValueError, match="at least two choices, got 1"):
        MultipleChoiceItem("ctx", ("only",), 0)
    with pytest.raises(ValueError, match="target 4 is out of range for 4 choices"):
        MultipleChoiceItem("ctx", ("a", "b", "c", "d"), 4)
    with pytest.raises(ValueError, match="target -1 is out of range"):
        MultipleChoiceItem("ctx", ("a", "b"), -1)
    with pytest.raises(ValueError, match="target must be the index"):
        MultipleChoiceItem("ctx", ("a", "b"), "a")
    with pytest.raises(ValueError, match="repeat one another"):
        MultipleChoiceItem("ctx", ("a", "a"), 0)
    with pytest.raises(ValueError, match="non-empty string"):
        MultipleChoiceItem("  ", ("a", "b"), 0)
    with pytest.raises(ValueError, match="has no items"):
        MultipleChoiceTask("empty", ())


def test_a_task_file_round_trips_and_its_errors_name_the_file_and_line(tmp_path, small_tasks):
    task = small_tasks[0]
    path = save_task(task, tmp_path / "t.jsonl")
    again = load_task(path, name=task.name)
    assert again.items == task.items and len(again) == 24
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "choices": ["a", "b"], "target": 1}\n{"context": "c", "choices": ["a"], "target": 0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: an item needs at least two choices"):
        load_task(bad)
    bad.write_text('{"context": "c", "choices": ["a", "b"], "target": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 1: target 2 is out of range for 2 choices"):
        load_task(bad)
    bad.write_text('{"context": "c", "choices": ["a", "b"]}\n')
    with pytest.raises(ValueError, match="line 1 must be a JSON object with 'context', 'choices' and 'target'"):
        load_task(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        load_task(bad)
    with pytest.raises(FileNotFoundError, match="no task file"):
        load_task(tmp_path / "missing.jsonl")


# --- building the tasks ---------------------------------------------------------------------------


def test_unknown_task_and_domain_names_are_refused():
    with pytest.raises(ValueError, match="unknown task 'hellaswag'; choose one of \\['next-sentence', 'last-word'\\]"):
        build_task("hellaswag")
    with pytest.raises(ValueError, match="unknown evaluation domain 'wiki'"):
        build_task("last-word", domains=["wiki"])
    with pytest.raises(ValueError, match="unknown task 'nope'.*next-sentence.*jsonl"):
        get_task("nope")
    with pytest.raises(ValueError, match="ask for at most"):
        build_task("last-word", n_items=100_000)


@pytest.mark.parametrize("name", task_names())
def test_a_task_is_the_same_for_a_seed_and_balanced_over_domains(name):
    task = build_task(name)
    assert len(task) == 200 and task.items == build_task(name).items
    assert task.items != build_task(name, seed=1).items
    assert all(len(item.choices) == 4 for item in task.items)
    # The right answer sits at every position (chance is 1/4).
    positions = Counter(item.target for item in task.items)
    assert set(positions) == {0, 1, 2, 3} and min(positions.values()) >= 25
    domains = Counter(item.source.split(" document")[0] for item in task.items)
    assert set(domains) == {"in-domain", "other-domain", "legal-english", "math-docs"}
    only = build_task(name, n_items=5, domains=["legal-english"])
    assert all(item.source.startswith("legal-english document") for item in only.items)


def _document(item: MultipleChoiceItem) -> str:
    domain, _, index = item.source.rpartition(" document ")
    return evaluation_documents(domain)[int(index)]


def test_next_sentence_items_hold_the_true_next_sentence_of_their_document():
    for item in build_task("next-sentence", n_items=60).items:
        runs = sentence_runs(_document(item))
        true = item.choices[item.target]
        assert any(" ".join(run[k:k + 3]) == f"{item.context} {true}" for run in runs for k in range(len(run)))
        # Distractors: sentences of the same document, among the eight closest to the true one in length.
        others = [s for s in dict.fromkeys(s for run in runs for s in run) if s != true and s not in item.context]
        gaps = sorted(abs(len(s) - len(true)) for s in others)
        for choice in item.choices:
            assert choice == true or (choice in others and abs(len(choice) - len(true)) <= gaps[min(7, len(gaps) - 1)])


def test_last_word_items_end_their_passage_with_the_true_word():
    for item in build_task("last-word", n_items=60).items:
        word = item.choices[item.target]
        assert word.isalpha() and len(word) >= 3
        passage = f"{item.context} {word}"
        assert any(passage in " ".join(run) for run in sentence_runs(_document(item)))


def test_no_task_item_shares_a_passage_with_the_calibration_text():
    items = [item for name in task_names() for item in build_task(name).items]
    texts = [f"{item.context} {' '.join(item.choices)}" for item in items]
    assert shared_passages(texts, calibration_documents()) == []


# --- scoring --------------------------------------------------------------------------------------


def test_encode_pair_moves_the_contexts_trailing_space_to_the_continuation(tiny):
    _, tokenizer = tiny
    ids = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    assert encode_pair(tokenizer, "The cat sat on the ", "mat") == (ids("The cat sat on the"), ids("The cat sat on the mat")[len(ids("The cat sat on the")):])
    context, continuation = encode_pair(tokenizer, "The cat sat on the", " mat")
    assert context + continuation == ids("The cat sat on the mat")


def _by_hand(model, context: list[int], continuation: list[int], limit: int) -> float:
    """One sequence at a time, no padding: the sum of log p(continuation token | everything before)."""
    sequence = (context + continuation)[-(limit + 1):]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence[:-1]])).logits[0].double()
    logp = F.log_softmax(logits, -1)[-len(continuation):]
    return float(logp.gather(-1, torch.tensor(continuation)[:, None]).sum())


@pytest.mark.parametrize("share_context", [True, False])
def test_choice_scores_equal_a_hand_computation_one_sequence_at_a_time(tiny, share_context):
    model, tokenizer = tiny
    task = MultipleChoiceTask("mixed", (
        MultipleChoiceItem("The history of the software", ("begins here.", "ends.", "is long and winding."), 1),
        MultipleChoiceItem("A", ("b", "cd"), 0),  # a one-token context: never from a cache
        *build_task("next-sentence", n_items=4).items,
        *build_task("last-word", n_items=4).items,
    ))
    pairs = [encode_pair(tokenizer, item.context, " " + c) for item in task.items for c in item.choices]
    short = max(len(cont) for _, cont in pairs) + 4  # longer pairs lose their first tokens, as in lm-eval
    assert sum(len(ctx) + len(cont) > short + 1 for ctx, cont in pairs) >= 8
    for limit in (1024, short):
        scores = choice_loglikelihoods(model, tokenizer, task, batch_size=3, share_context=share_context, max_length=limit)
        for item, item_scores in zip(task.items, scores):
            assert len(item_scores) == len(item.choices)
            for choice, (ll, greedy) in zip(item.choices, item_scores):
                context, continuation = encode_pair(tokenizer, item.context, " " + choice)
                assert ll == pytest.approx(_by_hand(model, context, continuation, limit), abs=2e-4, rel=1e-5)
                assert isinstance(greedy, bool)


def test_the_shared_context_and_full_sequence_paths_agree(tiny, small_tasks):
    model, tokenizer = tiny
    for task in small_tasks:
        shared = choice_loglikelihoods(model, tokenizer, task, share_context=True)
        alone = choice_loglikelihoods(model, tokenizer, task, share_context=False, batch_size=5)
        for a, b in zip(shared, alone):
            np.testing.assert_allclose([s[0] for s in a], [s[0] for s in b], rtol=1e-5, atol=2e-4)
            assert [s[1] for s in a] == [s[1] for s in b]


def test_metrics_follow_lm_eval_conventions(tiny, small_tasks):
    model, tokenizer = tiny
    model.train()
    task = small_tasks[1]
    result = score_multiple_choice(model, tokenizer, task)
    assert model.training  # the flag is restored
    model.eval()
    lls = [np.array(row) for row in result.loglikelihoods]
    acc = np.array([np.argmax(row) == item.target for row, item in zip(lls, task.items)], dtype=float)
    norm = np.array([np.argmax(row / np.array([len(c) for c in item.choices])) == item.target
                     for row, item in zip(lls, task.items)], dtype=float)
    assert result.n == 24 and result.acc == pytest.approx(acc.mean()) and result.acc_norm == pytest.approx(norm.mean())
    assert result.acc_stderr == pytest.approx(acc.std(ddof=1) / math.sqrt(24))
    assert result.acc_norm_stderr == pytest.approx(norm.std(ddof=1) / math.sqrt(24))
    assert 0.0 <= result.exact_match <= 1.0 and result.seconds > 0
    assert "loglikelihoods" not in result.to_dict() and len(result.to_dict(per_item=True)["loglikelihoods"]) == 24


def test_a_bad_batch_size_or_a_choice_longer_than_the_context_is_refused(tiny, small_tasks):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        choice_loglikelihoods(model, tokenizer, small_tasks[0], batch_size=0)
    with pytest.raises(ValueError, match="item 0 of task 'next-sentence': choice 0 is .* tokens long, longer than the model's context"):
        choice_loglikelihoods(model, tokenizer, small_tasks[0], max_length=3)


# --- lm-eval ----------------------------------------------------------------------------------------


def test_the_exported_task_is_an_lm_eval_multiple_choice_task_over_the_same_items(tmp_path, small_tasks):
    yaml = pytest.importorskip("yaml")
    task = small_tasks[0]
    path = export_lm_eval(task, tmp_path / "tasks")
    config = yaml.safe_load(path.read_text())
    assert config["task"] == lm_eval_task_name(task) == "svdkit_next_sentence"
    assert config["output_type"] == "multiple_choice" and config["dataset_path"] == "json"
    assert (config["doc_to_text"], config["doc_to_choice"], config["doc_to_target"]) == ("context", "choices", "target")
    assert config["target_delimiter"] == " " and [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]
    data = config["dataset_kwargs"]["data_files"]["test"]
    assert os.path.isabs(data) and load_task(data).items == task.items


LM_EVAL_RUN = textwrap.dedent("""
    import json, sys
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_dir, task_dir, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    out = simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=names,
                          task_manager=TaskManager(include_path=task_dir), device="cpu", batch_size=8, log_samples=True)
    result = {}
    for name in names:
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        result[name] = {"metrics": {k: v for k, v in out["results"][name].items() if isinstance(v, float)},
                        "lls": [[float(r[0]) for r in s["filtered_resps"]] for s in samples]}
    print("RESULT" + json.dumps(result))
""")


def test_lm_eval_runs_the_exported_tasks_and_agrees_with_svdkit(tmp_path, tiny, small_tasks):
    """lm-eval 0.4.13, in a fresh process and offline, on a tiny model saved to disk: the same
    items and conventions give the same accuracies (to 1e-6) and the same choice scores."""
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    names = [export_lm_eval(task, tmp_path / "tasks").stem for task in small_tasks]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-c", LM_EVAL_RUN, str(tmp_path / "model"), str(tmp_path / "tasks"), ",".join(names)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    reference = json.loads(run.stdout.split("RESULT", 1)[1])
    # Scored from the saved files, as lm-eval read them.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    for task, name in zip(small_tasks, names):
        ours = score_multiple_choice(loaded, loaded_tokenizer, task)
        theirs = reference[name]["metrics"]
        assert ours.acc == pytest.approx(theirs["acc,none"], abs=1e-6)
        assert ours.acc_norm == pytest.approx(theirs["acc_norm,none"], abs=1e-6)
        assert ours.acc_stderr == pytest.approx(theirs["acc_stderr,none"], abs=1e-6)
        np.testing.assert_allclose(np.array(ours.loglikelihoods), np.array(reference[name]["lls"]), rtol=1e-5, atol=2e-4)


# --- the CLI ----------------------------------------------------------------------------------------


def test_compress_and_eval_report_accuracy_next_to_perplexity(tmp_path, tiny, small_tasks, capsys):
    from svdkit.cli import main

    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    out = tmp_path / "small"
    assert main(["compress", str(tmp_path / "lm"), "-o", str(out), "--params", "0.7", "--calib-seqs", "8", "--seq-len", "32",
                 "--batch-size", "4", "--tasks", "--json", str(tmp_path / "report.json"), "--no-progress"]) == 0
    quality = json.loads((tmp_path / "report.json").read_text())["quality"]
    for name in task_names():
        assert f"acc {name} (dense -> compressed)" in quality and f"acc_norm {name} (dense -> compressed)" in quality
    assert quality["worst ppl ratio"].endswith(")") and "ppl legal-english (dense -> compressed)" in quality
    capsys.readouterr()
    task_file = save_task(small_tasks[1], tmp_path / "last.jsonl")
    assert main(["eval", str(out), "--data", "legal-english", "math-docs", "--max-tokens", "256", "--seq-len", "64",
                 "--tasks", str(task_file), "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    assert "worst perplexity ratio:" in capsys.readouterr().err
    results = json.loads((tmp_path / "eval.json").read_text())
    expected = score_multiple_choice(model, tokenizer, load_task(task_file))
    assert results["source"]["last acc"] == pytest.approx(expected.acc)
    assert results["source"]["last acc stderr"] == pytest.approx(expected.acc_stderr)
    assert set(results["model"]) >= {"legal-english", "math-docs", "last acc", "last acc_norm"}
