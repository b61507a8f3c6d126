"""Float64 references for every mpq op, written independently of csrc/ (no mpq import).

Contracts: docs/ALGORITHM.md sections 1 and 3, the schemas in csrc/registration.cpp.

- ``greedy_step_exact``: the exact optimum of one greedy step by sorting all breakpoints
  (vectorised with torch: one sort and two cumulative sums, no heap merge as in the C++).
- ``greedy_step_bruteforce``: a dense scan of the scale plus exact evaluation, to check the
  exact step on small vectors; ``greedy_step_enumerate`` tries every code vector (tiny D only).
- ``fit_multipoint_reference``: nested greedy points with the op's storage rules.
- ``dequantize_reference``, ``multipoint_linear_reference``, ``multipoint_conv2d_reference``:
  the layers in float64, including the activation fake quantization.
- ``multipoint_output_bound``: per output element, how far a kernel that reads its input in a
  float dtype and accumulates in float32 may be from that reference (``assert_within_bound``).
"""

from collections.abc import Sequence
from itertools import product

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def grid_max(bits: int) -> int:
    """K of the symmetric grid {-K..K} for ``bits`` bits."""
    return (1 << (bits - 1)) - 1


# ---- one greedy step --------------------------------------------------------------------------


def _sq_error(r: Tensor, a: Tensor, q: Tensor) -> Tensor:
    return ((r - a.unsqueeze(-1) * q) ** 2).sum(-1)


