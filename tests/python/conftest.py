import pytest
import torch

import mpq  # noqa: F401  (loads the ops library)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_intraop_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``).
    NB: on a busy 2-core machine OpenMP's spinning threads make the many small ops of calibration
    ~10x slower; results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def lite0():
    """(EfficientNet-Lite0, demo data with 32 calibration crops, FP32 logits on the eval images)."""
    from mpq.examples import assets
    from mpq.examples.demo import load_demo_data

    try:
        model = assets.load_efficientnet_lite0()
        data = load_demo_data(calib_images=32, batch_size=16)
    except assets.AssetMissing as e:  # pragma: no cover
        pytest.skip(f"offline assets missing: {e}")
    with torch.no_grad():
        ref = model(data.eval_images)
    return model, data, ref


@pytest.fixture(scope="module")
def photo_folders(tmp_path_factory):
    """calib/: the bundled unlabelled photos; val/: the 20 labelled ImageNet photos, one folder
    per class named n{index:08d} (read with --class-map index)."""
    from mpq.examples import assets

    root = tmp_path_factory.mktemp("images")
    (root / "calib").mkdir()
    for p in assets.unlabelled_photos():
        (root / "calib" / p.name).symlink_to(p)
    for p, label in assets.labelled_imagenet_photos():
        d = root / "val" / f"n{label:08d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / p.name).symlink_to(p)
    return root


def pytest_report_header(config):
    return f"mpq build: {mpq.build_info()}"
