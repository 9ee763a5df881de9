"""Every encoder against its upstream package, at the papers' architectures, from random weights
written in the file formats users download (tests/weights.py) and read by the library's own
loaders; and what each weight load prints, allows and refuses.

Fidelity tests compare the outputs the models consume with the upstream model's own forward on
the same input (max abs difference printed; run `pytest -s` to see them). Consistency tests check
the library against itself or against the upstream architecture without numbers; each docstring
says which it is.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import struct
import warnings

import open_clip
import pytest
import torch
from helpers import nearest_patch_tokens, vilt_padded_outputs
from torch import Tensor, nn
from weights import (
    darknet_convs,
    write_bert_folder,
    write_darknet,
    write_glove,
    write_open_clip,
    write_openai_clip,
    write_sam,
    write_swin_b,
    write_swin_microsoft,
    write_vilt_folder,
)

from common.encoders import (
    BERT_ARCHS,
    BertTextEncoder,
    CLIPImageEncoder,
    CLIPTextEncoder,
    Darknet53,
    GRUTextEncoder,
    SAMImageEncoder,
    SwinImageEncoder,
    ViLTEncoder,
)

RTOL = 1e-5  # max abs difference allowed, relative to the largest output value (fp32 sums)


def compare(name: str, ours: Tensor, ref: Tensor) -> float:
    """Assert two outputs agree within fp32 tolerance; print and return the max abs difference."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    print(f"{name}: max abs diff {diff:.2e} (outputs up to {scale:.3g})")
    assert diff <= RTOL * max(scale, 1.0), f"{name}: max abs diff {diff:.2e}, outputs {scale:.3g}"
    return diff


def load_line(capsys) -> str:
    """The one line a weight load printed (everything printed since the last call)."""
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("loaded "), lines
    return lines[0]


@contextlib.contextmanager
def recording(modules: dict):
    """Record, under its key, the output of each module's forward while inside the block."""
    outputs = {}
    handles = [module.register_forward_hook(lambda _m, _i, out, key=key: outputs.update({key: out}))
               for key, module in modules.items()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# SAM (MARIS): segment-anything's checkpoint
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sam_vit_b_global_blocks_match_segment_anything(weight_file, capsys):
    """Fidelity: a segment-anything vit_b checkpoint (sam_model_registry's Sam) loaded by
    SAMImageEncoder gives, at 1024 px, the outputs of segment-anything's own global-attention
    blocks (found as the blocks without windows) in ImageEncoderViT.forward."""
    path, sam = weight_file(write_sam, "sam_vit_b.pth", "vit_b")
    enc = SAMImageEncoder("vit_b", 1024, global_blocks=(0, 1, 2, 3), weights=path).eval()
    n = len(enc.state_dict())
    assert load_line(capsys).startswith(f"loaded {path}: {n}/{n} tensors into SAM vit_b image")
    blocks = sam.image_encoder.blocks
    global_blocks = [i for i, blk in enumerate(blocks) if blk.window_size == 0]
    assert enc.out_indexes == global_blocks == [2, 5, 8, 11]
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), recording({i: blocks[i] for i in global_blocks}) as outputs:
        sam.image_encoder(image)
        ours = enc(image)
    for i, feat in zip(global_blocks, ours):
        compare(f"SAM vit_b block {i} (1, 64, 64, 768)", feat, outputs[i])


