"""Deployment: the runtime-friendly graph of a compact model, its export to ONNX and
OpenVINO (checked against PyTorch), and int8 quantization."""
from .export import (
    FORMATS,
    ExportCheck,
    ExportError,
    export_and_check,
    export_onnx,
    export_openvino,
    export_torchscript,
    formats_for,
    require,
    require_onnx,
)
from .graph import DeployError, DeployModel, build_deploy_model

__all__ = [
    "FORMATS",
    "DeployError",
    "DeployModel",
    "ExportCheck",
    "ExportError",
    "build_deploy_model",
    "export_and_check",
    "export_onnx",
    "export_openvino",
    "export_torchscript",
    "formats_for",
    "require",
    "require_onnx",
]
