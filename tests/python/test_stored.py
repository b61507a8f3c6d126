"""The stored form of multipoint layers (mpq::pack_points / unpack_points) and the CPU kernels that
run on it (mpq::multipoint_{linear,conv2d}_stored: oneDNN int8 for int8 activations, a dense weight
decoded once for float activations): exact round trips, element-wise agreement with the float64
reference on every oneDNN ISA path, the prepared-weight cache, and file sizes."""

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mpq
from mpq.simulate import layer_bound

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _random_weight(C, P, code_shape, bits, seed=0, zero_channels=True):
    g = torch.Generator().manual_seed(seed)
    K = 2 ** (bits - 1)
    codes = torch.randint(-K, K, (C, P, *code_shape), generator=g).to(torch.int8)
    scales = torch.rand(C, P, generator=g) * 0.02 + 1e-3
    counts = torch.randint(1, P + 1, (C,), generator=g).to(torch.int32)
    if zero_channels and C > 2:
        counts[1] = 0  # a channel without points outputs its bias
    return codes, scales, counts


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("code_shape", [(1,), (7,), (37,), (3, 3, 3), (16, 1, 1)])
def test_pack_unpack_round_trip_is_exact(bits, code_shape):
    codes, scales, counts = _random_weight(9, 4, code_shape, bits, seed=bits)
    point_codes, point_scales = mpq.ops.pack_points(codes, scales, counts, bits)
    D = torch.Size(code_shape).numel()
    T = int(counts.sum())
    assert point_codes.shape == (T, (D * bits + 7) // 8) and point_codes.dtype == torch.uint8
    out_codes, out_scales = mpq.ops.unpack_points(point_codes, point_scales, counts, bits, D, 4)
    keep = torch.arange(4)[None, :] < counts[:, None]
    assert torch.equal(out_codes, torch.where(keep[:, :, None], codes.reshape(9, 4, D), 0))
    assert torch.equal(out_scales, torch.where(keep, scales, 0.0))


def test_pack_refuses_codes_outside_the_bit_width():
    codes, scales, counts = _random_weight(4, 2, (5,), 8)
    with pytest.raises(RuntimeError, match=r"mpq::pack_points: expected the codes of the points in use in -8..7"):
        mpq.ops.pack_points(codes.clamp(-100, 100) * 0 + 9, scales, counts, 4)
    point_codes, point_scales = mpq.ops.pack_points(codes.clamp(-8, 7), scales, counts, 4)
    with pytest.raises(RuntimeError, match=r"mpq::unpack_points: expected as many stored points as sum\(num_points\)"):
        mpq.ops.unpack_points(point_codes[1:], point_scales[1:], counts, 4, 5, 2)
    with pytest.raises(RuntimeError, match=r"mpq::multipoint_linear_stored: expected point_codes rows of"):
        mpq.ops.multipoint_linear_stored(torch.randn(2, 9), point_codes, point_scales, counts, 4, 9)
    with pytest.raises(RuntimeError, match=r'mpq::multipoint_linear_stored: path "int8" needs .* act_qparams'):
        mpq.ops.multipoint_linear_stored(torch.randn(2, 5), point_codes, point_scales, counts, 4, 5, None, None, "int8")
    with pytest.raises(
        RuntimeError, match=r'mpq::multipoint_linear_stored: expected path "auto", "int8", "dense" or "weight_only"'
    ):
        mpq.ops.multipoint_linear_stored(torch.randn(2, 5), point_codes, point_scales, counts, 4, 5, None, None, "mma")


# Layer geometries: (kind, C_in, C_out, kernel, stride, padding, dilation, groups).
LAYERS = [
    ("conv", 16, 40, 3, 1, 1, 1, 1),
    ("conv", 24, 24, 3, 2, 1, 1, 24),  # depthwise, strided
    ("conv", 12, 18, 3, 1, 2, 2, 3),  # grouped, dilated
    ("conv", 8, 32, 1, 1, 0, 1, 1),  # pointwise
    ("conv", 3, 16, 5, 2, 2, 1, 1),  # a stem
    ("linear", 64, 48, None, None, None, None, None),
]
# Activation grids: signed symmetric (zero point 0 -> 128 in uint8), unsigned, 4-bit with a zero point.
GRIDS = [(0.05, 0, -128, 127), (0.03, 0, 0, 255), (0.2, 3, 0, 15)]


def _layer(kind, cin, cout, k, stride, pad, dil, groups, bits=4, points=3, seed=0):
    if kind == "linear":
        m = mpq.nn.MultipointLinear(cin, cout, points, bits)
        shape = (cin,)
    else:
        m = mpq.nn.MultipointConv2d(cin, cout, [k, k], points, bits, [stride] * 2, [pad] * 2, [dil] * 2, groups)
        shape = (cin // groups, k, k)
    codes, scales, counts = _random_weight(cout, points, shape, bits, seed)
    m.set_weight(codes, scales, counts, torch.randn(cout, generator=torch.Generator().manual_seed(seed)))
    return m


@pytest.mark.parametrize("grid", GRIDS + [None], ids=lambda g: "float" if g is None else f"{g[2]}..{g[3]}")
@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: "-".join(map(str, l)))
def test_stored_layers_equal_the_float64_reference_element_wise(layer, grid):
    """Within mpq.simulate.layer_bound of the float64 layer (the simulation check's own bound)."""
    m = _layer(*layer)
    if grid is not None:
        m.set_act_qparams(*grid)
    kind, cin = layer[0], layer[1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, cin, generator=g) if kind == "linear" else torch.randn(2, cin, 11, 13, generator=g)
    if grid is not None and grid[2] >= 0:
        x = x.relu()
    with torch.no_grad():
        ys = {"module (auto)": m(x)}
        for kernel in ("int8", "dense") if grid is not None else ("dense",):
            if kind == "linear":
                ys[kernel] = mpq.ops.multipoint_linear_stored(
                    x,
                    m.point_codes,
                    m.point_scales,
                    m.num_points,
                    m.w_bits,
                    m.in_features,
                    m.bias,
                    m.act_qparams,
                    kernel,
                )
            else:
                ys[kernel] = mpq.ops.multipoint_conv2d_stored(
                    x,
                    m.point_codes,
                    m.point_scales,
                    m.num_points,
                    m.w_bits,
                    m.code_shape,
                    m.bias,
                    m.act_qparams,
                    m.stride,
                    m.padding,
                    m.dilation,
                    m.groups,
                    kernel,
                )
        ref, bound, _ = layer_bound(m, x)
        # The same layer through the reference op in float64 (dequantize per call).
        codes, scales = m.unpacked()
        if kind == "linear":
            ref_op = mpq.ops.multipoint_linear(x.double(), codes, scales, m.num_points, m.bias, m.act_qparams)
        else:
            ref_op = mpq.ops.multipoint_conv2d(
                x.double(),
                codes,
                scales,
                m.num_points,
                m.bias,
                m.act_qparams,
                m.stride,
                m.padding,
                m.dilation,
                m.groups,
            )
    assert torch.allclose(ref, ref_op, rtol=1e-12, atol=1e-12)
    for kernel, y in ys.items():
        assert y.dtype == torch.float32 and y.shape == ref.shape, kernel
        assert bool(((y.double() - ref).abs() <= bound).all()), (
            kernel,
            float(((y.double() - ref).abs() / bound).max()),
        )
        if kind == "conv":
            assert y.is_contiguous(memory_format=torch.channels_last), kernel


def test_8_bit_codes_take_int8_kernels_only_where_exact():
    """8-bit codes at their extremes against full uint8 levels: oneDNN without VNNI would saturate
    the int16 sum of each pair of products (2 * 255 * 127 > 32767); there path "int8" refuses them
    and "auto" computes them on the float path, within the float64 bound either way."""
    m = _layer("conv", 32, 32, 3, 1, 1, 1, 1, bits=8, points=2)
    codes, scales = m.unpacked()
    codes = torch.where(codes >= 0, 127, -127).to(torch.int8)  # every product at its largest
    m.set_weight(codes.reshape(32, 2, 32, 3, 3), scales, m.num_points, m.bias)
    m.set_act_qparams(0.02, 0, 0, 255)
    x = torch.full((1, 32, 6, 6), 10.0)  # level 255 everywhere
    args = (
        m.point_codes,
        m.point_scales,
        m.num_points,
        8,
        m.code_shape,
        m.bias,
        m.act_qparams,
        m.stride,
        m.padding,
        m.dilation,
        m.groups,
    )
    with torch.no_grad():
        ref, bound, _ = layer_bound(m, x)
        y = m(x)
        assert bool(((y.double() - ref).abs() <= bound).all()), float(((y.double() - ref).abs() / bound).max())
        if mpq.ops.int8_kernels_exact(8):
            y8 = mpq.ops.multipoint_conv2d_stored(x, *args, "int8")
            assert bool(((y8.double() - ref).abs() <= bound).all()), float(((y8.double() - ref).abs() / bound).max())
        else:
            with pytest.raises(
                RuntimeError, match=r'multipoint_conv2d_stored: path "int8" needs .* 8-bit codes, a CPU with VNNI'
            ):
                mpq.ops.multipoint_conv2d_stored(x, *args, "int8")
    assert mpq.ops.int8_kernels_exact(7) and mpq.ops.int8_kernels_exact(4)
    # Under 7-bit activations (levels 0..127: 2 * 127 * 128 <= 32767) 8-bit codes are exact on every
    # CPU: path "int8" takes them, codes at -128 and 127 against level 127 everywhere.
    assert mpq.ops.int8_kernels_exact(8, 128)
    assert mpq.ops.int8_kernels_exact(8, 129) == mpq.ops.int8_kernels_exact(8)  # 129 levels: VNNI only
    codes = torch.where(codes >= 0, 127, -128).to(torch.int8)
    m.set_weight(codes.reshape(32, 2, 32, 3, 3), scales, m.num_points, m.bias)
    m.set_act_qparams(0.02, 0, 0, 127)
    args = (m.point_codes, m.point_scales, *args[2:6], m.act_qparams, *args[7:])
    with torch.no_grad():
        ref, bound, _ = layer_bound(m, x)
        for path in ("auto", "int8"):
            y = mpq.ops.multipoint_conv2d_stored(x, *args, path)
            assert bool(((y.double() - ref).abs() <= bound).all()), (
                path,
                float(((y.double() - ref).abs() / bound).max()),
            )


@pytest.mark.parametrize("layer", [l for l in LAYERS if l[7] in (None, 1, 3)], ids=lambda l: "-".join(map(str, l)))
def test_points_with_whole_number_scale_ratios_merge_exactly(layer):
    """Channels whose point scales divide by whole numbers (a_k = r a_{k+1}, exactly) run as one
    int8 row r q_k + q_{k+1} when the merged codes stay in the exact range (``merge_points_exactly``
    in csrc/cpu/multipoint_stored.cpp): still within the float64 bound, on codes at their extremes,
    chains of merges, ratios whose merged codes overflow (not merged), and 1-ulp misses."""
    m = _layer(*layer, points=4)
    codes, scales = m.unpacked()
    C = codes.shape[0]
    codes = torch.where(codes >= 0, 7, -8).to(torch.int8)  # merged codes reach r * 7 + 7 and -(r * 8 + 8)
    # Scales of 11 significant bits, so that whole-number multiples up to 2**13 are exact in float32.
    base = torch.randint(1024, 2048, (C,), generator=torch.Generator().manual_seed(2)).float() * 2.0**-19
    ratios = [(1, 1, 1), (5, 3, 2), (15, 1, 1), (14, 9, 1), (17, 2, 2), (30, 1, 1), (2, 2, 2), (7, 4, 3)]
    for c in range(C):
        r1, r2, r3 = ratios[c % len(ratios)]
        s3 = float(base[c])
        scales[c] = torch.tensor([s3 * r3 * r2 * r1, s3 * r3 * r2, s3 * r3, s3])
        if c % 5 == 4:
            scales[c, 0] = torch.nextafter(scales[c, 0], torch.tensor(1.0))  # 1 ulp off: no merge
    counts = torch.tensor([4, 3, 2, 0, 1] * C, dtype=torch.int32)[:C]
    m.set_weight(codes.reshape(C, 4, *m.code_shape), scales, counts, m.bias)

    # The points each channel's int8 row takes, by the rule (merged codes up to 127 with VNNI, 64
    # without under 8-bit activations, 127 under 7-bit ones; the 1-ulp-off channels, c % 5 == 4,
    # take one): chains of 3 and 4 merge at small ratios, ratio 30 never (30 * 8 > 127).
    def expected(bound):
        out = []
        for c in range(C):
            n, k, run = int(counts[c]), 1, codes[c, 0].flatten().long()
            while k < n and c % 5 != 4:
                r = round(float(scales[c, k - 1]) / float(scales[c, k]))
                nxt = r * run + codes[c, k].flatten().long()
                if int(nxt.abs().max()) > bound:
                    break
                run, k = nxt, k + 1
            out.append(k if n > 0 else 0)
        return out

    expect = expected(127 if mpq.ops.int8_kernels_exact(8) else 64)
    D = codes[0, 0].numel()
    assert mpq.ops.int8_merged_points(m.point_codes, m.point_scales, m.num_points, 4, D).tolist() == expect
    assert max(expect) >= 3 and 2 in expect and 1 in expect
    expect7 = expected(127)  # 7-bit activations: on every CPU
    assert mpq.ops.int8_merged_points(m.point_codes, m.point_scales, m.num_points, 4, D, 128).tolist() == expect7
    kind, cin = layer[0], layer[1]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, cin, generator=g) if kind == "linear" else torch.randn(2, cin, 11, 13, generator=g)
    for grid in [*GRIDS, (0.04, 5, 0, 127)]:  # with a 7-bit grid: its own merge bound
        m.set_act_qparams(*grid)
        with torch.no_grad():
            y = _int8_path(m, x)
            ref, bound, _ = layer_bound(m, x)
        assert bool(((y.double() - ref).abs() <= bound).all()), (grid, float(((y.double() - ref).abs() / bound).max()))
    if not mpq.ops.int8_kernels_exact(8):
        return
    # Every channel two points at ratio 9: the kernels compute exactly what an 8-bit one-point layer
    # of codes 9 q_1 + q_2 at scale a_2 computes (same rows, same oneDNN call): equal bit for bit.
    two = _layer(*layer, points=2)
    q, _ = two.unpacked()
    two.set_weight(q, torch.stack([base * 9, base], 1), torch.full((C,), 2, dtype=torch.int32), m.bias)
    one = _layer(*layer, bits=8, points=1)
    merged = (9 * q[:, 0].to(torch.int16) + q[:, 1]).to(torch.int8)[:, None]
    one.set_weight(merged, base[:, None], torch.ones(C, dtype=torch.int32), m.bias)
    for layer_ in (two, one):
        layer_.set_act_qparams(*GRIDS[1])
    with torch.no_grad():
        assert torch.equal(_int8_path(two, x), _int8_path(one, x))


