"""Checks every model must pass (tiny configs, CPU): the contract, gradients, determinism,
padding invariance, the paper configs on the meta device, checkpoint round trip; and the common
pieces models build on (config choices, parameter groups, the post-norm encoder layer)."""

import dataclasses

import pytest
import torch
from helpers import MODEL_NAMES, build, make_batch

from common.checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint
from common.layers import PostNormEncoderLayer
from common.model import check_choices, freeze_encoders
from common.optim import pretrained_groups
from common.runconfig import load_model_module


@pytest.fixture(scope="module", params=MODEL_NAMES)
def tiny(request):
    model = build(request.param)
    return request.param, model, make_batch(model)


def test_forward_shape_and_loss(tiny):
    name, model, batch = tiny
    model.train()
    out = model(**model.inputs_from(batch), target=batch["mask"])
    B, _, H, W = batch["image"].shape
    assert out["mask_logits"].shape == (B, 1, H, W)
    assert torch.isfinite(out["mask_logits"]).all()
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    terms = [k for k in out if k.startswith("loss_")]
    assert terms, f"{name} names no loss terms"
    assert all(torch.isfinite(out[k]) for k in terms)


def test_every_trainable_parameter_gets_a_gradient(tiny):
    name, model, batch = tiny
    model.train()
    model.zero_grad(set_to_none=True)
    model(**model.inputs_from(batch), target=batch["mask"])["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:8]}"
    bad = [n for n, p in model.named_parameters()
           if p.requires_grad and (not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0)]
    assert not bad, f"{name}: zero or non-finite gradient for {bad[:8]}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_frozen_encoders_get_no_gradient(name):
    model = build(name, freeze_encoders=True)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen, f"{name}: freeze_encoders=True froze nothing"
    batch = make_batch(model)
    model.train()
    model(**model.inputs_from(batch), target=batch["mask"])["loss"].backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    # frozen modules stay in eval mode (their BN statistics and dropout do not move)
    assert all(not m.training for m in model.modules() if getattr(m, "frozen", False))


@pytest.mark.parametrize("policy,frozen", [(True, {"a", "b"}), (False, set()), (None, {"a"})])
def test_freeze_encoders_policy(policy, frozen, recwarn):
    """True freezes all, False none, None the encoders with weights; a random encoder that is
    trained warns."""
    encoders = {"a": (torch.nn.Linear(2, 2), "a.pt"), "b": (torch.nn.Linear(2, 2), None)}
    freeze_encoders("M", encoders, policy)
    assert {n for n, (m, _) in encoders.items() if getattr(m, "frozen", False)} == frozen
    assert all(p.requires_grad == (n not in frozen)
               for n, (m, _) in encoders.items() for p in m.parameters())
    warned = [str(w.message) for w in recwarn if "random weights" in str(w.message)]
    assert warned == ([] if "b" in frozen else ["M: the b encoder has random weights, so it is "
                                                "trained (the papers start from pretrained "
                                                "encoders)"])


def test_check_choices_names_the_field_and_its_choices():
    @dataclasses.dataclass
    class Cfg:
        imi: str = "iterative"
        lfr: bool = True

    check_choices(Cfg(), {"imi": ("iterative", "off"), "lfr": (True, False)})
    with pytest.raises(ValueError, match=r"imi must be one of \('iterative', 'off'\), not 'same'"):
        check_choices(Cfg(imi="same"), {"imi": ("iterative", "off")})


def test_pretrained_groups_keep_the_order_and_drop_an_empty_group():
    """The pretrained parts' parameters at their own lr, the rest after them, each group in the
    order given (an optimiser's saved state is matched by position); an empty group is left out."""
    enc, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    params = [head.bias, enc.weight, head.weight, enc.bias]
    groups = pretrained_groups(params, [enc], 0.1)
    assert [g["params"] for g in groups] == [[enc.weight, enc.bias], [head.bias, head.weight]]
    assert groups[0]["lr"] == 0.1 and "lr" not in groups[1]
    assert [g["params"] for g in pretrained_groups([head.weight], [enc], 0.1)] == [[head.weight]]


def test_post_norm_encoder_layer_is_torchs_post_norm_layer():
    """PostNormEncoderLayer computes nn.TransformerEncoderLayer (post-norm, ReLU) on the same
    weights."""
    torch.manual_seed(0)
    ours = PostNormEncoderLayer(16, 4, 32).eval()
    theirs = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    a = ours.attn
    with torch.no_grad():
        theirs.self_attn.in_proj_weight.copy_(torch.cat([a.to_q.weight, a.to_k.weight,
                                                         a.to_v.weight]))
        theirs.self_attn.in_proj_bias.copy_(torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias]))
        theirs.self_attn.out_proj.load_state_dict(a.to_out.state_dict())
        theirs.linear1.load_state_dict(ours.ffn[0].state_dict())
        theirs.linear2.load_state_dict(ours.ffn[3].state_dict())
        x = torch.randn(2, 7, 16)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_eval_is_deterministic(tiny):
    _, model, batch = tiny
    model.eval()
    with torch.no_grad():
        a = model(**model.inputs_from(batch))["mask_logits"]
        b = model(**model.inputs_from(batch))["mask_logits"]
    assert torch.equal(a, b)