def greedy_step_exact_batched(r: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Exact ``argmin_{a >= 0, q in {-K..K}^D} ||r_j - a q||^2`` for every row of r[C, D].

    Returns (a float64[C], q float64[C, D]); a = 0 and q = 0 for a zero row.

    As a decreases from +inf, |q_i| = |round(r_i / a)| grows from k to k + 1 at the breakpoint
    |r_i| / (k + 1/2), k = 0..K-1. Sorting all D*K breakpoints in decreasing order, after the
    j-th one <r, q> = sum of the |r_i| crossed and <q, q> = sum of (2k + 1) crossed; on the
    interval [b_(j+1), b_(j)] q is fixed and the best a is <r,q>/<q,q> clamped to the interval.
    The winner's q is rebuilt by counting, for each i, the breakpoints crossed (no rounding at
    a possibly tied scale); its least-squares scale is returned (never worse than the clamp).
    """
    r = r.to(torch.float64)
    if r.dim() != 2:
        raise ValueError(f"expected r [C, D], got {tuple(r.shape)}")
    C, D = r.shape
    K = grid_max(bits)
    if C == 0:
        return r.new_zeros(0), r.new_zeros(0, D)
    # Units of max|r| per row: squares neither overflow nor underflow at any magnitude.
    m = r.abs().amax(dim=1, keepdim=True)
    safe_m = torch.where(m > 0, m, torch.ones_like(m))
    v = r.abs() / safe_m  # [C, D] in [0, 1]
    half = torch.arange(K, dtype=torch.float64) + 0.5  # k + 1/2
    bp = (v.unsqueeze(2) / half).reshape(C, D * K)  # index i * K + k
    inc_rq = v.unsqueeze(2).expand(C, D, K).reshape(C, D * K)
    inc_qq = (2.0 * torch.arange(K, dtype=torch.float64) + 1.0).expand(C, D, K).reshape(C, D * K)
    bp_sorted, order = torch.sort(bp, dim=1, descending=True, stable=True)
    rq = torch.cumsum(torch.gather(inc_rq, 1, order), dim=1)  # after crossing sorted[0..j]
    qq = torch.cumsum(torch.gather(inc_qq, 1, order), dim=1)
    upper = bp_sorted
    lower = torch.cat([bp_sorted[:, 1:], bp_sorted.new_zeros(C, 1)], dim=1)
    a = torch.minimum(torch.maximum(rq / qq, lower), upper)
    gain = 2.0 * a * rq - a * a * qq  # ||r||^2 - ||r - a q||^2, normalised units
    best_gain, best_j = gain.max(dim=1)
    # |q_i| = how many of entry i's breakpoints lie among the first best_j + 1 sorted ones.
    crossed = (torch.arange(D * K).unsqueeze(0) <= best_j.unsqueeze(1)).to(torch.float64)
    entry = torch.div(order, K, rounding_mode="floor")
    mag = torch.zeros(C, D, dtype=torch.float64).scatter_add_(1, entry, crossed)
    q = torch.sign(r) * mag
    valid = (best_gain > 0) & (m.squeeze(1) > 0)
    q = torch.where(valid.unsqueeze(1), q, torch.zeros_like(q))
    qq_best = (q * q).sum(1)
    a_ls = torch.where(
        valid, (r * q).sum(1) / torch.where(valid, qq_best, torch.ones_like(qq_best)), torch.zeros_like(qq_best)
    )
    return a_ls, q


def greedy_step_exact(r: Tensor, bits: int) -> tuple[float, Tensor]:
    """Exact optimum of one greedy step for one vector r[D]: (a, q float64[D])."""
    a, q = greedy_step_exact_batched(r.reshape(1, -1), bits)
    return float(a[0]), q[0]


def greedy_step_bruteforce(r: Tensor, bits: int, n_scan: int = 20000) -> tuple[float, Tensor]:
    """A dense log scan of a over [max|r| / (K + 1/2) / 1e3, 2 max|r|] (plus every breakpoint
    midpoint when D*K is small); each candidate's codes clip(round(r/a)) are evaluated exactly
    at their least-squares scale. For checking the exact step on small vectors."""
    r = r.to(torch.float64).reshape(-1)
    K = grid_max(bits)
    m = float(r.abs().max())
    if m == 0.0:
        return 0.0, torch.zeros_like(r)
    lo = m / (K + 0.5) / 1e3
    cand = torch.logspace(
        torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(2.0 * m)), n_scan, dtype=torch.float64
    )
    bps = (r.abs().unsqueeze(1) / (torch.arange(K, dtype=torch.float64) + 0.5)).reshape(-1)
    bps = torch.unique(bps[bps > 0])
    if bps.numel() <= 4096:
        mids = torch.cat([(bps[1:] + bps[:-1]) / 2, bps[:1] / 2, bps[-1:] * 1.5])
        cand = torch.cat([cand, mids])
    best_e, best_a, best_q = float((r * r).sum()), 0.0, torch.zeros_like(r)
    for chunk in cand.split(2048):
        q = torch.clamp(torch.round(r.unsqueeze(0) / chunk.unsqueeze(1)), -K, K)  # [n, D]
        rq = (q * r).sum(1)
        qq = (q * q).sum(1)
        a = torch.where(qq > 0, rq / torch.where(qq > 0, qq, torch.ones_like(qq)), torch.zeros_like(qq))
        a = a.clamp_min(0.0)
        e = _sq_error(r.unsqueeze(0), a, q)
        i = int(torch.argmin(e))
        if float(e[i]) < best_e:
            best_e, best_a, best_q = float(e[i]), float(a[i]), q[i].clone()
    return best_a, best_q


def greedy_step_enumerate(r: Tensor, bits: int) -> tuple[float, Tensor]:
    """Every q in {-K..K}^D at its least-squares scale: the true optimum, for D*log2(2K+1) tiny."""
    r = r.to(torch.float64).reshape(-1)
    K = grid_max(bits)
    qs = torch.tensor(list(product(range(-K, K + 1), repeat=r.numel())), dtype=torch.float64)
    rq = qs @ r
    qq = (qs * qs).sum(1)
    a = torch.where(qq > 0, rq / torch.where(qq > 0, qq, torch.ones_like(qq)), torch.zeros_like(qq))
    a = a.clamp_min(0.0)
    e = _sq_error(r.unsqueeze(0), a, qs)
    i = int(torch.argmin(e))
    return float(a[i]), qs[i] if float(a[i]) > 0 else torch.zeros_like(r)


def step_sq_error(r: Tensor, a: float, q: Tensor) -> float:
    """||r - a q||^2 in float64."""
    r = r.to(torch.float64).reshape(-1)
    return float(((r - a * q.to(torch.float64).reshape(-1)) ** 2).sum())


# ---- the multipoint fit -----------------------------------------------------------------------


def fit_multipoint_reference(
    w: Tensor, bits: int, max_points: int, round_scales_to_float32: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Nested greedy exact points for every row of w[C, D], as the op's contract says.

    Point k solves the exact step on the residual of the first k points; its scale is stored
    in float32 (when ``round_scales_to_float32``) and the residual and errors use the stored
    value; a point that does not reduce the error is stored as zero (scale 0, codes 0); a zero
    residual gives zero points.

    Returns codes int8[C, P, D], scales float64[C, P] (float32-representable when rounded),
    sq_errors float64[C, P] = ||w_j - sum_{i<=k} scales[j,i] codes[j,i]||^2.
    """
    r = w.detach().to(torch.float64).reshape(w.shape[0], -1).clone()
    C, D = r.shape
    codes = torch.zeros(C, max_points, D, dtype=torch.int8)
    scales = torch.zeros(C, max_points, dtype=torch.float64)
    sq_errors = torch.zeros(C, max_points, dtype=torch.float64)
    err = (r * r).sum(1)
    for p in range(max_points):
        a, q = greedy_step_exact_batched(r, bits)
        if round_scales_to_float32:
            a = a.to(torch.float32).to(torch.float64)
        new_r = r - a.unsqueeze(1) * q
        new_err = (new_r * new_r).sum(1)
        accept = (a > 0) & (new_err < err)
        r = torch.where(accept.unsqueeze(1), new_r, r)
        err = torch.where(accept, new_err, err)
        codes[:, p] = torch.where(accept.unsqueeze(1), q, torch.zeros_like(q)).to(torch.int8)
        scales[:, p] = torch.where(accept, a, torch.zeros_like(a))
        sq_errors[:, p] = err
    return codes, scales, sq_errors