@pytest.mark.parametrize("arch", ["vit_h", "vit_l"])
def test_sam_vit_h_and_vit_l_architecture_match_segment_anything(arch):
    """Consistency with upstream's architecture, not its numbers (a ViT-H forward at 1024 px
    takes about a minute on a CPU and its file 2.5 GB; segment-anything builds only 1024 px):
    on the meta device, the image encoder's tensor names and shapes and the global-attention
    blocks are those of sam_model_registry's model."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        sam = sam_model_registry[arch]()
        enc = SAMImageEncoder(arch, 1024, global_blocks=(0, 1, 2, 3))
    theirs = {k.removeprefix("image_encoder."): tuple(v.shape)
              for k, v in sam.state_dict().items()
              if k.startswith("image_encoder.") and ".neck." not in k}
    assert {k: tuple(v.shape) for k, v in enc.state_dict().items()} == theirs
    blocks = sam.image_encoder.blocks
    assert enc.out_indexes == [i for i, blk in enumerate(blocks) if blk.window_size == 0]


def test_sam_load_prints_its_line_and_refuses_missing_or_unexpected_tensors(tmp_path, capsys):
    """Consistency of the loader (no upstream model): the allowance (prompt encoder, mask decoder,
    neck) is left out and said so; a renamed tensor or an extra one in the image encoder fails
    naming it; a file for another input size fails on the shapes."""
    torch.manual_seed(0)
    src = SAMImageEncoder("tiny", img_size=64)
    state = {f"image_encoder.{k}": v for k, v in src.state_dict().items()}
    state |= {"image_encoder.neck.0.weight": torch.zeros(2, 2),
              "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": torch.zeros(2, 2),
              "mask_decoder.iou_token.weight": torch.zeros(2, 2)}
    path = str(tmp_path / "sam.pth")
    torch.save(state, path)
    dst = SAMImageEncoder("tiny", img_size=64, weights=path)
    n = len(src.state_dict())
    assert load_line(capsys) == (f"loaded {path}: {n}/{n} tensors into SAM tiny image encoder "
                                 "(3 tensors of parts it does not build left out)")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(),
                                                  dst.state_dict().values()))
    name = "image_encoder.blocks.2.attn.qkv.weight"
    renamed = {(k + "s" if k == name else k): v for k, v in state.items()}
    torch.save(renamed, path)
    with pytest.raises(ValueError, match=rf"1 tensors missing \['{name}'\], "
                                         rf"1 unexpected \['{name}s'\]"):
        SAMImageEncoder("tiny", img_size=64, weights=path)
    torch.save(state | {"image_encoder.blocks.0.attn.extra": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"0 tensors missing \[\], 1 unexpected "
                                         r"\['image_encoder.blocks.0.attn.extra'\]"):
        SAMImageEncoder("tiny", img_size=64, weights=path)
    torch.save(state, path)
    with pytest.raises(ValueError, match="shape mismatch"):
        SAMImageEncoder("tiny", img_size=128, weights=path)


@pytest.mark.parametrize("build", [
    lambda w: SAMImageEncoder("tiny", img_size=64, weights=w),
    lambda w: CLIPImageEncoder("tiny", weights=w),
    lambda w: CLIPImageEncoder("tiny-rn", weights=w),
    lambda w: CLIPTextEncoder("tiny", weights=w),
    lambda w: SwinImageEncoder("tiny", weights=w),
    lambda w: Darknet53("tiny", weights=w),
], ids=["sam", "clip-vit", "clip-rn", "clip-text", "swin", "darknet"])
def test_an_encoder_built_to_load_a_file_skips_its_random_draw(build, tmp_path, monkeypatch):
    """Consistency (common.encoders.loading.skip_init): built without a file, an encoder draws
    its initial weights through torch.nn.init; built to load one, it draws none (the load replaces
    every tensor) and holds exactly the file's tensors; the initialisers work again afterwards,
    also after a build that failed."""
    from common.encoders.loading import skip_init

    calls = []
    for name in [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]:
        fn = getattr(nn.init, name)
        monkeypatch.setattr(nn.init, name,
                            lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = build(None)
    assert calls, "a random build must draw through torch.nn.init (else this test checks nothing)"
    path = str(tmp_path / "weights.pth")
    prefix = "image_encoder." if isinstance(src, SAMImageEncoder) else ""  # a SAM file's names
    torch.save({prefix + k: v for k, v in src.state_dict().items()}, path)
    calls.clear()
    with contextlib.redirect_stdout(None):
        dst = build(path)
    assert calls == []
    assert dst.state_dict().keys() == src.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(),
                                                  dst.state_dict().values()))
    with pytest.raises(RuntimeError, match="mid-build"), skip_init():
        raise RuntimeError("mid-build")
    nn.init.normal_(torch.empty(3))
    assert calls == ["normal_"]


# ---------------------------------------------------------------------------------------------
# CLIP (MMNet, MARIS): OpenAI's TorchScript files and open_clip checkpoints
# ---------------------------------------------------------------------------------------------

# The papers' OpenAI CLIPs: MARIS and MMNet paper (ViT-B/16), paper-rn101, paper-vit-l
OPENAI_ARCHS = ["ViT-B-16-quickgelu", "RN101-quickgelu", "ViT-L-14-quickgelu"]
SENTENCES = ["the man in the red shirt on the left", "a dog"]
TEXT_LEN = 17  # MMNet's text length (Sec. 4.1): CLIP's causal attention makes it a prefix


@pytest.fixture(scope="module", params=OPENAI_ARCHS)
def openai_clip(request, weight_file):
    """An OpenAI-format CLIP file of each paper architecture and open_clip's own model read
    from it by open_clip's OpenAI loader (which infers the architecture from the file)."""
    arch = request.param
    path, _ = weight_file(write_openai_clip, f"{arch}.pt", arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation
        ref = open_clip.load_openai_model(path, device="cpu").eval()
    return arch, path, ref


@pytest.mark.slow
def test_clip_text_matches_open_clip_on_an_openai_file(openai_clip, capsys):
    """Fidelity: CLIPTextEncoder on an OpenAI file gives open_clip's per-token features (its
    ln_final output inside encode_text) and its projected EOS feature (encode_text), on
    17-token prefixes of 77-token texts; the same file into the GELU architecture is refused."""
    arch, path, ref = openai_clip
    gelu = arch.removesuffix("-quickgelu")
    with pytest.raises(ValueError, match=f"OpenAI CLIP archive.*use the architecture '{arch}'"):
        CLIPTextEncoder(gelu, weights=path)
    enc = CLIPTextEncoder(arch, weights=path, project=True).eval()
    n = len(enc.state_dict())
    assert load_line(capsys).startswith(f"loaded {path}: {n}/{n} tensors into CLIP {arch} text")
    ids = open_clip.tokenize(SENTENCES)  # (B, 77), zero padded
    with torch.no_grad(), recording({"tokens": ref.ln_final}) as outputs:
        eos = ref.encode_text(ids)
        words, sentence, _ = enc(ids[:, :TEXT_LEN], ids[:, :TEXT_LEN] != 0)
    compare(f"CLIP {arch} words (2, 17, {enc.width})", words, outputs["tokens"][:, :TEXT_LEN])
    compare(f"CLIP {arch} EOS (2, {enc.out_dim})", sentence, eos)


@pytest.mark.slow
def test_clip_image_matches_open_clip_on_an_openai_file(openai_clip, capsys, monkeypatch):
    """Fidelity: CLIPImageEncoder on an OpenAI file, at 224 px (open_clip runs no other size),
    gives open_clip's stage features (outputs of its layer2-4, or of the ViT blocks at 1/3, 2/3,
    3/3 depth), z (ResNet: every row of its attention pool's multi_head_attention_forward; ViT:
    its ln_post tokens times proj) and z_bar (encode_image); the GELU architecture is refused."""
    arch, path, ref = openai_clip
    gelu = arch.removesuffix("-quickgelu")
    with pytest.raises(ValueError, match=f"OpenAI CLIP archive.*use the architecture '{arch}'"):
        CLIPImageEncoder(gelu, weights=path)
    enc = CLIPImageEncoder(arch, weights=path).eval()
    n = len([k for k in enc.state_dict() if not k.endswith("num_batches_tracked")])
    assert load_line(capsys).startswith(f"loaded {path}: {n}/{n} tensors into CLIP {arch} image")
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    v = ref.visual
    if enc.is_vit:
        stages = {f"x{i + 2}": v.transformer.resblocks[b - 1] for i, b in enumerate(enc.vit_blocks)}
        stages["ln_post"] = v.ln_post
    else:
        stages = {"x2": v.layer2, "x3": v.layer3, "x4": v.layer4}
        mha, pool = torch.nn.functional.multi_head_attention_forward, {}

        def record(*args, **kwargs):  # the pool attends from every token and keeps the first
            out = mha(*args, **kwargs)
            pool["all"] = out[0]  # (1 + h*w, B, D)
            return out

        monkeypatch.setattr(torch.nn.functional, "multi_head_attention_forward", record)
    with torch.no_grad(), recording(stages) as outputs:
        z_bar_ref = ref.encode_image(image)
        x2, x3, x4, z, z_bar = enc(image)
    h, w = z.shape[-2:]
    to_map = lambda t: t.transpose(1, 2).unflatten(2, (h, w))  # (B, N, C) -> (B, C, h, w)
    if enc.is_vit:  # open_clip's blocks are batch first: (B, 1 + h*w, width), class token first
        refs = {k: to_map(outputs[k][:, 1:]) for k in ("x2", "x3", "x4")}
        refs["z"] = to_map(outputs["ln_post"][:, 1:] @ v.proj)
    else:
        refs = {k: outputs[k] for k in ("x2", "x3", "x4")}
        refs["z"] = to_map(pool["all"][1:].transpose(0, 1))
    for name, ours in zip(("x2", "x3", "x4", "z"), (x2, x3, x4, z)):
        compare(f"CLIP {arch} {name} {tuple(ours.shape)}", ours, refs[name])
    compare(f"CLIP {arch} z_bar {tuple(z_bar.shape)}", z_bar, z_bar_ref)


@pytest.mark.slow
def test_clip_towers_match_open_clip_on_an_open_clip_checkpoint(tmp_path, capsys):
    """Fidelity: an open_clip checkpoint (a GELU ViT-B-16, as LAION's, in .safetensors) read by
    open_clip.create_model(pretrained=file) and by our encoders: same per-token and EOS text
    features, same image stage x4 and global feature; the file is not refused (not OpenAI's)."""
    arch = "ViT-B-16"
    path = str(tmp_path / "open_clip_model.safetensors")
    write_open_clip(path, arch)
    ref = open_clip.create_model(arch, pretrained=path).eval()
    text = CLIPTextEncoder(arch, weights=path, project=True).eval()
    image_enc = CLIPImageEncoder(arch, weights=path).eval()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" tensors into ")[1].split(" (")[0] for line in lines] == [
        f"CLIP {arch} text encoder", f"CLIP {arch} image encoder"]
    ids = open_clip.tokenize(SENTENCES)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    hooked = {"tokens": ref.ln_final, "x4": ref.visual.transformer.resblocks[-1]}
    with torch.no_grad(), recording(hooked) as outputs:
        eos, z_bar_ref = ref.encode_text(ids), ref.encode_image(image)
        words, sentence, _ = text(ids[:, :TEXT_LEN], ids[:, :TEXT_LEN] != 0)
        _, _, x4, _, z_bar = image_enc(image)
    compare(f"open_clip {arch} words", words, outputs["tokens"][:, :TEXT_LEN])
    compare(f"open_clip {arch} EOS", sentence, eos)
    compare(f"open_clip {arch} x4", x4.flatten(2).transpose(1, 2), outputs["x4"][:, 1:])
    compare(f"open_clip {arch} z_bar", z_bar, z_bar_ref)


