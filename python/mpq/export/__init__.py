"""Export of quantized models to other runtimes' formats (ONNX with QDQ operators, OpenVINO)."""

from mpq.export.onnx import OnnxMultipointLayer, export_onnx, export_openvino, exportable, int8_rows, requantized_rows

__all__ = ["export_onnx", "export_openvino", "exportable", "int8_rows", "requantized_rows", "OnnxMultipointLayer"]
