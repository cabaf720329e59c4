"""`qlora-lab bench` as a user runs it: a smoke matrix on the tiny model writes well-formed results (no timing
assertions: speed claims come from benchmarks/, not tests)."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import assert_clean_failure, run_cli


@pytest.mark.integration
def test_smoke_matrix_writes_results_with_both_recipes(tmp_path):
    proc = run_cli("bench", "model=tiny-random", "bench.methods=[qlora]", "bench.seq_lens=[160]",
                   "bench.batch_sizes=[2]", "bench.steps=2", "bench.warmup_steps=1", "bench.profile_steps=1",
                   "bench.quality_rows=3", f"bench.results_dir={tmp_path}", "bench.name=smoke",
                   f"hydra.run.dir={tmp_path / 'work'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "smoke.json").read_text())
    assert out["model"] == "builtin:tiny-random" and out["peak_tflops"] > 0
    assert [r["recipe"] for r in out["results"]] == ["qlora_lab", "plain"]
    for r in out["results"]:
        assert r["status"] == "completed", r
        assert r["measured_steps"] == 2 and r["tokens"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["mfu"] < 1 and r["peak_rss_mb"] > r["rss_after_imports_mb"] > 0
        assert r["trainable_params"] == 32768  # LoRA r16 on the tiny model's 14 linear layers
        assert r["estimated_mb"] > 0 and r["flops_per_token"] == 4 * r["matmul_params"]
        # the profiled step ran after the measured ones and is not in their timings
        assert len(r["step_times_s"]) == 3 and r["profile"]
        assert sum(x["share"] for x in r["profile"]) <= 1.0001 and all(x["ms_per_step"] > 0 for x in r["profile"])
        assert any(x["op"] in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear") for x in r["profile"])
        # quality beside speed: each recipe's trained model scored on the same 3 held-out rows
        assert r["quality_scored_rows"] == 3 and 0 <= r["quality_json_match"] <= 1
        assert 0 < r["quality_eval_loss"] < 20  # the tiny random model's real loss (ln(vocab) ~ 10)
    ours, plain = out["results"]
    assert ours["loss_impl"] == "selective" and not ours["checkpointing"]
    assert ours["skip_modules"] == [] and "skip_modules" not in plain  # the same 4-bit model as the plain recipe
    assert plain["loss_impl"] == "fused" and plain["checkpointing"] == 1.0  # SFTConfig's defaults
    from qlora_lab.cpu import allocator  # each worker ran with its recipe's allocator: ours as `qlora-lab train` would

    assert ours["allocator"] == allocator.resolve("auto") and plain["allocator"] == "system"
    (ratio,) = out["ratios"]
    assert ratio["tokens_per_s_ratio"] == pytest.approx(ours["tokens_per_s"] / plain["tokens_per_s"], abs=0.01)
    table = (tmp_path / "smoke.md").read_text()
    assert "| qlora | 160 | 2 | qlora_lab |" in table and "tokens/s ratio" in table
    assert table.count("Where the time goes") == 2
    assert "Quality after the 4 steps" in table and f"| {ours['quality_eval_loss']:.4f} |" in table
    assert (tmp_path / "smoke.png").stat().st_size > 0


def test_orpo_is_refused_with_the_reason():
    from omegaconf import OmegaConf

    from qlora_lab.bench.app import validate_bench
    from qlora_lab.config import BenchRunConfig
    from qlora_lab.errors import ConfigError

    cfg = OmegaConf.merge(OmegaConf.structured(BenchRunConfig), {"bench": {"methods": ["dpo", "orpo"]}})
    with pytest.raises(ConfigError, match="orpo is not benchmarked .* no tokens") as e:
        validate_bench(cfg)
    assert "1 problem(s)" in str(e.value)  # dpo is accepted


@pytest.mark.integration
def test_preference_rows_run_beside_trls_plain_trainer(tmp_path):
    """bench.methods=[dpo,kto]: our objective=... chain and TRL's trainer with its defaults, on the same rows as pairs."""
    proc = run_cli("bench", "model=tiny-random", "bench.methods=[dpo,kto]", "bench.seq_lens=[160]",
                   "bench.batch_sizes=[2]", "bench.steps=2", "bench.warmup_steps=1",
                   f"bench.results_dir={tmp_path}", "bench.name=prefs", f"hydra.run.dir={tmp_path / 'work'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "prefs.json").read_text())
    assert [(r["method"], r["recipe"]) for r in out["results"]] == [
        ("dpo", "qlora_lab"), ("dpo", "plain"), ("kto", "qlora_lab"), ("kto", "plain")]
    for r in out["results"]:
        assert r["status"] == "completed", r
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["trainable_params"] == 32768 and r["estimated_mb"] is None
        assert r["flops_per_token"] == 6 * r["matmul_params"]  # + the reference model's forward
    pairs = [json.loads(line) for line in (tmp_path / "work/pairs-160.jsonl").read_text().splitlines()]
    assert all(p["chosen"][0]["content"] != p["rejected"][0]["content"] for p in pairs)
    assert {x["method"] for x in out["ratios"]} == {"dpo", "kto"}
    assert "| dpo | 160 | 2 | qlora_lab |" in (tmp_path / "prefs.md").read_text()


@pytest.mark.integration  # the CLI's main in this process (no worker is started for a skipped row)
def test_gpu_rows_are_skipped_with_a_note_on_a_cpu_machine(cli_here, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = cli_here("bench", "model=llama-3.1-8b-arch", "bench.methods=[qlora]", "bench.seq_lens=[2048]",
                   f"bench.results_dir={tmp_path}", "bench.name=gpu", f"hydra.run.dir={tmp_path / 'work'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu.json").read_text())["results"]
    assert {r["status"] for r in rows} == {"skipped"} and "GPU" in rows[0]["note"]


def test_bad_bench_settings_are_reported_together(cli_here, tmp_path):
    proc = cli_here("bench", "bench.methods=[qlorra]", "bench.seq_lens=[]", "bench.steps=0",
                   f"hydra.run.dir={tmp_path}")
    assert_clean_failure(proc, "bench.methods='qlorra'", "Did you mean 'qlora'?", "bench.seq_lens=[]",
                         "bench.steps=0", "3 problem(s)")


def test_variants_get_their_own_ratio_and_bad_names_are_refused():
    from omegaconf import OmegaConf

    from qlora_lab.bench.app import ratios, validate_bench
    from qlora_lab.errors import ConfigError

    row = {"method": "qlora", "seq_len": 256, "batch": 8, "status": "completed", "peak_rss_mb": 100.0}
    results = [{**row, "recipe": "plain", "tokens_per_s": 100.0},
               {**row, "recipe": "qlora_lab", "tokens_per_s": 300.0},
               {**row, "recipe": "qlora_lab:shuffled", "tokens_per_s": 250.0, "peak_rss_mb": 150.0}]
    assert [(r["recipe"], r["tokens_per_s_ratio"], r["peak_mem_ratio"]) for r in ratios(results)] == [
        ("qlora_lab", 3.0, 1.0), ("qlora_lab:shuffled", 2.5, 1.5)]
    bench = {"methods": ["qlora"], "recipes": ["qlora_lab"], "seq_lens": [256], "batch_sizes": [8], "steps": 1,
             "warmup_steps": 0, "profile_steps": 0, "quality_rows": 0, "variants": {"a:b": ["batching=shuffled"]}}
    with pytest.raises(ConfigError, match="bench.variants: name 'a:b'"):
        validate_bench(OmegaConf.create({"bench": bench}))


def test_evaluations_during_training_are_not_in_the_step_times(monkeypatch):
    """A variant with trainer.eval_strategy=steps: the time of each evaluation (between one step's end and the next
    step) is reported apart, not in tokens/s or the step times; the eval losses are kept."""
    from types import SimpleNamespace

    from qlora_lab.bench import worker

    clock = iter([0.0, 1.0, 2.0, 12.0, 13.0, 14.0])  # train begins, step 1, step 2, its evaluation ends, steps 3-4
    monkeypatch.setattr(worker.time, "perf_counter", lambda: next(clock))
    timer, state = worker.StepTimer(), SimpleNamespace(num_input_tokens_seen=0)
    timer.on_train_begin(None, state, None)
    for step in (1, 2):
        state.num_input_tokens_seen = 100 * step
        timer.on_step_end(None, state, None)
    timer.on_evaluate(None, state, None, metrics={"eval_loss": 0.5})
    for step in (3, 4):
        state.num_input_tokens_seen = 100 * step
        timer.on_step_end(None, state, None)
    m = timer.measure(warmup=1, steps=3)
    assert m["step_times_s"] == [1.0, 1.0, 1.0, 1.0] and m["seconds"] == 3.0 and m["tokens_per_s"] == 100.0
    assert timer.eval_s == 10.0 and timer.eval_losses == [0.5]


def test_heldout_rows_are_encoded_as_training_encodes_a_chat_row():
    """The bench's quality loss is on the answer's tokens only, in the model's chat template."""
    from transformers import AutoTokenizer

    from qlora_lab import models, task

    tokenizer = AutoTokenizer.from_pretrained(models.resolve_model_path("builtin:tiny-random"))
    rows = task.demo_rows(2, "eval")
    for row, enc in zip(rows, task.encode_chat_rows(tokenizer, rows)):
        answer = [t for t in enc["labels"] if t != -100]
        assert len(enc["labels"]) == len(enc["input_ids"]) and enc["labels"][0] == -100
        assert enc["input_ids"][-len(answer):] == answer
        assert tokenizer.decode(answer).startswith(row["completion"])
        assert row["prompt"] in tokenizer.decode(enc["input_ids"][:-len(answer)])


@pytest.mark.parametrize("threshold, start, limit, step, expected, stop", [
    (5000, 512, 131072, 256, 4864, "5120 tokens do not fit"),      # doubling to 8192, then bisecting 4096..8192
    (70000, 8192, 131072, 1024, 69632, "70656 tokens do not fit"),
    (10**9, 512, 3000, 256, 3000, "fits at bench.max_seq_limit=3000"),  # the limit itself is probed once
    (100, 512, 4096, 256, None, "256 tokens do not fit"),          # halving down to the step
    (3000, 16384, 131072, 1024, 2048, "3072 tokens do not fit"),  # halving 16384 -> 2048, then bisecting
    (5500, 3000, 131072, 1024, 5120, "6000 tokens do not fit"),    # a start that is no multiple of the step
    (2700, 512, 3000, 256, 2560, "2816 tokens do not fit"),        # nor the limit
    (512, 512, 4096, 256, 512, "768 tokens do not fit"),
])
def test_max_seq_search_doubles_then_bisects_to_the_step(threshold, start, limit, step, expected, stop):
    from qlora_lab.bench.maxseq import longest

    probed = []

    def probe(length):
        probed.append(length)
        return length <= threshold

    best, why = longest(probe, start, limit, step)
    assert (best, why) == (expected, stop)
    assert len(probed) == len(set(probed))  # no length probed twice
    if expected and expected >= start:  # after the doubling's first failure (or the limit): on the step
        assert all(p % step == 0 for p in probed[probed.index(max(probed)) + 1:])


def test_a_probe_failing_for_another_reason_stops_the_search_and_is_not_read_as_too_long():
    from qlora_lab.bench.maxseq import fits, longest

    assert fits({"status": "completed", "within_budget": False}) is False
    assert fits({"status": "completed"}) is True
    assert fits({"status": "failed", "out_of_memory": True}) is False
    assert fits({"status": "failed", "out_of_memory": False, "error": "ValueError: x"}) is None
    assert longest(lambda n: True if n < 2048 else None, 512, 8192, 256) == (
        1024, "a probe at 2048 tokens failed for another reason than memory")


@pytest.mark.integration  # one CLI process, 4 probe processes on the tiny model
def test_max_seq_finds_each_recipes_longest_sequence_inside_the_budget(tmp_path):
    """On CPU the budget is the step's training memory (peak RSS above the imports): at 0.65 GiB (666 MiB) the plain
    recipe's full-vocabulary logits stop it at 256 tokens, where ours (selective loss) still fits 1024. Measured on
    the 2-core Xeon: ours 244-261 MiB from 128 to 1024 tokens; plain 330-360 at 128, 459 at 256, 808 at 512. The
    margins are wide on purpose: CI's machine measured plain at 128 tokens above 410 MiB (0.4 GiB failed there)."""
    budget_mb = 0.65 * 1024
    proc = run_cli("bench", "model=tiny-random", "bench.max_seq=true", "bench.methods=[qlora]", "bench.batch_sizes=[1]",
                   "bench.seq_lens=[512]", "bench.max_seq_limit=1024", "bench.max_seq_step=256",
                   "bench.memory_budget_gb=0.65", f"bench.results_dir={tmp_path}", "bench.name=maxseq",
                   f"hydra.run.dir={tmp_path / 'work'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "maxseq.json").read_text())
    ours, plain = out["searches"]
    probes = {s["recipe"]: [(p["seq_len"], p.get("used_mb")) for p in s["probes"]] for s in out["searches"]}
    assert (ours["recipe"], ours["max_seq"], ours["stopped"]) == ("qlora_lab", 1024, "fits at bench.max_seq_limit=1024"), probes
    # plain: 512 over the budget, so the search halves to 256 (fits) and the bisection has nothing left at step 256
    assert (plain["recipe"], plain["max_seq"], plain["stopped"]) == ("plain", 256, "512 tokens do not fit"), probes
    assert [p["seq_len"] for p in plain["probes"]] == [512, 256] and plain["probes"][0]["used_mb"] > budget_mb
    assert [p["seq_len"] for p in ours["probes"]] == [512, 1024]
    assert all(p["used_mb"] <= budget_mb for p in ours["probes"])
    assert out["ratios"] == [{"method": "qlora", "batch": 1, "recipe": "qlora_lab", "max_seq_ratio": 4.0}]
    # the probes trained on rows of the probed length (whole few-shot examples: a few tokens short at most)
    from transformers import AutoTokenizer

    from qlora_lab import models

    tokenizer = AutoTokenizer.from_pretrained(models.resolve_model_path("builtin:tiny-random"))
    rows = [json.loads(line) for line in (tmp_path / "work/rows-full-512.jsonl").read_text().splitlines()]
    lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) for r in rows]
    assert all(400 < n <= 512 for n in lengths), lengths
    assert "| qlora | 1 | plain | 256 | 512 tokens do not fit |" in (tmp_path / "maxseq.md").read_text()