@pytest.mark.parametrize("arch", ["ViT-B-16-quickgelu", "ViT-B-32-quickgelu", "ViT-L-14-quickgelu",
                                  "RN50-quickgelu", "RN101-quickgelu", "ViT-B-16", "RN101"])
def test_clip_towers_use_the_activation_open_clip_builds(arch):
    """Fidelity to open_clip's architecture (no numbers): our towers hold the activation modules
    open_clip.create_model(arch) holds, QuickGELU for the "-quickgelu" names (OpenAI's weights)
    and GELU otherwise; built on the meta device."""
    def activations(module: nn.Module) -> set[str]:
        return {type(m).__name__ for m in module.modules() if "GELU" in type(m).__name__}

    with torch.device("meta"):
        ref = open_clip.create_model(arch, device="meta")
        text, image = CLIPTextEncoder(arch), CLIPImageEncoder(arch)
    assert activations(text) == activations(ref.transformer)
    assert activations(image) == activations(ref.visual)
    expected = "QuickGELU" if arch.endswith("-quickgelu") else "GELU"
    assert activations(text) == {expected}


def test_clip_load_refuses_missing_or_unexpected_tensors(tmp_path, capsys):
    """Consistency of the loader (no upstream model): the other tower and logit_scale are the
    allowance; a tensor missing from the tower, or an unknown one in it, fails naming it."""
    torch.manual_seed(0)
    src = CLIPTextEncoder("tiny")
    state = dict(src.state_dict()) | {"visual.conv1.weight": torch.zeros(1),
                                      "logit_scale": torch.zeros(())}
    path = str(tmp_path / "clip.pt")
    torch.save(state, path)
    CLIPTextEncoder("tiny", weights=path)
    n = len(src.state_dict())
    assert load_line(capsys) == (f"loaded {path}: {n}/{n} tensors into CLIP tiny text encoder "
                                 "(2 tensors of parts it does not build left out)")
    missing = {k: v for k, v in state.items() if k != "ln_final.bias"}
    torch.save(missing, path)
    with pytest.raises(ValueError, match=r"1 tensors missing \['ln_final.bias'\], 0 unexpected"):
        CLIPTextEncoder("tiny", weights=path)
    torch.save(state | {"transformer.resblocks.0.ls_1.gamma": torch.zeros(64)}, path)
    with pytest.raises(ValueError, match=r"1 unexpected \['transformer.resblocks.0.ls_1.gamma'\]"):
        CLIPTextEncoder("tiny", weights=path)


