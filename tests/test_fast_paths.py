"""The fast paths give the reference path's outputs, to stated tolerances (chapter 7). Nothing here is timed.

Fast paths of fusionlib's models and what they are compared with:

* fused attention (``need_weights=False``: ``F.scaled_dot_product_attention``, whatever backend PyTorch
  picks) vs the written-out softmax(QKᵀ/√d)V (``need_weights=True``): outputs and gradients, float32;
* each SDPA backend forced with ``torch.nn.attention.sdpa_kernel`` vs the written-out attention;
* bf16 autocast (the mixed-precision recipe) vs float32;
* ``torch.compile`` (the graph PyTorch captures) vs eager.

And the benchmark's own measuring tools (``fusionlib.bench.models``): FLOP formulas against
``torch.utils.flop_counter``, saved-activation bytes against a hand count, ratio statistics, and a tiny
end-to-end run that writes the JSON the chapter reads.
"""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fusionlib.bench import models as bench
from fusionlib.models.uniter import UniterConfig, UniterModel
from fusionlib.models.vilbert import ViLBERT, ViLBERTConfig

# Stated tolerances (max absolute difference; the outputs are LayerNorm'd, of order 1).
FUSED_ATOL = 1e-5  # float32: the same arithmetic in another order
GRAD_RTOL = 1e-4  # float32 gradients, relative to the largest gradient of each parameter
BF16_ATOL = 0.1  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding, through a few layers
BF16_MEAN_ATOL = 0.02  # ... while the mean error stays small (no systematic drift)
COMPILE_ATOL = 1e-5

VOCAB, D, CLASSES = 40, 12, 7


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def padded_batch(B=4, T=8, R=6, text_lengths=(8, 5, 3, 1), region_counts=(6, 4, 1, 0), seed=0):
    """Right-padded words and regions, one sample with only [CLS] and one with no region at all."""
    g = torch.Generator().manual_seed(seed)
    attention_mask = torch.arange(T)[None] < torch.tensor(text_lengths)[:, None]
    input_ids = torch.randint(5, VOCAB, (B, T), generator=g).masked_fill(~attention_mask, 0)
    input_ids[:, 0] = 2
    region_mask = torch.arange(R)[None] < torch.tensor(region_counts)[:, None]
    real = region_mask[..., None]
    xy = torch.rand(B, R, 2, generator=g) * 0.7
    wh = 0.1 + 0.2 * torch.rand(B, R, 2, generator=g)
    box = torch.cat([xy, xy + wh], -1)
    area = wh.prod(-1, keepdim=True)
    feats = torch.randn(B, R, D, generator=g) * real
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "region_feats": feats,
        "region_loc5": torch.cat([box, area], -1) * real,
        "region_loc7": torch.cat([box, wh, area], -1) * real,
        "region_mask": region_mask,
        "image_feats": feats.sum(1) / region_mask.sum(1, keepdim=True).clamp(min=1),
    }


def vilbert():
    torch.manual_seed(0)
    config = ViLBERTConfig(
        vocab_size=VOCAB,
        num_region_classes=CLASSES,
        region_dim=D,
        text_hidden_size=32,
        text_num_layers=3,
        text_num_heads=4,
        text_ffn_size=64,
        visual_hidden_size=24,
        visual_num_layers=2,
        visual_num_heads=3,
        visual_ffn_size=48,
        bi_hidden_size=32,
        bi_num_heads=4,
        text_layer_ids=(1, 2),
        visual_layer_ids=(0, 1),
        max_text_len=12,
        initializer_range=0.2,
    )
    return ViLBERT(config).eval()


def uniter():
    torch.manual_seed(0)
    config = UniterConfig(
        vocab_size=VOCAB,
        num_region_classes=CLASSES,
        region_dim=D,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        ffn_size=64,
        max_text_len=12,
        initializer_range=None,
    )
    return UniterModel(config).eval()


def outputs(model, batch, need_weights=False):
    out = model(batch, need_weights=need_weights)
    if isinstance(
        getattr(model, "_orig_mod", model), ViLBERT
    ):  # a compiled model wraps the original
        return {
            "text": out.text_hidden,
            "visual": out.visual_hidden,
            "pooled_text": out.pooled_text,
            "pooled_visual": out.pooled_visual,
        }
    return {"sequence": out.sequence, "pooled": out.pooled}


def gradients(model, batch, need_weights=False):
    model.zero_grad(set_to_none=True)
    sum(
        (o * torch.linspace(-1, 1, o.shape[-1])).sum()
        for o in outputs(model, batch, need_weights).values()
    ).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


MODELS = {"vilbert": vilbert, "uniter": uniter}


