"""BatchNorm re-estimation after quantization (the "BN tuning" of AdaQuant: Hubara et al., "Improving
Post Training Neural Quantization: Layer-wise Calibration and Integer Programming", section 3;
also Nagel et al., "A White Paper on Neural Network Quantization", 2021, section 4.4).

Quantizing the weights shifts the mean and variance of every convolution's output, so the
BatchNorm statistics gathered on the float network no longer normalise it. Re-estimation
re-collects them on the quantized network (calibration data) and folds them again.

mpq folds each BatchNorm into its convolution before quantizing (``mpq.fold``), which keeps the
original BN (running mean mu, variance sigma^2 - eps, gamma, beta). For a folded convolution whose
quantized output (bias included) is z_q, the pre-BN output with quantized weights is
y_q = (sigma / gamma) (z_q - beta) + mu. With mu', var' the mean and variance of y_q on the
calibration data and sigma' = sqrt(var' + eps), the re-estimated BN gives
gamma (y_q - mu') / sigma' + beta, which is, in terms of z_q's own mean m and variance v,

    a (z_q - m) + beta,   a = sigma / sigma' = |gamma| / sqrt(v + eps gamma^2 / sigma^2),

a per-channel affine map of z_q: it is applied by multiplying the channel's point scales by a
(a > 0, so the codes stay) and setting the bias to a (b_q - m) + beta. It composes with every
method: multipoint layers, companded layers and float convolutions (kept in float, or ignored)
are corrected alike. A channel with gamma = 0 (a constant output) is left as it is.

Reference statistics (``QuantConfig.bn_reference``). The paper's re-estimation (``"running"``)
replaces the running statistics, gathered on the training set, by statistics of the calibration
data: in z's terms it maps z_q to mean beta and variance gamma^2 (sigma^2 - eps) / sigma^2, the
float layer's output statistics *on the training data*. With a small or unlike calibration set
that change costs accuracy by itself: on EfficientNet-Lite0 with 16 crops of the bundled photos
it takes 8-bit RTN from KL 0.013 to 1.16. ``"float"`` maps z_q instead to the mean and variance
of the float layer's output on the same calibration batches (one extra float pass), so that only
the shift caused by quantization is removed: a = sqrt((v_fp + e) / (v + e)), c = m_fp - a m
(e = eps gamma^2 / sigma^2). It is Banner et al.'s bias and variance correction, measured through
the quantized network; with the training set as the calibration data both coincide.

How: one pass over the calibration batches in "train mode", as the paper does: every folded
convolution normalises its output with the statistics of the current batch before passing it on,
so each layer sees its upstream layers already re-estimated (network order), and accumulates its
statistics; the stored ones are pooled over all the batches (mean and variance of every output
value of every batch, like ``momentum=None`` but with the between-batch spread included). With one
calibration batch this equals re-estimating the layers one at a time in network order with the
final statistics; with several, downstream layers see batch-normalised inputs during the pass.
``mpq.quantize`` uses the calibration batches it keeps in memory (the first
``max(1, config.sensitivity_batches)``), after bias correction and before the simulation check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from mpq.distributed import agree, gather_objects, world
from mpq.fold import set_submodule
from mpq.nn.modules import MultipointLayer

logger = logging.getLogger("mpq")

__all__ = ["reestimate_batchnorm", "bn_affine", "output_moments"]

Moments = tuple[torch.Tensor, torch.Tensor]  # per-channel mean and variance, float64 [C]


def _beta(bn: nn.Module, device: torch.device) -> torch.Tensor:
    if bn.bias is not None:
        return bn.bias.detach().double().to(device)
    return torch.zeros(bn.running_mean.shape, dtype=torch.float64, device=device)


def bn_affine(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor, reference: Moments | None = None) -> Moments:
    """(a, c) with z_new = a z_q + c, per channel (float64), from the folded ``bn`` and the mean /
    variance of the folded layer's quantized output z_q: a = sqrt((v_ref + e) / (v + e)),
    c = m_ref - a m with e = eps gamma^2 / sigma^2 (BN's eps in z's units). The reference
    (m_ref, v_ref) is the running statistics' (beta, gamma^2 (sigma^2 - eps) / sigma^2), which
    makes a = sigma / sigma', c = beta - a m (the paper's re-estimation), or ``reference``."""
    sigma2 = bn.running_var.detach().double().to(mean.device) + bn.eps
    gamma = bn.weight.detach().double().to(mean.device) if bn.weight is not None else torch.ones_like(sigma2)
    e = bn.eps * gamma**2 / sigma2
    if reference is None:
        m_ref, v_ref = _beta(bn, mean.device), gamma**2 * (sigma2 - bn.eps) / sigma2
    else:
        m_ref, v_ref = (r.double().to(mean.device) for r in reference)
    a = torch.sqrt((v_ref.clamp_min(0) + e) / (var.clamp_min(0) + e).clamp_min(1e-300))
    dead = gamma == 0  # a constant channel: left as it is
    a = torch.where(dead, torch.ones_like(a), a)
    c = torch.where(dead, torch.zeros_like(a), m_ref - a * mean)
    return a, c


class _Moments:
    """Pooled per-channel mean and variance of a layer's outputs [N, C, ...] over batches, summed
    around the first batch's channel means (less cancellation in E[z^2] - E[z]^2)."""

    def __init__(self) -> None:
        self.shift = self.s1 = self.s2 = None
        self.n = 0

    def add(self, out: torch.Tensor) -> Moments:
        """Accumulate ``out``; returns its own (this batch's) mean and variance."""
        z = out.detach().double().transpose(0, 1).reshape(out.shape[1], -1)
        if self.shift is None:
            self.shift = z.mean(1)
        z = z - self.shift[:, None]
        s1, s2 = z.sum(1), (z * z).sum(1)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += z.shape[1]
        m = s1 / z.shape[1]
        return m + self.shift, (z - m[:, None]).pow(2).mean(1)

    def merge_ranks(self, what: str) -> None:
        """Every rank's sums, moved to the first contributing rank's shift and added in rank
        order (``mpq.distributed``): all ranks then hold the same pooled moments."""
        every = [e for e in gather_objects((self.shift, self.s1, self.s2, self.n), what) if e[3] > 0]
        if not every:
            return
        shift = every[0][0].to(torch.float64)
        s1 = s2 = None
        for a, r1, r2, n in every:
            d = a.to(shift) - shift  # z - shift = (z - a) + d
            t1 = r1.to(shift) + n * d
            t2 = r2.to(shift) + 2 * d * r1.to(shift) + n * d * d
            s1, s2 = (t1, t2) if s1 is None else (s1 + t1, s2 + t2)
        device = self.shift.device if self.shift is not None else shift.device
        self.shift, self.s1, self.s2, self.n = shift.to(device), s1.to(device), s2.to(device), sum(e[3] for e in every)

    def result(self) -> Moments:
        m = self.s1 / self.n
        return m + self.shift, (self.s2 / self.n - m * m).clamp_min(0)