# ---------------------------------------------------------------------------------------------
# Swin-B and BERT-base (M3Dec), ViLT-B/32 (MaIL): torchvision and Hugging Face files
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_swin_b_stages_match_torchvision(weight_file, capsys):
    """Fidelity: torchvision's swin_b state dict file loaded by SwinImageEncoder gives, at M3Dec's
    480 px, the outputs of the four stages of torchvision's own swin_b forward."""
    path, net = weight_file(write_swin_b, "swin_b.pth")
    enc = SwinImageEncoder("swin_b", weights=path).eval()
    n = len(enc.state_dict())
    assert load_line(capsys) == (f"loaded {path}: {n}/{n} tensors into Swin swin_b "
                                 "(4 tensors of parts it does not build left out)")
    image = torch.randn(1, 3, 480, 480, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), recording({i: net.features[i] for i in (1, 3, 5, 7)}) as outputs:
        net(image)
        ours = enc(image)
    for stage, (i, feat) in enumerate(zip((1, 3, 5, 7), ours), start=1):
        ref = outputs[i].permute(0, 3, 1, 2)  # torchvision's stages are channels last
        compare(f"Swin-B stage {stage} {tuple(feat.shape)}", feat, ref)


@pytest.mark.slow
def test_swin_b_w12_microsoft_file_stages_match_timm(weight_file, capsys):
    """Fidelity: Microsoft's ImageNet-22K window-12 release (swin_base_patch4_window12_384_22k
    .pth, the file LAVT trains from; written in Microsoft's names) loaded by SwinImageEncoder
    gives the four stage outputs of timm's swin_base_patch4_window12_384 holding the same
    weights, at its 384 px (every stage a multiple of the window: timm pads after the shift,
    Microsoft's backbones and torchvision before, so padded sizes are checked against
    torchvision above)."""
    path, net = weight_file(write_swin_microsoft, "swin_base_patch4_window12_384_22k.pth")
    enc = SwinImageEncoder("swin_b_w12", weights=path).eval()
    n = len(enc.state_dict())
    assert load_line(capsys) == (f"loaded {path}: {n}/{n} tensors into Swin swin_b_w12 "
                                 "(4 tensors of parts it does not build left out)")
    image = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net.forward_intermediates(image, intermediates_only=True)  # (B, C, h, w) each
        ours = enc(image)
    for stage, (feat, expected) in enumerate(zip(ours, ref, strict=True), start=1):
        compare(f"Swin-B w12 stage {stage} {tuple(feat.shape)}", feat, expected)


