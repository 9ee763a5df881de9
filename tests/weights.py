"""Random weights in the file formats users download, written from the upstream packages' own
models, so that tests load real-format files through the library's loaders (nothing is
downloaded). Each writer builds the upstream model, gives it random weights (`randomise_`),
writes the file and returns the upstream model (or, for Darknet and GloVe, the values written)
for comparison.
"""

from __future__ import annotations

import os
import struct
import warnings

import torch
from torch import Tensor, nn


@torch.no_grad()
def randomise_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give random values to every floating tensor of the state dict that upstream initialises
    to one constant (norm gains and biases, BatchNorm statistics, SAM's zero position tables),
    so that a tensor loaded into the wrong place changes the output. Ones become U(0.5, 1.5)
    (gains, variances stay positive), other constants N(0, 0.1). Returns the module."""
    gen = torch.Generator().manual_seed(seed)
    for t in module.state_dict().values():  # tensors sharing the module's storage
        if not t.is_floating_point() or t.numel() < 2 or not (t == t.flatten()[0]).all():
            continue
        if t.flatten()[0] == 1:
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        else:
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    return module


def write_sam(path: str, arch: str = "vit_b", seed: int = 0) -> nn.Module:
    """segment-anything checkpoint (sam_vit_b_01ec64.pth): `torch.save` of the whole `Sam`'s
    state dict (image_encoder., prompt_encoder., mask_decoder.). Returns the `Sam`."""
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    sam = randomise_(sam_model_registry[arch](), seed).eval()
    torch.save(sam.state_dict(), path)
    return sam


def write_openai_clip(path: str, arch: str = "ViT-B-16-quickgelu", seed: int = 0) -> nn.Module:
    """OpenAI CLIP file (ViT-B-16.pt): a TorchScript archive whose state dict has OpenAI's names,
    its fp16 weights (OpenAI's convert_weights, as open_clip.model.convert_weights_to_lp) and
    its metadata scalars input_resolution, context_length, vocab_size. Its code is a trace of
    open_clip's model of `arch`, not OpenAI's own (readers, open_clip's included, use only the
    state dict). Returns the open_clip model, in fp32, holding the file's (fp16-rounded) values.
    """
    import open_clip
    from open_clip.model import convert_weights_to_lp

    torch.manual_seed(seed)
    model = randomise_(open_clip.create_model(arch), seed).eval()
    convert_weights_to_lp(model, torch.float16)
    half = {k for k, v in model.state_dict().items() if v.dtype == torch.float16}
    model.float()  # trace in fp32 (CPUs run fp16 slowly), store fp16 as OpenAI does
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    meta = dict(input_resolution=size, context_length=model.context_length,
                vocab_size=model.vocab_size)
    for name, value in meta.items():  # open_clip keeps two of them as ints
        model.__dict__.pop(name, None)
        model.register_buffer(name, torch.tensor(value))
    attn_mask = model._buffers.pop("attn_mask")  # OpenAI's is a constant, not in the state
    model.attn_mask = attn_mask
    image = torch.zeros(1, 3, size, size)
    text = torch.zeros(1, meta["context_length"], dtype=torch.long)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; OpenAI's files are TorchScript
        archive = torch.jit.trace(model, (image, text), check_trace=False)
    for name, tensor in [*archive.named_parameters(), *archive.named_buffers()]:
        if name in half:
            tensor.data = tensor.data.half()
    archive.save(path)
    del model.attn_mask
    model.register_buffer("attn_mask", attn_mask, persistent=False)
    for name, value in meta.items():
        delattr(model, name)
        if name != "input_resolution":
            setattr(model, name, value)
    return model


def write_open_clip(path: str, arch: str = "ViT-B-16", seed: int = 0) -> nn.Module:
    """open_clip checkpoint (open_clip_pytorch_model.bin, or open_clip_model.safetensors when
    `path` ends so): the open_clip model's plain fp32 state dict. Returns the model."""
    import open_clip

    torch.manual_seed(seed)
    model = randomise_(open_clip.create_model(arch), seed).eval()
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    else:
        torch.save(model.state_dict(), path)
    return model


def write_swin_b(path: str, seed: int = 0) -> nn.Module:
    """torchvision checkpoint (swin_b-68c6b09e.pth): `torch.save` of torchvision.models.swin_b's
    state dict. Returns the model."""
    from torchvision.models import swin_b

    torch.manual_seed(seed)
    net = randomise_(swin_b(weights=None), seed).eval()
    torch.save(net.state_dict(), path)
    return net


def write_swin_microsoft(path: str, seed: int = 0) -> nn.Module:
    """Microsoft's release (swin_base_patch4_window12_384_22k.pth): `torch.save({"model": state
    dict})` in the official repository's names, with its persistent buffers (relative-position
    indices, shift masks) and the 21,841-class ImageNet-22K head. Built by timm's
    swin_base_patch4_window12_384 and renamed back to Microsoft's layout (timm's own
    checkpoint_filter_fn reads such files by moving each stage's patch merging to the next
    stage and the head to head.fc; this undoes both). Returns the timm model."""
    import re

    import timm

    torch.manual_seed(seed)
    net = randomise_(timm.create_model("swin_base_patch4_window12_384", pretrained=False,
                                       num_classes=21841), seed).eval()
    state = {}
    for name, tensor in net.state_dict().items():
        name = re.sub(r"^layers\.(\d+)\.downsample\.",
                      lambda m: f"layers.{int(m[1]) - 1}.downsample.", name)
        state[name.replace("head.fc.", "head.")] = tensor
    for name, module in net.named_modules():  # buffers Microsoft's code saves and timm's not
        if hasattr(module, "relative_position_index"):
            state[f"{name}.relative_position_index"] = module.relative_position_index
        if getattr(module, "attn_mask", None) is not None:
            state[f"{name}.attn_mask"] = module.attn_mask
    torch.save({"model": state}, path)
    return net


def write_vocab(folder: str, size: int, words: tuple[str, ...] = ()) -> None:
    """A WordPiece vocab.txt of exactly `size` entries: BERT's special tokens, `words`, then
    filler tokens."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    entries = special + [w for w in dict.fromkeys(words) if w not in special]
    entries += [f"[unused{i}]" for i in range(size - len(entries))]
    if len(entries) != size:
        raise ValueError(f"{len(entries)} words do not fit a vocabulary of {size}")
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(entries) + "\n")


def write_bert_folder(folder: str, config=None, words: tuple[str, ...] = (),
                      seed: int = 0) -> nn.Module:
    """Hugging Face BERT folder (as bert-base-uncased): `BertForPreTraining.save_pretrained`
    (config.json, model.safetensors with "bert." names and the "cls." heads) and a vocab.txt of
    `config.vocab_size` entries. `config`: a transformers BertConfig (default: bert-base).
    Returns the BertModel (with its pooler)."""
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(seed)
    model = randomise_(BertForPreTraining(config or BertConfig()), seed).eval()
    model.save_pretrained(folder)
    write_vocab(folder, model.config.vocab_size, words)
    return model.bert


def write_vilt_folder(folder: str, config=None, words: tuple[str, ...] = (),
                      seed: int = 0) -> nn.Module:
    """Hugging Face ViLT folder (as dandelin/vilt-b32-mlm): `ViltForMaskedLM.save_pretrained`
    (config.json, model.safetensors with "vilt." names and the "mlm_score." head) and a vocab.txt
    of `config.vocab_size` entries. `config`: a transformers ViltConfig (default: vilt-b32).
    Returns the ViltModel."""
    from transformers import ViltConfig, ViltForMaskedLM

    torch.manual_seed(seed)
    model = randomise_(ViltForMaskedLM(config or ViltConfig()), seed).eval()
    model.save_pretrained(folder)
    write_vocab(folder, model.config.vocab_size, words)
    return model.vilt


# Darknet-53's widths, as YOLOv3's darknet53.cfg lists them, and this library's "tiny" variant
DARKNET_LAYOUTS = {"darknet53": (32, (1, 2, 8, 8, 4)), "tiny": (8, (1, 1, 1, 2, 1))}


def darknet_convs(arch: str = "darknet53") -> list[tuple[int, int, int, int]]:
    """(in, out, kernel, stride) of every convolution in darknet53.cfg's order: a 3x3 stem, then
    per stage a stride-2 3x3 convolution doubling the width and residual blocks of a 1x1 (half
    width) and a 3x3 convolution, each followed by [shortcut] from=-3."""
    width, depths = DARKNET_LAYOUTS[arch]
    convs, c = [(3, width, 3, 1)], width
    for depth in depths:
        convs.append((c, 2 * c, 3, 2))
        c *= 2
        convs += [(c, c // 2, 1, 1), (c // 2, c, 3, 1)] * depth
    return convs


def write_darknet(path: str, arch: str = "darknet53", head_values: int = 0,
                  seed: int = 0) -> list[dict[str, Tensor]]:
    """Darknet binary (darknet53.conv.74; yolov3.weights with `head_values` > 0): header int32
    major=0, minor=2, revision=0 and int64 images seen, then per convolution in cfg order float32
    BN beta, gamma, running mean, running var, then the kernel (out, in, k, k); then
    `head_values` more floats (a detection head). Returns per convolution its tensors and shape.
    """
    gen = torch.Generator().manual_seed(seed)
    convs, chunks = [], []  # kernels N(0, 0.25 / fan_in): features stay O(1) through 23 residuals
    for c_in, c_out, k, stride in darknet_convs(arch):
        conv = dict(
            beta=torch.randn(c_out, generator=gen) * 0.1,
            gamma=torch.rand(c_out, generator=gen) + 0.5,
            mean=torch.randn(c_out, generator=gen) * 0.1,
            var=torch.rand(c_out, generator=gen) + 0.5,
            kernel=torch.randn(c_out, c_in, k, k, generator=gen) * 0.5 / (c_in * k * k) ** 0.5,
            stride=stride)
        convs.append(conv)
        chunks += [conv[n].flatten() for n in ("beta", "gamma", "mean", "var", "kernel")]
    chunks.append(torch.randn(head_values, generator=gen))
    with open(path, "wb") as f:
        f.write(struct.pack("<3iq", 0, 2, 0, 32013312))
        f.write(torch.cat(chunks).numpy().astype("<f4").tobytes())
    return convs


def write_glove(path: str, words: list[str], dim: int, seed: int = 0) -> dict[str, Tensor]:
    """GloVe text file (glove.840B.300d.txt): one line per word, the word (which may contain
    spaces) then `dim` values separated by spaces. Returns each word's vector as written."""
    gen = torch.Generator().manual_seed(seed)
    vectors = {}
    with open(path, "w", encoding="utf-8") as f:
        for word in words:
            text = [f"{v:.5f}" for v in torch.randn(dim, generator=gen).tolist()]
            f.write(" ".join([word, *text]) + "\n")
            vectors[word] = torch.tensor([float(v) for v in text])
    return vectors