def _int8_path(m, x):
    """The stored op of layer ``m`` on its int8 path."""
    if isinstance(m, mpq.nn.MultipointLinear):
        return mpq.ops.multipoint_linear_stored(
            x, m.point_codes, m.point_scales, m.num_points, m.w_bits, m.in_features, m.bias, m.act_qparams, "int8"
        )
    return mpq.ops.multipoint_conv2d_stored(
        x,
        *(m.point_codes, m.point_scales, m.num_points, m.w_bits, m.code_shape, m.bias, m.act_qparams),
        *(m.stride, m.padding, m.dilation, m.groups, "int8"),
    )


_ISA_CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    import mpq, test_stored as t
    for layer in t.LAYERS:
        for grid in t.GRIDS:
            t.test_stored_layers_equal_the_float64_reference_element_wise(layer, grid)
    t.test_8_bit_codes_take_int8_kernels_only_where_exact()
    for layer in t.LAYERS:
        if layer[7] in (None, 1, 3):
            t.test_points_with_whole_number_scale_ratios_merge_exactly(layer)
    print("ok", torch.backends.cpu.get_cpu_capability(), mpq.ops.int8_kernels_exact(8))
    """
)


@pytest.mark.parametrize(
    "isa", ["SSE41", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_AMX", "ALL"]
)
def test_int8_kernels_agree_on_every_onednn_isa(isa):
    """oneDNN picks its int8 kernels by ISA at run time: force each (ONEDNN_MAX_CPU_ISA caps it at
    what the machine has, so every cap runs), plus ATen's paths for the float parts."""
    env = {
        **os.environ,
        "ONEDNN_MAX_CPU_ISA": isa,
        "ATEN_CPU_CAPABILITY": "default" if isa == "SSE41" else "avx2" if "AVX2" in isa else "avx512",
    }
    out = subprocess.run(
        [sys.executable, "-c", _ISA_CHILD, os.path.dirname(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]
    # This machine has AVX-512 VNNI (and AMX): only the caps below VNNI lose the exact 8-bit int8 path.
    if mpq.ops.int8_kernels_exact(8):
        assert out.stdout.split()[-1] == str(isa not in ("SSE41", "AVX2", "AVX512_CORE")), out.stdout


def test_the_prepared_weight_follows_in_place_changes_and_new_weights():
    m = _layer("conv", 16, 40, 3, 1, 1, 1, 1)  # a 3 x 3 dense conv: the int8 kernel
    m.set_act_qparams(0.05, 0, -128, 127)
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        y0 = m(x)
        m.point_scales.mul_(2.0)  # in place: the cached int8 weight must not be served stale
        y1 = m(x)
        bias = m.bias.view(1, -1, 1, 1)
        assert torch.allclose(y1 - bias, 2 * (y0 - bias), rtol=1e-5, atol=1e-5)
        other = _layer("conv", 16, 40, 3, 1, 1, 1, 1, seed=5)
        other.set_act_qparams(0.05, 0, -128, 127)
        assert not torch.allclose(other(x), y1)
        m.bias.add_(1.0)
        assert torch.allclose(m(x), y1 + 1.0, atol=1e-5)


def test_state_dict_and_torchscript_hold_the_stored_form():
    m = _layer("conv", 64, 128, 3, 1, 1, 1, 1, bits=4, points=4)
    m.set_act_qparams(0.05, 0, 0, 255)
    sd = m.state_dict()
    assert set(sd) == {"point_codes", "point_scales", "num_points", "bias", "act_qparams"}
    T = int(m.num_points.sum())
    assert sd["point_codes"].shape == (T, 64 * 9 * 4 // 8)
    fresh = mpq.nn.MultipointConv2d(64, 128, [3, 3], 4, 4, [1, 1], [1, 1], [1, 1])
    fresh.load_state_dict(sd)
    x = torch.randn(1, 64, 8, 8).relu()
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(m), buf)
    stored = sum(t.numel() * t.element_size() for t in sd.values())
    assert buf.tell() < stored + 20_000  # TorchScript's code and zip headers: ~10 KB
    buf.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.jit.load(buf)(x), m(x))


def test_version_1_state_dicts_load():
    """Before the stored form, the state held codes [C, P, ...] and scales [C, P]."""
    m = _layer("linear", 64, 48, None, None, None, None, None)
    codes, scales = m.unpacked()
    old = {"codes": codes, "scales": scales, "num_points": m.num_points.clone(), "bias": m.bias.clone()}
    fresh = mpq.nn.MultipointLinear(64, 48, 3, 4)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.point_codes, m.point_codes) and torch.equal(fresh.point_scales, m.point_scales)