# ---- layers -----------------------------------------------------------------------------------


def dequantize_reference(codes: Tensor, scales: Tensor, num_points: Tensor) -> Tensor:
    """W[j] = sum_{k < num_points[j]} scales[j,k] * codes[j,k] in float64: codes [C, P, ...]."""
    C, P = codes.shape[:2]
    out = torch.zeros((C,) + tuple(codes.shape[2:]), dtype=torch.float64)
    c64 = codes.to(torch.float64)
    s64 = scales.to(torch.float64)
    for j in range(C):
        for k in range(int(num_points[j])):
            out[j] += s64[j, k] * c64[j, k]
    return out


def fake_quantize_reference(x: Tensor, act_qparams: Tensor | None) -> Tensor:
    """clamp(round(x / scale) + zp, qmin, qmax) - zp, times scale, in float64
    (round half to even); the identity for act_qparams None."""
    x = x.to(torch.float64)
    if act_qparams is None:
        return x
    scale, zp, qmin, qmax = (float(v) for v in act_qparams.to(torch.float64))
    return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale


def multipoint_linear_reference(
    input: Tensor,
    codes: Tensor,
    scales: Tensor,
    num_points: Tensor,
    bias: Tensor | None = None,
    act_qparams: Tensor | None = None,
) -> Tensor:
    """fq(input) @ W^T + bias in float64; input [..., D], codes [C, P, D] -> [..., C]."""
    W = dequantize_reference(codes, scales, num_points)
    x = fake_quantize_reference(input, act_qparams)
    y = (x.unsqueeze(-2) * W).sum(-1)  # [..., C], no matmul kernel involved
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y


