"""HumanEval: unbiased pass@k maths, problem loading, resumable batched generation, the stage end to end."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch

from evaluation.errors import EvalError
from evaluation.generate import (
    STOP_SEQUENCES,
    GenerationConfig,
    append_jsonl,
    generate_completions,
    prompt_text,
    read_jsonl,
    truncate_at_stop,
)
from evaluation.humaneval import HumanEvalConfig, humaneval_to_dir, resume_key
from evaluation.passk import mean_pass_at_k, pass_at_k
from evaluation.sandbox import SandboxConfig
from sources import load_model
from sources.errors import SourceError
from sources.humaneval import load_humaneval

# ---- pass@k ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,c,k,expected", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0), (5, 2, 1, 0.4), (10, 3, 5, 1 - 21 / 252), (10, 0, 10, 0.0),
    (10, 1, 10, 1.0), (4, 2, 3, 1.0), (200, 1, 1, 0.005),
])
def test_pass_at_k_hand_cases(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_closed_form_exactly() -> None:
    for n in (1, 2, 7, 20, 200):
        for c in range(0, n + 1, max(1, n // 9)):
            for k in (1, 2, 5, 10, 100):
                if k > n:
                    continue
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-12), (n, c, k)


def test_pass_at_k_rejects_bad_input_and_means_over_problems() -> None:
    for args in [(0, 0, 1), (5, 6, 1), (5, 1, 6), (5, -1, 1), (5, 1, 0)]:
        with pytest.raises(EvalError):
            pass_at_k(*args)
    means = mean_pass_at_k({"a": (10, 3), "b": (10, 0), "c": (2, 2)}, ks=(1, 5))
    assert means == {"pass_at_1": pytest.approx((0.3 + 0 + 1) / 3)}  # pass@5 undefined with n=2


# ---- problems and configs -------------------------------------------------------------------------------


def test_problems_load_from_the_wheel() -> None:
    problems = load_humaneval()
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    assert [p.task_id for p in load_humaneval(task_ids=("HumanEval/5", "HumanEval/2"))] == ["HumanEval/5",
                                                                                           "HumanEval/2"]
    assert len(load_humaneval(limit=3)) == 3
    with pytest.raises(SourceError, match="unknown HumanEval task ids"):
        load_humaneval(task_ids=("HumanEval/999",))


def test_configs_are_validated() -> None:
    with pytest.raises(EvalError, match="n_samples"):
        GenerationConfig(n_samples=5)  # greedy with 5 samples
    with pytest.raises(EvalError, match="pass@10"):
        HumanEvalConfig(ks=(1, 10), generation=GenerationConfig(n_samples=5, temperature=0.8))
    with pytest.raises(EvalError, match="limit"):
        HumanEvalConfig(limit=0)
    cfg = HumanEvalConfig(ks=(1, 10), generation=GenerationConfig(n_samples=10, temperature=0.8))
    assert HumanEvalConfig(**{**cfg.to_dict()}) == cfg  # round trip through plain dicts (MLflow params)


def test_truncate_at_stop() -> None:
    text = "\n    return x\n\n\ndef other():\n    pass\n"
    assert truncate_at_stop(text, STOP_SEQUENCES) == "\n    return x\n\n"
    assert truncate_at_stop("\n    # indented comment stays\n    return 1\n#top", STOP_SEQUENCES) == (
        "\n    # indented comment stays\n    return 1")
    assert truncate_at_stop("no stop", STOP_SEQUENCES) == "no stop"


def test_read_jsonl_cuts_a_torn_last_line(tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    append_jsonl(path, [{"a": 1}, {"a": 2}])
    with open(path, "a") as f:
        f.write('{"a": 3, "trunc')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    append_jsonl(path, [{"a": 4}])
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 4}]


# ---- generation on the tiny real GGUF Llama (random weights: the plumbing, not the quality) --------------


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tinycoder-random")
    return model, tok


def test_generation_is_resumable(tiny, tmp_path) -> None:
    model, tok = tiny
    prompts = {p.task_id: p.prompt for p in load_humaneval(limit=5)}
    cfg = GenerationConfig(max_new_tokens=6, batch_size=2)
    full = generate_completions(model, tok, prompts, cfg, tmp_path / "full.jsonl", progress=False)
    assert [r["task_id"] for r in full] == list(prompts) and all(r["n_new_tokens"] >= 1 for r in full)
    assert tok.padding_side == "right" or tok.padding_side == "left"  # restored, whatever it was
    # a run killed after two batches: 4 lines kept, the 5th torn mid-write
    lines = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    order = [json.loads(x)["task_id"] for x in lines]
    (tmp_path / "part.jsonl").write_text("".join(lines[:4]) + lines[4][:10])
    resumed = generate_completions(model, tok, prompts, cfg, tmp_path / "part.jsonl", progress=False)
    assert [r["completion"] for r in resumed] == [r["completion"] for r in full]
    on_disk = [r["task_id"] for r in read_jsonl(tmp_path / "part.jsonl")]
    assert sorted(on_disk) == sorted(prompts) and on_disk[:4] == order[:4]  # only the missing one was added
    again = generate_completions(model, tok, prompts, cfg, tmp_path / "part.jsonl", progress=False)
    assert len(read_jsonl(tmp_path / "part.jsonl")) == 5 and again == resumed


def test_sampling_draws_n_samples(tiny) -> None:
    model, tok = tiny
    prompts = {p.task_id: p.prompt for p in load_humaneval(limit=2)}
    cfg = GenerationConfig(max_new_tokens=5, batch_size=4, n_samples=3, temperature=1.0, top_p=0.95)
    out = generate_completions(model, tok, prompts, cfg, progress=False)
    assert [(r["task_id"], r["sample"]) for r in out] == [(t, s) for t in prompts for s in range(3)]
    assert len({r["completion"] for r in out}) > 1


def test_stage_end_to_end_refuses_without_opt_in_and_resumes(tmp_path) -> None:
    out = tmp_path / "humaneval"
    small = HumanEvalConfig(limit=3, generation=GenerationConfig(max_new_tokens=6, batch_size=3),
                            sandbox=SandboxConfig(workers=2))
    with pytest.raises(EvalError, match="allow_execution"):
        humaneval_to_dir("tinycoder-random", small, out, progress=False)
    cfg = HumanEvalConfig(**{**small.to_dict(), "allow_execution": True})
    # a previous run was killed after generating HumanEval/0 (here: the canonical solution, so it must pass)
    first = load_humaneval(limit=1)[0]
    work = out.with_name(f".{out.name}.partial")
    work.mkdir()
    (work / "key.json").write_text(json.dumps(resume_key("tinycoder-random", cfg)))
    solution = first.canonical_solution
    append_jsonl(work / "completions.jsonl", [{"task_id": first.task_id, "sample": 0, "completion": solution,
                                               "n_new_tokens": 40, "finish": "stop", "seconds": 1.0}])
    metrics = humaneval_to_dir("tinycoder-random", cfg, out, progress=False)
    assert not work.exists()
    for name in ("completions.jsonl", "results.jsonl", "problems.jsonl", "metrics.json", "sandbox.json",
                 "config.json", "MANIFEST.json"):
        assert (out / name).is_file(), name
    results = read_jsonl(out / "results.jsonl")
    assert [r["task_id"] for r in results] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert results[0]["status"] == "passed"  # the resumed completion was reused, not regenerated
    assert all(r["status"] in ("passed", "failed", "timeout", "killed") and r["reason"] for r in results)
    assert metrics["pass_at_1"] == pytest.approx(metrics["n_passed"] / 3) and metrics["n_problems"] == 3
    assert json.loads((out / "metrics.json").read_text())["pass_at_1"] == metrics["pass_at_1"]
    assert metrics["tokens_per_second"] > 0 and metrics["executions_per_second"] > 0


# ---- the real small model: batching with left padding changes nothing under greedy decoding ---------------


@pytest.mark.slow
def test_batched_greedy_matches_unbatched_smollm2() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on 2 shared cores was 14x slower here (STACK.md)
    try:
        model, tok = load_model("smollm2-135m")
        prompts = {p.task_id: p.prompt for p in load_humaneval(task_ids=("HumanEval/0", "HumanEval/2",
                                                                         "HumanEval/4", "HumanEval/7"))}
        batched = generate_completions(model, tok, prompts, GenerationConfig(max_new_tokens=40, batch_size=4),
                                       progress=False)
        single = generate_completions(model, tok, prompts, GenerationConfig(max_new_tokens=40, batch_size=1),
                                      progress=False)
    finally:
        torch.set_num_threads(threads)
    assert [r["completion"] for r in batched] == [r["completion"] for r in single]
    assert all(r["completion"].strip() for r in batched)


@pytest.mark.parametrize(("model", "stripped"), [("qwen2.5-coder-0.5b", False), ("smollm2-135m", True)])
def test_prompt_ends_where_the_tokenizer_ends_a_token(model, stripped) -> None:
    """Qwen keeps a HumanEval prompt's closing newline as its own token, SmolLM2 merges it with the body's indent:
    each model gets the prompt on its own token boundary (the other form made each of them skip the body)."""
    from transformers import AutoTokenizer

    from sources.models import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(model))
    for p in load_humaneval(limit=8):
        text = prompt_text(tok, p.prompt)
        assert text == (p.prompt.rstrip() if stripped else p.prompt)
        assert prompt_text(tok, p.prompt, True) == p.prompt.rstrip() and prompt_text(tok, p.prompt, False) == p.prompt
    with pytest.raises(EvalError, match="strip_prompt"):
        GenerationConfig(strip_prompt="yes")


def test_cli_needs_the_opt_in_flag(tmp_path, capsys) -> None:
    from evaluation.humaneval_cli import main

    base = ["--model", "tinycoder-random", "--out", str(tmp_path / "he"), "--limit", "2", "--max-new-tokens", "4"]
    with pytest.raises(EvalError, match="allow-code-execution"):
        main(base)
    assert not (tmp_path / "he").exists()
    with pytest.raises(EvalError, match="n_samples"):
        main([*base, "--n", "3", "--allow-code-execution"])  # greedy with 3 samples
    assert main([*base, "--allow-code-execution"]) == 0
    assert json.loads(capsys.readouterr().out)["n_problems"] == 2
    assert len(read_jsonl(tmp_path / "he" / "results.jsonl")) == 2


# ---- the decode loop: same text as HF generate, batching and row dropping change nothing (fp32) ------------


def _hf_greedy(model, tok, text: str, max_new_tokens: int) -> str:
    import transformers

    enc = tok([text], return_tensors="pt")
    gen = transformers.GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                        repetition_penalty=1.0)
    out = model.generate(**enc, generation_config=gen)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_greedy_decode_matches_transformers_generate(tiny) -> None:
    model, tok = tiny
    prompts = {p.task_id: p.prompt for p in load_humaneval(limit=3)}
    never = ("\x00\x01never",)
    ours = generate_completions(model, tok, prompts, GenerationConfig(max_new_tokens=16, batch_size=1,
                                                                      stop_sequences=never), progress=False)
    for r in ours:
        assert r["completion"] == _hf_greedy(model, tok, prompt_text(tok, prompts[r["task_id"]]), 16)


@pytest.mark.parametrize(("stops", "batch_size"), [
    (("\x00\x01never",), 7),  # one batch, everyone runs to the length limit
    (("e", "("), 7),  # rows stop at different steps and leave the batch
    (("e", "("), 3),  # ... and queued prompts take their slots (cache merged with left padding, then cropped)
])
def test_batched_greedy_equals_unbatched_tiny(tiny, stops, batch_size) -> None:
    model, tok = tiny
    prompts = {p.task_id: p.prompt for p in load_humaneval(limit=12)}  # prompt lengths differ: left padding
    cfg = GenerationConfig(max_new_tokens=30, batch_size=batch_size, stop_sequences=stops, strip_prompt=True)
    batched = generate_completions(model, tok, prompts, cfg, progress=False)
    single = generate_completions(model, tok, prompts, GenerationConfig(**{**cfg.to_dict(), "batch_size": 1}),
                                  progress=False)
    assert [r["completion"] for r in batched] == [r["completion"] for r in single]
    assert [r["n_new_tokens"] for r in batched] == [r["n_new_tokens"] for r in single]
    if stops[0] == "e":
        lengths = {r["n_new_tokens"] for r in batched}
        assert len(lengths) > 1 and any(r["finish"] == "stop" for r in batched)  # rows really left early


def test_dense_result_is_reused_across_runs(tmp_path, monkeypatch) -> None:
    import sources
    from evaluation.humaneval import result_cache_dir

    monkeypatch.setattr(sources, "cache_root", lambda: tmp_path / "cache" / "models")
    cfg = HumanEvalConfig(limit=2, generation=GenerationConfig(max_new_tokens=4, batch_size=2),
                          allow_execution=True)
    first = humaneval_to_dir("tinycoder-random", cfg, tmp_path / "a", progress=False, cache=True)
    assert "humaneval_cache_hit" not in first and result_cache_dir("tinycoder-random", cfg).is_dir()
    second = humaneval_to_dir("tinycoder-random", cfg, tmp_path / "b", progress=False, cache=True)
    assert second["humaneval_cache_hit"] and second["pass_at_1"] == first["pass_at_1"]
    assert read_jsonl(tmp_path / "b" / "results.jsonl") == read_jsonl(tmp_path / "a" / "results.jsonl")
    assert (tmp_path / "b" / "MANIFEST.json").is_file()
    other = HumanEvalConfig(**{**cfg.to_dict(), "limit": 1})  # another config: computed, not reused
    assert "humaneval_cache_hit" not in humaneval_to_dir("tinycoder-random", other, tmp_path / "c",
                                                         progress=False, cache=True)
    lord_dir = tmp_path / "lord"  # a factored artifact loads through code outside the key: never cached
    lord_dir.mkdir()
    for name, text in {"config.json": "{}", "MANIFEST.json": "{}", "lord_artifact.json": '{"kind": "lord"}'}.items():
        (lord_dir / name).write_text(text)
    assert result_cache_dir(str(lord_dir), cfg) is None