def test_files_are_the_reported_size(lite0, tmp_path):
    """EfficientNet-Lite0 W4A8: the tensors of the TorchScript file and the whole mpq.save file
    within 10% of what mpq.summary.model_size_bytes reports (codes of the points in use, scales,
    float parameters). The TorchScript archive also holds its program: for the traced Lite0
    (its padding unrolled per layer) about 0.3 MB of code and 0.5 MB of debug source ranges."""
    import zipfile

    from mpq.summary import model_size_bytes

    model, data, _ = lite0
    q = mpq.quantize(model, data.calib_batches, mpq.QuantConfig.preset("W4A8", calib_batches=1))
    reported = model_size_bytes(q)
    traced = torch.jit.trace(q, data.calib_batches[0][:1], check_trace=False)
    traced.save(str(tmp_path / "q.pt"))
    with zipfile.ZipFile(tmp_path / "q.pt") as z:
        tensors = sum(i.file_size for i in z.infolist() if "/data/" in i.filename)
    mpq.save(q, tmp_path / "q.mpq.safetensors")
    saved = (tmp_path / "q.mpq.safetensors").stat().st_size
    assert tensors <= 1.10 * reported and saved <= 1.10 * reported, (tensors, saved, reported)
    assert reported < 0.2 * sum(p.numel() * 4 for p in model.parameters())  # vs FP32's 18.8 MB: ~2.7 MB
    loaded = torch.jit.load(str(tmp_path / "q.pt"))
    with torch.no_grad():
        assert torch.equal(loaded(data.calib_batches[0][:2]), q(data.calib_batches[0][:2]))
