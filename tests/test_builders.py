"""Each quant / adapter field reaches the bitsandbytes and peft configs it is documented to set."""

from __future__ import annotations

import pytest
import torch

from qlora_lab.adapters import build_peft_config
from qlora_lab.models import quantization_config
from tests.conftest import compose_train


def quant(*overrides):
    return quantization_config(compose_train(list(overrides)).quant)


def adapter(*overrides):
    return build_peft_config(compose_train(list(overrides)).adapter, tokenizer_path="/some/model")


def test_quantization_fields_reach_bitsandbytes():
    q = quant("quant=nf4")
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert quant("quant=nf4-single").bnb_4bit_use_double_quant is False
    assert quant("quant=fp4").bnb_4bit_quant_type == "fp4"
    assert quant("quant=int8").load_in_8bit is True
    assert quant("quant=none") is None
    assert quant("quant.compute_dtype=float32").bnb_4bit_compute_dtype == torch.float32
    assert quant("quant.quant_storage=bfloat16").bnb_4bit_quant_storage == torch.bfloat16
    # an explicit skip list keeps the output head unquantized too
    assert quant("quant.skip_modules=[down_proj]").llm_int8_skip_modules == ["down_proj", "lm_head"]
    assert quant().llm_int8_skip_modules is None  # transformers' own default then applies


def test_lora_family_fields_reach_peft():
    from peft import LoraConfig

    c = adapter("adapter.r=8", "adapter.alpha=4", "adapter.dropout=0.1", "adapter.target_modules=[q_proj,v_proj]",
                "adapter.modules_to_save=[lm_head]")
    assert isinstance(c, LoraConfig)
    assert (c.r, c.lora_alpha, c.lora_dropout, set(c.target_modules)) == (8, 4, 0.1, {"q_proj", "v_proj"})
    assert list(c.modules_to_save) == ["lm_head"]
    assert adapter("adapter=rslora").use_rslora is True
    assert adapter("adapter=dora").use_dora is True
    assert adapter("adapter=pissa", "quant=none").init_lora_weights == "pissa_niter_4"
    assert adapter("adapter=olora", "quant=none").init_lora_weights == "olora"
    assert adapter("adapter=loftq").init_lora_weights is True  # LoftQ is applied after loading (apply_post_init)


@pytest.mark.parametrize("overrides, expected", [
    (["adapter=prefix", "adapter.num_virtual_tokens=8", "adapter.prefix_projection=true"],
     {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8, "prefix_projection": True}),
    (["adapter=prompt", "adapter.prompt_init_text=Extract as JSON:"],
     {"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Extract as JSON:",
      "tokenizer_name_or_path": "/some/model"}),
    (["adapter=prompt"], {"prompt_tuning_init": "RANDOM"}),
    (["adapter=ptuning", "adapter.encoder_hidden_size=32"], {"peft_type": "P_TUNING", "encoder_hidden_size": 32}),
    (["adapter=ia3"], {"peft_type": "IA3", "feedforward_modules": {"down_proj"}}),
])
def test_other_adapter_fields_reach_peft(overrides, expected):
    c = adapter(*overrides)
    for key, want in expected.items():
        got = getattr(c, key)
        got = got.value if hasattr(got, "value") else got
        assert (set(got) if isinstance(want, set) else got) == want, key


def test_full_fine_tuning_has_no_peft_config():
    assert adapter("adapter=full", "quant=none") is None