def test_padding_does_not_change_the_output(tiny):
    _, model, batch = tiny
    model.eval()
    padded = dict(batch)
    extra = 5
    padded["text"] = torch.cat([batch["text"], batch["text"].new_full((len(batch["text"]), extra),
                                                                     model.tokenizer.pad_id)], 1)
    padded["text_mask"] = torch.cat([batch["text_mask"],
                                     batch["text_mask"].new_zeros(len(batch["text"]), extra)], 1)
    with torch.no_grad():
        a = model(**model.inputs_from(batch))["mask_logits"]
        b = model(**model.inputs_from(padded))["mask_logits"]
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def paper_configs():
    return [(n, c) for n in MODEL_NAMES for c in load_model_module(n).CONFIGS if c != "tiny"]


@pytest.mark.parametrize("name,config", paper_configs())
def test_paper_config_builds_and_runs_on_meta(name, config):
    with torch.device("meta"):
        model = build(name, config)
        spec = model.input_spec
        H = W = spec.size
        if spec.resize == "shorter":  # a landscape image at the largest size the spec allows
            W = spec.max_size
        inputs = dict(image=torch.zeros(1, 3, H, W), text=torch.zeros(1, 7, dtype=torch.long),
                      text_mask=torch.ones(1, 7, dtype=torch.bool),
                      image_mask=torch.ones(1, H, W, dtype=torch.bool))
        if "cand_masks" in model.input_names:
            inputs["cand_masks"] = torch.zeros(1, 3, H, W, dtype=torch.bool)
            inputs["cand_valid"] = torch.ones(1, 3, dtype=torch.bool)
        out = model(**{k: inputs[k] for k in model.input_names}, image_mask=inputs["image_mask"],
                    target=torch.zeros(1, 1, H, W))
    assert out["mask_logits"].shape == (1, 1, H, W)
    assert out["loss"].shape == ()


def test_checkpoint_round_trip(tiny, tmp_path):
    name, model, batch = tiny
    ckpt = dict(model_name=name, config=dataclasses.asdict(model.cfg), model=model.state_dict())
    path = str(tmp_path / "c.pt")
    save_checkpoint(ckpt, path)
    again, _, _ = build_model_from_checkpoint(load_checkpoint(path))
    model.eval(), again.eval()
    with torch.no_grad():
        a = model(**model.inputs_from(batch))["mask_logits"]
        b = again(**again.inputs_from(batch))["mask_logits"]
    assert torch.equal(a, b)


def test_from_scratch_position_tables_start_as_the_2d_sine_encoding():
    """Without weights, the ViT encoders' learned patch positions start spatially ordered."""
    from common.encoders import CLIPImageEncoder, SAMImageEncoder, ViLTEncoder
    from common.layers import sine_pos_2d

    sam = SAMImageEncoder("tiny", img_size=128)
    _, h, w, c = sam.pos_embed.shape
    assert torch.equal(sam.pos_embed.detach().view(h * w, c), sine_pos_2d(h, w, c))
    clip = CLIPImageEncoder("tiny").visual.positional_embedding.detach()  # class token first
    g = round((clip.shape[0] - 1) ** 0.5)
    assert torch.equal(clip[1:], sine_pos_2d(g, g, clip.shape[1]))
    vilt = ViLTEncoder("tiny", vocab_size=100)
    pos = vilt.pos_embed.detach()[0]
    assert torch.equal(pos[1:], sine_pos_2d(vilt.grid, vilt.grid, vilt.dim))
    assert pos[0].abs().max() < 0.05  # the class token's: ViLT's trunc_normal(0.02)


def test_readme_import_examples_run(tmp_path):
    """The README's "Use a model in your own code" snippets, executed as written: the predictor
    on a checkpoint of a one-step run (its path and the image's put in place of the README's),
    then the model built directly."""
    import pathlib
    import re

    import numpy as np
    from PIL import Image

    import train

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Use a model in your own code", 1)[1].split("\n## ", 1)[0]
    predictor, direct = re.findall(r"```python\n(.*?)```", section, re.S)
    run = tmp_path / "run"
    train.main(["--model", "maris", "--max-steps", "1", "--batch-size", "2", "--no-val",
                "--shapes-train-size", "2", "--workers", "0", "--out", str(run)])
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(tmp_path / "shapes.png")
    code = predictor.replace("runs/maris-tiny-shapes/best.pt", str(run / "last.pt"))
    code = code.replace('"shapes.png"', repr(str(tmp_path / "shapes.png")))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["mask"].shape == scope["prob"].shape == (30, 40)
    assert scope["masks"].shape == (2, 30, 40)
    scope = {}
    exec(compile(direct, "README.md", "exec"), scope)
    size = scope["model"].input_spec.size
    assert scope["logits"].shape == (1, 1, size, size)