def test_swin_microsoft_names_map_onto_torchvision_and_window_sizes_are_checked(tmp_path):
    """Consistency: every tensor of a Microsoft-format file of the small variant lands in its
    place in the torchvision module (a round trip through the names gives the same outputs), its
    final norm and head are left out, and a file of another window size is refused by its bias
    tables' shapes."""
    src = SwinImageEncoder("tiny").eval()
    inverse = {}
    for name, tensor in src.state_dict().items():
        m = re.match(r"features\.(\d+)\.(.*)", name)
        k, rest = int(m[1]), m[2]
        if k == 0:
            name = {"0": "patch_embed.proj", "2": "patch_embed.norm"}[rest[0]] + rest[1:]
        elif k % 2:
            block, rest = rest.split(".", 1)
            rest = rest.replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
            name = f"layers.{(k - 1) // 2}.blocks.{block}.{rest}"
        else:
            name = f"layers.{k // 2 - 1}.downsample.{rest}"
        inverse[name] = tensor
    path = str(tmp_path / "swin_tiny_ms.pth")
    torch.save({"model": inverse | {"norm.weight": torch.ones(256), "head.weight": torch.ones(
        5, 256)}}, path)
    enc = SwinImageEncoder("tiny", weights=path).eval()
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(enc(image), src(image), strict=True):
            assert torch.equal(a, b)
    table = "layers.0.blocks.0.attn.relative_position_bias_table"  # window 4: 7 x 7 offsets
    inverse[table] = torch.zeros(13 * 13, 1)  # a window-7 file's
    torch.save({"model": inverse}, path)
    with pytest.raises(ValueError, match=r"shape mismatch.*features\.1\.0\.attn\.relative_position"
                                         r"_bias_table', \(169, 1\), \(49, 1\)"):
        SwinImageEncoder("tiny", weights=path)