def test_max_seq_on_cpu_needs_a_budget():
    import torch
    from omegaconf import OmegaConf

    from qlora_lab.bench.app import validate_bench
    from qlora_lab.config import BenchRunConfig
    from qlora_lab.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("on a GPU the card is the budget")
    cfg = OmegaConf.merge(OmegaConf.structured(BenchRunConfig), {"bench": {"max_seq": True, "max_seq_step": 0}})
    with pytest.raises(ConfigError, match=r"(?s)needs bench.memory_budget_gb.*max_seq_step=0") as e:
        validate_bench(cfg)
    assert "2 problem(s)" in str(e.value)


def test_gpu_targets_are_composed_from_the_phases_outputs_with_the_plain_recipe_beside(tmp_path):
    """benchmarks/gpu/targets.py (run at the end of run_targets.sh) on outputs shaped as the bench writes them: a
    phase that did not run is "not measured", never a number."""
    import runpy
    from pathlib import Path

    targets = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks/gpu/targets.py"))
    machine = {"gpu": "NVIDIA H200", "label": "NVIDIA-H200"}
    row = {"method": "qlora", "seq_len": 2048, "batch": 4, "status": "completed", "mfu": 0.2}
    (tmp_path / "budget24.json").write_text(json.dumps({"machine": machine, "results": [
        {**row, "recipe": "qlora_lab", "tokens_per_s": 3000.0, "cuda_max_reserved_mb": 20000},
        {**row, "recipe": "plain", "tokens_per_s": 1400.0, "cuda_max_reserved_mb": 23000},
        {**row, "recipe": "qlora_lab:offload", "tokens_per_s": 2800.0},
        {**row, "recipe": "qlora_lab:compiled", "status": "failed", "error": "OutOfMemoryError: x"}]}))
    (tmp_path / "maxseq24.json").write_text(json.dumps({"machine": machine, "searches": [
        {"recipe": "qlora_lab", "max_seq": 73728, "stopped": "81920 tokens do not fit"},
        {"recipe": "plain", "max_seq": 8192, "stopped": "16384 tokens do not fit"}]}))
    (tmp_path / "maxseq12.json").write_text(json.dumps({"machine": machine, "searches": [  # ran, found nothing
        {"recipe": "qlora_lab", "max_seq": None, "stopped": "2048 tokens do not fit"}]}))
    res = targets["compose"](tmp_path)
    t = res["targets"]
    assert res["card"] == "NVIDIA H200"
    assert (t["speed_at_24gb"]["measured"], t["speed_at_24gb"]["met"]) == (2.14, True)
    assert t["speed_at_24gb"]["plain_tokens_per_s"] == 1400.0
    assert t["speed_at_24gb"]["variants"] == {"qlora_lab:offload": 2.0}  # the failed variant has no ratio
    assert (t["longest_seq_at_24gb"]["measured"], t["longest_seq_at_24gb"]["plain"], t["longest_seq_at_24gb"]["met"]) \
        == (73728, 8192, True)
    assert t["mfu_seq4096"]["measured"] is None and t["mfu_seq4096"]["met"] is None  # did not run
    assert t["longest_seq_at_12gb"]["measured"] is None and t["longest_seq_at_12gb"]["met"] is False  # ran, no fit
    table = targets["markdown"](res)
    assert "| 2.0 | 2.14 | 1400.0 | yes |" in table and table.count("not measured") == 1
    assert "no (ran, no value" in table
