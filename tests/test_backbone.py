"""The plain-head check: a head that does more than ``hidden · Wᵀ`` is refused, naming the config key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from egrsd_pl.backbone import UnsupportedHeadError, check_plain_head


def model_with(bias: bool = False, text_config: dict | None = None, **config) -> SimpleNamespace:
    head = torch.nn.Linear(4, 8, bias=bias)
    text = SimpleNamespace(**text_config) if text_config is not None else None
    return SimpleNamespace(
        config=SimpleNamespace(text_config=text, **config), get_output_embeddings=lambda: head
    )


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"logit_scale": 0.0625}, "logit_scale"),  # Cohere
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),  # Gemma 2
        ({"logits_scaling": 8.0}, "logits_scaling"),  # Granite
        ({"output_multiplier_scale": 0.5}, "output_multiplier_scale"),
        ({"text_config": {"final_logit_softcapping": 30.0}}, "final_logit_softcapping"),  # multimodal wrapper
    ],
)
def test_a_head_that_transforms_logits_is_refused_naming_the_key(config, key):
    with pytest.raises(UnsupportedHeadError, match=f"config key '{key}'") as error:
        check_plain_head(model_with(**config), "org/model")
    assert "--model.model_name_or_path 'org/model'" in str(error.value) and "\n" not in str(error.value)


def test_neutral_values_and_a_plain_head_pass():
    check_plain_head(model_with(logit_scale=1.0, logits_scaling=1, final_logit_softcapping=None), "m")


def test_a_head_with_a_bias_is_refused():
    with pytest.raises(UnsupportedHeadError, match="bias"):
        check_plain_head(model_with(bias=True), "m")