@pytest.mark.parametrize("name", MODELS)
def test_fused_attention_gives_the_written_out_outputs_and_gradients(name):
    model, batch = MODELS[name](), padded_batch()
    fused, reference = outputs(model, batch), outputs(model, batch, need_weights=True)
    for key in reference:
        assert torch.isfinite(fused[key]).all(), key
        torch.testing.assert_close(fused[key], reference[key], rtol=0, atol=FUSED_ATOL, msg=key)
    g_fused, g_ref = gradients(model, batch), gradients(model, batch, need_weights=True)
    assert g_fused.keys() == g_ref.keys() and len(g_ref) > 20
    for key, ref in g_ref.items():
        scale = ref.abs().max().clamp(min=1e-8)
        assert (g_fused[key] - ref).abs().max() <= GRAD_RTOL * scale, key


def _available_backends():
    backends = [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]  # both exist on CPU
    if torch.cuda.is_available():
        backends.append(SDPBackend.EFFICIENT_ATTENTION)
    return backends


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", _available_backends(), ids=lambda b: b.name)
def test_every_sdpa_backend_gives_the_written_out_outputs(name, backend):
    model, batch = MODELS[name](), padded_batch()
    reference = outputs(model, batch, need_weights=True)
    try:
        with sdpa_kernel([backend]):
            fused = outputs(model, batch)
    except (
        RuntimeError
    ) as error:  # the backend refuses these inputs (e.g. flash with a mask, on a GPU)
        pytest.skip(f"{backend.name} cannot run these inputs here: {str(error).splitlines()[0]}")
    for key in reference:
        torch.testing.assert_close(fused[key], reference[key], rtol=0, atol=FUSED_ATOL, msg=key)


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_stays_close_to_float32(name):
    model, batch = MODELS[name](), padded_batch()
    reference = outputs(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = outputs(model, batch)
    for key in reference:
        error = (low[key].float() - reference[key]).abs()
        assert torch.isfinite(low[key]).all(), key
        assert error.max() <= BF16_ATOL, f"{key}: max error {error.max():.3g}"
        assert error.mean() <= BF16_MEAN_ATOL, f"{key}: mean error {error.mean():.3g}"


@pytest.mark.parametrize("name", MODELS)
def test_compiled_graph_gives_the_eager_outputs(name):
    """``torch.compile`` captures the whole forward (the value checks step aside while compiling).

    On CPU the ``aot_eager`` backend checks the captured graph without paying for code generation;
    with CUDA, inductor's generated kernels are checked too.
    """
    torch._dynamo.reset()
    model, batch = MODELS[name](), padded_batch()
    reference = outputs(model, batch)
    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    got = outputs(compiled, batch)
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=0, atol=COMPILE_ATOL, msg=key)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------
# The benchmark's measuring tools
# ---------------------------------------------------------------------------


def test_matched_models_have_the_same_widths_and_layer_counts():
    size = bench.MatchedSize(
        hidden_size=32,
        num_heads=4,
        ffn_size=64,
        vocab_size=50,
        region_dim=12,
        lxmert_layers=(2, 1, 2),
        single_stream_layers=3,
    )
    v = bench.vilbert_config(size)
    assert (v.text_num_layers, v.visual_num_layers, v.num_co_layers) == (2, 1, 2)
    assert [k for k, _ in ViLBERT(v).schedule] == ["text", "text", "visual", "co", "co"]
    same = bench.vilbert_config(size, same_attention=True)
    assert (same.text_num_layers, same.visual_num_layers, same.num_co_layers) == (4, 3, 2)
    assert [f"{k[0]}{i}" for k, i in ViLBERT(same).schedule] == [
        "t0",
        "t1",
        "v0",
        "c0",
        "t2",
        "v1",
        "c1",
        "v2",
        "t3",
    ]
    lx = bench.lxmert_model(size).config
    assert (
        lx.l_layers,
        lx.r_layers,
        lx.x_layers,
        lx.hidden_size,
        lx.num_attention_heads,
        lx.intermediate_size,
        lx.visual_feat_dim,
    ) == (2, 1, 2, 32, 4, 64, 12)
    vb = bench.visualbert_model(size).config
    u = bench.uniter_config(size)
    assert (vb.num_hidden_layers, vb.hidden_size, vb.num_attention_heads, vb.intermediate_size) == (
        u.num_layers,
        u.hidden_size,
        u.num_heads,
        u.ffn_size,
    )
    # One stream of the same depth and width: at the book's size the parameter counts agree to 1%
    # (the embeddings differ in details: UNITER's 7-d box projection, VisualBERT's visual positions).
    n = {
        k: c.num_parameters()
        for k, c in bench.build_contenders(
            bench.MatchedSize(), names=("uniter", "visualbert")
        ).items()
    }
    assert abs(n["uniter"] - n["visualbert"]) / n["visualbert"] < 0.01