@pytest.mark.slow
def test_bert_base_tokens_match_transformers(tmp_path, capsys):
    """Fidelity: a bert-base folder (BertForPreTraining.save_pretrained: "bert." names, the
    pretraining heads) loaded by BertTextEncoder gives transformers' BertModel token features
    (last_hidden_state) on padded batches, at the real tokens the models use."""
    ref = write_bert_folder(str(tmp_path))
    enc = BertTextEncoder("bert-base", str(tmp_path), vocab_size=30522).eval()
    n = len(enc.bert.state_dict())
    assert load_line(capsys) == f"loaded {tmp_path}: {n}/{n} tensors into BERT bert-base"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 30522, (2, 20), generator=gen)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 12:] = False
    ids[~mask] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        words, sentence, _ = enc(ids, mask)
    compare("BERT-base tokens (2, 20, 768), real ones", words[mask], want[mask])
    assert torch.equal(sentence, words[:, 0])


def test_hugging_face_folders_refuse_missing_or_unexpected_tensors(tmp_path, capsys):
    """Consistency of the loader (no numbers): the pretraining heads and the pooler are the
    allowance; a renamed tensor of the model or an extra one inside it fails naming it."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig

    config = BertConfig(vocab_size=120, **BERT_ARCHS["tiny"])
    write_bert_folder(str(tmp_path), config)
    BertTextEncoder("tiny", str(tmp_path), vocab_size=120)
    assert " tensors into BERT tiny" in load_line(capsys)
    file = str(tmp_path / "model.safetensors")
    state = load_file(file)
    name = "bert.encoder.layer.1.output.dense.weight"
    renamed = {(k.replace("dense.weight", "dense.weights") if k == name else k): v
               for k, v in state.items()}
    save_file(renamed, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 tensors missing.*output.dense.weight'\], "
                                         r"1 unexpected \['bert.encoder.*dense.weights'\]"):
        BertTextEncoder("tiny", str(tmp_path), vocab_size=120)
    save_file(state | {"bert.encoder.layer.0.extra": torch.zeros(2),
                       "cls.predictions.extra": torch.zeros(2)}, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"0 tensors missing \[\], 1 unexpected "
                                         r"\['bert.encoder.layer.0.extra'\]"):
        BertTextEncoder("tiny", str(tmp_path), vocab_size=120)


@pytest.mark.slow
def test_vilt_b32_tokens_match_transformers(tmp_path, capsys):
    """Fidelity: a vilt-b32 folder (ViltForMaskedLM.save_pretrained, as dandelin/vilt-b32-mlm)
    loaded by ViLTEncoder gives transformers' ViltModel last_hidden_state for text and a padded
    384 x 576 image batch: words and class token in place, real patches as a set (ViltModel
    reorders its patch tokens)."""
    ref = write_vilt_folder(str(tmp_path))
    enc = ViLTEncoder("vilt-b32", str(tmp_path), vocab_size=30522).eval()
    n = len(ref.state_dict()) - len([k for k in ref.state_dict() if k.startswith("pooler.")])
    assert load_line(capsys) == f"loaded {tmp_path}: {n}/{n} tensors into ViLT vilt-b32 transformer"
    got, want, keep = vilt_padded_outputs(enc, ref, 30522, 15, 9, (384, 576), (320, 416), 5)
    compare("ViLT-B/32 words and class token (2, 16, 768)", got[:, :16], want[:, :16])
    for b in range(2):  # 10 x 13 real patches in the second image; each of ours is ViltModel's
        real, nearest = nearest_patch_tokens(got, want, keep, b, 15)
        compare(f"ViLT-B/32 patch tokens of image {b} ({len(real)}, 768)", real, nearest)


# ---------------------------------------------------------------------------------------------
# Darknet-53 and GloVe (M3Dec): darknet's binary layout, GloVe's text format
# ---------------------------------------------------------------------------------------------


def darknet_reference(image: Tensor, convs: list[dict]) -> list[Tensor]:
    """Darknet-53 as darknet53.cfg runs it, from the values in file order: conv, BN, leaky 0.1;
    a stride-2 conv opens each stage; residual pairs end in [shortcut] from=-3."""
    def conv_bn_leaky(x, c):
        x = nn.functional.conv2d(x, c["kernel"], stride=c["stride"],
                                 padding=c["kernel"].shape[-1] // 2)
        x = nn.functional.batch_norm(x, c["mean"], c["var"], c["gamma"], c["beta"], eps=1e-5)
        return nn.functional.leaky_relu(x, 0.1)

    x, feats, i = conv_bn_leaky(image, convs[0]), [], 1
    while i < len(convs):
        x, i = conv_bn_leaky(x, convs[i]), i + 1  # the stage's stride-2 conv
        while i < len(convs) and convs[i]["stride"] == 1:
            x, i = x + conv_bn_leaky(conv_bn_leaky(x, convs[i]), convs[i + 1]), i + 2
        feats.append(x)
    return feats


@pytest.mark.slow
def test_darknet53_reads_darknets_binary_layout(tmp_path, capsys):
    """Fidelity to darknet's published layout, as darknet53.cfg and darknet's loader define it
    (no upstream package exists to run): a yolov3.weights-like file (header, per convolution BN
    beta, gamma, mean, var, kernel, then a detection head) gives, at M3Dec's 416 px, the stage
    outputs of the cfg's network run from the file's values; a file cut short fails."""
    path = str(tmp_path / "yolov3.weights")
    convs = write_darknet(path, "darknet53", head_values=1000)
    assert len(convs) == 52
    enc = Darknet53("darknet53", weights=path).eval()
    assert load_line(capsys) == (f"loaded {path}: 52/52 convolutions (260 tensors) into "
                                 "Darknet-53 (darknet53) (1000 further values, a detection head, "
                                 "left out)")
    image = torch.rand(1, 3, 416, 416, generator=torch.Generator().manual_seed(0))  # RGB in [0, 1]
    with torch.no_grad():
        ours, want = enc(image), darknet_reference(image, convs)
    for i, (feat, ref) in enumerate(zip(ours, want), start=1):
        compare(f"Darknet-53 stage {i} {tuple(feat.shape)}", feat, ref)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 8 * 4])  # half the values
    with pytest.raises(ValueError, match="ends in convolution .* of the 52"):
        Darknet53("darknet53", weights=path)


def test_darknet_header_of_old_files(tmp_path):
    """Fidelity to darknet's loader: files before version 0.2 store "images seen" as int32."""
    convs = write_darknet(str(tmp_path / "new.weights"), "tiny")
    with open(tmp_path / "new.weights", "rb") as f:
        body = f.read()[20:]
    with open(tmp_path / "old.weights", "wb") as f:
        f.write(struct.pack("<3ii", 0, 1, 0, 0) + body)
    enc = Darknet53("tiny", weights=str(tmp_path / "old.weights"))
    assert [tuple(c["kernel"].shape[:2]) for c in convs] == [
        (c_out, c_in) for c_in, c_out, _, _ in darknet_convs("tiny")]
    assert torch.equal(enc.stem[0].weight, convs[0]["kernel"])
    assert torch.equal(enc.stages[-1][-1].body[1][1].running_var, convs[-1]["var"])


