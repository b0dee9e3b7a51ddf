"""`compile: true` as users run it (quantize, compile, train): one graph for training, one recompile for eval.

Dynamo's own backend interface counts the graphs: every compilation of a frame (a first compile, a recompile
after a failed guard, each piece after a graph break) calls the backend once. The backend here is dynamo's
"eager" (no Inductor code generation), since only the graph count is under test.
"""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import run_cli


# PACT's traceable path in the slow tier (35 s each): one compiled method keeps the count in the fast suite.
@pytest.mark.parametrize("method", ["lsq", pytest.param("pact_dorefa", marks=pytest.mark.slow)])
def test_compiled_fit_compiles_one_training_graph_and_at_most_one_recompile(method, digits_fast_args,
                                                                             monkeypatch):
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))
    status = run_cli("fit", *digits_fast_args, "--model.init_args.compile", "true", "--trainer.limit_train_batches",
                     "4", "--quantization.method", method, "--quantization.weight_bits", "4")
    torch._dynamo.reset()
    assert status == 0
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert not breaks, f"graph breaks: {breaks}"
    # training (train mode) and evaluation (eval mode: validation and test, whatever their batch sizes)
    assert 1 <= len(graphs) <= 2, f"{len(graphs)} graphs compiled"


def test_a_restored_pact_network_evaluates_compiled_without_a_training_batch():
    """`test` from a checkpoint never trains, so PACT's first-batch check never runs there: a network whose
    state was loaded counts as checked, and its evaluation is compiled at once instead of running eagerly."""
    from lightning_modules.models import build_model
    from quantizers import QuantSpec, quantize_model
    from quantizers.compiling import compile_after_initialization

    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    spec = QuantSpec(method="pact_dorefa", weight_bits=4)
    trained = quantize_model(build_model("resnet20", 10), spec)
    net = quantize_model(build_model("resnet20", 10), spec)
    net.load_state_dict(trained.state_dict())
    net.eval()
    torch._dynamo.reset()
    compile_after_initialization(net, backend=counting_backend)
    with torch.no_grad():
        net(torch.rand(4, 3, 32, 32))
    torch._dynamo.reset()
    assert len(graphs) == 1, "evaluation of a restored PACT network ran eagerly"
