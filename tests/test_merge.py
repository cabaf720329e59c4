"""`merge` and `chat` on tiny-model runs: merged == base + adapter, refusals, and the same greedy tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from qlora_lab import chat as chat_mod
from qlora_lab import task
from qlora_lab.config import CONF_DIR
from qlora_lab.errors import UserError
from qlora_lab.merge import merge, pick_base
from qlora_lab.train import train
from tests.conftest import TINY, compose_train
from tests.test_cli import assert_clean_failure, run_cli

pytestmark = pytest.mark.integration
QUICK = [*TINY, "trainer.learning_rate=1e-2", "score_before=false", "trainer.save_strategy=no"]


def app_cfg(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def trained_run(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    run = tmp_path_factory.mktemp(name)
    train(compose_train([*QUICK, *overrides], run))
    # a run made through the Python API has no .hydra/ (only the Hydra shell writes it): merge and chat must not
    # need it (they read config.yaml and metrics.json, which train() writes)
    assert not (run / ".hydra").exists()
    return run


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory, "qlora", [])


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory, "fp32", ["quant=none", "model.dtype=float32", "trainer.bf16=false"])


def plain_base_plus_adapter(run: Path, **kwargs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_lab.models import resolve_model_path
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-random"), device_map={"": "cpu"},
                                                **kwargs)
    return PeftModel.from_pretrained(base, run / "adapter").eval()


IDS = torch.tensor([[1, 520, 3300, 42, 17, 998, 205, 2, 77, 4000]])


def test_fp32_merge_matches_base_plus_adapter_tightly(fp32_run, tmp_path):
    from transformers import AutoModelForCausalLM

    info = merge(app_cfg("merge", [f"run={fp32_run}", f"out={tmp_path / 'm'}", "dtype=float32"]))
    assert info["merge_base"] == "original" and info["check"]["top1_agreement"] == 1.0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()  # no peft involved
    assert not any("lora" in n for n, _ in merged.named_parameters())
    reference = plain_base_plus_adapter(fp32_run, dtype=torch.float32)
    with torch.no_grad():
        delta = (merged(input_ids=IDS).logits - reference(input_ids=IDS).logits.cpu()).abs().max().item()
    assert delta < 1e-4, delta  # fp32 end to end: only summation order differs


def test_qlora_merge_defaults_to_nf4_roundtrip_and_beats_original(qlora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    rt = merge(app_cfg("merge", [f"run={qlora_run}", f"out={tmp_path / 'rt'}", "score=false"]))
    orig = merge(app_cfg("merge", [f"run={qlora_run}", f"out={tmp_path / 'orig'}", "base=original"]))
    assert rt["merge_base"] == "nf4_roundtrip" and rt["dtype"] == "bfloat16"
    # the documented default: merging into the weights the adapter saw reproduces the trained model better
    assert rt["check"]["max_abs_logit_delta"] < orig["check"]["max_abs_logit_delta"]
    # bf16 tolerance: the merged weights are rounded to bf16 once (|Δlogit| of a few bf16 ulps)
    assert rt["check"]["max_abs_logit_delta"] < 2e-2 and rt["check"]["top1_agreement"] >= 0.99
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "rt")
    assert merged.dtype == torch.bfloat16
    files = {p.name for p in (tmp_path / "rt").iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
            "README.md", "merge_info.json"} <= files
    assert "nf4_roundtrip" in (tmp_path / "rt" / "README.md").read_text()
    assert json.loads((tmp_path / "rt" / "merge_info.json").read_text())["check"] == rt["check"]


def test_auto_scores_both_bases_on_the_heldout_rows_and_records_them(qlora_run, tmp_path):
    info = merge(app_cfg("merge", [f"run={qlora_run}", f"out={tmp_path / 'auto'}"]))
    cands = info["candidates"]
    assert set(cands) == {"nf4_roundtrip", "original"} and info["selected_by"] == "task score"
    for r in cands.values():
        assert r["task_rows"] == 4 and 0 <= r["task_score"] <= 1
        assert 0 < r["eval_loss"] < 20, r  # a real loss of the tiny random model (ln(vocab) ~ 10)
    assert cands["nf4_roundtrip"]["eval_loss"] != cands["original"]["eval_loss"]  # two different models were scored
    assert info["merge_base"] == pick_base(cands)
    assert json.loads((tmp_path / "auto" / "merge_info.json").read_text())["candidates"] == cands


@pytest.mark.parametrize("scores", [{"nf4_roundtrip": 0.5, "original": 0.75}, {"nf4_roundtrip": 0.5, "original": 0.5},
                                    {"nf4_roundtrip": 0.75, "original": 0.5}])
def test_auto_saves_the_better_scored_base_exactly_as_forcing_it_would(qlora_run, tmp_path, monkeypatch, scores):
    """The kept model is the winner's merge byte for byte, whether it was built last or rebuilt after scoring the
    other (the scores are set, so that each branch is taken; ties go to the faithful nf4_roundtrip)."""
    from safetensors.torch import load_file

    from qlora_lab import merge as merge_mod

    built = []
    real = merge_mod.merged_on
    monkeypatch.setattr(merge_mod, "merged_on", lambda run, base, *a: built.append(base) or real(run, base, *a))
    by_loss = {}

    def fake_quality(model, tokenizer, held, metric, run):
        loss = task.heldout_loss(model, held["encoded"])
        base = built[-1]
        by_loss[base] = loss
        return {"task_score": scores[base], "task_rows": 4, "eval_loss": loss}

    monkeypatch.setattr(merge_mod, "quality", fake_quality)
    info = merge(app_cfg("merge", [f"run={qlora_run}", f"out={tmp_path / 'auto'}"]))
    expected = "original" if scores["original"] > scores["nf4_roundtrip"] else "nf4_roundtrip"
    assert info["merge_base"] == expected
    assert built == ["nf4_roundtrip", "original"] + (["nf4_roundtrip"] if expected == "nf4_roundtrip" else [])
    monkeypatch.undo()
    merge(app_cfg("merge", [f"run={qlora_run}", f"out={tmp_path / 'forced'}", f"base={expected}"]))
    got, want = load_file(tmp_path / "auto/model.safetensors"), load_file(tmp_path / "forced/model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_score_samples_sets_the_rows_each_base_is_scored_on(qlora_run, tmp_path):
    info = merge(app_cfg("merge", [f"run={qlora_run}", f"out={tmp_path / 'm'}", "score_samples=2"]))
    assert {r["task_rows"] for r in info["candidates"].values()} == {2}  # the run itself scored 4


def test_pick_base_prefers_the_score_then_the_faithful_one():
    def r(score, agree):
        return {"task_score": score, "check": {"top1_agreement": agree}}
    assert pick_base({"nf4_roundtrip": r(0.646, 0.981), "original": r(0.771, 0.59)}) == "original"
    assert pick_base({"nf4_roundtrip": r(0.7, 0.981), "original": r(0.7, 0.59)}) == "nf4_roundtrip"
    assert pick_base({"nf4_roundtrip": r(0.8, 0.981), "original": r(0.7, 0.59)}) == "nf4_roundtrip"


def test_score_false_and_forced_bases_score_nothing(qlora_run, tmp_path, monkeypatch):
    from qlora_lab import merge as merge_mod

    monkeypatch.setattr(merge_mod, "quality", lambda *a: pytest.fail("scored"))
    info = merge(app_cfg("merge", [f"run={qlora_run}", f"out={tmp_path / 'a'}", "score=false"]))
    assert info["merge_base"] == "nf4_roundtrip" and "candidates" not in info
    info = merge(app_cfg("merge", [f"run={qlora_run}", f"out={tmp_path / 'b'}", "base=original"]))
    assert info["merge_base"] == "original" and info["selected_by"] == "base=original"


@pytest.fixture(scope="module")
def loftq_run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory, "loftq", ["adapter=loftq"])


@pytest.mark.parametrize("run_fixture", ["qlora_run", "loftq_run"])
def test_nf4_roundtrip_merge_is_the_trained_base_plus_the_adapter_exactly(run_fixture, request, tmp_path):
    """Every merged weight: what the trained model computes with — its 4-bit layers' dequantized weights plus
    scale·B·A where adapted, its own copies elsewhere (model.dtype, not the checkpoint's float32 originals). The same
    for a LoftQ run, whose adapter also carries the 4-bit error it started from (merge's default base for it)."""
    qlora_run = request.getfixturevalue(run_fixture)
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    from qlora_lab.runs import load_run, load_trained

    merge(app_cfg("merge", [f"run={qlora_run}", f"out={tmp_path / 'm'}", "dtype=float32"]))
    merged = load_file(tmp_path / "m/model.safetensors")
    trained, _ = load_trained(load_run(qlora_run))
    expected = {}
    for name, module in trained.named_modules():
        key = name.removeprefix("base_model.model.") + ".weight"
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            # 4-bit, or down_proj kept in 16-bit (quant.skip_modules=auto on this small model)
            assert isinstance(base, bnb.nn.Linear4bit) or name.endswith("down_proj"), name
            weight = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float() \
                if isinstance(base, bnb.nn.Linear4bit) else base.weight.detach().float()
            a, b = module.lora_A["default"].weight.float(), module.lora_B["default"].weight.float()
            expected[key] = weight + (b @ a) * module.scaling["default"]
    for name, param in trained.named_parameters():
        key = name.removeprefix("base_model.model.")
        if "lora_" not in name and ".base_layer." not in name:
            expected[key] = param.detach().float()
    assert merged.keys() <= expected.keys() and len(merged) > 10
    for key, tensor in merged.items():
        assert tensor.dtype == torch.float32
        assert torch.allclose(tensor, expected[key], rtol=0, atol=1e-6), (key, (tensor - expected[key]).abs().max())


def test_prefix_adapter_is_refused_and_nothing_is_written(tmp_path_factory, tmp_path):
    run = trained_run(tmp_path_factory, "prefix", ["adapter=prefix"])
    with pytest.raises(UserError, match="adapter=prefix, which adds virtual tokens"):
        merge(app_cfg("merge", [f"run={run}", f"out={tmp_path / 'm'}"]))
    assert not (tmp_path / "m").exists() and not (run / "merged").exists()
    # chat still serves it
    answer = chat_mod.chat(app_cfg("chat", [f"run={run}", "prompt=Hi", "max_new_tokens=3", "stream=false"]))
    assert isinstance(answer, str)


def test_missing_and_incomplete_runs_fail_clearly(tmp_path):
    with pytest.raises(UserError, match="no such run directory"):
        merge(app_cfg("merge", [f"run={tmp_path / 'nope'}"]))
    half = tmp_path / "half"
    (half / ".hydra").mkdir(parents=True)
    (half / ".hydra" / "config.yaml").write_text("{}")
    with pytest.raises(UserError, match="is incomplete"):
        merge(app_cfg("merge", [f"run={half}"]))
    assert not (half / "merged").exists()


def test_chat_gives_the_same_greedy_tokens_from_the_run_and_its_merged_folder(fp32_run, tmp_path):
    merge(app_cfg("merge", [f"run={fp32_run}", f"out={tmp_path / 'm'}", "dtype=float32"]))
    common = ["prompt=Tell me a fact.", "max_new_tokens=12", "stream=false"]
    from_run = chat_mod.chat(app_cfg("chat", [f"run={fp32_run}", *common]))
    from_merged = chat_mod.chat(app_cfg("chat", [f"run={tmp_path / 'm'}", *common]))
    assert from_run == from_merged and len(from_run) > 0


def test_chat_sampling_is_drawn_from_its_seed(fp32_run):
    common = [f"run={fp32_run}", "prompt=Hi", "max_new_tokens=8", "stream=false", "do_sample=true", "temperature=1.5"]
    samples = [chat_mod.chat(app_cfg("chat", [*common, f"seed={s}"])) for s in range(1, 6)]
    assert chat_mod.chat(app_cfg("chat", [*common, "seed=1"])) == samples[0]  # the same seed: the same answer
    assert len(set(samples)) == len(samples), samples  # each seed its own draw: none ignored or replaced
    greedy = chat_mod.chat(app_cfg("chat", [f"run={fp32_run}", "prompt=Hi", "max_new_tokens=8", "stream=false"]))
    assert greedy not in samples  # and they are samples, not the greedy answer


def finished_run_dir(folder: Path, overrides: list[str]) -> Path:
    """What load_run() accepts as a completed run (its config, status completed, an adapter folder) without training
    one: the refusals below happen before any weight is read."""
    from omegaconf import OmegaConf

    from qlora_lab.rundir import RUN_CONFIG

    folder.mkdir(parents=True)
    OmegaConf.save(compose_train([*QUICK, *overrides], folder), folder / RUN_CONFIG)
    (folder / "metrics.json").write_text(json.dumps({"status": "completed"}))
    (folder / "adapter").mkdir()
    (folder / "adapter" / ("config.json" if "adapter=full" in overrides else "adapter_config.json")).write_text("{}")
    return folder


def test_chat_on_an_interrupted_run_says_it_is_incomplete(tmp_path):
    run = finished_run_dir(tmp_path / "run", [])
    (run / "metrics.json").write_text(json.dumps({"status": "preempted"}))  # config.yaml and metrics.json, no .hydra/
    shutil.rmtree(run / "adapter")
    with pytest.raises(UserError, match="is incomplete .* Resume it"):
        chat_mod.chat(app_cfg("chat", [f"run={run}", "prompt=Hi"]))


REFUSALS = {  # run's train overrides, merge overrides, what the message must say (the field, the fix)
    "bad-base": ([], ["base=nf4"], ["base='nf4'", "use one of auto, original, nf4_roundtrip"]),
    "bad-dtype": ([], ["dtype=int8"], ["dtype='int8'", "use one of bfloat16, float16, float32"]),
    "nf4_roundtrip-without-4bit": (["quant=none"], ["base=nf4_roundtrip"],
                                   ["base=nf4_roundtrip", "trained on quant=none", "Use base=original"]),
    # a fabricated folder: the refusal reads only the run's config
    "loftq-on-original": (["adapter=loftq"], ["base=original"],
                          ["base=original", "adapter.init=loftq", "would count twice", "Use base=nf4_roundtrip"]),
    "full-fine-tune": (["adapter=full", "quant=none"], [], ["was a full fine-tune", "{run}/adapter already is a "
                                                            "standalone model"]),  # the fix: use that folder as is
}


@pytest.mark.parametrize("case", REFUSALS)
def test_merge_refuses_what_it_cannot_merge_and_says_why(tmp_path, case):
    run_overrides, args, needles = REFUSALS[case]
    run, out = finished_run_dir(tmp_path / "run", run_overrides), tmp_path / "merged"
    with pytest.raises(UserError) as e:
        merge(app_cfg("merge", [f"run={run}", f"out={out}", *args]))
    for needle in needles:
        assert needle.format(run=run) in str(e.value), (needle, str(e.value))
    assert not out.exists() and not (run / "merged").exists()


def test_merge_refusal_on_the_command_line_is_one_message_and_exit_2(tmp_path):
    run_overrides, args, needles = REFUSALS["full-fine-tune"]
    run = finished_run_dir(tmp_path / "run", run_overrides)
    proc = run_cli("merge", f"run={run}", *args)
    assert_clean_failure(proc, "error: ", *(n.format(run=run) for n in needles))  # exit 2, no traceback
    assert not (run / "merged").exists()