def _channel_view(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return t.to(out.dtype).view([1, -1] + [1] * (out.dim() - 2))


def _pass(
    model: nn.Module,
    names: list[str],
    batches: Iterable[torch.Tensor],
    transform: Callable[[str, Moments, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, _Moments]:
    """Run ``batches`` through ``model`` (eval mode, no grad), accumulating the per-channel output
    moments of the named modules; ``transform(name, batch moments, output)`` may replace each
    output on the way."""
    acc = {n: _Moments() for n in names}
    modules = dict(model.named_modules())

    def make_hook(name: str):
        def hook(module, args, out):
            moments = acc[name].add(out)
            return transform(name, moments, out) if transform is not None else None

        return hook

    handles = [modules[n].register_forward_hook(make_hook(n)) for n in names]
    was_training = model.training
    model.eval()

    def run() -> None:
        with torch.no_grad():
            for x in batches:
                model(x)

    try:
        agree("BatchNorm re-estimation", run)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if world()[1] > 1:
        for n in names:
            acc[n].merge_ranks(f"BatchNorm statistics of layer {n!r}")
    return acc


def output_moments(model: nn.Module, names: list[str], batches: Iterable[torch.Tensor]) -> dict[str, Moments]:
    """Mean and variance per output channel of the named modules' outputs over ``batches``."""
    return {n: a.result() for n, a in _pass(model, names, batches).items() if a.n}


def _apply(module: nn.Module, a: torch.Tensor, c: torch.Tensor) -> None:
    """z -> a z + c on a layer's output: scale its weight (a quantized layer's ``scale_channels_``),
    bias -> a b + c."""
    with torch.no_grad():
        if isinstance(module, MultipointLayer):
            module.scale_channels_(a)
            dtype = torch.float32  # the quantized layers' bias
        elif isinstance(module, nn.Conv2d):
            module.weight.mul_(a.to(module.weight).view(-1, 1, 1, 1))
            dtype = module.weight.dtype
        else:
            raise TypeError(f"mpq.reestimate_batchnorm: cannot rescale a {type(module).__name__}")
        b = module.bias.double() if module.bias is not None else torch.zeros_like(a)
        new = (a.to(b) * b + c.to(b)).to(dtype)
        if module.bias is None:
            if isinstance(module, nn.Conv2d):
                module.bias = nn.Parameter(new, requires_grad=module.weight.requires_grad)
            else:
                module.bias = new
        else:
            module.bias.copy_(new)


def reestimate_batchnorm(
    qmodel: nn.Module,
    originals: dict[str, nn.Module],
    batches: Iterable[torch.Tensor],
    float_modules: dict[str, nn.Module] | None = None,
) -> dict[str, Moments]:
    """Re-estimate the BatchNorms folded into ``qmodel``'s convolutions, in place.

    Args:
        qmodel: the quantized model (multipoint / companded layers, or float convolutions).
        originals: conv name -> the BatchNorm2d folded into it (``fold_batchnorm(..., originals=)``).
        batches: calibration inputs (iterated twice when ``float_modules`` is given).
        float_modules: None for the paper's re-estimation (reference: the running statistics);
            else name -> the float (BN-folded) module each quantized layer replaced: a first pass
            with them swapped back in measures the float outputs' statistics, the reference.

    Returns:
        conv name -> (a, c) float64 [C]: the affine change z -> a z + c applied to its output.
    """
    modules = dict(qmodel.named_modules())
    names = [n for n in originals if n in modules]
    batches = list(batches)
    reference: dict[str, Moments] = {}
    if float_modules:
        swapped = {n: modules[n] for n in names if n in float_modules}
        try:
            for n in swapped:
                set_submodule(qmodel, n, float_modules[n])
            reference = output_moments(qmodel, names, batches)
        finally:
            for n, m in swapped.items():
                set_submodule(qmodel, n, m)

    def normalise(
        name: str, moments: Moments, out: torch.Tensor
    ) -> torch.Tensor:  # train mode: this batch's statistics
        a, c = bn_affine(originals[name], *moments, reference.get(name))
        return out * _channel_view(a, out) + _channel_view(c, out)

    acc = _pass(qmodel, names, batches, normalise)
    changes: dict[str, Moments] = {}
    for name in names:
        if acc[name].n == 0:
            logger.warning("mpq: layer %r was not called during BatchNorm re-estimation; left as it was", name)
            continue
        a, c = bn_affine(originals[name], *acc[name].result(), reference.get(name))
        _apply(modules[name], a, c)
        changes[name] = (a.cpu(), c.cpu())
    logger.info("mpq: re-estimated %d BatchNorms on the quantized model", len(changes))
    return changes
