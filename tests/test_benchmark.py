"""The benchmark: its FLOP count (common.measure) counts attention whichever kernel SDPA picks;
its rows (common.benchmark)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.measure import count_flops


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "additive-mask"])
def test_sdpa_and_explicit_attention_count_the_same_flops(backward, masked):
    """Consistency with torch's own matmul formulas: the fused CPU kernel (chosen without
    dropout; torch 2.14 counts it as 0) counts what explicit attention's matmuls count, forward
    and backward (model FLOPs: the fused backward's recomputation is not counted)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 50, 16, requires_grad=backward) for _ in range(3))
    bias = torch.randn(2, 4, 50, 50) if masked else None

    def run(attention):
        def fn():
            out = attention(q, k, v) if bias is None else attention(q, k, v, bias)
            if backward:
                out.sum().backward()
        return fn

    fused = run(lambda q, k, v, *m: F.scaled_dot_product_attention(q, k, v, *m))
    plain = run(lambda q, k, v, *m: torch.softmax(  # softmax(q k^T / sqrt(16) + bias) v
        q @ k.transpose(-1, -2) / 4 + (m[0] if m else 0), -1) @ v)
    with torch.no_grad() if not backward else torch.enable_grad():
        n_fused, n_plain = count_flops(fused), count_flops(plain)
    forward = 2 * (2 * 2 * 4 * 50 * 50 * 16)  # two (50 x 16) @ (16 x 50)-sized matmuls
    assert n_plain >= forward and n_fused == n_plain


def test_grouped_rows_count_one_encoder_pass_per_image():
    """`--sentences-per-image 2`: the step's FLOPs drop by the encoder passes it shares."""
    from common.benchmark import bench_model

    row = lambda k: bench_model("maris", "tiny", torch.device("cpu"), 4, "none", 0, 1,
                                freeze=True, cached=False, per_image=k)
    plain, grouped, cached = row(1), row(2), bench_model(
        "maris", "tiny", torch.device("cpu"), 4, "none", 0, 1, freeze=True, cached=True)
    assert grouped["model"] == "maris (2/image)" and plain["model"] == "maris"
    encoder = plain["step_GFLOPs"] - cached["step_GFLOPs"]  # 4 image and 4 text encodings
    assert encoder > 0
    assert grouped["step_GFLOPs"] < plain["step_GFLOPs"] - 0.3 * encoder


@pytest.mark.slow
def test_a_compiled_row_times_the_compiled_model_and_counts_eager_flops(monkeypatch):
    """`--compile`: the timed forward and step go through torch.compile (here its graph capture
    alone, the "aot_eager" backend, as code generation takes minutes on 2 cores), the FLOPs are
    the eager model's (the compiled graph's kernels are not counted by FlopCounterMode)."""
    from common import benchmark

    calls, original = [], torch.compile

    def capture(model):
        calls.append(type(model).__name__)
        compiled = original(model, backend="aot_eager")

        def run(*args, **kwargs):
            calls.append("run")
            return compiled(*args, **kwargs)
        return run

    monkeypatch.setattr(torch, "compile", capture)
    row = lambda compiled: benchmark.bench_model("mmnet", "tiny", torch.device("cpu"), 2, "none",
                                                 0, 1, False, False, compiled=compiled)
    compiled = row(True)
    assert calls[0] == "MMNet" and calls.count("run") >= 3  # forward, compile step, timed step
    eager = row(False)
    assert compiled["model"] == "mmnet compiled" and eager["model"] == "mmnet"
    assert compiled["step_GFLOPs"] == pytest.approx(eager["step_GFLOPs"], rel=1e-9)
    assert compiled["fwd_GFLOPs"] == pytest.approx(eager["fwd_GFLOPs"], rel=1e-9)


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_mfu_divides_by_a_matmul_in_the_steps_dtype(amp, monkeypatch):
    """Under --amp fp16 the model runs fp16 matmuls (tensor cores on a GPU): an fp32 reference
    would put MFU an order of magnitude too high there. The reference matmul is timed here at a
    small size, as half-precision matmuls are slow on this CPU."""
    from common import benchmark, measure

    dtypes = []

    def small(device, dtype):
        dtypes.append(dtype)
        return measure.matmul(device, dtype, n=64)

    monkeypatch.setattr(benchmark, "matmul", small)
    row = benchmark.bench_model("mmnet", "tiny", torch.device("cpu"), 1, amp, 0, 1, False, False)
    assert dtypes == [{"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]]
    assert row["amp"] == amp and row["MFU"] > 0


def test_a_failing_row_does_not_hide_the_others(monkeypatch, capsys):
    """Each row is its own process: one that fails (an out-of-memory on a GPU) is reported after
    the table of the others, and the command fails."""
    import json
    import subprocess
    import types

    from common import benchmark

    def fake_run(cmd, **kwargs):  # a row process: MaIL's fails, the others print their row
        name = cmd[cmd.index("--model") + 1]
        if name == "mail":
            return subprocess.CompletedProcess(cmd, 1, "", "CUDA out of memory")
        row = {key: 1.0 for key, _, _ in benchmark.COLUMNS}
        row.update(model=name, config="tiny", batch=8, device="cpu", amp="none", threads=2)
        return subprocess.CompletedProcess(cmd, 0, json.dumps(row) + "\n", "")

    monkeypatch.setattr(benchmark, "subprocess", types.SimpleNamespace(run=fake_run))
    with pytest.raises(RuntimeError, match="mail/tiny: CUDA out of memory"):
        benchmark.main(["--model", "all", "--config", "tiny", "--device", "cpu"])
    table = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in table[1:4]) == ["m3dec", "maris", "mmnet"]


@pytest.mark.parametrize("family", ["open_clip ViT", "open_clip ResNet", "SAM", "Swin", "ViLT",
                                    "BERT", "Darknet"])
def test_flops_are_the_same_in_eval_and_train_mode(family):
    """nn.MultiheadAttention's inference fast path (eval mode, no grad) is a fused kernel that
    FlopCounterMode does not see: open_clip's ViT-B/32 counted 5.9 GFLOP in eval mode against
    8.8 in train mode. Every encoder family counts the same in both modes (dropout aside, which
    counts nothing)."""
    import warnings

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    if family.startswith("open_clip"):
        import open_clip

        arch = "ViT-B-32" if family.endswith("ViT") else "RN50"
        model, x = open_clip.create_model(arch, pretrained=None).visual, torch.randn(1, 3, 224, 224)
        call = lambda: model(x)
    else:
        from helpers import build, make_batch

        name = {"SAM": "maris", "Swin": "m3dec", "ViLT": "mail", "BERT": "m3dec",
                "Darknet": "m3dec"}[family]
        model = build(name)
        batch = make_batch(model, n=1)
        call = lambda: model(**model.inputs_from(batch))

    def forward():
        with torch.no_grad():
            call()

    model.eval()
    in_eval = count_flops(forward)
    model.train()
    assert in_eval == count_flops(forward) > 0
