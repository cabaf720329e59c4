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


def test_loss_auto_takes_trls_loss_where_only_it_computes_the_configured_loss():
    from transformers import LlamaConfig, MixtralConfig

    from qlora_lab.errors import ConfigError
    from qlora_lab.plan import _loss
    from qlora_lab.validate import validate

    def loss_impl(cfg, model_config):
        return _loss(cfg, model_config, [])

    llama = LlamaConfig(num_hidden_layers=1)
    assert loss_impl(compose_train([]), llama) == "selective"
    for extra in (["trainer.loss_type=dft"], ["trainer.label_smoothing_factor=0.1"]):
        assert loss_impl(compose_train(extra), llama) == "fused"
    assert loss_impl(compose_train([]), MixtralConfig(num_hidden_layers=1)) == "fused"  # its router aux loss
    with pytest.raises(ConfigError, match="loss=native with trainer.loss_type=dft: only TRL's own loss"):
        validate(compose_train(["loss=native", "trainer.loss_type=dft"]))
    with pytest.raises(ConfigError, match="loss=selective with trainer.label_smoothing_factor=0.1"):
        validate(compose_train(["loss=selective", "trainer.label_smoothing_factor=0.1"]))


@pytest.mark.parametrize("value, on", [("null", False), ("false", False), ("true", True)])
def test_gradient_checkpointing_unset_means_off_not_trls_default(tmp_path, value, on):
    from qlora_lab.sftconfig import build_sft_config

    args = build_sft_config(compose_train([f"trainer.gradient_checkpointing={value}"]).trainer, tmp_path, cuda=False,
                            mixed_precision="no")
    assert args.activation_checkpointing is on


def test_an_adapter_on_the_output_layer_is_refused_with_the_alternative():
    from qlora_lab.errors import ConfigError
    from qlora_lab.validate import validate

    refused = r"TRL's SFTTrainer trains no adapter on lm_head.*modules_to_save=\[lm_head\]"
    with pytest.raises(ConfigError, match=refused):
        validate(compose_train(["adapter.target_modules=[q_proj,lm_head]"]))


def test_trainer_settings_transformers_refuses_are_reported_with_the_rest_before_loading():
    from qlora_lab.errors import ConfigError
    from qlora_lab.validate import validate

    with pytest.raises(ConfigError) as e:
        # keep=last: keep=best (the default when evaluating) would align the saves with the evaluations itself
        validate(compose_train(["adapter.r=0", "trainer.load_best_model_at_end=true", "trainer.eval_strategy=steps",
                                "trainer.eval_steps=3", "trainer.save_steps=2", "keep=last"]))
    assert "2 problem(s)" in str(e.value) and "adapter.r=0" in str(e.value)
    assert "trainer.load_best_model_at_end requires the saving steps to be a round multiple" in str(e.value)


def test_estimate_counts_each_parameter_state_once():
    from transformers import LlamaConfig

    from qlora_lab.estimate import count_params, estimate

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=1000)
    total = count_params(config)["total"]
    full = estimate(config, quant="none", adapter="full")
    # bf16 full fine-tuning: the weight (2 bytes) + gradient, AdamW exp_avg and exp_avg_sq (2 bytes each)
    assert (full["weights_bytes"], full["trainable_bytes"]) == (2 * total, 6 * total)
    lora = estimate(config, quant="nf4", adapter="lora")
    # LoRA on a 4-bit base: bf16 adapter, gradient and two AdamW states, 2 bytes each
    assert lora["trainable_bytes"] == 8 * lora["trainable_params"] and lora["weights_bytes"] < 2 * total