def multipoint_conv2d_reference(
    input: Tensor,
    codes: Tensor,
    scales: Tensor,
    num_points: Tensor,
    bias: Tensor | None,
    act_qparams: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """conv2d(fq(input), W, bias) in float64 as im2col (F.unfold) and a per-group product;
    input [N, C_in, H, W], codes [C_out, P, C_in/groups, kh, kw] -> [N, C_out, OH, OW]."""
    W = dequantize_reference(codes, scales, num_points)  # [C_out, C_in/g, kh, kw]
    x = fake_quantize_reference(input, act_qparams)
    y = _conv2d64(x, W, stride, padding, dilation, groups)
    if bias is not None:
        y = y + bias.to(torch.float64).reshape(1, -1, 1, 1)
    return y


def _conv2d64(
    x: Tensor, W: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int
) -> Tensor:
    """conv2d(x, W) in float64 as im2col (F.unfold) and a per-group product."""
    N, C_in, H, Wd = x.shape
    C_out, cin_g, kh, kw = W.shape
    oh = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (Wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=tuple(dilation), padding=tuple(padding), stride=tuple(stride))
    cols = cols.reshape(N, groups, cin_g * kh * kw, oh * ow)  # channel-major, as W flattens
    Wg = W.reshape(groups, C_out // groups, cin_g * kh * kw)
    return torch.einsum("gok,ngkl->ngol", Wg, cols).reshape(N, C_out, oh, ow)


# Unit roundoff of a float32 accumulation, doubled: tensor cores align the products of one mma and
# may truncate rather than round their sum.
_ACC_ROUNDOFF_FLOAT32 = 2.0**-22


def multipoint_output_bound(
    input: Tensor,
    codes: Tensor,
    scales: Tensor,
    num_points: Tensor,
    bias: Tensor | None = None,
    act_qparams: Tensor | None = None,
    conv: tuple[Sequence[int], Sequence[int], Sequence[int], int] | None = None,
    int8_levels: bool = False,
) -> tuple[Tensor, Tensor]:
    """(reference, bound) for a multipoint layer: the float64 reference of
    ``multipoint_linear_reference`` (``conv`` None) or ``multipoint_conv2d_reference`` (``conv`` =
    (stride, padding, dilation, groups)), and per output element a bound on |out - reference| for a
    kernel that reads ``input`` in its dtype T, rounds the weight terms, fq(x) and the bias to T at
    most once each, accumulates the products in float32 (float64 for float64) in any order and
    blocking, and writes T. Every packed kernel of mpq (gemv, mma, int8, igemm, the depthwise
    kernel, the dense decode before a float32-accumulating GEMM) is such a kernel.

    bound = ((P K + 32) u_acc + 4 u_T) S + s (|W| . B) + eta_T (P |1| . |fq(x)| + 1), plus u_T
    (|reference| + that) for the output's rounding, where
      |W| = sum_p |a_p| |q_p|: every point's terms count on their own (the kernels sum the points
        one by one); S = |W| . |fq(x)| + |b| the magnitudes of every term of the output's sum, and
        with ``int8_levels`` (the int8 kernel, whose levels are v = L - (qmin + 128) and whose
        epilogue adds (qmin + 128 - zp) row_sum back) also s |qmin + 128 - zp| sum_k |W|_k;
      P K + 32: the P K products of the sum plus the partial sums of warps and K splits, the
        epilogue and the bias, each one rounding of u_acc (float32: 2^-22, see
        _ACC_ROUNDOFF_FLOAT32; float64: 2^-52), the classic worst case of a sum in any order;
      4 u_T: the roundings to T of a weight term (the point's scale, then the scaled code), of fq(x)
        and of the bias;
      s (|W| . B): one level of the activation quantizer wherever x / s lies within
        (u_T + 2^-24) max(|x / s|, 1) of a rounding boundary (the kernels divide in float32, then
        round x / s to T, before rounding to an integer), inside the clamp; B is that indicator;
      eta_T = the smallest subnormal of T: each weight term and the output may be subnormal.
    A worst case, not an estimate: a correct kernel never exceeds it, and it is element-wise, so
    one wrong output among millions is seen (a relative L2 norm over all of them is not)."""
    dtype = input.dtype
    finfo = torch.finfo(dtype)
    u = finfo.eps / 2
    u_acc = 2.0**-52 if dtype == torch.float64 else _ACC_ROUNDOFF_FLOAT32
    eta = finfo.tiny * finfo.eps
    C, P = codes.shape[:2]
    inner = tuple(codes.shape[2:])
    active = (torch.arange(P)[None, :] < num_points.to(torch.int64)[:, None]).to(torch.float64)
    coeff = (scales.to(torch.float64).abs() * active).reshape(C, P, *([1] * len(inner)))
    w_abs = (coeff * codes.to(torch.float64).abs()).sum(1)  # [C, *inner]
    x = input.to(torch.float64)

    if conv is None:

        def apply(v: Tensor, w: Tensor) -> Tensor:
            return torch.matmul(v, w.t())

        def per_channel(v: Tensor) -> Tensor:
            return v
    else:
        stride, padding, dilation, groups = conv

        def apply(v: Tensor, w: Tensor) -> Tensor:
            return _conv2d64(v, w, stride, padding, dilation, groups)

        def per_channel(v: Tensor) -> Tensor:
            return v.reshape(1, -1, 1, 1)

    fq = fake_quantize_reference(x, act_qparams)
    spread = apply(fq.abs(), w_abs)
    extra = torch.zeros(())
    if act_qparams is not None:
        s, zp, qmin, qmax = (float(v) for v in act_qparams.to(torch.float64))
        t = x / s
        # the kernel's x / s: divided in float32 (or float64), then rounded to T
        near = (t - torch.floor(t) - 0.5).abs() <= 1.001 * (u + 2.0**-24) * t.abs().clamp_min(1.0)
        inside = (t + zp >= qmin - 1) & (t + zp <= qmax + 1)
        extra = s * apply((near & inside).to(torch.float64), w_abs)
        if int8_levels:
            spread = spread + per_channel(s * abs(qmin + 128 - zp) * w_abs.reshape(C, -1).sum(1))
    if bias is not None:
        spread = spread + per_channel(bias.to(torch.float64).abs())
    K = w_abs[0].numel() if C else 0
    bound = ((P * K + 32) * u_acc + 4 * u) * spread + extra + eta * (P * apply(fq.abs(), torch.ones_like(w_abs)) + 1)
    if conv is None:
        reference = multipoint_linear_reference(input, codes, scales, num_points, bias, act_qparams)
    else:
        reference = multipoint_conv2d_reference(input, codes, scales, num_points, bias, act_qparams, *conv)
    return reference, bound + u * (reference.abs() + bound)


def assert_within_bound(got: Tensor, reference: Tensor, bound: Tensor, what: str = "output") -> None:
    """Every element of ``got`` within ``bound`` of ``reference`` (``multipoint_output_bound``);
    the message names the worst element."""
    err = (got.detach().to("cpu", torch.float64) - reference).abs()
    assert err.shape == bound.shape, (tuple(err.shape), tuple(bound.shape))
    if err.numel() == 0:
        return
    ratio = err / bound
    worst = tuple(
        int(i) for i in torch.unravel_index(torch.argmax(torch.nan_to_num(ratio, nan=float("inf"))), ratio.shape)
    )
    assert bool((err <= bound).all()), (
        f"{what}: element {worst} is {float(got[worst]):.9g}, the float64 reference {float(reference[worst]):.9g}: "
        f"|difference| {float(err[worst]):.3e} > bound {float(bound[worst]):.3e} ({float(ratio[worst]):.3g}x)"
    )


def relative_l2(w: Tensor, codes: Tensor, scales: Tensor, points: int) -> float:
    """||w - sum_{k < points} scales[k] codes[k]|| / ||w|| for one row w[D], codes [P, D]."""
    w = w.to(torch.float64)
    approx = (scales[:points].to(torch.float64).unsqueeze(1) * codes[:points].to(torch.float64)).sum(0)
    return float(torch.linalg.vector_norm(w - approx) / torch.linalg.vector_norm(w))


__all__: list[str] = [
    "grid_max",
    "greedy_step_exact",
    "greedy_step_exact_batched",
    "greedy_step_bruteforce",
    "greedy_step_enumerate",
    "step_sq_error",
    "fit_multipoint_reference",
    "dequantize_reference",
    "fake_quantize_reference",
    "multipoint_linear_reference",
    "multipoint_conv2d_reference",
    "multipoint_output_bound",
    "assert_within_bound",
    "relative_l2",
]
