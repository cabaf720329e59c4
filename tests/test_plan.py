"""The run's plan (qlora_lab/plan.py): every `auto` decided once and recorded; a resume on another machine that would
change the numerics is refused; the modules' import graph has no cycle; validating a config initialises nothing."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qlora_lab import plan
from qlora_lab.errors import UserError
from tests.conftest import TINY, compose_train

ROOT = Path(__file__).resolve().parent.parent
CPU = plan.Machine(device="cpu", accelerator="cpu", bf16=True, world_size=1)
SHORT = [*TINY, "trainer.max_steps=2", "trainer.save_steps=1", "score_before=false", "data.task_eval_samples=0"]


def _flat(tree, prefix=""):
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


@pytest.mark.integration
def test_a_run_records_its_plan_and_every_auto_is_resolved_there_then_a_resume_elsewhere_is_refused(
        tmp_path, monkeypatch):
    from qlora_lab import train as train_mod

    train_mod.train(compose_train(SHORT, tmp_path))
    config = _flat(OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml")))
    recorded = json.loads((tmp_path / "plan.json").read_text())
    autos = sorted(k for k, v in config.items() if v == "auto")
    assert {"model.dtype", "quant.compute_dtype", "loss", "kernels", "adapter.dropout_impl", "allocator",
            "memory_budget_gb", "data.format"} <= set(autos)
    for key in autos:  # config.yaml + plan.json: no `auto` left unresolved
        assert key in recorded["resolved"], key
        assert recorded["resolved"][key] != "auto", key
    assert "auto" not in _flat(recorded).values()
    assert recorded["machine"]["device"] == "cpu" and recorded["model_type"] == "llama"

    # the same run resumed (trained longer) where bf16 is not supported: other dtypes -> refused, naming them
    no_bf16 = dataclasses.replace(plan.Machine.detect(), bf16=False)
    monkeypatch.setattr(plan.Machine, "detect", classmethod(lambda cls: no_bf16))
    longer = [*SHORT, "trainer.max_steps=3"]
    before = (tmp_path / "plan.json").read_text()
    with pytest.raises(UserError, match=r"(?s)compute_dtype: 'bfloat16' when the run started, 'float32' now.*"
                                        r"resume.allow_plan_change=true"):
        train_mod.train(compose_train(longer, tmp_path))
    assert (tmp_path / "plan.json").read_text() == before  # nothing recorded by the refused resume
    # asked for explicitly: resumed, and the new plan recorded
    metrics = train_mod.train(compose_train([*longer, "resume.allow_plan_change=true"], tmp_path))
    assert metrics["global_step"] == 3
    assert json.loads((tmp_path / "plan.json").read_text())["compute_dtype"] == "float32"


def test_the_plan_resolves_auto_per_machine():
    from transformers import LlamaConfig

    cfg = compose_train(TINY)
    llama = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256)
    cpu = plan.make(cfg, CPU, llama, (128, 0.5))
    assert (cpu.model_dtype, cpu.compute_dtype, cpu.mixed_precision) == ("bfloat16", "bfloat16", "bf16")
    assert (cpu.loss, cpu.kernels, cpu.dropout_impl) == ("selective", "lean", "recompute")
    old_cpu = plan.make(cfg, dataclasses.replace(CPU, bf16=False), llama, (128, 0.5))
    assert (old_cpu.model_dtype, old_cpu.compute_dtype, old_cpu.mixed_precision) == ("float32", "float32", "no")
    gpu = dataclasses.replace(CPU, device="cuda", accelerator="cuda", gpu_name="X", gpu_memory_gb=24.0)
    on_gpu = plan.make(cfg, gpu, llama, (128, 0.5))
    assert (on_gpu.kernels, on_gpu.dropout_impl, on_gpu.memory_budget_gb) == ("none", "torch", 21.6)
    assert plan.numeric_differences(plan.make(cfg, CPU, llama).to_json(), old_cpu) == [
        "model_dtype: 'bfloat16' when the run started, 'float32' now",
        "compute_dtype: 'bfloat16' when the run started, 'float32' now",
        "mixed_precision: 'bf16' when the run started, 'no' now"]
    assert "Plan:" in plan.describe(cpu) and "selective / lean / recompute" in plan.describe(cpu)


def test_cpu_levers_apply_only_to_the_families_they_are_tested_on_and_the_plan_says_so():
    from transformers import GPT2Config

    from qlora_lab.cpu.kernels import LEAN_FAMILIES

    assert set(LEAN_FAMILIES) == {"llama", "mistral", "qwen2"}  # each in tests/test_kernels.py
    p = plan.make(compose_train(TINY), CPU, GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256))
    assert p.kernels == "none"
    assert any("lean kernels are tested on llama, mistral, qwen2 only, not 'gpt2'" in n for n in p.notes)
    asked = plan.make(compose_train([*TINY, "kernels=lean"]), CPU, GPT2Config(n_layer=1, n_embd=32, n_head=2))
    assert asked.kernels == "none" and "plan" not in asked.notes  # asked for lean, told why not


def test_validating_a_config_leaves_accelerate_and_cuda_untouched():
    import subprocess
    import sys

    code = """
import torch
from accelerate.state import AcceleratorState, PartialState
from tests.conftest import TINY, compose_train
from qlora_lab.validate import validate
import os
env = dict(os.environ)
validate(compose_train(TINY))
assert not PartialState._shared_state, PartialState._shared_state
assert not AcceleratorState._shared_state
assert not torch.cuda.is_initialized()
assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())
print("untouched")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "untouched" in out.stdout, out.stderr[-3000:]


def _import_graph() -> dict[str, set[str]]:
    """qlora_lab module -> the qlora_lab modules it imports, at the top or inside functions."""
    files = {}
    for f in (ROOT / "qlora_lab").rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = f
    graph = {m: set() for m in files}
    for m, f in files.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlora_lab"):
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t in files and t not in (m, "qlora_lab")}
    return graph


def test_the_import_graph_has_no_cycle_and_config_is_a_leaf():
    graph = _import_graph()
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, cycles
    assert graph["qlora_lab.config"] == {"qlora_lab.sftconfig"}
    assert graph["qlora_lab.sftconfig"] <= {"qlora_lab.errors"}
    assert len(graph) > 20 and graph["qlora_lab.train"]  # the graph is really read


def test_every_schema_field_has_its_doc_where_ides_and_help_see_it():
    from qlora_lab.config import SCHEMAS, TrainerConfig, field_help

    missing = []
    for schema in {*SCHEMAS.values()}:
        stack = [schema]
        while stack:
            s = stack.pop()
            for f in dataclasses.fields(s):
                sub = f.default_factory if isinstance(f.default_factory, type) else None
                if sub is not None and dataclasses.is_dataclass(sub):
                    stack.append(sub)
                    continue
                if not field_help(s, f.name):
                    missing.append(f"{s.__name__}.{f.name}")
    assert not missing, missing
    assert field_help(TrainerConfig, "learning_rate")  # TRL's own help for the trainer group
    from qlora_lab.config import AdapterConfig
    assert field_help(AdapterConfig, "r").startswith("LoRA rank: a number, or \"auto\" = 64 for models under 1B")
