"""``python -m mpq``: quantize, evaluate and compare models from the shell.

    python -m mpq quantize --model torchvision:resnet18 --calib ~/imagenet/train --config W4A8 --out r18.mpq.safetensors
    python -m mpq eval     --model torchvision:resnet18 --data ~/imagenet/val --quantized r18.mpq.safetensors
    python -m mpq sweep    --model efficientnet_lite0 --calib CAL --data VAL --avg-bits 4,4.25,4.5,5 --methods rtn,multipoint
    python -m mpq demo     # EfficientNet-Lite0: FP32 vs RTN W4A8 vs multipoint W4A8 on bundled photos (offline)
    python -m mpq info     # build facts: versions, CUDA kernels and architectures

- ``commands``: argument parsing, the ``cmd_*`` functions and ``main`` (what ``mpq.__main__`` runs);
- ``models``: ``load_model`` (torchvision's zoo, the bundled EfficientNet-Lite0, saved files) and preprocessing;
- ``images``: image folders, labelled ImageFolder layouts, calibration batches, ``EvalData``;
- ``evaluate``: ``evaluate``, ``quantize_and_evaluate``, ``versions``;
- ``configs``: ``make_config`` (a preset or a JSON file, with overrides), ``sweep_configs``;
- ``errors``: ``UserError``, a user's mistake: one line on stderr, exit status 2.

``examples/imagenet/eval.py`` uses ``models``, ``images``, ``evaluate`` and ``configs`` as a library.
``import mpq`` does not import this package.
"""

from mpq.cli.commands import build_parser, main
from mpq.cli.errors import UserError

__all__ = ["UserError", "build_parser", "main"]
