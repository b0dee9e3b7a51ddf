"""A read-and-rewrite view of an ONNX graph: who produces and who consumes each tensor, its constants, and the
clean-up a rewrite needs afterwards (dead nodes and initializers dropped, nodes back in topological order)."""

from __future__ import annotations

import numpy as np
from onnx import ModelProto, helper, numpy_helper

# ONNX Runtime's contrib ops (QLinearAdd, QLinearMul, QLinearSigmoid, QLinearConcat, channels-last QLinearConv,
# NhwcMaxPool): the int8 graph is written for ONNX Runtime.
MICROSOFT = "com.microsoft"


class GraphIndex:
    """Producers, consumers and constant initializers of `model`'s graph, as they are when it is built."""

    def __init__(self, model: ModelProto) -> None:
        self.graph = model.graph
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.producers = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in self.graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        tensor = self.initializers.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def only_consumer(self, name: str):
        """The one node reading `name`, or None where several (or none, or the graph's output) read it."""
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.graph_outputs else None

    def producer(self, name: str, op_type: str):
        node = self.producers.get(name)
        return node if node is not None and node.op_type == op_type else None

    def add_initializer(self, stem: str, array: np.ndarray) -> str:
        """A new initializer under a name not taken yet (constants shared with other nodes stay as they were)."""
        name = stem
        while name in self.initializers:
            name += "_"
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = tensor
        return name


def import_microsoft_ops(model: ModelProto) -> None:
    """Declare the com.microsoft domain in the model's opset imports (once)."""
    if not any(entry.domain == MICROSOFT for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MICROSOFT, 1))


def replace_nodes(graph, nodes: list) -> None:
    """Make `nodes` the graph's node list."""
    copies = []
    for node in nodes:  # detached copies: clearing the repeated field would invalidate the originals
        copy = type(node)()
        copy.CopyFrom(node)
        copies.append(copy)
    del graph.node[:]
    graph.node.extend(copies)


def drop_dead_nodes(model: ModelProto) -> None:
    """Remove nodes none of whose outputs is read (repeatedly), then initializers no node reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    nodes = list(graph.node)
    while True:
        read = {name for node in nodes for name in node.input} | outputs
        alive = [node for node in nodes if any(out in read for out in node.output)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    replace_nodes(graph, nodes)
    keep = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def sort_topologically(model: ModelProto) -> None:
    """Put the nodes in an order where each runs after the producers of its inputs (ONNX requires it), keeping
    the original order wherever it already is one."""
    graph = model.graph
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            raise RuntimeError("the rewritten graph has a cycle or an input nothing produces; this is a bug in "
                               "qreg's exporter")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        taken = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in taken]
    replace_nodes(graph, ordered)
