"""``python -m mpq``: the command line (``mpq.cli``, ``main`` in ``mpq.cli.commands``).

python -m mpq quantize --model MODEL --calib DIR --config W4A8 --out PATH
python -m mpq eval     --model MODEL --data DIR [--quantized PATH]
python -m mpq sweep    --model MODEL --calib DIR --data DIR --avg-bits 4,4.5,5 --methods rtn,multipoint
python -m mpq demo     # EfficientNet-Lite0: FP32 vs RTN W4A8 vs multipoint W4A8 on real photos
python -m mpq info     # build facts: versions, CUDA kernels and architectures
"""

import sys

from mpq.cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
