"""Bias correction (Nagel, van Baalen, Blankevoort, Welling, "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019, section 4.2; Banner, Nahshan, Soudry, "Post training
4-bit quantization of convolutional networks for rapid-deployment", NeurIPS 2019, section 4).

Quantizing W shifts the expected output of channel j by E[(W_q - W)_j x] = (W_q - W)_j mu, with mu
the mean of the layer's input (its im2col patches for a convolution). Adding (W - W_q)_j mu to the
bias removes that shift. mpq measures mu on the calibration data, through the full-precision model
(the "empirical" variant; Nagel et al.'s analytic variant derives it from BatchNorm statistics).
It composes with every method (``QuantConfig.bias_correction``): ``mpq.quantize`` applies it to
the weight each channel finally keeps (after the multipoint allocation).
"""

from __future__ import annotations

import torch

__all__ = ["corrected_bias"]


def corrected_bias(
    weight: torch.Tensor, quantized: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor
) -> torch.Tensor:
    """The bias that keeps each output channel's calibration mean.

    Args:
        weight (Tensor[C, D]): full-precision weight (BatchNorm folded).
        quantized (Tensor[C, D]): the weight the quantized layer applies.
        bias (Tensor[C] or None): the bias before correction (None: zero).
        mean (Tensor[G, D]): mean input row of each of the G groups (rows of ``weight`` are split
            into G consecutive groups, a grouped convolution's output channels).

    Returns:
        float32 [C]: bias + (W - W_q) mu.
    """
    C, D = weight.shape
    G = mean.shape[0]
    if C % G or mean.shape[1] != D or quantized.shape != weight.shape:
        raise ValueError(
            f"mpq.methods.bias_correction: expected weight and quantized [C, D] and mean [G, D] with G dividing C, "
            f"got {tuple(weight.shape)}, {tuple(quantized.shape)}, {tuple(mean.shape)}"
        )
    delta = (weight.double().cpu() - quantized.double().cpu()).reshape(G, C // G, D)
    shift = torch.einsum("grd,gd->gr", delta, mean.double().cpu()).reshape(C)
    base = torch.zeros(C, dtype=torch.float64) if bias is None else bias.detach().double().cpu()
    return (base + shift).float()