def test_attention_flops_match_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    B, H, Dh, T, V = 2, 4, 8, 6, 5
    d = H * Dh
    g = torch.Generator().manual_seed(0)
    text, image, joint = (torch.randn(B, H, n, Dh, generator=g) for n in (T, V, T + V))
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as single:
        F.scaled_dot_product_attention(joint, joint, joint)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as co:
        for q, kv in ((text, text), (image, image), (text, image), (image, text)):
            F.scaled_dot_product_attention(q, kv, kv)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as cross:
        F.scaled_dot_product_attention(text, image, image)
        F.scaled_dot_product_attention(image, text, text)
    assert single.get_total_flops() == B * bench.attention_flops(T, V, d, "single")
    assert co.get_total_flops() == B * bench.attention_flops(T, V, d, "co")
    assert cross.get_total_flops() == B * bench.attention_flops(T, V, d, "cross")
    # (T + V)^2 = T^2 + V^2 + 2TV: per layer the two designs do the same attention arithmetic.
    assert bench.attention_flops(T, V, d, "single") == bench.attention_flops(T, V, d, "co")
    with pytest.raises(ValueError, match="kind must be"):
        bench.attention_flops(T, V, d, "dual")


def test_saved_activation_bytes_counts_what_autograd_keeps():
    x = torch.randn(10, 6, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(6, 6))
    module = torch.nn.Module()
    module.w = w
    # x @ w saves x and w; tanh saves its output (10 x 6). Without the weights: 2 * 60 floats.
    nbytes = bench.saved_activation_bytes(
        lambda: torch.tanh(x @ w).sum().backward(), exclude=module
    )
    assert nbytes == 2 * 60 * 4
    assert (
        bench.saved_activation_bytes(lambda: torch.tanh(x @ w).sum().backward())
        == (2 * 60 + 36) * 4
    )


def test_ratio_summary_pairs_rounds():
    s = bench.ratio_summary([2.0, 4.0, 3.0, 10.0], [1.0, 2.0, 1.0, 5.0])
    assert s["median"] == 2.0 and s["min"] == 2.0 and s["max"] == 3.0 and s["rounds"] == 4
    with pytest.raises(ValueError, match="as many rounds"):
        bench.ratio_summary([1.0, 2.0], [1.0])


def test_the_benchmark_runs_end_to_end_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = bench.main(
        [
            "--device",
            "cpu",
            "--threads",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--hidden",
            "16",
            "--heads",
            "2",
            "--ffn",
            "32",
            "--batch",
            "2",
            "--tokens",
            "4",
            "--regions",
            "3",
            "--no-attention",
            "--no-precision",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and saved["versions"]["torch"] == torch.__version__
    assert set(saved["models"]) == set(bench.LABELS)
    assert set(saved["ratios"]) == {f"{a}_vs_{b}" for a, b in bench.PAIRS}
    for m in saved["models"].values():
        assert (
            m["parameters"] > 0
            and m["gflop_per_step"] > 0
            and m["memory_bytes"] > 0
            and m["median_ms"] > 0
        )
    assert report["models"]["uniter"]["parameters"] == saved["models"]["uniter"]["parameters"]
    assert "fusionlib UNITER vs transformers VisualBertModel" in printed and "params" in printed


def test_cuda_extras_record_unsupported_backends_and_failed_compiles(monkeypatch):
    """The CUDA-only part of the benchmark (run here on the CPU): a backend that refuses the inputs
    and a ``torch.compile`` that cannot build (no triton, no C compiler) are noted, never raised,
    so chapter 7's one GPU run keeps its other numbers."""
    size = bench.MatchedSize(
        hidden_size=16,
        num_heads=2,
        ffn_size=32,
        batch_size=2,
        text_len=4,
        num_regions=3,
        vocab_size=50,
        region_dim=12,
    )
    contenders = bench.build_contenders(size, "cpu", names=("vilbert", "uniter"))

    @functools.wraps(torch.compile)  # torch._dynamo reads torch.compile.__wrapped__
    def cannot_compile(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("compile failed: no C compiler found\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", cannot_compile)

    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        out = bench._cuda_extras(
            contenders,
            torch.device("cpu"),
            repeats=1,
            warmup=0,
            compile=("uniter",),
            say=lambda *a, **k: None,
        )
    assert set(out["sdpa_backends"]) == {"flash", "efficient", "math"}
    for name in ("vilbert", "uniter"):
        # The CPU has no memory-efficient kernel: the same refusal as flash with a mask on a GPU.
        efficient = out["sdpa_backends"]["efficient"][name]
        assert efficient["ms"] is None and efficient["error"]
        assert all("Triggered internally" not in r for r in efficient["reasons"])
        assert out["sdpa_backends"]["math"][name]["ms"] > 0
    assert out["sdpa_backends"]["flash"]["uniter"]["reasons"]  # e.g. no fused kernel takes dropout
    # SDPA's refusals are recorded with the error, not printed on the chapter's page.
    refusals = [str(w.message) for w in escaped if "kernel" in str(w.message)]
    assert not refusals, refusals
    assert out["compile"] == {}
    assert out["compile_errors"] == {"uniter": "compile failed: no C compiler found"}
