"""Which operations of a graph INT8 leaves in fp32 (ONNX node names, for ONNX Runtime's and NNCF's quantisers).

- The head: everything from the last global pooling on (the 1x1 reduction, the BNNeck, flip averaging, the
  output). The template itself must not be 8-bit: 256 levels per tensor cannot keep the small differences
  between people, and the BNNeck's per-dimension scaling magnifies any error that reaches it.
- The first stage of the extractor: every operation whose output is still at least 1/4 of the input's height.
  Measured on the strong recipe's MobileNetV2 (docs/DEPLOY.md, "CPU backends"): quantised, blocks 0-3 took the
  templates' cosine with fp32 from 0.98 down to 0.75; left in fp32 they cost no measurable time at batch 1.
  Keeping the first and the last layers in higher precision is the field's usual mixed-precision reading.
- The mask generator's output: what follows its last convolution (the sigmoid, the resize).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

FIRST_STAGE_FRACTION = 4  # operations with output height >= input height / this stay fp32 (extractor only)
POOLING_OPS = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean")


def _descendants(nodes: list, start: Iterable) -> set[str]:
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: set[str] = set()
    todo = list(start)
    while todo:
        node = todo.pop()
        if node.name in found:
            continue
        found.add(node.name)
        for output in node.output:
            todo += consumers.get(output, [])
    return found


def fp32_nodes(graph_path: Path, role: str) -> list[str]:
    """The names of the nodes of the ONNX graph at ``graph_path`` that INT8 leaves in fp32, for ``role``."""
    import onnx
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(graph_path)))
    nodes = list(model.graph.node)
    if role != "extractor":
        convs = [n for n in nodes if n.op_type == "Conv"]
        return sorted(_descendants(nodes, convs[-1:]) - {c.name for c in convs[-1:]})
    pools = [n for n in nodes if n.op_type in POOLING_OPS]
    keep = _descendants(nodes, pools[-1:])
    height = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    shapes = {v.name: v.type.tensor_type.shape.dim for v in model.graph.value_info}
    for node in nodes:
        dims = shapes.get(node.output[0]) if node.output else None
        if height and dims is not None and len(dims) == 4 and dims[2].dim_value * FIRST_STAGE_FRACTION >= height:
            keep.add(node.name)
    return sorted(keep)
