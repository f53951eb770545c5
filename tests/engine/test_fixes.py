"""Fixes made while moving decoding into the engine: dynamic RoPE is refused at validation (it
used to pass validation and fail at build), models and checkpoints import without each other, an
unknown model_type is refused with the supported families, and no config flag is left unused."""

import subprocess
import sys

import pytest

from lmforge.checkpoints.hf import family_of
from lmforge.config import ConfigError, ModelConfig


def test_dynamic_rope_is_refused_with_the_alternatives():
    with pytest.raises(ConfigError, match=r"'dynamic'.*KV cache.*'ntk'") as e:
        ModelConfig.from_name("smollm2-135m", rope_scaling={"type": "dynamic", "factor": 2.0})
    assert "\n" not in str(e.value)
    ModelConfig.from_name("smollm2-135m", rope_scaling={"type": "ntk", "factor": 2.0})  # the fixed form works


@pytest.mark.parametrize("first, other", [("lmforge.models", "lmforge.checkpoints"), ("lmforge.checkpoints", "lmforge.models")])
def test_models_and_checkpoints_import_without_each_other(first, other):
    code = f"import sys, {first}; print({other!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_unknown_model_type_names_the_supported_families():
    with pytest.raises(ConfigError, match="model_type 'falcon'.*gpt2, llama, mistral, qwen2, t5"):
        family_of({"model_type": "falcon"})
    assert family_of({"model_type": "qwen2"}) == "qwen2"
    assert not hasattr(ModelConfig, "is_decoder")
