"""Kind and layout guesses from PyTorch-style names, on names real checkpoints use."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weightatlas.adapters._naming import infer, is_norm_module, split
from weightatlas.storage._record import KINDS

CONV2D = ("conv2d", ("out", "in", "h", "w"))
LINEAR = ("linear", ("out", "in"))
ATTN = ("attention", ("out", "in"))
EMBED = ("embedding", ("vocab", "dim"))
NORM = ("norm", ("channel",))

# (name, shape, expected) from torchvision ResNet, GPT-2, Llama, BERT, T5, ViT, nn.LSTM...
CASES = [
    # ResNet
    ("conv1.weight", (64, 3, 7, 7), CONV2D),
    ("bn1.weight", (64,), NORM),
    ("bn1.running_mean", (64,), NORM),
    ("bn1.num_batches_tracked", (), ("norm", ())),
    ("layer1.0.downsample.0.weight", (256, 64, 1, 1), CONV2D),
    ("layer1.0.downsample.1.weight", (256,), NORM),
    ("layer1.0.downsample.1.running_var", (256,), NORM),
    ("fc.weight", (1000, 2048), LINEAR),
    # GPT-2
    ("transformer.wte.weight", (50257, 768), EMBED),
    ("transformer.wpe.weight", (1024, 768), EMBED),
    ("transformer.h.0.ln_1.weight", (768,), NORM),
    ("transformer.h.0.ln_1.bias", (768,), NORM),
    ("transformer.ln_f.bias", (768,), NORM),
    ("transformer.h.0.attn.c_attn.weight", (768, 2304), ATTN),
    ("transformer.h.0.attn.bias", (1, 1, 1024, 1024), ("other", ("d0", "d1", "d2", "d3"))),
    ("transformer.h.0.mlp.c_fc.weight", (768, 3072), LINEAR),
    ("lm_head.weight", (50257, 768), LINEAR),
    # Llama
    ("model.embed_tokens.weight", (32000, 4096), EMBED),
    ("model.layers.0.self_attn.q_proj.weight", (4096, 4096), ATTN),
    ("model.layers.0.self_attn.o_proj.weight", (4096, 4096), ATTN),
    ("model.layers.0.mlp.gate_proj.weight", (11008, 4096), LINEAR),
    ("model.layers.0.input_layernorm.weight", (4096,), NORM),
    ("model.layers.0.post_attention_layernorm.weight", (4096,), NORM),
    ("model.norm.weight", (4096,), NORM),
    ("model.layers.0.self_attn.rotary_emb.inv_freq", (64,), ("other", ("d0",))),
    # BERT
    ("bert.embeddings.word_embeddings.weight", (30522, 768), EMBED),
    ("bert.embeddings.LayerNorm.weight", (768,), NORM),
    ("bert.embeddings.LayerNorm.gamma", (768,), NORM),
    ("bert.embeddings.position_ids", (1, 512), ("other", ("d0", "d1"))),
    ("bert.encoder.layer.0.attention.self.query.weight", (768, 768), ATTN),
    ("bert.encoder.layer.0.intermediate.dense.weight", (3072, 768), LINEAR),
    # T5
    ("shared.weight", (32128, 512), EMBED),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", (512, 512), ATTN),
    ("encoder.block.0.layer.0.layer_norm.weight", (512,), NORM),
    # ViT / CLIP
    ("vit.embeddings.patch_embeddings.projection.weight", (768, 3, 16, 16), CONV2D),
    ("vit.embeddings.cls_token", (1, 1, 768), ("other", ("d0", "d1", "d2"))),
    ("positional_embedding", (77, 512), EMBED),
    ("blocks.0.attn.qkv.weight", (2304, 768), ATTN),
    ("blocks.0.norm1.weight", (768,), NORM),
    # nn.LSTM / nn.GRU / nn.MultiheadAttention
    ("lstm.weight_ih_l0", (32, 16), ("recurrent", ("gates_out", "in"))),
    ("lstm.weight_hh_l1_reverse", (32, 8), ("recurrent", ("gates_out", "in"))),
    ("lstm.bias_hh_l0", (32,), ("recurrent", ("gates_out",))),
    ("lstm.weight_hr_l0", (4, 8), ("recurrent", ("out", "in"))),
    ("gru_cell.weight_ih", (24, 16), ("recurrent", ("gates_out", "in"))),
    ("mha.in_proj_weight", (48, 16), ATTN),
    ("mha.in_proj_bias", (48,), ("attention", ("out",))),
    ("enc.q_proj_weight", (16, 16), ATTN),
    # Other convolutions
    ("encoder.conv1d.weight", (8, 4, 3), ("conv1d", ("out", "in", "w"))),
    ("stem.weight", (8, 4, 3, 3, 3), ("conv3d", ("out", "in", "d", "h", "w"))),
    ("decoder.deconv1.weight", (8, 4, 2, 2), ("conv_transpose", ("in", "out", "h", "w"))),
    ("up.conv_transpose.weight", (8, 4, 2), ("conv_transpose", ("in", "out", "w"))),
    # Anything else
    ("scale", (), ("other", ())),
    ("pos_embed_table", (3, 4, 5), ("other", ("d0", "d1", "d2"))),
]


@pytest.mark.parametrize(("name", "shape", "expected"), CASES, ids=[c[0] for c in CASES])
def test_infer_on_real_names(name: str, shape: tuple[int, ...], expected: tuple) -> None:
    assert infer(name, shape) == expected


SIBLINGS = {
    "features.0.weight": (64, 3, 3, 3),
    "features.0.bias": (64,),
    "features.1.weight": (64,),
    "features.1.bias": (64,),
    "features.1.running_mean": (64,),
    "classifier.weight": (10, 64),
    "classifier.bias": (10,),
    "tok.weight": (100, 8),
    "up.deconv.weight": (8, 4, 2, 2),
    "up.deconv.bias": (4,),
    "attn.in_proj_weight": (24, 8),
    "attn.out_proj.weight": (8, 8),
    "attn.out_proj.bias": (8,),
    "mixer.out_proj.weight": (8, 16),
    "head.weight": (3, 4, 5),
    "head.bias": (3,),
    "bias": (3,),
}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("features.0.bias", ("conv2d", ("out",))),
        ("features.1.bias", ("norm", ("channel",))),
        ("classifier.bias", ("linear", ("out",))),
        ("up.deconv.bias", ("conv_transpose", ("out",))),
        ("attn.out_proj.weight", ATTN),  # found through the in_proj_weight next to it
        ("attn.out_proj.bias", ("attention", ("out",))),
        ("mixer.out_proj.weight", LINEAR),  # Mamba's out_proj is not attention
        ("head.bias", ("conv1d", ("out",))),  # its weight is 3-d
        ("bias", ("other", ("d0",))),
    ],
)
def test_bias_takes_its_weights_kind(name: str, expected: tuple) -> None:
    assert infer(name, SIBLINGS[name], SIBLINGS) == expected


def test_bias_without_siblings() -> None:
    assert infer("fc.bias", (10,)) == ("other", ("d0",))
    assert infer("block.attn.proj.bias", (10,)) == ("attention", ("out",))
    assert infer("block.norm.bias", (10,)) == NORM


def test_split_and_norm_modules() -> None:
    assert split("layer1.0.conv2.weight") == ("layer1.0.conv2", "weight")
    assert split("scale") == ("", "scale")
    for module in ("ln_f", "h.0.ln_2", "bn1", "encoder.final_layer_norm", "attn_ln", "gn"):
        assert is_norm_module(module), module
    for module in ("kernel", "linear", "conv1", "blocks.0.mlp", "bnb", "lnx"):
        assert not is_norm_module(module), module


_NAME_PARTS = st.sampled_from(
    ["weight", "bias", "conv", "ln_1", "attn", "embed", "lstm", "weight_ih_l0", "running_mean",
     "in_proj_weight", "deconv", "0", "fc", "norm", "x", "", "Wq", "shared"]
)  # fmt: skip


@given(
    parts=st.lists(_NAME_PARTS | st.text(max_size=6), min_size=1, max_size=5),
    shape=st.lists(st.integers(0, 9), max_size=7).map(tuple),
    with_siblings=st.booleans(),
)
def test_infer_always_gives_a_kind_and_one_axis_per_dim(
    parts: list[str], shape: tuple[int, ...], with_siblings: bool
) -> None:
    name = ".".join(parts)
    siblings = {name: shape, name.rpartition(".")[0] + ".weight": (4, 3)} if with_siblings else None
    kind, layout = infer(name, shape, siblings)
    assert kind in KINDS
    assert len(layout) == len(shape)
    assert len(set(layout)) == len(layout)
