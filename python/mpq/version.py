"""mpq's version, written once: the package (``mpq.__version__``), its metadata (pyproject.toml
reads it) and the C++ library (CMakeLists.txt reads it into ``mpq::_build_info``)."""

__version__ = "0.1.0"