def test_glove_text_file_fills_the_vocabulary_rows(tmp_path, capsys):
    """Fidelity to GloVe's text format (word, which may contain spaces, then the values): the
    vocabulary words found get the file's vectors, the others keep their random start."""
    path = str(tmp_path / "glove.840B.300d.txt")
    vectors = write_glove(path, ["red", "at&t web .", "ball", "left", "zebra"], 300)
    vocab = ("<pad>", "<unk>", "red", "ball", "square", "left", "at&t web .")
    torch.manual_seed(0)
    enc = GRUTextEncoder(vocab, dim=8, word_dim=300, weights=path)
    assert load_line(capsys) == f"loaded {path}: 4/6 vocabulary words (the others start random)"
    for i, word in enumerate(vocab):
        if word in vectors:
            assert torch.equal(enc.embed.weight[i], vectors[word]), word
    torch.manual_seed(0)
    random_start = GRUTextEncoder(vocab, dim=8, word_dim=300).embed.weight
    assert torch.equal(enc.embed.weight[4], random_start[4])  # "square" is not in the file


# ---------------------------------------------------------------------------------------------
# Input statistics
# ---------------------------------------------------------------------------------------------


def test_image_encoders_declare_the_statistics_their_weights_expect():
    """Fidelity to each upstream package's own preprocessing constants: segment-anything's Sam
    pixel_mean/pixel_std (0-255 scale), open_clip's OpenAI statistics, transformers'
    ViltImageProcessor, torchvision's swin_b transforms; Darknet has no package: darknet's loader
    scales RGB to [0, 1] with no mean or std."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from segment_anything.modeling import Sam
    from torchvision.models import Swin_B_Weights
    from transformers import ViltImageProcessor

    def close(a, b):
        return len(a) == len(b) == 3 and all(abs(x - y) < 1e-7 for x, y in zip(a, b))

    params = inspect.signature(Sam.__init__).parameters
    assert close(SAMImageEncoder.pixel_mean, [x / 255 for x in params["pixel_mean"].default])
    assert close(SAMImageEncoder.pixel_std, [x / 255 for x in params["pixel_std"].default])
    assert close(CLIPImageEncoder.pixel_mean, OPENAI_DATASET_MEAN)
    assert close(CLIPImageEncoder.pixel_std, OPENAI_DATASET_STD)
    vilt = ViltImageProcessor()
    assert close(ViLTEncoder.pixel_mean, vilt.image_mean)
    assert close(ViLTEncoder.pixel_std, vilt.image_std)
    swin = Swin_B_Weights.IMAGENET1K_V1.transforms()
    assert close(SwinImageEncoder.pixel_mean, swin.mean)
    assert close(SwinImageEncoder.pixel_std, swin.std)
    assert Darknet53.pixel_mean == (0.0, 0.0, 0.0) and Darknet53.pixel_std == (1.0, 1.0, 1.0)
