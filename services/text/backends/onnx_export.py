"""The ONNX copy of a sentence-transformers model: exported locally from its weights, once, and kept on disk.

The whole model (transformer, pooling, normalisation) is exported with torch.onnx from the weights already
loaded (no network), then, for BERT models, ONNX Runtime's transformer optimiser fuses each layer's
attention, GELU and layer norms into single CPU kernels. The file is kept under
`<cache_dir>/onnx/<weights' hash>-<EXPORT_FORMAT>/`, so new weights or a changed export get a file of
their own, and is written under a temporary name then renamed, so a worker never loads half a file.
The int8 variant is that graph with its weights quantised dynamically (per-channel, int8 MatMuls).
"""

import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger("text.onnx")

# Part of the cache key: change it whenever the exported graph would change for the same weights.
EXPORT_FORMAT = "st1"
OPSET = 17
OUTPUT = "sentence_embedding"


def onnx_model(
    model: "SentenceTransformer", version: str, input_names: list[str], cache_dir: Path, int8: bool
) -> Path:
    """The path of the model's ONNX file (fp32, or int8 if asked), exported now if it is not there yet."""
    folder = cache_dir.expanduser() / "onnx" / f"{version}-{EXPORT_FORMAT}"
    fp32 = folder / "model.onnx"
    if not fp32.is_file():
        log.info("exporting %s to ONNX (once; kept in %s)", version, folder)
        _written(fp32, lambda tmp: _export(model, input_names, tmp))
    if not int8:
        return fp32
    quantised = folder / "model-int8.onnx"
    if not quantised.is_file():
        log.info("quantising %s to int8 (once; kept in %s)", version, folder)
        _written(quantised, lambda tmp: _quantise(fp32, tmp))
    return quantised


def _written(target: Path, write: Callable[[Path], None]) -> None:
    """Have `write` make the file in a temporary folder beside `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".partial-") as scratch:
        tmp = Path(scratch) / target.name
        write(tmp)
        os.replace(tmp, target)


def _export(model: "SentenceTransformer", input_names: list[str], path: Path) -> None:
    transformer: Any = model[0].auto_model  # a transformers PreTrainedModel
    config = transformer.config
    # The eager attention exports as the MatMul/Softmax pattern that the optimiser fuses; SDPA does not.
    previous = config._attn_implementation
    transformer.set_attn_implementation("eager")
    try:
        wrapper = _Whole(model, input_names).eval()
        example = tuple(
            torch.full((2, 8), int(name != "token_type_ids"), dtype=torch.int64) for name in input_names
        )
        example[input_names.index("attention_mask")][1, 5:] = 0  # padding, so the mask is in the graph
        axes = {name: {0: "batch", 1: "tokens"} for name in input_names}
        raw = path.with_suffix(".raw.onnx")
        # The tracer warns that a few shape checks become constants (mask length equals token count, not
        # causal): true of every batch the worker builds; the legacy exporter warns that it is legacy (the
        # new one needs onnxscript, which is not installed).
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                example,
                str(raw),
                input_names=input_names,
                output_names=[OUTPUT],
                dynamic_axes={**axes, OUTPUT: {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
    finally:
        transformer.set_attn_implementation(previous)
    if config.model_type != "bert":
        os.replace(raw, path)  # ONNX Runtime's own graph optimisations still apply when it loads
        return
    from onnxruntime.transformers.optimizer import optimize_model

    optimised = optimize_model(
        str(raw),
        model_type="bert",
        num_heads=int(config.num_attention_heads),
        hidden_size=int(config.hidden_size),
        opt_level=0,
    )
    log.info("fused operators: %s", optimised.get_fused_operator_statistics())
    optimised.save_model_to_file(str(path))


def _quantise(fp32: Path, path: Path) -> None:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The fused operators are outside ONNX's shape inference: their outputs are float32.
    quantize_dynamic(
        str(fp32),
        str(path),
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": TensorProto.FLOAT},
    )


class _Whole(torch.nn.Module):
    """The sentence-transformers pipeline as one module of positional tensors (what torch.onnx traces)."""

    def __init__(self, model: "SentenceTransformer", input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        features = dict(zip(self.input_names, tensors, strict=True))
        return self.model(features)[OUTPUT]
