

# ---------------------------------------------------------------- attention "auto": the kernel each device wants


def test_auto_attention_is_klbelt_fp32_on_the_cpu_and_sdpa_on_a_gpu():
    from klbelt.rl.attention import current, resolve, set_attention
    from klbelt.rl.config import TrainConfig
    from klbelt.demo.task import ENGLISH_DEMO_CONFIG
    from tiny_models import tiny_llama

    assert resolve("auto", "cpu") == "klbelt_fp32" and resolve("auto", torch.device("cuda")) == "sdpa"
    assert resolve("eager", "cuda") == "eager"  # an explicit choice is kept on every device
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        resolve("flash", "cpu")
    assert TrainConfig(attn_implementation="auto").attn_implementation == "auto"
    assert ENGLISH_DEMO_CONFIG.attn_implementation == "auto"  # the English demo: its CPU kernel here, SDPA on a GPU
    model = tiny_llama(10)
    assert set_attention(model, "auto") == "sdpa" and current(model) == "klbelt_fp32"
